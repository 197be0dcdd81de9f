"""Tests for xvr_batch.synth: synthetic two-camera x-ray archives."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from xvr_batch import synth

SMALL = dict(n_frames=40, hr_shape=(64, 96), scale=4, stride=10, offset=3, seed=5)
ALL_MOVING = "particles,cavity,rotor,crack"
KEYS = (
    "/exchange/data_lr",
    "/exchange/data_hr",
    "/exchange/hr_index",
    "/exchange/data_dark_lr",
    "/exchange/data_white_lr",
    "/exchange/data_dark_hr",
    "/exchange/data_white_hr",
    "/exchange/data_gt",
)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def _bin(x: np.ndarray, s: int) -> np.ndarray:
    *lead, hh, ww = x.shape
    return x.reshape(*lead, hh // s, s, ww // s, s).mean(axis=(-3, -1))


@pytest.fixture(scope="module")
def small() -> dict[str, np.ndarray]:
    return synth.generate(**SMALL, families=ALL_MOVING)


def test_keys_shapes_dtypes(small: dict[str, np.ndarray]) -> None:
    assert set(small) == set(KEYS)
    n, (hh, ww), s = SMALL["n_frames"], SMALL["hr_shape"], SMALL["scale"]
    h, w = hh // s, ww // s
    assert small["/exchange/data_lr"].shape == (n, h, w)
    assert small["/exchange/data_gt"].shape == (n, hh, ww)
    k = small["/exchange/hr_index"].size
    assert small["/exchange/data_hr"].shape == (k, hh, ww)
    for cam, shape in (("lr", (h, w)), ("hr", (hh, ww))):
        for kind in ("dark", "white"):
            arr = small[f"/exchange/data_{kind}_{cam}"]
            assert arr.shape[1:] == shape and 5 <= arr.shape[0] <= 10
            assert arr.dtype == np.uint16
    assert small["/exchange/data_lr"].dtype == np.uint16
    assert small["/exchange/data_hr"].dtype == np.uint16
    assert small["/exchange/data_gt"].dtype == np.float32
    assert small["/exchange/hr_index"].dtype == np.int64
    # HR = scale x LR
    assert small["/exchange/data_hr"].shape[1] == s * small["/exchange/data_lr"].shape[1]
    assert small["/exchange/data_hr"].shape[2] == s * small["/exchange/data_lr"].shape[2]


def test_hr_index_spacing(small: dict[str, np.ndarray]) -> None:
    idx = small["/exchange/hr_index"]
    expected = np.arange(SMALL["offset"], SMALL["n_frames"], SMALL["stride"])
    np.testing.assert_array_equal(idx, expected)
    assert idx[0] == SMALL["offset"] and np.all(np.diff(idx) == SMALL["stride"])
    assert idx[-1] < SMALL["n_frames"]


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="key frame"):
        synth.generate(n_frames=10, hr_shape=(32, 32), stride=20)  # only one key frame
    with pytest.raises(ValueError, match="key frame"):
        synth.generate(n_frames=30, hr_shape=(32, 32), stride=10, offset=25)
    with pytest.raises(ValueError, match="multiple"):
        synth.generate(n_frames=30, hr_shape=(30, 32), scale=4, stride=10)
    with pytest.raises(ValueError, match="unknown"):
        synth.generate(n_frames=30, hr_shape=(32, 32), stride=10, families=["lava"])
    with pytest.raises(ValueError, match="dtype"):
        synth.generate(n_frames=30, hr_shape=(32, 32), stride=10, dtype="int32")


def test_deterministic_by_seed(small: dict[str, np.ndarray]) -> None:
    again = synth.generate(**SMALL, families=ALL_MOVING)
    for key in KEYS:
        np.testing.assert_array_equal(small[key], again[key], err_msg=key)
    other = synth.generate(**{**SMALL, "seed": 6}, families=ALL_MOVING)
    assert not np.array_equal(small["/exchange/data_lr"], other["/exchange/data_lr"])
    assert not np.array_equal(small["/exchange/data_gt"], other["/exchange/data_gt"])
    # random family choice is a function of the seed too
    a = synth.generate(**{**SMALL, "seed": 11})
    b = synth.generate(**{**SMALL, "seed": 11})
    np.testing.assert_array_equal(a["/exchange/data_lr"], b["/exchange/data_lr"])


def test_gt_matches_key_frames(small: dict[str, np.ndarray]) -> None:
    gt = small["/exchange/data_gt"]
    hr = small["/exchange/data_hr"].astype(np.float64)
    for k, t in enumerate(small["/exchange/hr_index"]):
        assert _corr(gt[t], hr[k]) > 0.95
        # same units: equal up to noise
        assert abs(hr[k].mean() - gt[t].mean()) < 0.01 * gt[t].mean()
    # the truth is noise-free: a key frame is closer to its own truth than to a neighbour's
    t0 = int(small["/exchange/hr_index"][0])
    assert np.abs(hr[0] - gt[t0]).mean() < np.abs(hr[0] - gt[t0 + 5]).mean()


def test_lr_is_binned_truth(small: dict[str, np.ndarray]) -> None:
    s = SMALL["scale"]
    lr = small["/exchange/data_lr"].astype(np.float64)
    lr_sig = lr - small["/exchange/data_dark_lr"].mean(axis=0)
    gt_sig = small["/exchange/data_gt"] - small["/exchange/data_dark_hr"].mean(axis=0)
    binned = _bin(gt_sig, s)
    assert _corr(lr_sig, binned) > 0.8
    for t in (0, 17, 39):
        assert _corr(lr_sig[t], binned[t]) > 0.75
    # the LR camera has its own gain and offset
    assert not np.isclose(lr.mean(), small["/exchange/data_gt"].mean(), rtol=0.05)


def test_darks_below_flats(small: dict[str, np.ndarray]) -> None:
    for cam in ("lr", "hr"):
        dark = small[f"/exchange/data_dark_{cam}"].astype(np.float64).mean(axis=0)
        white = small[f"/exchange/data_white_{cam}"].astype(np.float64).mean(axis=0)
        assert np.all(dark < white)
        assert dark.mean() > 0  # a real dark offset
        frames = small[f"/exchange/data_{cam}"].astype(np.float64)
        assert dark.mean() < frames.mean() < white.mean()


def test_archive_round_trip(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "synthetic.h5")
    summary = synth.synthesize(path, **SMALL, families="cavity+particles")
    assert summary["families"] == ["static", "particles", "cavity"]
    assert set(summary["speeds"]) == {"particles", "cavity"}
    assert summary["seed"] == SMALL["seed"]
    assert summary["shapes"]["/exchange/data_lr"] == (40, 16, 24)
    assert os.listdir(tmp_path) == ["synthetic.h5"]  # no temporary file left
    ref = synth.generate(**SMALL, families=["particles", "cavity"])
    with h5py.File(path, "r") as f:
        for key in KEYS:
            np.testing.assert_array_equal(f[key][()], ref[key], err_msg=key)
            assert f[key].dtype == ref[key].dtype
        assert f["/exchange/data_lr"].chunks == (1, 16, 24)
        assert f["/exchange/data_gt"].chunks == (1, 64, 96)
        attrs = f["/synth"].attrs
        assert attrs["seed"] == SMALL["seed"]
        assert json.loads(attrs["families"]) == ["static", "particles", "cavity"]
        params = json.loads(attrs["params_json"])
        assert params["stride"] == SMALL["stride"] and params["lr_dose"] == summary["lr_dose"]


def test_write_archive_is_atomic(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.h5")
    with pytest.raises(TypeError):
        synth.write_archive(path, {"/exchange/data_lr": np.zeros((2, 4, 4)), "/x": object()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", synth.FAMILIES)
def test_each_family_runs(family: str) -> None:
    out = synth.generate(n_frames=24, hr_shape=(64, 64), stride=8, seed=2, families=[family],
                         speed=1.5)
    gt = out["/exchange/data_gt"]
    assert gt.shape == (24, 64, 64) and np.isfinite(gt).all()
    assert out["/exchange/data_lr"].shape == (24, 16, 16)


def _scene_ratio(out: dict[str, np.ndarray], bg: dict[str, np.ndarray]) -> np.ndarray:
    """Moving-scene signal over the static-only signal (same seed: same beam and background)."""
    dark = bg["/exchange/data_dark_hr"].mean(axis=0)
    return (out["/exchange/data_gt"] - dark) / (bg["/exchange/data_gt"] - dark)


@pytest.mark.parametrize("family", synth.MOVING_FAMILIES)
def test_motion_present(family: str) -> None:
    kw = dict(n_frames=30, hr_shape=(96, 96), stride=10, seed=3, speed=2.0)
    bg = synth.generate(**kw, families=["static"])
    out = synth.generate(**kw, families=[family])
    ratio = _scene_ratio(out, bg)
    assert np.abs(np.diff(ratio, axis=0)).max() > 0.02  # the scene changes between frames
    assert np.abs(np.diff(out["/exchange/data_lr"].astype(float), axis=0)).mean() > 0
    # and differs from the static background
    assert np.abs(ratio - 1).max() > 0.05


def test_static_scene_does_not_move() -> None:
    kw = dict(n_frames=30, hr_shape=(64, 64), stride=10, seed=3)
    bg = synth.generate(**kw, families=["static"])
    np.testing.assert_allclose(_scene_ratio(bg, bg), 1.0)
    # only the beam drifts: frame-to-frame changes are small and smooth
    gt = bg["/exchange/data_gt"]
    assert np.abs(np.diff(gt, axis=0)).mean() < 0.01 * gt.mean()


def test_speed_controls_motion() -> None:
    kw = dict(n_frames=20, hr_shape=(96, 96), stride=10, seed=4, families=["particles"])
    bg = synth.generate(**{**kw, "families": ["static"]})
    slow = _scene_ratio(synth.generate(**kw, speed=0.1), bg)
    fast = _scene_ratio(synth.generate(**kw, speed=3.0), bg)
    assert np.abs(np.diff(fast, axis=0)).mean() > 3 * np.abs(np.diff(slow, axis=0)).mean()


def test_random_families_and_speeds(tmp_path: os.PathLike[str]) -> None:
    seen: set[str] = set()
    for seed in range(6):
        summary = synth.synthesize(os.path.join(tmp_path, f"a{seed}.h5"), n_frames=12,
                                   hr_shape=(32, 32), stride=5, seed=seed)
        fams = summary["families"]
        assert fams[0] == "static" and 1 <= len(fams) - 1 <= 3
        assert set(fams[1:]) <= set(synth.MOVING_FAMILIES)
        assert all(0.1 <= v <= 4.0 for v in summary["speeds"].values())
        assert synth.LR_DOSE_RANGE[0] <= summary["lr_dose"] <= synth.LR_DOSE_RANGE[1]
        seen.update(fams[1:])
    assert len(seen) >= 2


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_other_dtypes(dtype: str) -> None:
    kw = dict(n_frames=20, hr_shape=(32, 32), stride=10, seed=1, families=["rotor"])
    ref = synth.generate(**kw)
    out = synth.generate(**kw, dtype=dtype)
    scale = 257.0 if dtype == "uint8" else 65535.0
    for key in KEYS:
        if key == "/exchange/hr_index":
            continue
        arr = out[key]
        assert arr.dtype == (np.float32 if key.endswith("gt") else np.dtype(dtype)), key
        if dtype == "float32":
            assert arr.min() >= 0 and arr.max() <= 1
        tol = 0.51 if dtype == "uint8" else 0.51 / 65535
        np.testing.assert_allclose(arr.astype(np.float64), ref[key] / scale, atol=tol, err_msg=key)


def test_default_size_200_frames() -> None:
    # the documented default: 200 frames, HR 256x256, scale 4, stride 20 (no timing assertion)
    out = synth.generate(seed=0)
    assert out["/exchange/data_lr"].shape == (200, 64, 64)
    assert out["/exchange/data_hr"].shape == (10, 256, 256)
    assert out["/exchange/data_gt"].shape == (200, 256, 256)
    np.testing.assert_array_equal(out["/exchange/hr_index"], np.arange(0, 200, 20))
    lr = out["/exchange/data_lr"]
    assert lr.max() < 65535 and lr.min() > 0  # fits the dtype without gross clipping
