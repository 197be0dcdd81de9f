"""Tests for xvr_batch.evaluate: frame selection, baselines, scores, errors, table and plot.

Every archive and reconstruction here is a real HDF5 file written with h5py under ``tmp_path``.
The scene is a smooth pattern drifting in time, so the baselines have finite, sensible scores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from xvr_batch import metrics
from xvr_batch.errors import UserError
from xvr_batch.evaluate import (
    BEST_BASELINE,
    METHOD,
    METHODS,
    as_float,
    baselines_for_archive,
    evaluate,
    format_table,
    plot,
    select_frames,
)
from xvr_batch.io.archive import Archive
from xvr_batch.normalise import Calibration, fit_normalisation

N, H_LR, W_LR, SCALE = 21, 16, 16, 4
HH, WW = H_LR * SCALE, W_LR * SCALE
KEYS = [0, 10, 20]
BETWEEN = [t for t in range(N) if t not in KEYS]


def _transmission(n: int = N) -> np.ndarray:
    """A smooth pattern in (0.2, 0.9) that drifts sideways and changes contrast over time."""
    y, x = np.mgrid[0:HH, 0:WW].astype(np.float64)
    frames = []
    for t in range(n):
        a = np.sin(0.21 * x + 0.35 * t) * np.cos(0.13 * y - 0.1 * t)
        b = np.exp(-(((x - 10 - 2.0 * t) ** 2) + (y - 30) ** 2) / 60.0)
        frames.append(0.55 + 0.25 * a - 0.1 * b)
    return np.stack(frames)


def _bin(a: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    return a.reshape(n, H_LR, SCALE, W_LR, SCALE).mean(axis=(2, 4))


def make_archive(
    path: Path,
    *,
    keys: list[int] = KEYS,
    gt: bool = True,
    flats: bool = False,
    with_index: bool = True,
) -> np.ndarray:
    """Write an archive; return its ground truth (N, HH, WW) float32 in HR counts.

    Without ``flats`` the HR camera reads ``1000 + 3000 * T`` and the LR camera
    ``100 + 1500 * bin(T)`` (different gain and offset). With ``flats`` both cameras have a
    per-pixel dark and gain pattern and matching dark/flat datasets.
    """
    trans = _transmission()
    if flats:
        rng = np.random.default_rng(1)
        dark_hr = 50 + 10 * rng.random((HH, WW))
        gain_hr = 3000 * (1 + 0.2 * rng.random((HH, WW)))
        dark_lr = 20 + 5 * rng.random((H_LR, W_LR))
        gain_lr = 1500 * (1 + 0.2 * rng.random((H_LR, W_LR)))
    else:
        dark_hr, gain_hr, dark_lr, gain_lr = 1000.0, 3000.0, 100.0, 1500.0
    truth = (dark_hr + gain_hr * trans).astype(np.float32)
    lr = (dark_lr + gain_lr * _bin(trans)).astype(np.float32)
    with h5py.File(path, "w") as f:
        ex = f.create_group("exchange")
        ex.create_dataset("data_lr", data=lr, chunks=(1, H_LR, W_LR))
        ex.create_dataset("data_hr", data=truth[keys], chunks=(1, HH, WW))
        if with_index:
            ex.create_dataset("hr_index", data=np.asarray(keys, dtype=np.int64))
        if gt:
            ex.create_dataset("data_gt", data=truth, chunks=(1, HH, WW))
        if flats:
            for cam, dark, gain in (("lr", dark_lr, gain_lr), ("hr", dark_hr, gain_hr)):
                ex.create_dataset(f"data_dark_{cam}", data=np.stack([dark] * 2).astype(np.float32))
                ex.create_dataset(f"data_white_{cam}", data=np.stack([dark + gain] * 2).astype(np.float32))
    return truth


def write_recon(
    path: Path,
    data: np.ndarray,
    *,
    keys: list[int] | None = KEYS,
    process: dict[str, Any] | None = None,
    name: str = "data",
) -> Path:
    """Write a reconstruction file: /exchange/data, /exchange/hr_index and /process attrs."""
    with h5py.File(path, "w") as f:
        ex = f.create_group("exchange")
        ex.create_dataset(name, data=np.asarray(data, dtype=np.float32), chunks=(1, *data.shape[1:]))
        if keys is not None:
            ex.create_dataset("hr_index", data=np.asarray(keys, dtype=np.int64))
        if process:
            grp = f.create_group("process").create_group("xvr_batch")
            for key, value in process.items():
                grp.attrs[key] = json.dumps(value)
    return path


def recorded_process(archive: Path, **input_extra: Any) -> dict[str, Any]:
    """What the pipeline records: the fitted normalisation and the input options."""
    with Archive(archive) as arc:
        norm = fit_normalisation(arc).to_dict()
    return {"normalisation": norm, "input": {"path": str(archive), **input_extra}}


@pytest.fixture()
def archive(tmp_path: Path) -> tuple[Path, np.ndarray]:
    path = tmp_path / "archive.h5"
    return path, make_archive(path)


def assert_strict_json(result: dict) -> dict:
    text = json.dumps(result, allow_nan=False)
    return json.loads(text)


# ------------------------------------------------------------------------------ frame selection


def test_select_frames_between_and_all() -> None:
    assert select_frames(N, KEYS, "between") == BETWEEN
    assert select_frames(N, KEYS, "all") == BETWEEN
    keys = [3, 10, 17]
    between = select_frames(N, keys, "between")
    assert between == [4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16]
    everything = select_frames(N, keys, "all")
    assert everything == [t for t in range(N) if t not in keys]
    assert {0, 1, 2, 18, 19, 20} <= set(everything) and not {0, 20} & set(between)


def test_select_frames_max_frames_evenly() -> None:
    picked = select_frames(N, KEYS, "between", max_frames=4)
    assert len(picked) == 4 and picked[0] == BETWEEN[0] and picked[-1] == BETWEEN[-1]
    assert picked == sorted(picked)
    assert select_frames(N, KEYS, "between", max_frames=100) == BETWEEN


@pytest.mark.parametrize("kwargs", [{"frames": "keys"}, {"max_frames": 0}])
def test_select_frames_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(UserError):
        select_frames(N, KEYS, **kwargs)


def test_select_frames_empty_is_user_error() -> None:
    with pytest.raises(UserError, match="no frames"):
        select_frames(5, [0, 1, 2, 3, 4], "between")


# ------------------------------------------------------------------------------ scores


def test_identical_recon_gives_inf(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    recon = write_recon(tmp_path / "recon.h5", truth, process=recorded_process(path))
    result = evaluate(recon, path)
    assert result["frames"] == BETWEEN
    m = result["methods"][METHOD]
    assert m["psnr"] == ["inf"] * len(BETWEEN) and m["mean_psnr"] == "inf"
    assert m["ssim"] == [1.0] * len(BETWEEN) and m["mean_ssim"] == 1.0
    assert result["margin_db"] == "inf" and as_float(result["margin_db"]) == math.inf
    assert math.isfinite(as_float(result["methods"][BEST_BASELINE]["mean_psnr"]))
    assert result["normalisation_source"] == "recorded"
    assert "data range" in result["data_range"] and "HR camera counts" in result["data_range"]
    back = assert_strict_json(result)
    assert back["methods"][METHOD]["mean_psnr"] == "inf"
    table = format_table(result)
    assert "inf" in table


def test_recon_equal_to_key_blend(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    data = truth.copy()
    for t, images in baselines_for_archive(path, BETWEEN):
        data[t] = images["key_blend"]
    recon = write_recon(tmp_path / "recon.h5", data, process=recorded_process(path))
    result = evaluate(recon, path)
    method, blend = result["methods"][METHOD], result["methods"]["key_blend"]
    assert method["psnr"] == pytest.approx(blend["psnr"], rel=1e-9)
    assert method["ssim"] == pytest.approx(blend["ssim"], rel=1e-9)
    assert as_float(result["margin_db"]) <= 1e-9
    # the key blend is exact at its own brackets' ends and worst mid-way
    psnr = dict(zip(result["frames"], blend["psnr"]))
    assert psnr[5] < psnr[1] and psnr[5] < psnr[9]


def test_noisy_recon_and_best_baseline(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    rng = np.random.default_rng(5)
    noisy = truth + rng.normal(0, 30, truth.shape).astype(np.float32)
    recon = write_recon(tmp_path / "recon.h5", noisy, process=recorded_process(path))
    result = evaluate(recon, path, progress=True)
    m = result["methods"][METHOD]
    assert all(math.isfinite(v) for v in m["psnr"])
    assert all(0 < v < 1 for v in m["ssim"])
    for i, t in enumerate(result["frames"]):  # the data range is the truth frame's max - min
        rng_t = float(truth[t].max() - truth[t].min())
        mse = float(np.mean((noisy[t].astype(np.float64) - truth[t]) ** 2))
        assert m["psnr"][i] == pytest.approx(10 * math.log10(rng_t**2 / mse), rel=1e-6)
    a, b = result["methods"]["lr_bicubic"], result["methods"]["key_blend"]
    best = result["methods"][BEST_BASELINE]
    for i in range(len(result["frames"])):
        pick = "lr_bicubic" if a["psnr"][i] >= b["psnr"][i] else "key_blend"
        assert best["choice"][i] == pick
        assert best["psnr"][i] == max(a["psnr"][i], b["psnr"][i])
        assert best["ssim"][i] == result["methods"][pick]["ssim"][i]
    assert result["margin_db"] == pytest.approx(m["mean_psnr"] - best["mean_psnr"])
    assert m["mean_psnr"] == pytest.approx(float(np.mean(m["psnr"])))
    assert set(result["methods"]) == set(METHODS)
    assert_strict_json(result)


def test_lr_bicubic_baseline_matches_calibration(archive: tuple[Path, np.ndarray]) -> None:
    path, _ = archive
    with Archive(path) as arc:
        norm = fit_normalisation(arc)
        calib = Calibration(arc, norm)
        expected = metrics.bicubic_upsample(calib.model_to_hr(calib.lr_to_model(arc.read_lr_at([7])[0])), SCALE)
        blend = 0.3 * arc.read_hr(0) + 0.7 * arc.read_hr(1)
    ((t, images),) = baselines_for_archive(path, [7], norm)
    assert t == 7 and images["lr_bicubic"].shape == (HH, WW)
    np.testing.assert_allclose(images["lr_bicubic"], expected, rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(images["key_blend"], blend, rtol=1e-6)


def test_frames_all_scores_outside_key_range(tmp_path: Path) -> None:
    path = tmp_path / "archive.h5"
    keys = [3, 10, 17]
    truth = make_archive(path, keys=keys)
    recon = write_recon(tmp_path / "recon.h5", truth + 1.0, keys=keys, process=recorded_process(path))
    between = evaluate(recon, path, frames="between")
    assert between["frames"] == select_frames(N, keys, "between")
    everything = evaluate(recon, path, frames="all")
    assert 0 in everything["frames"] and 20 in everything["frames"]
    assert not set(keys) & set(everything["frames"])
    # outside the key range the blend is the nearest key frame
    i = everything["frames"].index(20)
    with Archive(path) as arc:
        expected = metrics.psnr(arc.read_hr(2), truth[20])
    assert everything["methods"]["key_blend"]["psnr"][i] == pytest.approx(expected, rel=1e-6)
    sampled = evaluate(recon, path, frames="all", max_frames=3)
    assert len(sampled["frames"]) == 3 and sampled["n_candidates"] == len(everything["frames"])
    assert "3 of" in format_table(sampled)


def test_recorded_normalisation_is_preferred(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    process = recorded_process(path)
    fitted = dict(process["normalisation"])
    process["normalisation"]["a"] *= 1.1  # deliberately off: lr_bicubic must get worse
    recon = write_recon(tmp_path / "recorded.h5", truth + 1.0, process=process)
    used = evaluate(recon, path)
    assert used["normalisation_source"] == "recorded"
    assert used["normalisation"]["a"] == pytest.approx(fitted["a"] * 1.1)

    bare = write_recon(tmp_path / "bare.h5", truth + 1.0)
    refit = evaluate(bare, path)
    assert refit["normalisation_source"] == "refit"
    assert refit["normalisation"] == pytest.approx(fitted)
    assert any("normalisation" in w for w in refit["warnings"])
    assert as_float(used["methods"]["lr_bicubic"]["mean_psnr"]) < as_float(
        refit["methods"]["lr_bicubic"]["mean_psnr"]
    )
    # the reconstruction's own score does not depend on the normalisation
    assert used["methods"][METHOD]["psnr"] == refit["methods"][METHOD]["psnr"]


def test_flat_fielded_archive(tmp_path: Path) -> None:
    path = tmp_path / "flats.h5"
    truth = make_archive(path, flats=True)
    recon = write_recon(tmp_path / "recon.h5", truth, process=recorded_process(path))
    result = evaluate(recon, path)
    assert result["normalisation"]["lr_flat_field"] and result["normalisation"]["hr_flat_field"]
    lr = [as_float(v) for v in result["methods"]["lr_bicubic"]["psnr"]]
    assert all(math.isfinite(v) and v > 20 for v in lr)


def test_recorded_stride_opens_archive_without_index(tmp_path: Path) -> None:
    path = tmp_path / "archive.h5"
    truth = make_archive(path, with_index=False)
    process = {"input": {"path": str(path), "hr_stride": 10, "hr_offset": 0}}
    recon = write_recon(tmp_path / "recon.h5", truth + 1.0, process=process)
    result = evaluate(recon, path)
    assert result["frames"] == BETWEEN and result["archive"]["hr_stride"] == 10
    assert result["normalisation_source"] == "refit"


def test_constant_truth_frame_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "archive.h5"
    truth = make_archive(path)
    with h5py.File(path, "a") as f:
        f["/exchange/data_gt"][5] = np.full((HH, WW), 1234.0, dtype=np.float32)
    recon = write_recon(tmp_path / "recon.h5", truth + 1.0)
    result = evaluate(recon, path)
    i = result["frames"].index(5)
    assert result["methods"][METHOD]["psnr"][i] is None
    assert math.isfinite(as_float(result["methods"][METHOD]["mean_psnr"]))
    assert any("constant" in w for w in result["warnings"])
    assert_strict_json(result)


# ------------------------------------------------------------------------------ errors


def test_missing_ground_truth_is_user_error(tmp_path: Path) -> None:
    path = tmp_path / "nogt.h5"
    make_archive(path, gt=False)
    recon = write_recon(tmp_path / "recon.h5", np.zeros((N, HH, WW), np.float32))
    with pytest.raises(UserError, match="ground truth"):
        evaluate(recon, path)


def test_shape_mismatch_is_user_error(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    small = write_recon(tmp_path / "small.h5", truth[:, :32, :32])
    with pytest.raises(UserError, match="shape"):
        evaluate(small, path)
    short = write_recon(tmp_path / "short.h5", truth[:-1], keys=None)
    with pytest.raises(UserError, match="shape"):
        evaluate(short, path)


def test_missing_recon_data_is_user_error(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    recon = write_recon(tmp_path / "recon.h5", truth, name="other")
    with pytest.raises(UserError, match="/exchange/data"):
        evaluate(recon, path)
    with pytest.raises(UserError, match="not found"):
        evaluate(tmp_path / "absent.h5", path)


def test_key_frame_mismatch_is_user_error(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    recon = write_recon(tmp_path / "recon.h5", truth, keys=[0, 5, 20])
    with pytest.raises(UserError, match="key frames"):
        evaluate(recon, path)


def test_bad_frames_argument(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    recon = write_recon(tmp_path / "recon.h5", truth)
    with pytest.raises(UserError, match="frames"):
        evaluate(recon, path, frames="keys")


# ------------------------------------------------------------------------------ reporting


def test_format_table_names_every_method(archive: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, truth = archive
    recon = write_recon(tmp_path / "recon.h5", truth + 5.0, process=recorded_process(path))
    table = format_table(evaluate(recon, path))
    for name in METHODS:
        assert name in table
    assert "mean PSNR" in table and "mean SSIM" in table and "best baseline" in table
    assert "max - min" in table


def test_plot_writes_png(
    archive: tuple[Path, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, truth = archive
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    recon = write_recon(tmp_path / "recon.h5", truth, process=recorded_process(path))
    result = evaluate(recon, path)  # method PSNR is inf everywhere: the plot must cope
    out = tmp_path / "eval.png"
    plot(result, recon, path, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = os.environ["MPLCONFIGDIR"]
    assert not config.startswith(os.path.expanduser("~") + os.sep)
