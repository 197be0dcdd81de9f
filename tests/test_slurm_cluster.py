"""Job scripts on a real Slurm cluster: the single-node one from tests/cluster/start-slurm.sh.

Each test renders a script (with the builder or from a template), submits it with
:func:`xvr_batch.slurm.client.submit`, waits for it and reads its log. The program the scripts
launch is a stand-in `xvr-batch` that prints what it sees (ranks, world size, GPUs) and, when asked,
waits for SIGUSR2/SIGTERM and records it. Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from xvr_batch.slurm import client as slurm
from xvr_batch.slurm.script import JobSpec, render_job_script
from xvr_batch.slurm.template import render_template, template_placeholders

pytestmark = pytest.mark.slurm

JOB_TIMEOUT = 60.0  # seconds any one job may take
POLL = 0.25

STUB = """#!{python}
# Stand-in for xvr-batch in the cluster tests: prints what a rank sees, optionally waits for a signal.
import json, os, signal, sys, time
from pathlib import Path

info = {{key: os.environ.get(key) for key in (
    "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "RANK", "WORLD_SIZE",
    "LOCAL_RANK", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT")}}
info["argv"] = sys.argv[1:]
if os.environ.get("XVR_STUB_MPI"):
    from mpi4py import MPI
    info["mpi_rank"], info["mpi_size"] = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
os.write(1, ("XVR-STUB " + json.dumps(info) + "\\n").encode())  # one write: ranks never interleave a line
wait_dir = os.environ.get("XVR_STUB_WAIT_DIR")
if wait_dir:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    got = []
    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name[3:]))
    Path(wait_dir, "ready-" + rank).touch()
    deadline = time.monotonic() + 50
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    Path(wait_dir, "signal-" + rank).write_text(",".join(got) or "none")
    code = int(os.environ.get("XVR_STUB_EXIT", "0")) if got else 3
    if code == 75 and os.environ.get("XVR_STOP_MARKER"):  # what xvr-batch does on a clean stop
        Path(os.environ["XVR_STOP_MARKER"]).write_text("75")
    time.sleep(0.3 * int(rank))  # ranks end at different times, as real ones do
    sys.exit(code)
"""


def _cluster_problem() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH: no Slurm here (start one with: bash tests/cluster/start-slurm.sh)"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 15 s: slurmctld is not running (bash tests/cluster/start-slurm.sh)"
    if result.returncode != 0:
        return f"the Slurm cluster is not up ({result.stderr.strip()}); run: bash tests/cluster/start-slurm.sh"
    states = result.stdout.split()
    if not any(state in ("idle", "mix", "alloc") for state in states):
        return f"no Slurm node is up (node states: {' '.join(states) or 'none'}); run: bash tests/cluster/start-slurm.sh"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    problem = _cluster_problem()
    if problem is not None:
        pytest.skip(problem)


@pytest.fixture
def stub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the stand-in xvr-batch first on PATH; sbatch passes the environment on to the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "xvr-batch"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key in ("XVR_STUB_MPI", "XVR_STUB_WAIT_DIR", "XVR_PYTHON", "XVR_STUB_EXIT"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


@pytest.fixture
def jobs() -> Iterator[list[str]]:
    """Job ids submitted by a test; any still alive at its end are cancelled."""
    submitted: list[str] = []
    yield submitted
    for job_id in submitted:
        if slurm.job_state(job_id) in slurm.ACTIVE_STATES:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def submit(script: str, workdir: Path, jobs: list[str]) -> str:
    job_id = slurm.submit(script, str(workdir))
    jobs.append(job_id)
    return job_id


def finish(job_id: str, workdir: Path) -> tuple[str, str, list[dict]]:
    """Wait for the job; return its final state, its log and the stub's reports."""
    state = slurm.wait_for_job(job_id, poll=POLL, timeout=JOB_TIMEOUT)
    log_path = workdir / f"xvr-{job_id}.out"
    log = log_path.read_text() if log_path.exists() else "(no log)"
    reports = [json.loads(line[len("XVR-STUB "):]) for line in log.splitlines() if line.startswith("XVR-STUB ")]
    return state, log, reports


def wait_until(condition: Callable[[], bool], what: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


# ---- builder: one script per launcher -----------------------------------------------------------


def test_cpu_job_runs_hostile_arguments_literally(stub_env: Path, jobs: list[str]) -> None:
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    args = ["reconstruct", "/data/a b.h5", f"$(touch {marker})", f"`touch {marker}`", "it's"]
    script = render_job_script(JobSpec(workdir=str(stub_env), requeue=False), ["xvr-batch", *args], launcher="none")
    job_id = submit(script, stub_env, jobs)
    state, log, reports = finish(job_id, stub_env)
    assert state == "COMPLETED", log
    assert [report["argv"] for report in reports] == [args]
    assert reports[0]["SLURM_JOB_ID"] == job_id
    assert not marker.exists()


def test_mpi_launcher_sees_world_size_two(stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XVR_STUB_MPI", "1")
    spec = JobSpec(ntasks_per_node=2, gpus_per_node=1, requeue=False)
    job_id = submit(render_job_script(spec, ["xvr-batch", "reconstruct", "a.h5"], launcher="mpi"), stub_env, jobs)
    state, log, reports = finish(job_id, stub_env)
    assert state == "COMPLETED", log
    assert sorted(report["mpi_rank"] for report in reports) == [0, 1], log
    assert {report["mpi_size"] for report in reports} == {2}
    assert {report["CUDA_VISIBLE_DEVICES"] for report in reports} == {"0"}


def test_srun_overcommit_two_tasks_is_one_world() -> None:
    code = "from mpi4py import MPI; print('size', MPI.COMM_WORLD.Get_size())"
    result = subprocess.run(
        ["timeout", "60", "srun", "-n", "2", "--overcommit", "--mpi=pmi2", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["size", "2", "size", "2"]


# ---- templates ------------------------------------------------------------------------------------

TEMPLATE_RESOURCES = {"job_name": "xvr-ci", "nodes": 1, "ntasks_per_node": 2, "gpus_per_node": 2,
                      "cpus_per_task": 1, "time": "00:05:00", "output": "xvr-%j.out"}


def render(name: str, **values: object) -> str:
    wanted = template_placeholders(name)
    return render_template(name, **{key: value for key, value in {**TEMPLATE_RESOURCES, **values}.items() if key in wanted})


def test_template_1node_torchrun(stub_env: Path, jobs: list[str]) -> None:
    script = render("reconstruct-1node-torchrun", python=sys.executable, archive="/data/a b.h5", out_h5="o.h5", extra_args=[])
    state, log, reports = finish(submit(script, stub_env, jobs), stub_env)
    assert state == "COMPLETED", log
    assert sorted(report["RANK"] for report in reports) == ["0", "1"], log
    assert {report["CUDA_VISIBLE_DEVICES"] for report in reports} == {"0,1"}
    assert reports[0]["argv"] == ["reconstruct", "/data/a b.h5", "-o", "o.h5", "--backend", "torch"]


def test_template_multinode_srun_torch(stub_env: Path, jobs: list[str]) -> None:
    script = render("reconstruct-multinode-srun-torch", archive="a.h5", out_h5="o.h5", extra_args=["--dtype", "uint16"])
    job_id = submit(script, stub_env, jobs)
    state, log, reports = finish(job_id, stub_env)
    assert state == "COMPLETED", log
    assert sorted(report["SLURM_PROCID"] for report in reports) == ["0", "1"], log
    assert {report["SLURM_NTASKS"] for report in reports} == {"2"}
    assert {report["MASTER_ADDR"] for report in reports} == {subprocess.check_output(["hostname", "-s"], text=True).strip()}
    assert {report["MASTER_PORT"] for report in reports} == {str(20000 + int(job_id) % 20000)}


def test_template_multinode_srun_mpi(stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XVR_STUB_MPI", "1")
    script = render("reconstruct-multinode-srun-mpi", archive="a.h5", out_h5="o.h5", extra_args=[])
    state, log, reports = finish(submit(script, stub_env, jobs), stub_env)
    assert state == "COMPLETED", log
    assert sorted(report["mpi_rank"] for report in reports) == [0, 1], log
    assert {report["mpi_size"] for report in reports} == {2}


def test_template_train_ddp_really_trains(tmp_path: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The real `xvr-batch train` with real flags: srun -> torchrun -> 2 DDP ranks; the checkpoint loads."""
    from xvr_batch.model import SwinXVR, load_checkpoint
    from xvr_batch.synth import synthesize

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("XVR_PYTHON", raising=False)
    data = tmp_path / "train a.h5"
    synthesize(str(data), seed=1, families="particles", n_frames=40, hr_shape=(64, 64), stride=10)
    out = tmp_path / "model out.pt"
    script = render("train-ddp-multinode", python=sys.executable, nproc_per_node=2, cpus_per_task=2,
                    train_args=[str(data), "-o", str(out), "--preset", "tiny", "--steps", "3", "--batch", "2",
                                "--crop", "16", "--val-every", "1000", "--ckpt-every", "1000", "--device", "cpu", "-q"])
    state, log, _ = finish(submit(script, tmp_path, jobs), tmp_path)
    assert state == "COMPLETED", log
    model, ckpt = load_checkpoint(out)
    assert isinstance(model, SwinXVR) and ckpt["step"] == 3
    assert ckpt["meta"]["hardware"]["world_size"] == 2, log


def test_template_dask_worker_joins_scheduler_and_stops_on_term(stub_env: Path, jobs: list[str]) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None
    ) as local, \
            distributed.Client(local) as client:
        script = render(
            "dask-worker", python=sys.executable, scheduler=local.scheduler_address, cores=1, memory="1G",
            gpus_per_node=1, walltime="00:05:00", nthreads=1, processes=1, memory_limit="1GB", death_timeout=30,
            interface="lo", local_directory=str(stub_env / "dask scratch"), resources="GPU=1",
        )
        job_id = submit(script, stub_env, jobs)
        client.wait_for_workers(1, timeout=JOB_TIMEOUT)
        where = client.submit(lambda: os.environ["SLURM_JOB_ID"], resources={"GPU": 1}, pure=False)
        assert where.result(timeout=JOB_TIMEOUT) == job_id
        slurm.cancel(job_id, signal="TERM")  # the batch shell passes it on; the worker closes cleanly
        state, log, _ = finish(job_id, stub_env)
    assert state == "COMPLETED", log
    assert "got SIGTERM" in log


# ---- stop signals ---------------------------------------------------------------------------------


def ask_to_stop(job_id: str, wait_dir: Path, ranks: int, signal: str = "USR2") -> None:
    """Once every rank waits for a signal, send one to the batch shell, as --signal=B:... would."""
    wait_until(lambda: len(list(wait_dir.glob("ready-*"))) == ranks, f"{ranks} rank(s) of job {job_id} to start")
    slurm.cancel(job_id, signal=signal, target="batch")


@pytest.mark.parametrize(
    ("launcher", "spec"),
    [
        ("none", JobSpec(requeue=False)),
        ("mpi", JobSpec(ntasks_per_node=2, requeue=False)),
        ("torch", JobSpec(gpus_per_node=2, requeue=False)),
    ],
    ids=["plain", "srun", "torchrun-fake-gpus"],
)
def test_usr2_reaches_every_rank_and_the_job_ends_cleanly(
    launcher: str, spec: JobSpec, stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_dir = stub_env / "signals"
    wait_dir.mkdir()
    monkeypatch.setenv("XVR_STUB_WAIT_DIR", str(wait_dir))
    monkeypatch.setenv("XVR_PYTHON", sys.executable)
    job_id = submit(render_job_script(spec, ["xvr-batch", "reconstruct", "a.h5"], launcher=launcher), stub_env, jobs)
    ranks = spec.tasks_per_node
    ask_to_stop(job_id, wait_dir, ranks)
    state, log, reports = finish(job_id, stub_env)
    assert state == "COMPLETED", log
    assert sorted(path.read_text() for path in wait_dir.glob("signal-*")) == ["USR2"] * ranks, log
    assert "got SIGUSR2" in log
    assert len(reports) == ranks, log
    if launcher == "torch":  # torchrun on one node: ranks and the fake GPUs
        assert sorted(report["RANK"] for report in reports) == ["0", "1"]
        assert {report["WORLD_SIZE"] for report in reports} == {"2"}
        assert {report["CUDA_VISIBLE_DEVICES"] for report in reports} == {"0,1"}


def test_term_reaches_srun_tasks_as_term(stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """srun would turn a SIGTERM sent to itself into SIGKILL; scancel --signal delivers TERM."""
    wait_dir = stub_env / "signals"
    wait_dir.mkdir()
    monkeypatch.setenv("XVR_STUB_WAIT_DIR", str(wait_dir))
    spec = JobSpec(ntasks_per_node=2, requeue=False)
    job_id = submit(render_job_script(spec, ["xvr-batch"], launcher="mpi"), stub_env, jobs)
    ask_to_stop(job_id, wait_dir, 2, signal="TERM")
    state, log, _ = finish(job_id, stub_env)
    assert state == "COMPLETED", log
    assert sorted(path.read_text() for path in wait_dir.glob("signal-*")) == ["TERM", "TERM"], log


def test_clean_stop_on_the_warning_requeues_the_job(stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    wait_dir = stub_env / "signals"
    wait_dir.mkdir()
    monkeypatch.setenv("XVR_STUB_WAIT_DIR", str(wait_dir))
    monkeypatch.setenv("XVR_STUB_EXIT", "75")  # a clean stop, as xvr-batch reports it
    job_id = submit(render_job_script(JobSpec(requeue=True), ["xvr-batch"], launcher="none"), stub_env, jobs)
    ask_to_stop(job_id, wait_dir, 1)

    def requeued() -> bool:
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
        return "Restarts=1" in shown and slurm.job_state(job_id) in ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING")

    wait_until(requeued, f"job {job_id} to be requeued")
    assert (wait_dir / "signal-0").read_text() == "USR2"
    slurm.cancel(job_id)
    assert slurm.wait_for_job(job_id, poll=POLL, timeout=JOB_TIMEOUT) == "CANCELLED"
    log = (stub_env / f"xvr-{job_id}.out").read_text()
    assert "requeueing job" in log


def restarts(job_id: str) -> int:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return int(shown.split("Restarts=")[1].split()[0]) if "Restarts=" in shown else -1


@pytest.mark.parametrize(
    ("launcher", "spec"),
    [("torch", JobSpec(gpus_per_node=2)), ("mpi", JobSpec(ntasks_per_node=2))],
    ids=["torchrun", "srun-kill-on-bad-exit"],
)
def test_a_stop_with_status_75_requeues_through_launchers_that_lose_it(
    launcher: str, spec: JobSpec, stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun reports the ranks' 75 as 1, srun as 143: the stop marker still makes it a requeue."""
    wait_dir = stub_env / "signals"
    wait_dir.mkdir()
    monkeypatch.setenv("XVR_STUB_WAIT_DIR", str(wait_dir))
    monkeypatch.setenv("XVR_STUB_EXIT", "75")
    monkeypatch.setenv("XVR_PYTHON", sys.executable)
    job_id = submit(render_job_script(spec, ["xvr-batch", "reconstruct", "a.h5"], launcher=launcher), stub_env, jobs)
    ask_to_stop(job_id, wait_dir, 2)
    wait_until(lambda: restarts(job_id) >= 1, f"job {job_id} to be requeued")
    slurm.cancel(job_id)
    slurm.wait_for_job(job_id, poll=POLL, timeout=JOB_TIMEOUT)
    log = (stub_env / f"xvr-{job_id}.out").read_text()
    assert "stopped cleanly (exit status 75)" in log and "requeueing job" in log, log


def test_a_failure_is_not_requeued(stub_env: Path, jobs: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    wait_dir = stub_env / "signals"
    wait_dir.mkdir()
    monkeypatch.setenv("XVR_STUB_WAIT_DIR", str(wait_dir))
    monkeypatch.setenv("XVR_STUB_EXIT", "1")
    job_id = submit(render_job_script(JobSpec(ntasks_per_node=2), ["xvr-batch"], launcher="mpi"), stub_env, jobs)
    ask_to_stop(job_id, wait_dir, 2)
    state, log, _ = finish(job_id, stub_env)
    assert state == "FAILED" and restarts(job_id) in (0, -1), log
    assert "requeueing" not in log
