"""Cost of the beam step of ``--refine lr`` (xvr_batch.refine.beam_gains / apply_gains), with and without its
blind gain, on random tensors of one batch.

    python benchmarks/bench_beam.py                                   # CPU, 12 frames at LR 100x256 (HR 400x1024)
    python benchmarks/bench_beam.py --device cuda --frames 48

"beam": the frame gains and their application (what ``UnitRunner._beam_dev`` did before the blind gain);
"beam+blind": the same plus the key blend's gain under the unmeasured LR pixels (``beam_gains(..., blind=True)``:
two more medians, and the mask's upsampling), as ``UnitRunner._beam_dev`` runs it now. 30 % of the LR pixels are marked unmeasured.
"""

from __future__ import annotations

import statistics
import time

import torch

from _refine_batch import parse_batch
from xvr_batch.refine import apply_gains, beam_gains


def main() -> None:
    bt = parse_batch(__doc__, repeat=7)
    a, dev, rand, sync = bt.args, bt.device, bt.rand, bt.sync
    n, (h, w), s = a.frames, a.lr, a.scale
    out = rand(1, n, h * s, w * s) * 0.8 + 0.1
    out_b = torch.nn.functional.avg_pool2d(out.reshape(n, 1, h * s, w * s), s).view(n, h, w)
    lr = out_b * 1.02 + 0.01 * rand(n, h, w)
    ok = rand(n, h, w) > 0.3
    key_b = rand(n, 2, h, w) * 0.8 + 0.1
    key_lr = key_b + 0.01 * rand(n, 2, h, w)
    key_ok = rand(n, 2, h, w) > 0.3
    wt = torch.linspace(0, 1, n, dtype=torch.float64, device=dev)

    def beam() -> torch.Tensor:
        gains = beam_gains(out_b, lr, ok, key_b, key_lr, key_ok, wt)
        return apply_gains(out, gains.view(1, n), 0.1, 0.9)

    def blind() -> torch.Tensor:
        gains, bg = beam_gains(out_b, lr, ok, key_b, key_lr, key_ok, wt, blind=True)
        return apply_gains(out, gains.view(1, n), 0.1, 0.9, bg.view(1, n), ~ok.view(1, n, h, w))

    times: dict[str, list[float]] = {"beam": [], "beam+blind": []}
    for fn in (beam, blind):
        fn()
    sync()
    for _ in range(a.repeat):  # alternating, so both see the same machine load
        for name, fn in (("beam", beam), ("beam+blind", blind)):
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    print(f"{a.device}: {n} frames, LR {h}x{w}, HR {h * s}x{w * s}, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"  {name:<11} median {1e3 * statistics.median(ts):7.1f} ms per batch")


if __name__ == "__main__":
    main()
