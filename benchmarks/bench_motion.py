"""Cost of the motion step of ``--refine lr`` (xvr_batch.motion.motion_fuse) on random tensors of one batch.

    python benchmarks/bench_motion.py                                 # CPU, 12 frames at LR 100x256 (HR 400x1024)
    python benchmarks/bench_motion.py --device cuda --frames 48

Each run times the step twice: with the plain 4x4 binning, and through a 5x5 LR transfer kernel (step ``psf``,
xvr_batch.lrpsf), which adds one dilated convolution of each shifted key and of the two gate candidates.

The step searches (2 RADIUS s + 1) ** 2 whole-HR-pixel displacements of both key frames for every LR pixel (289 at
RADIUS 2, s = 4); the search's cost does not depend on the content, so random tensors time it as well as real frames.
10 % of the LR pixels are marked unmeasured.
"""

from __future__ import annotations

import statistics
import time

import torch

from _refine_batch import parse_batch
from xvr_batch.motion import RADIUS, motion_fuse


def main() -> None:
    bt = parse_batch(__doc__, repeat=5)
    a, dev, rand, sync = bt.args, bt.device, bt.rand, bt.sync
    n, (h, w), s = a.frames, a.lr, a.scale
    out = rand(n, h * s, w * s) * 0.8 + 0.1
    lr = torch.nn.functional.avg_pool2d(out[:, None], s)[:, 0] + 0.01 * rand(n, h, w)
    ok = rand(n, h, w) > 0.1
    keys = rand(n, 2, h * s, w * s) * 0.8 + 0.1
    key_lr = torch.nn.functional.avg_pool2d(keys.reshape(2 * n, 1, h * s, w * s), s).view(n, 2, h, w)
    key_ok = rand(n, 2, h, w) > 0.1
    wt = torch.linspace(0, 1, n, dtype=torch.float64, device=dev)

    kernel = torch.full((5, 5), 0.02, dtype=out.dtype, device=dev)
    kernel[2, 2] = 1.0 - 24 * 0.02
    print(f"{a.device}: {n} frames, LR {h}x{w}, HR {h * s}x{w * s}, RADIUS {RADIUS} "
          f"({(2 * RADIUS * s + 1) ** 2} displacements), {torch.get_num_threads()} threads")
    for name, k in (("motion", None), ("motion + psf kernel", kernel)):
        motion_fuse(out, lr, ok, keys, key_lr, key_ok, wt, 0.01, s, 0.1, 0.9, kernel=k)
        sync()
        times = []
        for _ in range(a.repeat):
            t = time.perf_counter()
            motion_fuse(out, lr, ok, keys, key_lr, key_ok, wt, 0.01, s, 0.1, 0.9, kernel=k)
            sync()
            times.append(time.perf_counter() - t)
        print(f"  {name:<19} median {1e3 * statistics.median(times):8.1f} ms per batch "
              f"({1e3 * statistics.median(times) / n:.1f} ms per frame)")


if __name__ == "__main__":
    main()
