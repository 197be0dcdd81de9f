"""Training: checkpoints, exact resume, learning, DDP replicas in sync, fine-tuning, user errors.

Everything runs on real (tiny) synthetic archives, with real files and real processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, to_xfusion_keys

from xvr_batch.errors import UserError
from xvr_batch.model import SwinXVR, load_checkpoint, save_checkpoint
from xvr_batch.model.checkpoint import xfusion_config, xfusion_to_state_dict
from xvr_batch.synth import generate, synthesize, write_archive
from xvr_batch.train import (
    PSNR_LOSS_EPS, TrainOptions, TrainSamples, _inspect_archive, _run_identity, detect_dist_env, frame_psnr_loss,
    last_checkpoint_path, main, options_from_dict, run_training,
)

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = dict(n_frames=40, hr_shape=(64, 64), stride=10)


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one thread is as fast, and much faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    paths = {}
    for name, seed, fam in (("a", 1, "particles"), ("b", 2, "rotor"), ("val", 3, "cavity")):
        paths[name] = str(root / f"{name}.h5")
        synthesize(paths[name], seed=seed, families=fam, **ARCHIVE)
    arrays = generate(seed=4, **ARCHIVE)
    del arrays["/exchange/data_gt"]
    paths["nogt"] = str(root / "nogt.h5")
    write_archive(paths["nogt"], arrays)
    return paths


def _opts(data, out, **kw) -> TrainOptions:
    base = dict(archives=[data["a"], data["b"]], out=str(out), preset="tiny", crop=16, batch=2, steps=4,
                log_every=1, val_every=0, ckpt_every=0, progress=False)
    base.update(kw)
    return TrainOptions(**base)


def _quiet(_msg: str) -> None:
    pass


def _state(path) -> dict:
    return torch.load(path, weights_only=True)


# ------------------------------------------------------------------------------------------ sampling


def test_samples_respect_windows_and_brackets(data):
    infos = [_inspect_archive(data["a"], "training", 4)]
    keys = infos[0].hr_index
    for head in ("all", "centre"):
        ds = TrainSamples(infos, 3, head, 16, 4, seed=0, rank=0, key_jitter=True, p_jitter=0.5,
                          dose_range=(1, 7), p_noise=0.5, flips=True, length=400)
        kinds = set()
        for g in range(400):
            s = ds.draw(g)
            first, last = min(s.frames), max(s.frames)
            kinds.add(s.keys[0][0])
            if head == "all":
                assert s.targets == s.frames and last - first == 2 and s.frames == tuple(range(first, last + 1))
            else:
                assert s.targets == (s.frames[1],)
            (k0, a), (k1, b) = s.keys
            assert k0 == k1
            if k0 == "gt":  # jittered: 1..S frames outside the window, clipped to the archive
                assert a == 0 or 1 <= first - a <= infos[0].spacing
                assert b == 39 or 1 <= b - last <= infos[0].spacing
            elif head == "all":  # the archive's real bracket of the window
                assert keys[a] <= first or a == 0
                assert keys[b] >= last or b == len(keys) - 1
            assert s.y == 0 and s.x == 0  # LR 16x16, crop 16: the only origin
        assert kinds == {"gt", "hr"}
        item = ds[7]
        n_out = 3 if head == "all" else 1
        assert item["lr"].shape == (3, 1, 16, 16) and item["hr"].shape == (2, 1, 64, 64)
        assert item["target"].shape == (n_out, 1, 64, 64)
        assert torch.equal(ds[7]["target"], item["target"])  # a pure function of (seed, rank, index)
        ds.close()


def test_motion_sampling_keeps_the_most_moving_candidate(data):
    """p_motion=1: each sample is the candidate (of motion_tries draws) whose truth moves most from the
    key mean; p_motion=0 leaves the plain draw; both stay pure functions of the sample number."""
    from xvr_batch.train import _motion_score

    infos = [_inspect_archive(data["a"], "training", 4), _inspect_archive(data["b"], "training", 4)]
    common = dict(seed=0, rank=0, key_jitter=True, p_jitter=0.5, dose_range=(1, 7), p_noise=0.0, flips=True,
                  length=50)
    plain = TrainSamples(infos, 3, "all", 8, 4, **common)
    moving = TrainSamples(infos, 3, "all", 8, 4, p_motion=1.0, motion_tries=4, **common)
    gains = []
    for g in range(12):
        candidates = [plain._load(plain.draw(g, k), g) for k in range(4)]
        scores = [_motion_score(c) for c in candidates]
        got = moving[g]
        assert torch.equal(plain[g]["target"], candidates[0]["target"])  # candidate 0 is the plain draw
        best = candidates[int(np.argmax(scores))]
        assert torch.equal(got["target"], best["target"]) and torch.equal(got["lr"], best["lr"])
        assert torch.equal(moving[g]["target"], got["target"])
        gains.append(max(scores) - scores[0])
    assert max(gains) > 0  # the choice mattered for some samples
    plain.close()
    moving.close()


def test_dist_env_detection():
    assert detect_dist_env({}).world_size == 1
    d = detect_dist_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (1, 4, 1, "torchrun")
    d = detect_dist_env({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3"})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (3, 8, 3, "srun")
    # inside an sbatch script, outside srun: a plain run
    assert detect_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).world_size == 1


# ------------------------------------------------------------------------------------------ runs


def test_few_steps_write_loadable_checkpoints(data, tmp_path):
    out = tmp_path / "w" / "model.pt"
    logs: list[str] = []
    early = run_training(_opts(data, out, steps=4, stop_at=2, val_archives=[data["val"]]), log=logs.append)
    assert early == last_checkpoint_path(out) == str(tmp_path / "w" / "model.last.pt")
    assert _state(early)["step"] == 2 and not out.exists()

    path = run_training(_opts(data, out, steps=4, ckpt_every=2, val_archives=[data["val"]],
                              resume=early), log=logs.append)
    assert path == str(out) and out.exists()
    assert not os.path.exists(last_checkpoint_path(out))  # superseded by the final checkpoint
    model, ckpt = load_checkpoint(out)  # weights_only load of our format
    assert isinstance(model, SwinXVR) and model.cfg.embed_dim == 24
    raw = _state(out)
    assert raw["step"] == 4
    assert {"optimizer", "scheduler", "rng", "params", "params_ema", "train_options"} <= set(raw)
    assert raw["scheduler"]["last_epoch"] == 4 and raw["optimizer"]["state"]
    meta = raw["meta"]
    assert [d["name"] for d in meta["data"]] == ["a.h5", "b.h5"] and all(len(d["fingerprint"]) == 64
                                                                         for d in meta["data"])
    assert meta["hardware"]["world_size"] == 1 and meta["hardware"]["torch"]
    assert meta["steps"] == 4 and meta["wall_time_s"] > 0
    assert [s for s, _ in meta["loss_log"]] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for _, v in meta["loss_log"])
    psnr = meta["final_val_psnr"]
    assert psnr["per_archive"].keys() == {"val.h5"} and np.isfinite(psnr["mean"])
    assert meta["resumed_from"][0]["step"] == 2
    assert any("validation PSNR" in m for m in logs) and any("loss" in m for m in logs)


def test_resume_is_exact(data, tmp_path):
    kw = dict(steps=6, drop_path=0.1, lr=5e-4)  # stochastic depth on: the torch RNG must be restored too
    straight = run_training(_opts(data, tmp_path / "straight.pt", **kw), log=_quiet)
    half = run_training(_opts(data, tmp_path / "split.pt", stop_at=3, **kw), log=_quiet)
    assert _state(half)["step"] == 3
    # changed options (here: lr) are allowed but reported
    logs: list[str] = []
    run_training(_opts(data, tmp_path / "drift.pt", resume=half, stop_at=4, **dict(kw, lr=1e-4)), log=logs.append)
    assert any("changed since the checkpoint: lr 0.0005 -> 0.0001" in m for m in logs), logs
    split = run_training(_opts(data, tmp_path / "split.pt", resume=half, **kw), log=_quiet)
    a, b = _state(straight), _state(split)
    # Bit-identical in practice; CPU BLAS kernels may round differently with buffer alignment, so allow 1e-6.
    # (A wrong RNG state, data stream, EMA or optimizer state shows up as differences of 1e-4 and more.)
    for key in ("params", "params_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.allclose(a[key][k], b[key][k], rtol=0, atol=1e-6), (key, k)
    assert [s for s, _ in a["meta"]["loss_log"]] == [s for s, _ in b["meta"]["loss_log"]] == list(range(1, 7))
    assert np.allclose([v for _, v in a["meta"]["loss_log"]], [v for _, v in b["meta"]["loss_log"]], rtol=1e-5, atol=0)
    for i, st in a["optimizer"]["state"].items():
        assert torch.allclose(st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"], rtol=0, atol=1e-6)
        assert int(st["step"]) == int(b["optimizer"]["state"][i]["step"]) == 6
    assert a["scheduler"] == b["scheduler"]
    # a different schedule length cannot silently continue
    with pytest.raises(UserError, match="steps"):
        run_training(_opts(data, tmp_path / "x.pt", resume=split, steps=8), log=_quiet)
    with pytest.raises(UserError, match="resume checkpoint not found"):
        run_training(_opts(data, tmp_path / "x.pt", resume=half, **kw), log=_quiet)  # removed at the end


def test_workers_and_centre_head(data, tmp_path):
    # the data stream does not depend on worker processes
    kw = dict(steps=2, log_every=2)
    a = _state(run_training(_opts(data, tmp_path / "w0.pt", **kw), log=_quiet))
    b = _state(run_training(_opts(data, tmp_path / "w2.pt", num_workers=2, **kw), log=_quiet))
    assert all(torch.allclose(a["params"][k], b["params"][k], rtol=0, atol=1e-6) for k in a["params"])
    # head "centre": one output per window, validated on the inference plan's sliding windows
    c = _state(run_training(_opts(data, tmp_path / "c.pt", head="centre", val_archives=[data["val"]], **kw),
                            log=_quiet))
    assert c["config"]["head"] == "centre" and np.isfinite(c["meta"]["final_val_psnr"]["mean"])


def test_loss_decreases(data, tmp_path):
    out = run_training(_opts(data, tmp_path / "l.pt", steps=60, lr=2e-3, eta_min=1e-4, p_noise=0.0, crop=8,
                             archives=[data["a"]]), log=_quiet)
    losses = [v for _, v in _state(out)["meta"]["loss_log"]]
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"L1 loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
    assert last < 0.7 * first, (first, last)


def test_frame_psnr_loss_is_the_mean_frame_psnr():
    """The "psnr" loss is -ln(10)/10 times the mean per-frame PSNR (range 1), and each frame weighs the same."""
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 16, generator=g)
    err = torch.randn(2, 3, 16, 16, generator=g) * torch.tensor([1e-3, 1e-2, 1e-1]).view(1, 3, 1, 1)
    pred = target + err
    mse = err.square().mean(dim=(-2, -1))
    mean_psnr = (10 * torch.log10(1 / mse)).mean()
    loss = frame_psnr_loss(pred, target, eps=0.0)
    assert torch.allclose(loss, -mean_psnr * np.log(10) / 10, rtol=1e-5)
    # gradient per frame ~ err / mse: the frame with the smallest error gets the largest push per pixel
    p = pred.clone().requires_grad_(True)
    frame_psnr_loss(p, target, eps=0.0).backward()
    per_frame = p.grad.abs().mean(dim=(0, 2, 3))  # about 1 / (error scale): 10x per frame here
    assert per_frame[0] > 5 * per_frame[1] and per_frame[1] > 5 * per_frame[2], per_frame
    # an exact frame is finite (eps)
    assert torch.isfinite(frame_psnr_loss(target, target)) and float(frame_psnr_loss(target, target)) == \
        pytest.approx(np.log(PSNR_LOSS_EPS), rel=1e-6)


def test_psnr_loss_trains_and_is_recorded(data, tmp_path):
    out = run_training(_opts(data, tmp_path / "p.pt", steps=40, lr=2e-3, eta_min=1e-4, p_noise=0.0, crop=8,
                             archives=[data["a"]], loss="psnr"), log=_quiet)
    ck = _state(out)
    losses = [v for _, v in ck["meta"]["loss_log"]]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < first - np.log(10) * 0.3, (first, last)  # mean frame PSNR up by more than 3 dB
    assert ck["meta"]["recipe"]["loss"] == "mean log frame MSE" and ck["train_options"]["loss"] == "psnr"
    with pytest.raises(UserError, match="loss must be one of l1, psnr"):
        run_training(_opts(data, tmp_path / "bad.pt", loss="l2"), log=_quiet)


def test_a_run_recorded_before_an_option_existed_is_the_same_run():
    """A stopped run's options written before `loss` existed ran with L1: its resume identity is unchanged."""
    now = TrainOptions(archives=["a.h5"], out="o.pt").to_dict()
    old = {k: v for k, v in now.items() if k not in ("loss", "time_lr_mult")}
    assert _run_identity(old) == _run_identity(now)
    assert _run_identity(old) != _run_identity(dict(now, loss="psnr"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_replicas_stay_in_sync(data, tmp_path):
    out = tmp_path / "ddp" / "m.pt"
    opts = _opts(data, out, steps=3, ckpt_every=2, drop_path=0.1, debug_report=True, val_archives=[data["val"]])
    cfg = tmp_path / "opts.json"
    cfg.write_text(json.dumps(opts.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "xvr_batch.train", "--json", str(cfg)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [3, 3]
    assert reports[0]["params_sha256"] == reports[1]["params_sha256"]
    assert reports[0]["params_ema_sha256"] == reports[1]["params_ema_sha256"]
    # only rank 0 writes: the intermediate at step 2 and the final one
    assert [r["checkpoints_written"] for r in reports] == [2, 0]
    assert res.stdout.count("wrote ") == 1
    ckpt = _state(out)
    assert ckpt["meta"]["hardware"]["world_size"] == 2 and ckpt["rng"]["world_size"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.pt", "m.pt.rank0.json", "m.pt.rank1.json"]
    from xvr_batch.train import _params_sha
    assert _params_sha(ckpt["params"]) == reports[0]["params_sha256"]


# ------------------------------------------------------------------------------------------ fine-tuning


NETWORK_G = dict(type="VideoTransformerSTF", num_in_ch=1, num_frame=3, embed_dim=24, num_feat_ext=24,
                 depths=[2], num_heads=[3], window_size=[5, 8, 8], mlp_ratio=2, num_feat_rec=16, upscale=4,
                 upsampler="pixelshuffle", drop_path_rate=0.0, resi_connection="1conv")


@pytest.mark.parametrize("as_file", [False, True])
def test_finetune_from_xfusion_starts_from_its_weights(data, tmp_path, as_file):
    torch.manual_seed(123)
    src = SwinXVR(xfusion_config(NETWORK_G, head="all"))
    xf = to_xfusion_keys(src.state_dict())
    assert xfusion_to_state_dict(xf).keys() == src.state_dict().keys()
    pth = tmp_path / "net_g.pth"
    torch.save({"params_ema": xf, "params": {k: torch.zeros_like(v) for k, v in xf.items()}}, pth)
    network_g: str | dict = NETWORK_G
    if as_file:
        import yaml

        network_g = str(tmp_path / "options.yml")
        Path(network_g).write_text(yaml.safe_dump({"name": "xfusion", "network_g": NETWORK_G}))
    # lr 0: the optimizer does not move the weights, so the end state is the start state
    out = run_training(_opts(data, tmp_path / "ft.pt", steps=1, lr=0.0, eta_min=0.0, init=str(pth),
                             xfusion_network_g=network_g), log=_quiet)
    ckpt = _state(out)
    for k, v in src.state_dict().items():
        assert torch.equal(ckpt["params"][k], v), k
        assert torch.equal(ckpt["params_ema"][k], v), k
    assert ckpt["meta"]["init"]["kind"] == "xfusion" and ckpt["config"]["window_t"] == 5

    # and from our own checkpoint: its params_ema is the start
    ours = tmp_path / "ours.pt"
    zeros = {k: torch.zeros_like(v) for k, v in src.state_dict().items()}
    src_zero = SwinXVR(src.cfg)
    src_zero.load_state_dict(zeros)
    save_checkpoint(ours, src_zero, params_ema=src.state_dict())
    out2 = run_training(_opts(data, tmp_path / "ft2.pt", steps=1, lr=0.0, eta_min=0.0, init=str(ours)), log=_quiet)
    ckpt2 = _state(out2)
    assert all(torch.equal(ckpt2["params"][k], v) for k, v in src.state_dict().items())
    assert ckpt2["meta"]["init"]["kind"] == "xvr_batch"


# ------------------------------------------------------------------------------------------ user errors


def test_user_errors(data, tmp_path):
    out = tmp_path / "e.pt"
    with pytest.raises(UserError, match="data_gt") as err:
        run_training(_opts(data, out, archives=[data["a"], data["nogt"]]), log=_quiet)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        run_training(_opts(data, out, archives=[str(tmp_path / "missing.h5")]), log=_quiet)
    with pytest.raises(UserError, match="crop"):
        run_training(_opts(data, out, crop=32), log=_quiet)
    with pytest.raises(UserError, match="preset"):
        run_training(_opts(data, out, preset="huge"), log=_quiet)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pth"):
        run_training(_opts(data, out, init=str(bad)), log=_quiet)
    xf = tmp_path / "xf.pth"
    torch.save({"params_ema": {"conv_first.weight": torch.zeros(1)}}, xf)
    with pytest.raises(UserError, match="network_g"):
        run_training(_opts(data, out, init=str(xf)), log=_quiet)
    with pytest.raises(UserError, match="p_motion"):
        run_training(_opts(data, out, p_motion=1.5), log=_quiet)
    with pytest.raises(UserError, match="motion_tries"):
        run_training(_opts(data, out, motion_tries=0), log=_quiet)
    with pytest.raises(UserError, match="unknown training options"):
        options_from_dict({"archives": [data["a"]], "out": str(out), "stepz": 3})
    assert not out.exists()


def test_cli_reports_user_error_in_one_line(data, tmp_path, capsys):
    cfg = tmp_path / "o.json"
    cfg.write_text(json.dumps({"archives": [data["nogt"]], "out": str(tmp_path / "o.pt"), "preset": "tiny"}))
    assert main(["--json", str(cfg), "--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "data_gt" in err and "\n" not in err


def test_cli_train_passes_the_recipe_options(data, tmp_path):
    """`xvr-batch train` forwards the sampling/regularisation flags to the run and records them."""
    out = tmp_path / "cli.pt"
    proc = cli("train", data["a"], data["b"], "-o", out, "--preset", "tiny", "--steps", 2, "--batch", 2,
               "--crop", 16, "--p-motion", 1, "--p-noise", 0, "--drop-path", 0.05, "--num-workers", 0, "-q",
               "--time-cond", "--loss", "psnr", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(str(out))
    ck = _state(out)
    recipe = ck["meta"]["recipe"]
    assert recipe["p_motion"] == 1.0 and recipe["p_noise"] == 0.0 and recipe["drop_path"] == 0.05
    assert ck["config"]["time_cond"] is True and "time_embed" in ck["params"]
    assert ck["train_options"]["loss"] == "psnr"
    assert ck["step"] == 2
    bad = cli("train", data["a"], "-o", tmp_path / "x.pt", "--p-motion", 2)
    assert bad.returncode == 2 and "--p-motion" in bad.stderr
