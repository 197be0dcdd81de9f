"""`xvr-batch reconstruct --nodes N` on the real single-node Slurm cluster (tests/cluster/start-slurm.sh)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli, make_archive, read_data
from xvr_batch.errors import UserError
from xvr_batch.driver import reconstruct
from xvr_batch.pipeline import Options, prepare
from xvr_batch.slurm.script import job_name_for
from xvr_batch.slurm.submit import SubmitOptions, render_submission

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


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


# ---- the job's options (submit.toml) and its name -------------------------------------------------


def test_force_replan_is_not_written_into_the_requeueable_jobs_options(tmp_path, archive, tiny_weights):
    """Every run of a requeued job reads submit.toml: with force-replan there it would start over each time."""
    opts = Options(archive=str(archive), output=str(tmp_path / "o.h5"), weights=str(tiny_weights), unit_frames=8,
                   force_replan=True, lr='/exchange/a "quoted" \\ name', keep_workdir=True)
    _, toml, _ = render_submission(opts, SubmitOptions())
    table = tomllib.loads(toml)["reconstruct"]
    assert "force-replan" not in table and "force_replan" not in table
    assert table["unit-frames"] == 8 and table["keep-workdir"] is True
    assert table["lr"] == '/exchange/a "quoted" \\ name'  # written by tomli_w, read back unchanged
    r = cli("reconstruct", archive, "-o", tmp_path / "o.h5", "--weights", tiny_weights, "--nodes", 1,
            "--force-replan", "--dry-run", check=True)
    assert "force-replan =" not in r.stdout and "--force-replan: on submission" in r.stdout


def test_job_name_is_derived_safely_from_any_file_name(tmp_path, tiny_weights):
    assert job_name_for("run 42 (test)") == "xvr-run_42__test_"
    assert job_name_for("ünïcødé;$(id)") == "xvr-_n_c_d____id_"
    assert len(job_name_for("x" * 300)) == 64 and job_name_for("") == "xvr-"
    arc = make_archive(tmp_path / "run 42 (test).h5")
    script, _, _ = render_submission(Options(archive=str(arc), output=str(tmp_path / "out 42.h5")), SubmitOptions())
    assert "#SBATCH --job-name=xvr-run_42__test_" in script.splitlines()
    script, _, _ = render_submission(Options(archive=str(arc), output=str(tmp_path / "o.h5")),
                                     SubmitOptions(job_name="beamline-32.run_42"))
    assert "#SBATCH --job-name=beamline-32.run_42" in script.splitlines()
    for bad in ("run 42", "", "a;b", "x" * 65):
        with pytest.raises(UserError, match="--job-name") as info:
            render_submission(Options(archive=str(arc), output=str(tmp_path / "o.h5")), SubmitOptions(job_name=bad))
        assert "\n" not in str(info.value)


def _job_id(stdout: str) -> str:
    return stdout.split("submitted Slurm job ")[1].split(";")[0]


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(0.5)
    return path.exists()


@needs_slurm
@pytest.mark.slurm
def test_archive_name_with_spaces_submits_to_slurm(tmp_path, tiny_weights):
    arc = make_archive(tmp_path / "run 42 (test).h5")
    ref = read_data(reconstruct(Options(archive=str(arc), output=str(tmp_path / "ref.h5"), weights=str(tiny_weights),
                                        unit_frames=8), progress=False))
    out = tmp_path / "run 42 (test)_hr.h5"
    r = cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--unit-frames", 8, "--nodes", 1, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    job = _job_id(r.stdout)
    shown = subprocess.run(["squeue", "-h", "-j", job, "-o", "%j"], capture_output=True, text=True).stdout.strip()
    if not shown:  # already gone from the queue: ask the controller
        shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        shown = shown.split("JobName=")[1].split()[0] if "JobName=" in shown else ""
    assert shown == "xvr-run_42__test_"
    assert _wait_for(out, 240), (tmp_path / f"{out.name}.slurm-{job}.log").read_text()[-3000:]
    assert read_data(out).tobytes() == ref.tobytes()


@needs_slurm
@pytest.mark.slurm
def test_force_replan_replans_at_submit_and_the_job_keeps_its_parts_on_requeue(tmp_path, archive, tiny_weights):
    ref = read_data(reconstruct(Options(archive=str(archive), output=str(tmp_path / "ref.h5"),
                                        weights=str(tiny_weights), unit_frames=8), progress=False))
    out = tmp_path / "o.h5"
    wd = tmp_path / "o.h5.xvr"
    prepare(Options(archive=str(archive), output=str(out), weights=str(tiny_weights), unit_frames=4))
    old_plan = (wd / "manifest.json").read_text()
    r = cli("reconstruct", archive, "-o", out, "--weights", tiny_weights, "--unit-frames", 8, "--nodes", 1,
            "--force-replan", "--sbatch=--hold", "-q")  # held: nothing of the job runs before we look
    assert r.returncode == 0, r.stdout + r.stderr
    job = _job_id(r.stdout)
    try:
        assert "discarded the earlier plan" in r.stdout
        assert not (wd / "manifest.json").exists() or (wd / "manifest.json").read_text() != old_plan
        assert "force-replan" not in (wd / "submit.toml").read_text()
        subprocess.run(["scontrol", "release", job], check=True, capture_output=True)
        assert _wait_for(out, 240), (tmp_path / f"o.h5.slurm-{job}.log").read_text()[-3000:]
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert read_data(out).tobytes() == ref.tobytes()
