"""Training that survives a requeue: SIGUSR2/SIGTERM -> checkpoint + status 75 -> the same command continues.

Real signals, real files and real processes (in-process runs, ``python -m xvr_batch.train`` and torchrun).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from xvr_batch.errors import EXIT_STOPPED, UserError
from xvr_batch.synth import synthesize
from xvr_batch.train import TrainingStopped, TrainOptions, last_checkpoint_path, run_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("train_requeue")
    paths = []
    for name, seed, fam in (("a", 1, "particles"), ("b", 2, "rotor")):
        paths.append(str(root / f"{name}.h5"))
        synthesize(paths[-1], seed=seed, families=fam, n_frames=40, hr_shape=(64, 64), stride=10)
    return paths


def _opts(archives, out, **kw) -> TrainOptions:
    base = dict(archives=list(archives), out=str(out), preset="tiny", crop=16, batch=2, steps=6, drop_path=0.1,
                lr=5e-4, log_every=1, val_every=0, ckpt_every=0, progress=False)
    base.update(kw)
    return TrainOptions(**base)


def _state(path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same_weights(a_path, b_path) -> None:
    a, b = _state(a_path), _state(b_path)
    for key in ("params", "params_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=0, atol=1e-6), (key, k)
    assert a["step"] == b["step"] and a["scheduler"] == b["scheduler"]


def test_sigusr2_stops_with_a_checkpoint_and_the_same_call_continues_exactly(archives, tmp_path):
    straight = run_training(_opts(archives, tmp_path / "straight.pt"), log=lambda _m: None)
    out = tmp_path / "split.pt"

    def signal_at_step_2(msg: str) -> None:
        if msg.startswith("step 2/"):
            os.kill(os.getpid(), signal.SIGUSR2)  # as Slurm's time-limit warning would

    before = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(TrainingStopped) as info:
        run_training(_opts(archives, out), log=signal_at_step_2)
    assert info.value.exit_code == EXIT_STOPPED == 75
    assert info.value.step == 2 and info.value.path == last_checkpoint_path(out)
    assert signal.getsignal(signal.SIGUSR2) == before  # the handler is put back
    assert _state(last_checkpoint_path(out))["step"] == 2 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    logs: list[str] = []
    path = run_training(_opts(archives, out), log=logs.append)  # the same call: no resume= given
    assert path == str(out)
    assert any(m.startswith("resume: continuing the stopped run from") and "step 2/6" in m for m in logs), logs
    assert not os.path.exists(last_checkpoint_path(out))
    _assert_same_weights(straight, out)
    assert _state(out)["meta"]["resumed_from"][0]["step"] == 2


def test_auto_resume_refuses_a_checkpoint_of_other_options(archives, tmp_path):
    out = tmp_path / "m.pt"
    run_training(_opts(archives, out, stop_at=2), log=lambda _m: None)  # leaves m.last.pt at step 2
    with pytest.raises(UserError, match=r"other options.*lr 0\.0005 -> 0\.0001.*delete") as info:
        run_training(_opts(archives, out, lr=1e-4), log=lambda _m: None)
    assert "\n" not in str(info.value)
    assert _state(last_checkpoint_path(out))["step"] == 2  # left as it was


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_JOB_ID", "MASTER_ADDR", "MASTER_PORT",
              "XVR_STOP_MARKER"):
        env.pop(k, None)
    return env


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return seen
    raise AssertionError(f"never saw {needle!r}: {''.join(seen)[-2000:]}")


def test_command_line_exits_75_on_sigterm_and_leaves_the_stop_marker(archives, tmp_path):
    opts = _opts(archives, tmp_path / "cli.pt", steps=40)
    cfg = tmp_path / "opts.json"
    cfg.write_text(json.dumps(opts.to_dict()))
    marker = tmp_path / "stopped.marker"
    env = dict(_env(), XVR_STOP_MARKER=str(marker))
    proc = subprocess.Popen([sys.executable, "-m", "xvr_batch.train", "--json", str(cfg)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc, "step 2/40")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-2000:]
    assert "training stopped on request" in err and "run the same command again" in err
    step = _state(last_checkpoint_path(opts.out))["step"]
    assert 2 <= step < 40
    assert json.loads(marker.read_text().splitlines()[0])["status"] == 75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_agree_on_the_step_when_only_one_is_signalled(archives, tmp_path):
    out = tmp_path / "ddp" / "m.pt"
    opts = _opts(archives, out, steps=60, drop_path=0.0)
    cfg = tmp_path / "opts.json"
    cfg.write_text(json.dumps(opts.to_dict()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "xvr_batch.train", "--json", str(cfg)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc, "step 3/60")
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGUSR2)  # one rank only: the other learns it through all_reduce
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun reports a worker's 75 as a failure: hence the stop marker
    stops = re.findall(r"training stopped on request at step (\d+)/60", err)
    ckpt = _state(last_checkpoint_path(out))
    assert len(stops) == 2 and stops[0] == stops[1] == str(ckpt["step"]), err[-3000:]  # both ranks, one step
    assert 3 <= ckpt["step"] < 60 and ckpt["rng"]["world_size"] == 2
    assert not out.exists()
