"""SWIN-XVR network: parity with the authors' code, shapes, batching, key reuse, checkpoints, tiling."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from conftest import to_xfusion_keys
from xvr_batch.errors import UserError
from xvr_batch.model import (
    ModelConfig, SwinXVR, drop_path_schedule, from_xfusion, load_checkpoint, preset, save_checkpoint,
)
from xvr_batch.model.checkpoint import xfusion_to_state_dict
from xvr_batch.model.tiling import plan_tiles, tiled_forward

SHARED = Path(os.environ.get("XVR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURE = SHARED / "fixtures" / "xfusion_parity_small.pt"


def _inputs(cfg: ModelConfig, b: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(b, cfg.num_lr, 1, h, w, generator=g)
    hr = torch.rand(b, 2, 1, 4 * h, 4 * w, generator=g)
    return lr, hr


@pytest.fixture(scope="module")
def fixture():
    if not FIXTURE.exists():
        pytest.skip(f"reference fixture not found at {FIXTURE} (set XVR_SHARED)")
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize("case_index", [0, 1])
def test_xfusion_parity(fixture, case_index):
    case = fixture["cases"][case_index]
    head = "centre" if case["class"] == "STF" else "all"
    model = from_xfusion(case["checkpoint"], fixture["config"], head=head)
    ref = case["out"]
    with torch.no_grad():
        both = model(case["lq"], case["hq"]).reshape(ref.shape)
        assert (both - ref).abs().max().item() <= 1e-4
        for i in range(ref.shape[0]):
            one = model(case["lq"][i:i + 1], case["hq"][i:i + 1]).reshape(ref[i:i + 1].shape)
            assert (one - ref[i:i + 1]).abs().max().item() <= 1e-4


def test_xfusion_prefers_ema_and_accepts_path(fixture, tmp_path):
    case = fixture["cases"][1]
    ckpt = dict(case["checkpoint"])
    raw = {k: torch.zeros_like(v) for k, v in ckpt["params"].items()}
    path = tmp_path / "xf.pth"
    torch.save({"params": raw, "params_ema": ckpt["params_ema"]}, path)
    model = from_xfusion(path, fixture["config"], head="all")
    with torch.no_grad():
        out = model(case["lq"], case["hq"])
    assert (out - case["out"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("network_g", [
    dict(num_frame=1, embed_dim=24, num_feat_ext=24, depths=[2], num_heads=[2], window_size=[3, 4, 4],
         mlp_ratio=2, num_feat_rec=16, upscale=4, upsampler="pixelshuffle", drop_path_rate=0.1),
    dict(num_frame=5, embed_dim=36, num_feat_ext=36, depths=[1, 3, 2], num_heads=[3, 6, 2], window_size=[7, 6, 6],
         mlp_ratio=4, num_feat_rec=8, upscale=4, upsampler="pixelshuffle"),
])
def test_xfusion_key_mapping_is_general(network_g):
    from xvr_batch.model.checkpoint import xfusion_config
    src = SwinXVR(xfusion_config(network_g, head="all")).eval()
    xf = to_xfusion_keys(src.state_dict())
    xf["layers.0.residual_group.blocks.0.attn.relative_position_index"] = torch.zeros(1)  # ignored buffer
    assert xfusion_to_state_dict(xf).keys() == src.state_dict().keys()
    model = from_xfusion({"params_ema": xf}, network_g, head="all")
    lr, hr = _inputs(model.cfg, 1, 13, 11)
    with torch.no_grad():
        assert torch.equal(model(lr, hr), src(lr, hr))


@pytest.mark.parametrize("nl,window,h,w", [(1, 4, 9, 7), (3, 8, 20, 36), (5, 6, 13, 17), (2, 8, 8, 8), (3, 8, 5, 30)])
@pytest.mark.parametrize("head", ["all", "centre"])
def test_shapes(nl, window, h, w, head):
    cfg = preset("tiny", num_lr=nl, window=window, head=head)
    model = SwinXVR(cfg).eval()
    lr, hr = _inputs(cfg, 2, h, w)
    with torch.no_grad():
        out = model(lr, hr)
    n_out = nl if head == "all" else 1
    assert out.shape == (2, n_out, 1, 4 * h, 4 * w)
    assert torch.isfinite(out).all()


def test_batch_invariance():
    cfg = preset("tiny", depths=(2, 2), num_heads=(3, 3))
    model = SwinXVR(cfg).eval()
    lr, hr = _inputs(cfg, 4, 19, 23, seed=3)
    with torch.no_grad():
        batched = model(lr, hr)
        single = torch.cat([model(lr[i:i + 1], hr[i:i + 1]) for i in range(4)])
    assert (batched - single).abs().max().item() <= 1e-5


def test_key_frame_reuse_matches_plain_forward():
    cfg = preset("tiny")
    model = SwinXVR(cfg).eval()
    lr, hr = _inputs(cfg, 3, 16, 20, seed=5)
    with torch.no_grad():
        plain = model(lr, hr)
        keys = model.encode_keys(hr[:1, :, :, :, :])  # all windows of a segment share the same two key frames
        shared = model.forward_features(lr, keys.expand(3, -1, -1, -1, -1))
        plain_shared = model(lr, hr[:1].expand(3, -1, -1, -1, -1))
        # encode each key frame separately, then stack, as the pipeline does
        k0 = model.encode_keys(hr[:, :1])
        k1 = model.encode_keys(hr[:, 1:])
        split = model.forward_features(lr, torch.cat([k0, k1], dim=1))
    assert (shared - plain_shared).abs().max().item() <= 1e-5
    assert (split - plain).abs().max().item() <= 1e-5


def test_drop_path_schedule():
    sched = drop_path_schedule(0.2, 24)
    assert len(sched) == 24 and sched[0] == 0.0 and abs(sched[-1] - 0.2) < 1e-7
    diffs = [b - a for a, b in zip(sched, sched[1:])]
    assert max(diffs) - min(diffs) < 1e-6
    model = SwinXVR(preset("paper"))
    rates = [blk.drop_path.p for st in model.stages for blk in st.blocks]
    assert rates == pytest.approx(sched)
    shifts = [blk.shift for st in model.stages for blk in st.blocks]
    assert shifts[0] == (0, 0, 0) and shifts[1] == (2, 4, 4)  # time shift vanishes: D fits one window


def test_paper_preset_size():
    model = SwinXVR(preset("paper"))
    n = sum(p.numel() for p in model.parameters())
    assert 9.95e6 < n < 10.05e6
    assert model.flops(100, 256) == pytest.approx(3.87e12, rel=0.01)


def test_checkpoint_round_trip(tmp_path):
    cfg = preset("tiny", head="centre")
    model = SwinXVR(cfg).eval()
    path = tmp_path / "w.pt"
    save_checkpoint(path, model, params_ema=model.state_dict(), meta={"steps": 3})
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == 1 and ckpt["meta"] == {"steps": 3} and loaded.cfg == cfg
    lr, hr = _inputs(cfg, 1, 12, 12)
    with torch.no_grad():
        assert torch.equal(loaded(lr, hr), model(lr, hr))
    assert not list(tmp_path.glob(".*tmp*"))


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    model = SwinXVR(preset("tiny"))
    good = tmp_path / "good.pt"
    save_checkpoint(good, model)
    ckpt = torch.load(good, weights_only=True)

    missing = dict(ckpt, params={k: v for k, v in ckpt["params"].items() if not k.startswith("stages.0.conv")})
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(UserError, match=r"missing keys \(first: stages\.0\.conv\.weight"):
        load_checkpoint(tmp_path / "missing.pt")

    extra = dict(ckpt, params=dict(ckpt["params"], **{"bogus.weight": torch.zeros(1)}))
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="unexpected keys.*bogus.weight"):
        load_checkpoint(tmp_path / "extra.pt")

    wrong = dict(ckpt, params=dict(ckpt["params"], **{"lr_conv.weight": torch.zeros(5, 1, 3, 3)}))
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match="wrong shapes.*lr_conv.weight"):
        load_checkpoint(tmp_path / "wrong.pt")

    class Evil:  # needs arbitrary unpickling: must be refused, never executed
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "xvr_batch.checkpoint", "x": Evil()}, f)
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()

    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="not a readable torch checkpoint|refused"):
        load_checkpoint(tmp_path / "garbage.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_tile_plan_covers_frame_with_overlap():
    tiles = plan_tiles(50, 70, 24, 8)
    covered = torch.zeros(50, 70)
    for t in tiles:
        covered[t.y0:t.y1, t.x0:t.x1] += 1
    assert covered.min() >= 1
    ys = sorted({t.y0 for t in tiles})
    assert all(b - a <= 24 - 8 for a, b in zip(ys, ys[1:]))


def test_tiled_matches_untiled_closely():
    cfg = preset("tiny", depths=(2,), num_heads=(3,))
    model = SwinXVR(cfg).eval()
    lr, hr = _inputs(cfg, 1, 40, 48, seed=1)
    with torch.no_grad():
        full = model(lr, hr)
        tiled = tiled_forward(model, lr, hr, tile=24, overlap=16)
    assert tiled.shape == full.shape
    mse = ((tiled - full) ** 2).mean().item()
    rng = (full.max() - full.min()).item()
    psnr = 10 * torch.log10(torch.tensor(rng ** 2 / mse)).item()
    assert psnr > 30, psnr  # random weights; the pipeline test checks >= 50 dB with the default weights
    with pytest.raises(ValueError, match="at least one window"):
        tiled_forward(model, lr, hr, tile=24, overlap=cfg.window - 1)


def test_key_mean_residual_reuse_and_default_off():
    assert preset("paper").residual == "none"  # the paper's network has no global skip
    cfg = preset("tiny", residual="key_mean")
    model = SwinXVR(cfg).eval()
    lr, hr = _inputs(cfg, 2, 12, 16, seed=7)
    with torch.no_grad():
        plain = model(lr, hr)
        reused = model.forward_features(lr, model.encode_keys(hr), SwinXVR.key_base(hr))
        with pytest.raises(ValueError, match="key_base"):
            model.forward_features(lr, model.encode_keys(hr))
        # with the head zeroed, the output is exactly the mean of the two key frames
        torch.nn.init.zeros_(model.conv_last.weight)
        torch.nn.init.zeros_(model.conv_last.bias)
        base_only = model(lr, hr)
    assert (plain - reused).abs().max().item() <= 1e-5
    assert torch.allclose(base_only, hr.mean(dim=1, keepdim=True).expand_as(base_only))
