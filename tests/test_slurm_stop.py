"""How a job ends: exit statuses and requeue, unrendered templates, and the one job-state classification.

The job scripts run under bash in a sandbox whose scontrol/scancel/srun are stand-ins that log their
arguments (no cluster needed); tests/test_slurm_cluster.py runs the same scripts on the real Slurm.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from xvr_batch.slurm import client
from xvr_batch.slurm.ports import MASTER_PORT_BASE, MASTER_PORT_SPAN, master_port, master_port_shell
from xvr_batch.slurm.script import JobSpec, render_job_script
from xvr_batch.slurm.shell import BLOCKS, marker_line
from xvr_batch.slurm.template import template_names, template_text, templates_dir

REPO = Path(__file__).resolve().parents[1]


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """Environment with stand-in Slurm tools that append their arguments to calls.log."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    record = f'echo "$(basename "$0") $*" >> {log}\n'
    write_exe(bin_dir / "scontrol", f'#!/bin/bash\n{record}[ "$1 $2" = "show hostnames" ] && echo node001\nexit 0\n')
    write_exe(bin_dir / "scancel", f"#!/bin/bash\n{record}")
    write_exe(bin_dir / "srun", '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "XVR_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node001",
               SLURM_SUBMIT_DIR=str(tmp_path))
    return env


def run_job(tmp_path: Path, env: dict[str, str], step: str, requeue: bool = True,
            launcher: str = "none") -> tuple[int, str, str]:
    """Run a job script whose step is ``bash -c STEP``; return (status, stderr, Slurm calls)."""
    script = tmp_path / "job.sbatch"
    script.write_text(render_job_script(JobSpec(requeue=requeue), ["bash", "-c", step], launcher=launcher))
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    log = tmp_path / "calls.log"
    return result.returncode, result.stderr, log.read_text() if log.exists() else ""


# ---- exit statuses: 0 done, 75 stopped (requeue), anything else failed ---------------------------


def test_status_0_is_done_and_not_requeued(tmp_path: Path, sandbox: dict[str, str]) -> None:
    rc, err, calls = run_job(tmp_path, sandbox, "exit 0")
    assert rc == 0 and "requeue" not in calls, err


def test_status_75_is_a_clean_stop_and_requeues(tmp_path: Path, sandbox: dict[str, str]) -> None:
    rc, err, calls = run_job(tmp_path, sandbox, "exit 75")
    assert "scontrol requeue 4242" in calls, err
    assert rc == 0 and "stopped cleanly (exit status 75)" in err


def test_status_75_without_requeue_is_the_jobs_status(tmp_path: Path, sandbox: dict[str, str]) -> None:
    rc, err, calls = run_job(tmp_path, sandbox, "exit 75", requeue=False)
    assert rc == 75 and "requeue" not in calls, err


@pytest.mark.parametrize("status", [1, 2, 137, 143])
def test_other_statuses_are_failures_and_not_requeued(status: int, tmp_path: Path, sandbox: dict[str, str]) -> None:
    rc, err, calls = run_job(tmp_path, sandbox, f"exit {status}")
    assert rc == status and "requeue" not in calls, err


def test_the_stop_marker_recognises_a_stop_the_launcher_reported_as_failure(tmp_path: Path, sandbox: dict[str, str]) -> None:
    """torchrun reports a worker's 75 as 1: the marker a stopping rank leaves makes it a clean stop."""
    step = f'{sys.executable} -c "from xvr_batch.slurm.stopmark import record_stopped; record_stopped()"; exit 1'
    rc, err, calls = run_job(tmp_path, {**sandbox, "PYTHONPATH": str(REPO)}, step)
    assert "scontrol requeue 4242" in calls and rc == 0, err
    assert not (tmp_path / ".xvr-batch-stopped.4242").exists()  # removed once read


def test_a_stale_marker_from_an_earlier_run_is_ignored(tmp_path: Path, sandbox: dict[str, str]) -> None:
    (tmp_path / ".xvr-batch-stopped.4242").write_text("{}\n")
    rc, err, calls = run_job(tmp_path, sandbox, "exit 1")
    assert rc == 1 and "requeue" not in calls, err


