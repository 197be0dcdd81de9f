"""Orchestration overhead of the execution backends: units per second with a no-op model.

    python benchmarks/bench_backends.py                       # local, torch, mpi, dask x 1, 2, 4 workers
    python benchmarks/bench_backends.py --units 400 --workers 1,2 --backends torch,dask

Every unit still runs the real :class:`~xvr_batch.pipeline.UnitRunner` path (read the LR frames and key
frames, calibrate, write and fsync the part, hash it, rename it) and the real backend (hand-out,
journal append and fsync by the one writer); only the network call is replaced by zeros (``--compute
noop``, the default; ``--compute tiny`` runs the tiny model instead). The archive has 1-frame units of
8x12 LR pixels, so what is measured is the cost of moving a unit through each backend.

Each configuration runs as a real command line (``python bench_backends.py --entry reconstruct ...``
under torchrun / mpiexec, and as a Dask worker preload, so that every process gets the no-op model).
Two numbers per row:

* **steady units/s**: ``(units - 1) / (t_last - t_first)`` from the journal timestamps, i.e. throughput
  once everything is up, and **ms/unit/worker** = 1000 x workers / that, the time a worker spends per
  unit (compute is ~0 here, so this is the per-unit overhead);
* **wall s**: the whole command, including process start, imports, cluster start, prepare, finalise.

Prints a markdown table on stdout. Workers: torch = ranks, mpi = worker ranks (``-n workers+1``:
rank 0 only hands out units), dask = LocalCluster worker processes, local = 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing


# ------------------------------------------------------------------------------------------------ no-op model

def _noop_compute(self, wins, lr, hr):
    import numpy as np

    n_out = self.cfg.num_lr if self.cfg.head == "all" else 1
    s = self.cfg.scale
    return np.zeros((lr.shape[0], n_out, lr.shape[-2] * s, lr.shape[-1] * s), np.float32)


def install_noop() -> None:
    """Replace the network call of every UnitRunner in this process by zeros."""
    if os.environ.get("XVR_BENCH_COMPUTE", "noop") == "noop":
        from xvr_batch.pipeline import UnitRunner

        UnitRunner._compute = _noop_compute


def dask_setup(worker) -> None:  # noqa: ARG001  (Dask preload hook: runs in each worker process)
    install_noop()


# ------------------------------------------------------------------------------------------------ driver

def _make_inputs(d: Path, units: int) -> tuple[Path, Path]:
    import torch

    sys.path.insert(0, str(HERE.parents[1] / "tests"))
    from conftest import make_archive

    from xvr_batch.model import SwinXVR, preset, save_checkpoint

    torch.manual_seed(0)
    weights = d / "tiny.pt"
    save_checkpoint(weights, SwinXVR(preset("tiny", window=4)).eval())
    keys = tuple(range(0, units, 20)) + ((units - 1,) if (units - 1) % 20 else ())
    archive = make_archive(d / "bench.h5", n=units, hr_index=keys)
    return archive, weights


def _journal_rate(workdir: Path) -> float:
    ts = sorted(json.loads(line)["t"] for line in (workdir / "journal.jsonl").read_text().splitlines() if line.strip())
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return float("nan")
    return (len(ts) - 1) / (ts[-1] - ts[0])


def _command(backend: str, workers: int, args: list[str]) -> list[str]:
    entry = [str(HERE), "--entry", *args, "--backend", backend]
    if backend == "local":
        return [sys.executable, *entry]
    if backend == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}", *entry]
    if backend == "mpi":
        mpiexec = Path(sys.executable).parent / "mpiexec"
        return [str(mpiexec if mpiexec.exists() else "mpiexec"), "-n", str(workers + 1), sys.executable, *entry]
    if backend == "dask":
        return [sys.executable, *entry, "--workers", str(workers)]
    raise ValueError(backend)


def run_one(backend: str, workers: int, archive: Path, weights: Path, d: Path, compute: str, timeout: float) -> dict:
    out = d / f"out-{backend}-{workers}.h5"
    args = ["reconstruct", str(archive), "-o", str(out), "--weights", str(weights), "--unit-frames", "1",
            "--batch", "1", "--threads", "1", "-q", "--keep-workdir"]
    env = dict(os.environ, XVR_BENCH_COMPUTE=compute, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    r = subprocess.run(_command(backend, workers, args), capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{backend} x{workers} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rate = _journal_rate(Path(str(out) + ".xvr"))
    shutil.rmtree(str(out) + ".xvr", ignore_errors=True)
    out.unlink()
    return {"backend": backend, "workers": workers, "wall": wall, "rate": rate}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=200, help="units (1 frame each) [200]")
    ap.add_argument("--workers", default="1,2,4", help="worker counts [1,2,4]")
    ap.add_argument("--backends", default="local,torch,mpi,dask", help="backends [local,torch,mpi,dask]")
    ap.add_argument("--compute", choices=["noop", "tiny"], default="noop", help="no-op model or the tiny model")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run [600]")
    ap.add_argument("--dir", default=None, help="scratch folder [a temporary one]")
    a = ap.parse_args(argv)
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="xvr-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    archive, weights = _make_inputs(d, a.units)
    rows = []
    for backend in a.backends.split(","):
        for w in ([1] if backend == "local" else [int(x) for x in a.workers.split(",")]):
            row = run_one(backend, w, archive, weights, d, a.compute, a.timeout)
            rows.append(row)
            print(f"# {backend} x{w}: {row['rate']:.1f} units/s, wall {row['wall']:.1f} s", file=sys.stderr, flush=True)
    import platform

    print(f"Units: {a.units} x 1 frame (LR 8x12, HR 32x48), compute: {a.compute}, CPUs: {os.cpu_count()}, "
          f"python {platform.python_version()}\n")
    print("| backend | workers | steady units/s | ms/unit/worker | wall s (incl. startup) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['workers']} | {r['rate']:.1f} | {1000 * r['workers'] / r['rate']:.1f} | "
              f"{r['wall']:.1f} |")
    if not a.dir:
        shutil.rmtree(d, ignore_errors=True)


def entry(argv: list[str]) -> None:
    """A real xvr-batch command line with the no-op model (every rank / process runs this)."""
    install_noop()
    if "--backend" in argv and argv[argv.index("--backend") + 1] == "dask":
        # every Dask worker imports this file as a preload and installs the no-op model too
        from xvr_batch.backends import daskbackend

        orig = daskbackend.DaskBackend.__init__

        def init(self, *a, **kw):
            orig(self, *a, **kw)
            self.cluster_kwargs.setdefault("preload", [str(HERE)])

        daskbackend.DaskBackend.__init__ = init
    from xvr_batch.cli import main as cli_main

    sys.argv = ["xvr-batch", *argv]
    cli_main(argv)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--entry":
        entry(sys.argv[2:])
    else:
        main()
