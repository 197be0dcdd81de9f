"""Distributed backends on real processes: torchrun, srun-style launches, mpiexec, Dask, Slurm.

Every backend runs the same unit code, so the stitched data must be byte-identical to ``local``.
All runs use ``--threads 1`` (torch CPU results could depend on the intra-op thread count; with the
models here they do not, but one setting everywhere keeps the comparison honest) and tiny archives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli, make_archive, read_data
from xvr_batch.backends import backend_kwargs, get_backend
from xvr_batch.errors import EXIT_STOPPED
from xvr_batch.driver import reconstruct
from xvr_batch.pipeline import Options

BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
TIMEOUT = 180

needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec next to the interpreter ({MPIEXEC})")


# ------------------------------------------------------------------------------------------------ helpers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith(("SLURM_", "PMI_"))}
    env.update(PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    return env


def _args(archive, out, weights, *extra, unit_frames=8):
    return ["reconstruct", str(archive), "-o", str(out), "--weights", str(weights), "--unit-frames", str(unit_frames),
            "-q", "--threads", "1", *map(str, extra)]


def _xvr(*args) -> list[str]:
    return [sys.executable, "-m", "xvr_batch", *args]


def _torchrun(nproc: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "xvr_batch", *args]


def _run(cmd, timeout=TIMEOUT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env())


def _srun_style(n: int, args, port: int | None = None, timeout=TIMEOUT) -> list[tuple[int, str, str]]:
    """Start ``n`` ranks ourselves with srun's environment (no Slurm); (returncode, stdout, stderr) each."""
    port = port or _free_port()
    procs = [subprocess.Popen(_xvr(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(SLURM_PROCID=r, SLURM_NTASKS=n, SLURM_LOCALID=r, MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port))
             for r in range(n)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _journal(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "journal.jsonl").read_text().splitlines() if line.strip()]


def _assert_once_each(workdir: Path, n_units: int) -> list[dict]:
    recs = [r for r in _journal(workdir) if r.get("status", "done") == "done"]
    assert sorted(r["unit"] for r in recs) == list(range(n_units)), "every unit recorded exactly once"
    return recs


@pytest.fixture(scope="module")
def arc(tmp_path_factory) -> Path:
    """40 frames, 8 frames per unit: 5 units (not divisible by 2 ranks or workers)."""
    return make_archive(tmp_path_factory.mktemp("arc") / "a.h5")


@pytest.fixture(scope="module")
def ref(arc, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    reconstruct(Options(archive=str(arc), output=str(out), weights=str(tiny_weights), unit_frames=8, threads=1),
                progress=False)
    return read_data(out)


@pytest.fixture(scope="module")
def long_arc(tmp_path_factory):
    """60 frames in 2-frame units (30 units): long enough to stop a run in the middle."""
    return make_archive(tmp_path_factory.mktemp("long") / "c.h5", n=60, hr_index=(0, 20, 40, 59))


@pytest.fixture(scope="module")
def long_ref(long_arc, tiny_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("longref") / "ref.h5"
    reconstruct(Options(archive=str(long_arc), output=str(out), weights=str(tiny_weights), unit_frames=2, threads=1),
                progress=False)
    return read_data(out)


# ------------------------------------------------------------------------------------------------ options

def test_backend_options_are_checked():
    assert backend_kwargs("dask", {"workers": 2, "threads": 1}) == {"workers": 2}
    assert backend_kwargs("torch", {"workers": None, "nodes": None}) == {}
    with pytest.raises(Exception, match="--workers applies to --backend dask"):
        backend_kwargs("torch", {"workers": 2})
    with pytest.raises(Exception, match="give only one"):
        backend_kwargs("dask", {"workers": 2, "scheduler": "tcp://x:1"})
    with pytest.raises(Exception, match="unknown backend"):
        get_backend("spark")


def test_misplaced_backend_flag_is_one_line(tmp_path, arc, tiny_weights):
    r = cli(*_args(arc, tmp_path / "o.h5", tiny_weights, "--backend", "torch", "--workers", "2"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--workers applies to" in r.stderr


# ------------------------------------------------------------------------------------------------ torch.distributed

def test_torchrun_two_gloo_ranks_identical(tmp_path, arc, tiny_weights, ref):
    out = tmp_path / "o.h5"
    r = _run(_torchrun(2, *_args(arc, out, tiny_weights, "--backend", "torch", "--keep-workdir")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2 (gloo" in r.stderr
    assert read_data(out).tobytes() == ref.tobytes()
    recs = _assert_once_each(tmp_path / "o.h5.xvr", 5)
    assert {rec["rank"] for rec in recs} <= {0, 1}


def test_srun_style_environment_identical(tmp_path, arc, tiny_weights, ref):
    out = tmp_path / "o.h5"
    results = _srun_style(2, _args(arc, out, tiny_weights, "--backend", "torch"))
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    assert "launched by srun" in results[0][2]
    assert results[0][1].strip() == str(out.resolve()) and results[1][1].strip() == ""  # only rank 0 prints
    assert read_data(out).tobytes() == ref.tobytes()


def test_rank0_user_error_every_rank_exits_2_one_line(tmp_path, arc, tiny_weights):
    out = tmp_path / "o.h5"
    out.write_bytes(b"already here")
    results = _srun_style(2, _args(arc, out, tiny_weights, "--backend", "torch"))
    assert [rc for rc, _, _ in results] == [2, 2]
    errors = [line for _, _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "output already exists" in errors[0]
    assert not any("Traceback" in err for _, _, err in results)
    assert out.read_bytes() == b"already here" and not (tmp_path / "o.h5.xvr").exists()


# ------------------------------------------------------------------------------------------------ MPI

@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [3, 1])
def test_mpiexec_identical(tmp_path, arc, tiny_weights, ref, ranks):
    out = tmp_path / "o.h5"
    r = _run([str(MPIEXEC), "-n", str(ranks), *_xvr(*_args(arc, out, tiny_weights, "--backend", "mpi",
                                                                 "--keep-workdir"))])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"mpi: world size {ranks}" in r.stderr
    assert read_data(out).tobytes() == ref.tobytes()
    recs = _assert_once_each(tmp_path / "o.h5.xvr", 5)
    if ranks > 1:
        assert {rec["rank"] for rec in recs} <= {1, 2}  # rank 0 only coordinates


@needs_mpi
@pytest.mark.mpi
def test_mpi_rank0_user_error_exits_2_one_line(tmp_path, arc, tiny_weights):
    out = tmp_path / "o.h5"
    out.write_bytes(b"already here")
    r = _run([str(MPIEXEC), "-n", "3", *_xvr(*_args(arc, out, tiny_weights, "--backend", "mpi"))])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "output already exists" in errors[0] and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ Dask

def test_dask_local_cluster_identical_and_survives_a_killed_worker(tmp_path, arc, tiny_weights, ref):
    from xvr_batch.backends.daskbackend import DaskBackend

    killed: dict = {}

    def kill_a_busy_worker(rec, client):
        if killed:
            return
        busy = [addr for addr, keys in client.processing().items() if keys]
        if not busy:
            return  # try again at the next completion
        pids = client.run(os.getpid)
        os.kill(pids[busy[0]], signal.SIGKILL)
        killed[busy[0]] = pids[busy[0]]

    out = tmp_path / "o.h5"
    opts = Options(archive=str(arc), output=str(out), weights=str(tiny_weights), unit_frames=4, threads=1,
                   keep_workdir=True)
    backend = DaskBackend(workers=2, on_record=kill_a_busy_worker, cluster_kwargs={"silence_logs": 50})
    assert reconstruct(opts, backend, progress=False) == str(out.resolve())
    assert killed, "no worker was busy at any completion"
    assert read_data(out).tobytes() == ref.tobytes()
    _assert_once_each(tmp_path / "o.h5.xvr", 10)


def test_dask_cli_local_cluster_with_gpu_resources_identical(tmp_path, arc, tiny_weights, ref):
    """--gpus-per-worker 1 on the CPU: workers advertise GPU=1, each unit reserves it (the pinning path)."""
    out = tmp_path / "o.h5"
    r = cli(*_args(arc, out, tiny_weights, "--backend", "dask", "--workers", "2", "--gpus-per-worker", "1"),
            timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_data(out).tobytes() == ref.tobytes()


def test_dask_existing_scheduler(tmp_path, arc, tiny_weights, ref):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=True, threads_per_worker=2, dashboard_address=None) as cluster:
        out = tmp_path / "o.h5"
        r = cli(*_args(arc, out, tiny_weights, "--backend", "dask", "--scheduler", cluster.scheduler_address),
                timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert read_data(out).tobytes() == ref.tobytes()


def test_dask_slurm_job_script_renders_gpu_pinning():
    backend = get_backend("dask-slurm", nodes=2, gpus_per_node=2)
    script = backend.job_script()
    assert "#SBATCH --gres=gpu:2" in script
    assert "--resources GPU=1" in script and "--nworkers 2" in script
    assert "--nthreads 1" in script and "--cpus-per-task=8" in script
    assert sys.executable in script


def _slurm_up() -> str | None:
    """None if the single-node test Slurm is up, else why the test is skipped."""
    if not (REPO / "tests" / "cluster" / "start-slurm.sh").exists():
        return "tests/cluster/start-slurm.sh is missing"
    if not shutil.which("sinfo"):
        return "no sinfo: start Slurm with tests/cluster/start-slurm.sh"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed ({exc}): start Slurm with tests/cluster/start-slurm.sh"
    if r.returncode != 0 or not any(s.startswith(("idle", "mix", "alloc")) for s in r.stdout.split()):
        return f"Slurm is not up (sinfo: {r.stdout.strip() or r.stderr.strip()}): run tests/cluster/start-slurm.sh"
    return None


@pytest.mark.slurm
@pytest.mark.skipif(_slurm_up() is not None, reason=str(_slurm_up()))
def test_dask_slurm_cluster_on_real_slurm(tmp_path, arc, tiny_weights, ref):
    from xvr_batch.backends.daskbackend import DaskBackend

    out = tmp_path / "o.h5"
    opts = Options(archive=str(arc), output=str(out), weights=str(tiny_weights), unit_frames=8, threads=1,
                   keep_workdir=True)
    # one Slurm job (node) with two fake GPUs: two worker processes, each advertising GPU=1
    backend = DaskBackend(slurm=True, nodes=1, gpus_per_node=2,
                          cluster_kwargs={"memory": "2GB", "job_cpu": 2, "walltime": "00:10:00",
                                          "log_directory": str(tmp_path / "logs")}, worker_timeout=120)
    assert reconstruct(opts, backend, progress=False) == str(out.resolve())
    assert read_data(out).tobytes() == ref.tobytes()
    recs = _assert_once_each(tmp_path / "o.h5.xvr", 5)
    assert {rec["worker"] for rec in recs} <= {"SLURMCluster-0-0", "SLURMCluster-0-1"}
    assert list((tmp_path / "logs").glob("*.err")), "the workers ran as Slurm jobs"


# ------------------------------------------------------------------------------------------------ stop and resume

def _stop_midway(cmd, journal: Path, sig=signal.SIGTERM, timeout=TIMEOUT) -> tuple[int, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count("\n") >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("backend", ["local", "torch", "mpi", "dask"])
def test_sigterm_stops_cleanly_and_rerun_is_identical(tmp_path, long_arc, tiny_weights, long_ref, backend):
    out = tmp_path / "o.h5"
    args = _args(long_arc, out, tiny_weights, "--backend", backend, unit_frames=2)
    if backend == "torch":
        cmd = _torchrun(2, *args)
    elif backend == "mpi":
        if not MPIEXEC.exists():
            pytest.skip(f"no mpiexec ({MPIEXEC})")
        cmd = [str(MPIEXEC), "-n", "3", *_xvr(*args)]
    else:
        cmd = _xvr(*args, *(["--workers", "2"] if backend == "dask" else []))
    rc, err = _stop_midway(cmd, tmp_path / "o.h5.xvr" / "journal.jsonl")
    # a clean stop is not success: `reconstruct ... && next-step` must not go on. 75 (EX_TEMPFAIL) is the
    # documented "stopped, resumable" status. torchrun reports a stopped worker as a failure of its own
    # (exit 1); the ranks themselves exit EXIT_STOPPED
    assert EXIT_STOPPED == 75
    assert rc in ((EXIT_STOPPED, 1) if backend == "torch" else (EXIT_STOPPED,)), err[-3000:]
    assert "stopped on request" in err, err[-3000:]
    assert not out.exists()
    done = _assert_journal_valid(tmp_path / "o.h5.xvr")
    assert 0 < len(done) < 30, err[-3000:]
    r = _run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{len(done)} units already done" in r.stderr, r.stderr[-3000:]
    assert read_data(out).tobytes() == long_ref.tobytes()


def _assert_journal_valid(workdir: Path) -> set[int]:
    from xvr_batch.workdir import WorkDir

    wd = WorkDir(workdir)
    done = wd.completed_units(verify=True)
    assert not wd.problems, wd.problems
    recorded = {r["unit"] for r in _journal(workdir)}
    assert set(done) == recorded
    return set(done)