def test_a_stop_on_sigterm_is_not_requeued(tmp_path: Path, sandbox: dict[str, str]) -> None:
    """scancel (SIGTERM) means stop for good; Slurm requeues a preempted job by itself."""
    ready = tmp_path / "ready"
    step = f'trap "exit 75" TERM; touch {ready}; for i in $(seq 300); do sleep 0.1; done; exit 9'
    script = tmp_path / "job.sbatch"
    script.write_text(render_job_script(JobSpec(), ["bash", "-c", step], launcher="none"))
    proc = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=sandbox, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(400):
            if ready.exists():
                break
            subprocess.run(["sleep", "0.05"])
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    calls = (tmp_path / "calls.log").read_text() if (tmp_path / "calls.log").exists() else ""
    assert proc.returncode == 75 and "requeue" not in calls, err
    assert "got SIGTERM" in err


# ---- templates: one copy of the shared code, spliced; unrendered ones refuse to run -----------------


@pytest.mark.parametrize("name", template_names())
def test_unrendered_template_fails_loudly_before_its_step(name: str, tmp_path: Path, sandbox: dict[str, str]) -> None:
    marker = tmp_path / "the-step-ran"
    write_exe(Path(sandbox["PATH"].split(os.pathsep)[0]) / "xvr-batch", f"#!/bin/bash\ntouch {marker}\n")
    result = subprocess.run(["bash", str(templates_dir() / name)], cwd=tmp_path, env=sandbox, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    assert "unrendered template" in result.stderr and "python -m xvr_batch.slurm" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", template_names())
def test_python_m_xvr_batch_slurm_prints_a_complete_template(name: str) -> None:
    result = subprocess.run([sys.executable, "-m", "xvr_batch.slurm", name], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == template_text(name)
    assert "@xvr-batch-block" not in result.stdout and "xvr_finish()" in result.stdout
    assert subprocess.run(["bash", "-n"], input=result.stdout, text=True).returncode == 0
    # every marker in the raw file is a known block
    raw = (templates_dir() / name).read_text()
    markers = [line for line in raw.splitlines() if "@xvr-batch-block" in line]
    assert markers and set(markers) <= {marker_line(block) for block in BLOCKS}


def test_one_master_port_rule() -> None:
    assert (MASTER_PORT_BASE, MASTER_PORT_SPAN) == (20000, 20000)
    assert master_port(4242) == 24242 and master_port(20000) == 20000 and master_port(39999) == 39999
    assert master_port_shell() == "$((20000 + SLURM_JOB_ID % 20000))"
    script = render_job_script(JobSpec(nodes=2), ["true"], launcher="torch")
    assert f"MASTER_PORT={master_port_shell()}" in script
    assert f"MASTER_PORT={master_port_shell()}" in template_text("reconstruct-multinode-srun-torch")


# ---- the job-state classification (used by wait_for_job and follow_job) -------------------------------

FINAL = ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "SPECIAL_EXIT", "REVOKED"]
NOT_FINAL = ["REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "PENDING", "RUNNING", "COMPLETING", "SUSPENDED",
             "STOPPED", "CONFIGURING", "SIGNALING", "STAGE_OUT"]


@pytest.mark.parametrize("state", FINAL)
def test_terminal_states_are_final(state: str) -> None:
    assert client.is_final(state) and client.is_final(state + "+") and client.is_final(f"{state} by 0")
    assert state in client.FINAL_STATES


@pytest.mark.parametrize("state", NOT_FINAL)
def test_active_states_are_not_final(state: str) -> None:
    assert not client.is_final(state) and not client.is_final(state, requeueable=True)


def test_classification_details() -> None:
    assert client.base_state("CANCELLED by 0") == client.base_state("CANCELLED+") == "CANCELLED"
    assert client.is_final(None)  # Slurm forgot the job
    assert not client.is_final("PREEMPTED", requeueable=True)  # Slurm puts it back in the queue
    assert client.is_final("SOME_NEW_STATE")  # never hang on a state added by a later Slurm
    assert not client.ACTIVE_STATES & client.FINAL_STATES


def test_follow_job_and_wait_for_job_share_the_classification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeueable job that is preempted and requeued is followed to its real end."""
    states = iter(["PENDING", "RUNNING", "PREEMPTED", "REQUEUED", "PENDING", "RUNNING", "SPECIAL_EXIT"])
    monkeypatch.setattr(client, "job_state", lambda job_id: next(states))
    assert client.follow_job("7", tmp_path / "wd", tmp_path / "o.h5", poll=0, progress=False) == "SPECIAL_EXIT"
    states = iter(["RUNNING", "CANCELLED by 0"])
    assert client.wait_for_job("7", poll=0) == "CANCELLED"
