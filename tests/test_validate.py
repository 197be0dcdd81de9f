"""xvr-batch validate: key-frame self-validation (real HDF5 files, a real tiny model)."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest

from conftest import make_archive
from xvr_batch import metrics
from xvr_batch.errors import UserError
from xvr_batch.validate import key_window, parse_keys, validate_archive

KEYS = (3, 11, 19, 27, 35)


@pytest.fixture(scope="module")
def arc5(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("val") / "five.h5", n=40, hr_index=KEYS)


def test_validate_json_and_key_blend_by_hand(run_cli, arc5, tiny_weights):
    r = run_cli("validate", arc5, "--weights", tiny_weights, "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)  # exactly one JSON object on stdout
    assert {"swin_xvr", "key_blend", "lr_bicubic", "keys", "weights", "archive"} <= set(res)
    assert [row["key"] for row in res["keys"]] == [1, 2, 3]
    assert [row["frame"] for row in res["keys"]] == list(KEYS[1:4])
    for name in ("swin_xvr", "key_blend", "lr_bicubic"):
        assert math.isfinite(res[name]["psnr"]) and 0 < res[name]["ssim"] <= 1
        for row in res["keys"]:
            assert math.isfinite(row[name]["psnr"])
    assert res["weights"]["source"] == str(tiny_weights.resolve())
    # the key blend of key 2 (frame 19) is the mean of keys 1 and 3 (frames 11, 27), scored in HR counts
    with h5py.File(arc5) as f:
        hr = f["/exchange/data_hr"][()].astype(np.float32)
    truth = hr[2]
    blend = 0.5 * hr[1] + 0.5 * hr[3]
    want = metrics.psnr(blend, truth, data_range=float(truth.max() - truth.min()))
    assert res["keys"][1]["key_blend"]["psnr"] == pytest.approx(float(want), abs=1e-4)
    assert res["keys"][1]["bracket"] == [11, 27]


def test_validate_library_in_memory_model_matches_file(arc5, tiny_weights):
    from xvr_batch.model import load_checkpoint
    model, _ = load_checkpoint(tiny_weights)
    a = validate_archive(arc5, weights=model, keys=[2])
    b = validate_archive(arc5, weights=str(tiny_weights), keys=[2])
    assert a["swin_xvr"]["psnr"] == pytest.approx(b["swin_xvr"]["psnr"], abs=1e-6)
    assert a["weights"]["source"] == "<in-memory model>" and len(a["keys"]) == 1
    with pytest.raises(UserError, match="not an interior key"):
        validate_archive(arc5, weights=model, keys=[0])


def test_static_scene_perfect_blend_is_inf_and_strict_json(run_cli, tmp_path, tiny_weights):
    """A scene that never changes: the key blend is perfect (PSNR inf, written as "inf"), SSIM 1."""
    path = tmp_path / "static.h5"
    rng = np.random.default_rng(0)
    hr_img = (1000 + 500 * rng.random((32, 48))).astype(np.float32)
    lr_img = hr_img.reshape(8, 4, 12, 4).mean(axis=(1, 3))
    with h5py.File(path, "w") as f:
        f["/exchange/data_lr"] = np.repeat(lr_img[None], 30, axis=0)
        f["/exchange/data_hr"] = np.repeat(hr_img[None], 3, axis=0)
        f["/exchange/hr_index"] = np.array([2, 14, 26])
    r = run_cli("validate", path, "--weights", tiny_weights, "--json")
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["key_blend"]["psnr"] == "inf" and res["key_blend"]["ssim"] == 1.0
    assert isinstance(res["swin_xvr"]["psnr"], float)


def test_validate_table_and_plot(run_cli, arc5, tiny_weights, tmp_path):
    png = tmp_path / "v.png"
    r = run_cli("validate", arc5, "--weights", tiny_weights, "--keys", "1:3", "--plot", png)
    assert r.code == 0, r.err
    assert "swin_xvr" in r.out and "best_baseline" in r.out and png.stat().st_size > 1000


def test_validate_refusals(run_cli, tmp_path, tiny_weights):
    two = make_archive(tmp_path / "two.h5", n=20, hr_index=(3, 15))
    for args, words in (((two, "--weights", tiny_weights), "at least 3"),
                        ((tmp_path / "missing.h5", "--weights", tiny_weights), "not found"),
                        ((two, "--weights", tmp_path / "nope.pt"), "not found")):
        r = run_cli("validate", *args)
        assert r.code == 2, (args, r.err)
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.err
        assert "Traceback" not in r.err


def test_windows_and_key_parsing():
    assert key_window([3, 11, 19], 1, 3, 40, "all") == ((10, 11, 12), 1)
    assert key_window([0, 11, 39], 2, 3, 40, "all") == ((37, 38, 39), 2)  # moved inside the archive
    assert key_window([3, 11, 19], 1, 3, 40, "centre") == ((10, 11, 12), 0)
    assert parse_keys("1,4:6") == [1, 4, 5] and parse_keys(None) is None
    with pytest.raises(UserError):
        parse_keys("a")
