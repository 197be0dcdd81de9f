"""Tests for the opt-in domain randomisation of xvr_batch.synth (effects=..., the extra families)."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from xvr_batch import synth

KW = dict(n_frames=20, hr_shape=(64, 64), scale=4, stride=10, offset=0, families="particles,rotor", speed=1.0)


def _gen(effects=None, **kw):
    args = {**KW, "seed": 0, "lr_dose": None, "hr_dose": None, "dtype": "uint16", **kw}
    return synth._generate(**args, effects=effects)


def _hf(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.mean(np.diff(x, axis=-1) ** 2) + np.mean(np.diff(x, axis=-2) ** 2))


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------------------------------ defaults

@pytest.mark.parametrize("kw", [dict(), dict(families=None, seed=11, dtype="uint8"),
                                dict(families="crack,cavity", dtype="float32", lr_dose=2000.0)])
def test_no_effects_is_the_plain_archive(kw) -> None:
    plain_kw = {k: v for k, v in {**KW, "seed": 0, **kw}.items()}
    plain = synth.generate(**plain_kw)
    for none in (None, [], "", "none"):
        arrays, params = _gen(none, **kw)
        _assert_same(arrays, plain)
        assert "effects" not in params and "effect_params" not in params


def test_plain_metadata_has_no_effect_keys(tmp_path) -> None:
    summary = synth.synthesize(tmp_path / "a.h5", **{**KW, "seed": 3})
    assert "effects" not in summary
    with h5py.File(tmp_path / "a.h5", "r") as f:
        params = json.loads(f["/synth"].attrs["params_json"])
        assert "effects" not in params and "effects" not in f["/synth"].attrs


def test_resolve_effects() -> None:
    assert synth.resolve_effects(None) == []
    assert synth.resolve_effects("fpn+psf") == ["psf", "fpn"]  # canonical order
    assert synth.resolve_effects("all") == list(synth.EFFECTS)
    assert synth.resolve_effects("all,-flicker") == [e for e in synth.EFFECTS if e != "flicker"]
    r = [synth.resolve_effects("random", seed) for seed in range(12)]
    assert r == [synth.resolve_effects("random", seed) for seed in range(12)]  # by seed
    assert len({tuple(x) for x in r}) > 3
    with pytest.raises(ValueError, match="unknown effects"):
        synth.resolve_effects("psf,lava")
    with pytest.raises(ValueError, match="unknown effects"):
        synth.generate(**KW, effects=["blur"])


# ------------------------------------------------------------------------------------------ every effect

@pytest.mark.parametrize("effect", synth.EFFECTS)
def test_effect_deterministic_and_changes_the_data(effect: str) -> None:
    a, pa = _gen([effect], seed=4)
    b, pb = _gen([effect], seed=4)
    _assert_same(a, b)
    assert pa["effects"] == [effect] and json.dumps(pa["effect_params"], sort_keys=True) == json.dumps(
        pb["effect_params"], sort_keys=True)
    plain, _ = _gen(None, seed=4)
    assert not np.array_equal(a["/exchange/data_lr"], plain["/exchange/data_lr"])
    other, po = _gen([effect], seed=5)
    assert pa["effect_params"] != po["effect_params"]


def test_effect_streams_are_independent() -> None:
    _, one = _gen(["psf"], seed=2)
    _, many = _gen(["psf", "fpn", "flicker", "misreg", "texture"], seed=2)
    assert one["effect_params"]["psf"] == many["effect_params"]["psf"]
    _, two = _gen(["flicker", "defects"], seed=2)
    assert two["effect_params"]["flicker"] == many["effect_params"]["flicker"]
    # and the scene does not change: the families and speeds are the plain archive's
    _, plain = _gen(None, seed=2)
    assert many["families"] == plain["families"] and many["speeds"] == plain["speeds"]


def test_psf_lowers_high_frequencies() -> None:
    fx, p = _gen(["psf"], seed=0)
    plain, pp = _gen(None, seed=0)
    assert p["effect_params"]["psf"]["sigma_hr"] > pp["psf_sigma_hr"] + 0.5  # this seed draws a wide PSF
    assert _hf(fx["/exchange/data_gt"]) < 0.5 * _hf(plain["/exchange/data_gt"])
    assert p["effect_params"]["psf"]["sigma_lr"] > pp["psf_sigma_lr"] + 0.2
    assert _hf(fx["/exchange/data_lr"]) < 0.6 * _hf(plain["/exchange/data_lr"])


def test_hot_and_dead_pixels_fixed_across_frames() -> None:
    fx, p = _gen(["defects"], seed=1)
    d = p["effect_params"]["defects"]
    for cam in ("lr", "hr"):
        data = fx[f"/exchange/data_{cam}"]
        hot = np.all(data == 65535, axis=0)
        dead = np.all(data == 0, axis=0)
        assert hot.sum() >= d[f"hot_pixels_{cam}"] >= 1
        assert dead.sum() >= d[f"dead_pixels_{cam}"] >= 1
        # fixed positions: the darks and flats show the same defects
        assert np.all(fx[f"/exchange/data_dark_{cam}"][:, hot] == 65535)
        assert np.all(fx[f"/exchange/data_white_{cam}"][:, dead] == 0)
    plain, _ = _gen(None, seed=1)
    assert not np.any(np.all(plain["/exchange/data_lr"] == 65535, axis=0))


def test_saturation_clips_bright_regions() -> None:
    fx, p = _gen(["saturation"], seed=2)
    assert p["effect_params"]["saturation"]["fill_lr"] > 1.0
    assert (fx["/exchange/data_lr"] == 65535).mean() > 0.01
    assert (fx["/exchange/data_white_lr"] == 65535).mean() > 0.05
    plain, _ = _gen(None, seed=2)
    assert (plain["/exchange/data_lr"] == 65535).mean() == 0


def test_flicker_changes_per_frame_mean() -> None:
    kw = dict(families=["static"], n_frames=40, seed=3)
    fx, p = _gen(["flicker"], **kw)
    plain, _ = _gen(None, **kw)
    dark = plain["/exchange/data_dark_hr"].mean(axis=0)
    ratio = (fx["/exchange/data_gt"] - dark).mean(axis=(1, 2)) / (plain["/exchange/data_gt"] - dark).mean(axis=(1, 2))
    jitter = p["effect_params"]["flicker"]["jitter"]
    assert np.std(np.diff(ratio)) > 0.7 * jitter  # per-frame changes of the intensity
    assert abs(ratio[-1] / ratio[0] - 1) > 0.0 and np.ptp(ratio) > 2 * jitter
    # the plain beam only drifts slowly
    m = (plain["/exchange/data_gt"] - dark).mean(axis=(1, 2))
    assert np.std(np.diff(m / m.mean())) < 0.3 * jitter


def test_read_noise_and_row_banding() -> None:
    fx, p = _gen(["read"], seed=5)
    q = p["effect_params"]["read"]
    for cam in ("lr", "hr"):
        darks = fx[f"/exchange/data_dark_{cam}"].astype(np.float64)
        diff = darks[0] - darks[1]
        expect = np.hypot(q[f"read_noise_{cam}"], q[f"row_noise_{cam}"])
        if expect > 3:
            np.testing.assert_allclose(diff.std() / np.sqrt(2), expect, rtol=0.2)
    assert q["row_noise_lr"] > 0
    rows = (fx["/exchange/data_dark_lr"][0].astype(np.float64) - fx["/exchange/data_dark_lr"][1]).mean(axis=1)
    assert rows.std() > 0.5 * np.sqrt(2) * q["row_noise_lr"]  # whole rows shift together


def test_fpn_gain_pattern_and_column_stripes() -> None:
    kw = dict(seed=0, lr_dose=1e6, hr_dose=1e6)  # nearly noise-free flats
    fx, p = _gen(["fpn"], **kw)
    plain, _ = _gen(None, **kw)
    q = p["effect_params"]["fpn"]

    def flat(a):
        return a["/exchange/data_white_hr"].astype(np.float64).mean(axis=0) - a["/exchange/data_dark_hr"].mean(0)

    ratio = flat(fx) / flat(plain)  # the extra gain pattern (PSF-blurred)
    assert np.std(ratio) > 0.25 * q["prnu_hr"]
    assert np.std(ratio.mean(axis=0)) > 0.5 * q["column_gain_hr"]  # whole columns brighter or darker
    assert not np.allclose(fx["/exchange/data_dark_hr"].mean(0), plain["/exchange/data_dark_hr"].mean(0), atol=1)


def test_misregistration_breaks_exact_binning() -> None:
    def resid(o):
        lr = o["/exchange/data_lr"].astype(np.float64) - o["/exchange/data_dark_lr"].mean(0)
        gt = o["/exchange/data_gt"].astype(np.float64) - o["/exchange/data_dark_hr"].mean(0)
        b = gt.reshape(gt.shape[0], 16, 4, 16, 4).mean(axis=(2, 4))
        a = np.c_[b.ravel(), np.ones(b.size)]
        coef, *_ = np.linalg.lstsq(a, lr.ravel(), rcond=None)
        return float(np.sqrt(np.mean((lr.ravel() - a @ coef) ** 2)) / np.std(lr))

    kw = dict(seed=2, lr_dose=1e7, dtype="float32")  # nearly noise-free LR
    fx, p = _gen(["misreg"], **kw)
    plain, _ = _gen(None, **kw)
    m = p["effect_params"]["misreg"]
    assert abs(m["rotation_deg"]) < 0.3 and abs(m["scale_factor"] - 1) <= 0.003
    assert max(abs(v) for v in m["shift_lr_px"]) <= 0.35
    assert resid(fx) > 2.0 * resid(plain)
    np.testing.assert_array_equal(fx["/exchange/data_gt"], plain["/exchange/data_gt"])  # the truth is unchanged


def test_dose_effect_wide_range_and_explicit_dose_kept() -> None:
    doses = [_gen(["dose"], seed=s)[1]["lr_dose"] for s in range(8)]
    lo, hi = synth.EFFECT_RANGES["dose"]["lr_dose_log"]
    assert all(lo <= d <= hi for d in doses)
    assert min(doses) < synth.LR_DOSE_RANGE[0] or max(doses) > synth.LR_DOSE_RANGE[1]
    _, p = _gen(["dose"], seed=1, lr_dose=3333.0)
    assert p["lr_dose"] == 3333.0 and p["hr_dose"] != _gen(None, seed=1)[1]["hr_dose"]


def test_texture_adds_multiscale_structure_in_the_substrate() -> None:
    kw = dict(families=["static"], seed=7, lr_dose=1e7, hr_dose=1e7)
    fx, p = _gen(["texture"], **kw)
    plain, _ = _gen(None, **kw)
    q = p["effect_params"]["texture"]
    assert q["octaves"] >= 3
    dark = plain["/exchange/data_dark_hr"].mean(axis=0)
    lr = np.log((fx["/exchange/data_gt"][0] - dark) / (plain["/exchange/data_gt"][0] - dark))[48:64]  # substrate
    assert np.std(lr) > 0.2 * q["amplitude"]  # the added attenuation
    coarse = lr.reshape(4, 4, 16, 4).mean(axis=(1, 3))
    assert np.std(coarse) > 0.1 * np.std(lr) and np.std(lr - np.kron(coarse, np.ones((4, 4)))) > 0.1 * np.std(lr)


def test_all_effects_together_and_metadata(tmp_path) -> None:
    path = tmp_path / "fx.h5"
    summary = synth.synthesize(path, **{**KW, "seed": 9}, effects="all")
    assert summary["effects"] == list(synth.EFFECTS)
    with h5py.File(path, "r") as f:
        assert set(f["/exchange"]) == {k.split("/")[-1] for k in synth.generate(**{**KW, "seed": 9})}
        params = json.loads(f["/synth"].attrs["params_json"])
        assert params["effects"] == list(synth.EFFECTS)
        assert set(params["effect_params"]) == set(synth.EFFECTS)
        assert json.loads(f["/synth"].attrs["effects"]) == list(synth.EFFECTS)
        assert np.isfinite(f["/exchange/data_gt"][()]).all()


# ------------------------------------------------------------------------------------------ families

def _ratio(fam: str, seed: int = 3, **kw) -> np.ndarray:
    base = dict(n_frames=30, hr_shape=(96, 96), stride=10, seed=seed, speed=2.0, **kw)
    bg = synth.generate(**base, families=["static"])
    out = synth.generate(**base, families=[fam])
    dark = bg["/exchange/data_dark_hr"].mean(axis=0)
    return (out["/exchange/data_gt"] - dark) / (bg["/exchange/data_gt"] - dark)


@pytest.mark.parametrize("family", synth.EXTRA_FAMILIES)
def test_extra_family_moves_and_is_deterministic(family: str) -> None:
    ratio = _ratio(family)
    assert np.isfinite(ratio).all()
    assert np.abs(np.diff(ratio, axis=0)).max() > 0.02
    assert np.abs(ratio - 1).max() > 0.05
    np.testing.assert_array_equal(ratio, _ratio(family))


def test_extra_families_never_drawn_by_default() -> None:
    for seed in range(20):
        fams = _gen(None, families=None, seed=seed)[1]["families"]
        assert set(fams[1:]) <= set(synth.MOVING_FAMILIES)


def test_debris_enters_at_the_border() -> None:
    ratio = _ratio("debris", seed=4, )
    vis = np.abs(ratio - 1) > 0.02
    assert not vis[0].any()  # nothing in the field at the start
    first = next(t for t in range(vis.shape[0]) if vis[t].any())
    ys, xs = np.nonzero(vis[first])
    h, w = vis.shape[1:]
    border = np.minimum.reduce([ys, xs, h - 1 - ys, w - 1 - xs])
    assert border.min() <= 2  # it appears at the border


def test_collide_particles_collide_and_spin() -> None:
    bg = synth._Background(np.random.default_rng(0), (96, 96))
    c = synth._Collide(np.random.default_rng(1), bg, 8.0, 60)
    assert c.n_collisions > 0
    assert np.ptp(c.angs, axis=0).max() > 0.5
    r = c.r
    assert np.all(c.traj[..., 0] >= r - 9) and np.all(c.traj[..., 0] <= 96 - r + 9)  # stays in the box


def test_spatter_is_fast_and_leaves() -> None:
    bg = synth._Background(np.random.default_rng(0), (96, 96))
    s = synth._Spatter(np.random.default_rng(2), bg, 4.0, 40)
    speed = np.hypot(*s.vel)
    assert speed.min() >= 2 * 4.0 - 1e-9 and s.r.max() <= 2.5
    alive = [s.positions(float(t))[1].sum() for t in range(40)]
    assert max(alive) > 0 and len(set(alive)) > 3  # particles come and go


# ------------------------------------------------------------------------------------------ CLI

def test_cli_effects(run_cli, tmp_path) -> None:
    out = tmp_path / "e.h5"
    res = run_cli("synth", out, "--frames", "12", "--hr-size", "32", "32", "--stride", "5", "--seed", "3",
                  "--effects", "psf,defects", "--family", "meltpool")
    assert res.code == 0, res.err
    with h5py.File(out, "r") as f:
        params = json.loads(f["/synth"].attrs["params_json"])
    assert params["effects"] == ["psf", "defects"] and params["families"] == ["static", "meltpool"]
    res = run_cli("synth", tmp_path / "r.h5", "--frames", "12", "--hr-size", "32", "32", "--stride", "5",
                  "--randomise")
    assert res.code == 0, res.err


def test_cli_bad_effect_is_one_line_exit_2(run_cli, tmp_path) -> None:
    res = run_cli("synth", tmp_path / "x.h5", "--frames", "12", "--hr-size", "32", "32", "--stride", "5",
                  "--effects", "psf,lava")
    assert res.code == 2
    assert "lava" in res.err and len(res.err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.h5")
