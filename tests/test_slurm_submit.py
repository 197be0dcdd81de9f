"""`xvr-batch reconstruct --nodes N` on the real single-node Slurm cluster (tests/cluster/start-slurm.sh)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli, make_archive, read_data
from xvr_batch.pipeline import Options, reconstruct


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    return r.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in r.stdout.splitlines())


needs_slurm = pytest.mark.skipif(not _slurm_up(), reason="no Slurm cluster up (run tests/cluster/start-slurm.sh)")


def test_dry_run_prints_script_and_refuses_hostile_values(tmp_path, archive, tiny_weights):
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--weights", tiny_weights, "--nodes", 2,
            "--gpus-per-node", 4, "--partition", "gpu", "--time", "02:00:00", "--dry-run", check=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --gres=gpu:4" in lines and "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --signal=B:USR2@120" in lines and "#SBATCH --requeue" in lines
    assert "--backend torch" in r.stdout and "srun" in r.stdout
    assert not (tmp_path / "o.h5.xvr").exists()  # a dry run writes nothing
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--nodes", 1, "--partition", "debug;touch /tmp/x",
            "--dry-run")
    assert r.returncode == 2 and "partition" in r.stderr and "Traceback" not in r.stderr
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--partition", "debug")
    assert r.returncode == 2 and "--nodes" in r.stderr


@needs_slurm
@pytest.mark.slurm
def test_nodes_wait_gives_identical_bytes(tmp_path, archive, tiny_weights):
    ref = read_data(reconstruct(Options(archive=str(archive), output=str(tmp_path / "ref.h5"),
                                        weights=str(tiny_weights), unit_frames=8), progress=False))
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--weights", tiny_weights, "--unit-frames", 8,
            "--nodes", 1, "--wait", "-q", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted Slurm job" in r.stdout
    assert read_data(tmp_path / "o.h5").tobytes() == ref.tobytes()


def _squeue_empty(job: str) -> bool:
    r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    return not r.stdout.strip()


@needs_slurm
@pytest.mark.slurm
def test_preemption_signal_stops_cleanly_requeues_and_resumes(tmp_path, tiny_weights):
    arc = make_archive(tmp_path / "a.h5", n=60, hr_index=(0, 20, 40, 59))
    ref = read_data(reconstruct(Options(archive=str(arc), output=str(tmp_path / "ref.h5"), weights=str(tiny_weights),
                                        unit_frames=60), progress=False))
    out = tmp_path / "o.h5"
    r = cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--unit-frames", 2, "--nodes", 1, check=True)
    job = r.stdout.split("submitted Slurm job ")[1].split(";")[0]
    journal = tmp_path / "o.h5.xvr" / "journal.jsonl"
    deadline = time.time() + 120
    while not (journal.exists() and journal.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    assert journal.exists(), "the job never recorded a unit"
    # what Slurm does 120 s before the time limit (--signal=B:USR2@120): signal the batch shell
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], check=True)
    deadline = time.time() + 240
    while not out.exists() and time.time() < deadline:
        time.sleep(0.5)
    log = tmp_path / f"o.h5.slurm-{job}.log"
    text = log.read_text() if log.exists() else ""
    assert out.exists(), f"the requeued job did not finish:\n{text[-3000:]}"
    assert "got SIGUSR2" in text and "requeueing job" in text, text[-3000:]
    assert "stopped on request" in text
    assert read_data(out).tobytes() == ref.tobytes()
    deadline = time.time() + 60
    while not _squeue_empty(job) and time.time() < deadline:
        time.sleep(0.5)
