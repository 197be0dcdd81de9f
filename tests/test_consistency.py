"""Per-frame LR consistency (xvr_batch.consistency): computed while reconstructing, stored, summarised, flagged.

Real HDF5 archives (xvr_batch.synth), the shipped default weights on the CPU, the real CLI in this process.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import h5py
import hdf5plugin  # noqa: F401  (the output is compressed)
import numpy as np
import pytest

from xvr_batch import consistency as C
from xvr_batch import synth
from xvr_batch.workdir import WorkDir

NOISY, SHIFTED = 27, 43  # non-key frames whose LR frame is corrupted (key frames every 10)


def _cli(*args) -> tuple[int, str, str]:
    from xvr_batch.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue(), err.getvalue()


def _reconstruct(arc, out, unit):
    code, _, err = _cli("reconstruct", arc, "-o", out, "--device", "cpu", "--unit-frames", unit, "--keep-workdir",
                        "-q")
    assert code == 0, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("consistency")
    clean = d / "clean.h5"
    summary = synth.synthesize(clean, n_frames=60, hr_shape=(128, 160), stride=10, seed=3)
    assert NOISY not in summary["hr_index"] and SHIFTED not in summary["hr_index"]
    bad = d / "bad.h5"
    shutil.copy(clean, bad)
    with h5py.File(bad, "r+") as f:
        lr = f["/exchange/data_lr"]
        x = lr[NOISY].astype(np.float64)
        noise = np.random.default_rng(0).normal(0.0, 0.3 * x.std() + 0.1 * x.mean(), x.shape)
        lr[NOISY] = np.clip(x + noise, 0, np.iinfo(lr.dtype).max).astype(lr.dtype)  # heavy noise
        lr[SHIFTED] = np.roll(lr[SHIFTED], 3, axis=1)  # the view shifted by 3 LR pixels
    outs = {"clean16": d / "clean16.out.h5", "clean128": d / "clean128.out.h5", "bad16": d / "bad16.out.h5"}
    _reconstruct(clean, outs["clean16"], 16)
    _reconstruct(clean, outs["clean128"], 128)
    _reconstruct(bad, outs["bad16"], 16)
    return {"dir": d, "clean": clean, "bad": bad, **outs}


def _read(path):
    with h5py.File(path, "r") as f:
        ds = f[C.DATASET]
        return ds[()], dict(ds.attrs), f["/exchange/data"][()]


def test_corrupted_lr_frames_are_flagged_and_clean_frames_are_not(runs):
    clean, cattrs, _ = _read(runs["clean16"])
    bad, battrs, _ = _read(runs["bad16"])
    assert clean.shape == bad.shape == (60,) and clean.dtype == np.float32
    assert np.isfinite(clean).all() and np.isfinite(bad).all()  # key frames are scored too
    assert cattrs["n_flagged"] == 0 and list(cattrs["flagged_frames"]) == []
    assert clean.max() < cattrs["threshold"] == C.DEFAULT_THRESHOLD
    assert 0.5 < np.median(clean) < 1.5  # ~1: as consistent as a measured HR key frame
    assert set(np.flatnonzero(bad > battrs["threshold"])) == {NOISY, SHIFTED}
    assert battrs["n_flagged"] == 2 and list(battrs["flagged_frames"]) == [NOISY, SHIFTED]
    assert battrs["worst_frame"] == NOISY and battrs["sigma"] == cattrs["sigma"] > 0
    assert "bin4(recon) - LR" in battrs["metric"]


def test_dataset_identical_across_unit_sizes(runs):
    a, aattrs, adata = _read(runs["clean16"])
    b, battrs, bdata = _read(runs["clean128"])
    assert a.tobytes() == b.tobytes() and adata.tobytes() == bdata.tobytes()
    assert json.dumps(aattrs, default=repr, sort_keys=True) == json.dumps(battrs, default=repr, sort_keys=True)


def test_parts_and_journal_carry_it(runs):
    wd = WorkDir(str(runs["bad16"]) + ".xvr")
    records = wd.completed_units(verify=True)
    assert len(records) > 1
    values, _, _ = _read(runs["bad16"])
    for uid, rec in records.items():
        s = rec["consistency"]
        lo, hi = rec["frames"]
        assert s["n"] == hi - lo and s["threshold"] == C.DEFAULT_THRESHOLD
        assert s["flagged"] == [t for t in (NOISY, SHIFTED) if lo <= t < hi] and s["n_flagged"] == len(s["flagged"])
        with h5py.File(wd.resolve_part(rec["part"]), "r") as f:
            assert f[C.PART_DATASET][()].tobytes() == values[lo:hi].tobytes()


def test_status_shows_the_summary(runs):
    code, out, err = _cli("status", str(runs["bad16"]) + ".xvr")
    assert code == 0, err
    assert "LR consistency of 60 frames" in out and f"worst" in out and f"(frame {NOISY})" in out
    assert f"2 frames over 1.5 ({NOISY}, {SHIFTED})" in out
    code, out, err = _cli("status", str(runs["bad16"]) + ".xvr", "--json")
    assert code == 0, err
    st = json.loads(out)["consistency"]
    assert st["n"] == 60 and st["n_flagged"] == 2 and st["flagged"] == [NOISY, SHIFTED]
    assert st["worst_frame"] == NOISY and st["max"] > st["threshold"] > st["median"]
    code, out, err = _cli("status", str(runs["clean16"]) + ".xvr", "--json")
    assert code == 0, err
    st = json.loads(out)["consistency"]
    assert st["n"] == 60 and st["n_flagged"] == 0 and st["flagged"] == []


def test_evaluate_shows_the_summary_and_flagged_frames(runs, tmp_path):
    js = tmp_path / "scores.json"
    code, out, err = _cli("evaluate", runs["bad16"], "--truth", runs["bad"], "--json", js)
    assert code == 0, err
    assert "LR consistency (60 frames" in out and f"flagged frames: {NOISY}, {SHIFTED}" in out
    s = json.loads(js.read_text())["lr_consistency"]
    assert s["flagged"] == [NOISY, SHIFTED] and s["n_flagged"] == 2 and s["n"] == 60 and s["sigma"] > 0
    code, out, err = _cli("evaluate", runs["clean128"], "--truth", runs["clean"])
    assert code == 0, err
    assert "0 frames over 1.5" in out and "flagged frames:" not in out


def test_summaries_are_total_on_tampered_records():
    good = C.summarise(np.array([1.0, np.nan, 2.0, 0.5], np.float32), 10, 1.5)
    assert good["n"] == 3 and good["flagged"] == [12] and good["worst_frame"] == 12
    merged = C.merge_summaries([good, None, "x", {"n": True}, {"n": 5, "median": "a"}, {"n": 0},
                                {"n": 2, "median": 1.0, "max": 9.0, "worst_frame": 3, "n_flagged": 1,
                                 "flagged": [3], "threshold": 1.5}])
    assert merged["n"] == 5 and merged["n_flagged"] == 2 and merged["flagged"] == [3, 12]
    assert merged["worst_frame"] == 3
    assert C.merge_summaries([None, {}, []]) is None
    assert "no frames" in C.describe(None) and "over 1.5" in C.describe(merged)
    assert C.check_record({"sigma": float("nan"), "threshold": 1.5}) is None
    assert C.check_record({"sigma": 0.1, "threshold": True}) is None
