"""Cost of the per-frame LR consistency (xvr_batch.consistency) inside ``UnitRunner.run_unit``.

    python benchmarks/bench_consistency.py                       # CPU, shipped lite weights, HR 128x160
    python benchmarks/bench_consistency.py --device cuda --hr 400 1024 --frames 256

One synthetic archive, one unit; ``run_unit`` is timed with the metric on and off (alternating, after a warm-up),
and the metric's own stage (``UnitRunner.stats["consistency"]``: avg_pool2d, the residual, the reductions and, on
CUDA, the launch of its copy back) and the op alone on one batch's tensors are reported per batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xvr_batch import synth
from xvr_batch.pipeline import Options, UnitRunner, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--hr", type=int, nargs=2, default=(128, 160))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="Work folder [a temporary one].")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(a.dir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        arc = d / "bench.h5"
        synth.synthesize(str(arc), n_frames=a.frames, hr_shape=tuple(a.hr), stride=12, seed=5)
        job = prepare(Options(archive=str(arc), output=str(d / "out.h5"), device=a.device, unit_frames=a.frames,
                              batch=a.batch, overwrite=True, force_replan=True, keep_workdir=True, threads=a.threads))
        runner = UnitRunner(job)
        unit = job.plan().units[0]
        n_batches = unit.batches[1] - unit.batches[0]
        sigma = runner._cons_sigma
        walls: dict[str, list[float]] = {"with": [], "without": []}
        stage: list[float] = []
        runner.run_unit(unit)  # warm-up
        for _ in range(a.reps):
            for mode in ("without", "with"):
                runner._cons_sigma = sigma if mode == "with" else None
                runner.stats.clear()
                t0 = time.perf_counter()
                runner.run_unit(unit)
                walls[mode].append(time.perf_counter() - t0)
                if mode == "with":
                    stage.append(runner.stats["consistency"])
        runner._cons_sigma = sigma
        nl, (hh, ww), dev = runner.cfg.num_lr, a.hr, runner.device
        out = torch.rand(a.batch, len(runner._cons_slots), hh, ww, device=dev)
        lr = torch.rand(a.batch, nl, hh // 4, ww // 4, device=dev)
        for _ in range(5):
            runner._consistency_dev((lr, None), out)
        k = 200
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(k):
            r = runner._consistency_dev((lr, None), out)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        op = (time.perf_counter() - t0) / k
        del r
        runner.close()
    print(f"{n_batches} batches of {a.batch} windows x NL={nl}, HR {hh}x{ww}, {dev}, torch threads "
          f"{torch.get_num_threads()}")
    for m, v in walls.items():
        print(f"run_unit {m:8s}: median {statistics.median(v):.3f} s ({', '.join(f'{x:.3f}' for x in v)}) = "
              f"{1000 * statistics.median(v) / n_batches:.1f} ms/batch")
    print(f"consistency stage in run_unit: median {1000 * statistics.median(stage) / n_batches:.3f} ms/batch")
    print(f"consistency op alone: {1000 * op:.3f} ms/batch")


if __name__ == "__main__":
    main()
