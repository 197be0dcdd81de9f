"""End-to-end pipeline efficiency and memory, on CPU with the default (lite) weights.

    python benchmarks/bench_pipeline.py --frames 60 --hr-size 128 160 --batch 4

1. Efficiency: wall time of `reconstruct` (read, normalise, compute, write parts, stitch) against the
   model-only time for the same batches of windows (UnitRunner's compute step on tensors already in
   memory). Goal: model / end-to-end >= 90 %.
2. Memory: peak RSS of a `reconstruct` process for an archive of length x1 and x8 (each in a fresh
   process). Goal: the same within 10 % (memory does not grow with the archive length).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    code = (
        "import resource, runpy, sys; sys.argv = {argv!r}; "
        "from xvr_batch.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    ).format(argv=["xvr-batch", *cmd])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    kb = int([ln for ln in out.splitlines() if ln.startswith("PEAK_RSS_KB")][0].split()[1])
    del before
    return wall, kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--hr-size", nargs=2, type=int, default=(128, 160))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--unit-frames", type=int, default=128)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--mem-factor", type=int, default=8)
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()

    import torch
    from xvr_batch import synth
    from xvr_batch.driver import reconstruct
    from xvr_batch.pipeline import Options, UnitRunner, prepare

    d = Path(tempfile.mkdtemp(prefix="xvr-bench-"))
    arc = d / "a.h5"
    synth.synthesize(str(arc), n_frames=a.frames, hr_shape=tuple(a.hr_size), stride=20, seed=5)
    common = dict(archive=str(arc), weights=a.weights, batch=a.batch, unit_frames=a.unit_frames, overwrite=True,
                  force_replan=True)

    # end to end
    t0 = time.perf_counter()
    reconstruct(Options(output=str(d / "e2e.h5"), **common), progress=False)
    e2e = time.perf_counter() - t0

    # model only, the same batches, inputs prepared in memory beforehand
    job = prepare(Options(output=str(d / "m.h5"), **common))
    runner = UnitRunner(job)
    batches = []
    cache = {}
    from collections import OrderedDict
    hr_cache = OrderedDict()
    for u in job.plan().units:
        for b in range(*u.batches):
            batches.append(runner._read_batch(b, hr_cache))
    t0 = time.perf_counter()
    for _, wins, lr, hr in batches:
        runner._compute(wins, lr, hr)
    model_only = time.perf_counter() - t0
    del cache
    res = {"frames": a.frames, "hr_size": list(a.hr_size), "batch": a.batch, "unit_frames": a.unit_frames,
           "threads": torch.get_num_threads(), "end_to_end_s": e2e, "model_only_s": model_only,
           "efficiency": model_only / e2e, "frames_per_s_e2e": a.frames / e2e}

    if not a.skip_memory:
        rss = {}
        for factor in (1, a.mem_factor):
            p = d / f"m{factor}.h5"
            synth.synthesize(str(p), n_frames=a.frames * factor, hr_shape=tuple(a.hr_size), stride=20, seed=5)
            wall, mib = _peak_rss_of(["reconstruct", str(p), "-o", str(d / f"o{factor}.h5"), "-q", "--overwrite",
                                      "--batch", str(a.batch), "--unit-frames", str(a.unit_frames)]
                                     + (["--weights", a.weights] if a.weights else []))
            rss[factor] = {"frames": a.frames * factor, "wall_s": wall, "peak_rss_mib": mib}
        res["rss"] = rss
        res["rss_growth"] = rss[a.mem_factor]["peak_rss_mib"] / rss[1]["peak_rss_mib"] - 1
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
