"""Time conditioning (``ModelConfig.time_cond``): the network told where each LR frame lies between its keys.

The model terms are checked exactly (zero start = the network without them; the base formula), then each place
that feeds a model its inputs: the training samples and the training run from weights without it, and the
reconstruction pipeline, against the formula on a real archive.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import make_archive

from xvr_batch.driver import reconstruct
from xvr_batch.errors import UserError
from xvr_batch.model import SwinXVR, load_checkpoint, preset, save_checkpoint
from xvr_batch.model.config import ModelConfig
from xvr_batch.model.swin_xvr import TIME_PARAMS, with_time_cond
from xvr_batch.normalise import time_weight
from xvr_batch.pipeline import Options
from xvr_batch.synth import synthesize
from xvr_batch.train import TrainOptions, TrainSamples, _inspect_archive, run_training


def _pair(seed: int = 0, **kw) -> tuple[SwinXVR, SwinXVR]:
    """A tiny key_mean network with non-trivial weights, and the same network with time conditioning (zero)."""
    torch.manual_seed(seed)
    plain = SwinXVR(preset("tiny", residual="key_mean", window=4, **kw)).eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("bias") or "rel_bias_table" in name:
                p.normal_(0, 0.05)
    return plain, with_time_cond(plain)


def _inputs(b: int = 2, h: int = 8, w: int = 12, nl: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, nl, 1, h, w, generator=g), torch.rand(b, 2, 1, 4 * h, 4 * w, generator=g),
            torch.rand(b, nl, generator=g))


def test_zero_start_is_the_network_without_it():
    plain, timed = _pair()
    assert {k for k in timed.state_dict()} - {k for k in plain.state_dict()} == set(TIME_PARAMS)
    assert with_time_cond(timed) is timed and timed.base_gate.item() == 0 and not timed.time_embed.any()
    assert timed.cfg.parameter_count() == sum(p.numel() for p in timed.parameters())
    assert timed.cfg.parameter_count() == plain.cfg.parameter_count() + plain.cfg.embed_dim + 1
    lr, hr, times = _inputs()
    with torch.no_grad():
        assert torch.equal(plain(lr, hr), timed(lr, hr, times))
        timed.time_embed.normal_()  # the time vector reaches the output
        assert (plain(lr, hr) - timed(lr, hr, times)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="time weight"):
        timed(lr, hr)


def test_base_gate_moves_the_base_towards_the_key_blend():
    plain, timed = _pair(seed=3)
    lr, hr, times = _inputs(seed=4)
    gate = 0.7
    with torch.no_grad():
        timed.base_gate.fill_(gate)
        got = timed(lr, hr, times) - plain(lr, hr)  # B, NL, 1, H, W
    want = gate * (times - 0.5)[:, :, None, None, None] * (hr[:, 1:2] - hr[:, 0:1])
    assert torch.allclose(got, want, atol=1e-5)
    # gate 1: the base is the time blend of the keys, (1 - w) K0 + w K1
    with torch.no_grad():
        timed.base_gate.fill_(1.0)
        base = timed(lr, hr, times) - plain(lr, hr) + SwinXVR.key_base(hr)
    blend = (1 - times)[:, :, None, None, None] * hr[:, 0:1] + times[:, :, None, None, None] * hr[:, 1:2]
    assert torch.allclose(base, blend, atol=1e-5)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_config_refuses_a_non_boolean(value):
    with pytest.raises(UserError, match="time_cond must be true or false"):
        ModelConfig.from_dict(dict(preset("tiny").to_dict(), time_cond=value))


def test_old_configs_load_without_it(tmp_path):
    d = preset("tiny").to_dict()
    del d["time_cond"]  # a checkpoint written before the field existed
    assert ModelConfig.from_dict(d).time_cond is False
    plain, timed = _pair()
    save_checkpoint(tmp_path / "t.pt", timed)
    model, _ = load_checkpoint(tmp_path / "t.pt")
    assert model.cfg.time_cond and torch.equal(model.base_gate, timed.base_gate)


# ------------------------------------------------------------------------------------------------ training

ARCHIVE = dict(n_frames=40, hr_shape=(64, 64), stride=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc_data")
    paths = []
    for seed, fam in ((1, "particles"), (2, "rotor")):
        paths.append(str(root / f"a{seed}.h5"))
        synthesize(paths[-1], seed=seed, families=fam, **ARCHIVE)
    return paths


def test_samples_carry_each_frames_time_weight(data):
    infos = [_inspect_archive(p, "train", 4) for p in data]
    ds = TrainSamples(infos, num_lr=3, head="all", crop=8, scale=4, seed=0, rank=0, key_jitter=True, p_jitter=0.5,
                      dose_range=(1, 7), p_noise=0.0, flips=False, length=40)
    kinds = set()
    for g in range(40):
        spec = ds.draw(g)
        info = infos[spec.archive]
        t0, t1 = ((int(info.hr_index[i]) if kind == "hr" else int(i)) for kind, i in spec.keys)
        kinds |= {kind for kind, _ in spec.keys}
        times = ds[g]["times"]
        assert times.dtype == torch.float32 and times.shape == (3,)
        assert times.tolist() == pytest.approx([time_weight(t, t0, t1) for t in spec.frames])
    assert kinds == {"hr", "gt"}  # both real and jittered brackets were checked


def test_training_turns_it_on_over_weights_without_it(data, tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "plain.pt"
    save_checkpoint(init, SwinXVR(preset("tiny", residual="key_mean", window=4)).eval())
    kw = dict(archives=data, preset="tiny", crop=8, batch=2, steps=3, log_every=1, val_every=0, ckpt_every=0,
              progress=False, init=str(init), val_archives=[data[0]])
    logs: list[str] = []
    # no steps taken: the validation of the start is the init network's, to the bit
    a = run_training(TrainOptions(out=str(tmp_path / "a.pt"), time_cond=False, **dict(kw, steps=1, lr=0.0)),
                     log=logs.append)
    b = run_training(TrainOptions(out=str(tmp_path / "b.pt"), time_cond=True, **dict(kw, steps=1, lr=0.0)),
                     log=logs.append)
    va = torch.load(a, weights_only=True)["meta"]["final_val_psnr"]["mean"]
    vb = torch.load(b, weights_only=True)["meta"]["final_val_psnr"]["mean"]
    assert va == vb
    out = run_training(TrainOptions(out=str(tmp_path / "c.pt"), time_cond=True, **kw), log=logs.append)
    model, _ = load_checkpoint(out)
    assert model.cfg.time_cond
    assert model.base_gate.abs().item() > 0 and model.time_embed.abs().max().item() > 0  # they learn
    # weights that have it cannot be trained as a network without it
    with pytest.raises(UserError, match="time conditioning"):
        run_training(TrainOptions(out=str(tmp_path / "d.pt"), time_cond=False, **dict(kw, init=out)),
                     log=logs.append)


# ------------------------------------------------------------------------------------------------ pipeline

def _frames(path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["/exchange/data"][()].astype(np.float64)


@pytest.mark.parametrize("archive,extra", [
    ({}, {}),
    # tiled: the base and the key difference are cut to each tile
    (dict(n=24, lr_shape=(24, 28), hr_index=(2, 11, 21)), dict(tile=16, tile_overlap=8)),
])
def test_pipeline_gives_each_frame_its_time_weight(tmp_path, archive, extra):
    arc = make_archive(tmp_path / "a.h5", **archive)
    plain, timed = _pair(seed=5)
    gate = 0.5
    with torch.no_grad():
        timed.base_gate.fill_(gate)
    outs = {}
    for name, model in (("plain", plain), ("timed", timed)):
        save_checkpoint(tmp_path / f"{name}.pt", model)
        opts = Options(archive=str(arc), output=str(tmp_path / f"{name}.h5"), weights=str(tmp_path / f"{name}.pt"),
                       refine="none", registration="none", unit_frames=7, batch=3, **extra)
        outs[name] = _frames(reconstruct(opts, progress=False))
    with h5py.File(arc, "r") as f:
        keys = f["/exchange/hr_index"][()].tolist()
        hr = f["/exchange/data_hr"][()].astype(np.float64)
        dark = f["/exchange/data_dark_hr"][()].astype(np.float64).mean(axis=0)
    checked = 0
    for t in range(keys[0] + 1, keys[-1]):
        if t in keys:
            continue
        k = max(i for i, v in enumerate(keys) if v < t)
        w = time_weight(t, keys[k], keys[k + 1])
        # the model-to-counts map is affine per pixel (dark + flat span), so in counts the base moves by
        # gate (w - 1/2) (K1 - K0) with the keys' own counts, dark included in both and cancelling
        want = gate * (w - 0.5) * ((hr[k + 1] - dark) - (hr[k] - dark))
        got = outs["timed"][t] - outs["plain"][t]
        inside = (outs["plain"][t] > 0) & (outs["timed"][t] > 0)  # not at the camera's floor
        assert inside.mean() > 0.5
        np.testing.assert_allclose(got[inside], want[inside], rtol=0, atol=1e-2)  # counts; a frame off: 10 and more
        checked += 1
    assert checked > 15
    # outside the keys (nearest-key frames) the base does not move
    assert np.array_equal(outs["timed"][: keys[0]], outs["plain"][: keys[0]])
