"""Tests for xvr_batch.io.archive: validation, lazy reads, fingerprint, describe.

Every archive here is a real HDF5 file written with h5py under ``tmp_path``; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import h5py
import hdf5plugin
import numpy as np
import pytest

from xvr_batch.errors import UserError
from xvr_batch.io.archive import CALIBRATIONS, Archive, ArchivePaths, inspect_file

N, H_LR, W_LR, SCALE, STRIDE = 30, 12, 16, 4, 10
KEYS = list(range(0, N, STRIDE))  # [0, 10, 20]
K = len(KEYS)

Mutator = Callable[[h5py.File], None]


def make_archive(
    path: Path,
    *,
    n: int = N,
    keys: list[int] | None = None,
    dtype: Any = np.uint16,
    calib: bool = True,
    gt: bool = False,
    with_index: bool = True,
    mutate: Mutator | None = None,
    lr_kwargs: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Write a valid archive to ``path`` (then apply ``mutate``); return the arrays written."""
    keys = KEYS if keys is None else keys
    rng = np.random.default_rng(0)
    hh, ww = H_LR * SCALE, W_LR * SCALE
    arrays: dict[str, np.ndarray] = {
        "lr": rng.integers(0, 4000, (n, H_LR, W_LR)).astype(dtype),
        "hr": rng.integers(0, 60000, (len(keys), hh, ww)).astype(dtype),
        "hr_index": np.asarray(keys, dtype=np.int64),
    }
    if calib:
        arrays["dark_lr"] = rng.integers(0, 100, (5, H_LR, W_LR)).astype(dtype)
        arrays["white_lr"] = rng.integers(3000, 4000, (4, H_LR, W_LR)).astype(dtype)
        arrays["dark_hr"] = rng.integers(0, 100, (3, hh, ww)).astype(dtype)
        arrays["white_hr"] = rng.integers(50000, 60000, (2, hh, ww)).astype(dtype)
    if gt:
        arrays["gt"] = rng.integers(0, 60000, (n, hh, ww)).astype(dtype)
    with h5py.File(path, "w") as f:
        ex = f.create_group("exchange")
        ex.create_dataset("data_lr", data=arrays["lr"], chunks=(1, H_LR, W_LR), **(lr_kwargs or {}))
        ex.create_dataset("data_hr", data=arrays["hr"], chunks=(1, hh, ww))
        if with_index:
            ex["hr_index"] = arrays["hr_index"]
        for name in CALIBRATIONS:
            if name in arrays:
                ex[f"data_{name}"] = arrays[name]
        if gt:
            ex["data_gt"] = arrays["gt"]
        if mutate is not None:
            mutate(f)
    return arrays


@pytest.fixture
def archive_path(tmp_path: Path) -> Path:
    p = tmp_path / "archive.h5"
    make_archive(p)
    return p


# ------------------------------------------------------------------------------------------
# valid archives


def test_valid_archive_attributes(archive_path: Path) -> None:
    with Archive(archive_path) as a:
        assert a.path == str(archive_path)
        assert a.paths == ArchivePaths()
        assert a.n_frames == N
        assert a.lr_shape == (H_LR, W_LR)
        assert a.hr_shape == (H_LR * SCALE, W_LR * SCALE)
        assert a.scale == SCALE
        assert a.hr_index.dtype == np.int64
        assert a.hr_index.tolist() == KEYS
        assert a.hr_index_source == "dataset"
        assert a.hr_stride is None and a.hr_offset == 0
        assert a.lr_dtype == np.uint16 and a.hr_dtype == np.uint16
        assert not a.has_gt


def test_reads_match_written_values(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    arr = make_archive(p)
    with Archive(p) as a:
        lr = a.read_lr(3, 9)
        assert lr.dtype == np.float32 and lr.shape == (6, H_LR, W_LR)
        np.testing.assert_array_equal(lr, arr["lr"][3:9].astype(np.float32))
        assert a.read_lr(5, 5).shape == (0, H_LR, W_LR)
        idx = [7, 2, 2, 29, 3, 4, 0, 7]  # unsorted, repeated, non-contiguous
        at = a.read_lr_at(idx)
        assert at.dtype == np.float32 and at.shape == (len(idx), H_LR, W_LR)
        np.testing.assert_array_equal(at, arr["lr"][idx].astype(np.float32))
        assert a.read_lr_at([]).shape == (0, H_LR, W_LR)
        for k in range(K):
            hr = a.read_hr(k)
            assert hr.dtype == np.float32 and hr.shape == a.hr_shape
            np.testing.assert_array_equal(hr, arr["hr"][k].astype(np.float32))
        np.testing.assert_array_equal(a.read_hr_all(), arr["hr"].astype(np.float32))
        with pytest.raises(IndexError):
            a.read_lr(25, 31)
        with pytest.raises(IndexError):
            a.read_lr_at([0, N])
        with pytest.raises(IndexError):
            a.read_hr(K)


def test_calibrations_are_averaged_and_cached(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    arr = make_archive(p)
    with Archive(p) as a:
        for name in CALIBRATIONS:
            mean = a.calibration(name)
            assert mean is not None and mean.dtype == np.float32
            assert mean.shape == arr[name].shape[1:]
            np.testing.assert_allclose(mean, arr[name].astype(np.float64).mean(axis=0), rtol=1e-6)
            assert a.calibration(name) is mean  # cached
            assert not mean.flags.writeable
        with pytest.raises(ValueError):
            a.calibration("flat")


def test_calibrations_absent_and_2d(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    dark = np.full((H_LR, W_LR), 7, np.uint16)

    def add_2d_dark(f: h5py.File) -> None:
        f["/exchange/data_dark_lr"] = dark

    make_archive(p, calib=False, mutate=add_2d_dark)
    with Archive(p) as a:
        np.testing.assert_array_equal(a.calibration("dark_lr"), dark.astype(np.float32))
        assert a.calibration("white_lr") is None
        assert a.calibration("dark_hr") is None
        d = a.describe()
        assert d["calibrations"]["dark_lr"] == {"path": "/exchange/data_dark_lr", "n_frames": 1}
        assert d["calibrations"]["white_hr"] is None
        assert any("missing darks/flats" in w for w in d["warnings"])


def test_hr_stride_path(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    make_archive(p, with_index=False)
    with Archive(p, hr_stride=STRIDE) as a:
        assert a.hr_index.tolist() == KEYS
        assert a.hr_index_source == "stride"
        assert a.hr_stride == STRIDE and a.hr_offset == 0
    q = tmp_path / "offset.h5"
    make_archive(q, keys=[5, 12, 19, 26])
    with Archive(q, hr_stride=7, hr_offset=5) as a:  # overrides the (equal) dataset
        assert a.hr_index.tolist() == [5, 12, 19, 26]
        assert a.hr_index_source == "stride"
        assert any("ignored because --hr-stride" in w for w in a.describe()["warnings"])


def test_hr_stride_overrides_a_broken_hr_index(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    make_archive(p, keys=[0, 10, 10])  # invalid dataset; --hr-stride is the documented way out
    with pytest.raises(UserError, match="not strictly increasing"):
        Archive(p)
    with Archive(p, hr_stride=10) as a:
        assert a.hr_index.tolist() == KEYS


def test_float_hr_index_with_whole_values_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"

    def float_index(f: h5py.File) -> None:
        del f["/exchange/hr_index"]
        f["/exchange/hr_index"] = np.asarray(KEYS, dtype=np.float64)

    make_archive(p, mutate=float_index)
    with Archive(p) as a:
        assert a.hr_index.dtype == np.int64 and a.hr_index.tolist() == KEYS


def test_custom_paths_and_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"

    def move(f: h5py.File) -> None:
        f.move("/exchange/data_lr", "/lr")
        f.move("/exchange/data_hr", "/cam2/frames")

    make_archive(p, mutate=move)
    paths = ArchivePaths(lr="/lr", hr="/cam2/frames")
    assert ArchivePaths.from_dict(json.loads(json.dumps(paths.to_dict()))) == paths
    assert ArchivePaths.from_dict({"lr": "/lr"}) == ArchivePaths(lr="/lr")
    with pytest.raises(UserError, match="unknown archive path name"):
        ArchivePaths.from_dict({"low_res": "/lr"})
    with pytest.raises(UserError, match="must be a string"):
        ArchivePaths.from_dict({"lr": 3})
    with Archive(p, paths=paths) as a:
        assert a.n_frames == N
    # Disabled optional datasets are treated as absent.
    with Archive(p, paths=dataclasses.replace(paths, dark_lr="")) as a:
        assert a.calibration("dark_lr") is None


def test_ground_truth(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    arr = make_archive(p, gt=True)
    with Archive(p) as a:
        assert a.has_gt
        np.testing.assert_array_equal(a.read_gt(2, 4), arr["gt"][2:4].astype(np.float32))
        assert a.describe()["has_gt"] is True


def test_malformed_ground_truth_is_lazy(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"

    def bad_gt(f: h5py.File) -> None:
        f["/exchange/data_gt"] = np.zeros((N, H_LR, W_LR), np.uint16)  # LR size, not HR

    make_archive(p, mutate=bad_gt)
    with Archive(p) as a:
        assert not a.has_gt
        assert any("/exchange/data_gt" in w for w in a.describe()["warnings"])
        with pytest.raises(UserError, match="/exchange/data_gt"):
            a.read_gt(0, 1)


def test_compressed_with_plugin_filter(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    arr = make_archive(p, lr_kwargs=dict(hdf5plugin.Blosc(cname="lz4")))
    with Archive(p) as a:
        np.testing.assert_array_equal(a.read_lr(0, N), arr["lr"].astype(np.float32))
        lr = next(d for d in a.describe()["datasets"] if d["path"] == "/exchange/data_lr")
        assert lr["compression"] is not None and "blosc" in lr["compression"].lower()


def test_pickle_reopens(archive_path: Path) -> None:
    with Archive(archive_path) as a:
        b = pickle.loads(pickle.dumps(a))
        try:
            assert b.fingerprint() == a.fingerprint()
            np.testing.assert_array_equal(b.read_lr(0, 2), a.read_lr(0, 2))
        finally:
            b.close()


def test_close_and_context_manager(archive_path: Path) -> None:
    a = Archive(archive_path)
    with a:
        a.read_lr(0, 1)
    with pytest.raises(RuntimeError, match="closed"):
        a.read_lr(0, 1)
    a.close()  # idempotent


def test_file_untouched_after_use(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    make_archive(p, gt=True)
    past = 1_600_000_000
    os.utime(p, (past, past))
    before, mtime = p.read_bytes(), os.stat(p).st_mtime_ns
    with Archive(p) as a:
        a.read_lr(0, N)
        a.read_lr_at([3, 1])
        a.read_hr_all()
        a.read_gt(0, 2)
        for name in CALIBRATIONS:
            a.calibration(name)
        a.check_finite()
        a.fingerprint()
        a.describe()
    inspect_file(p)
    assert os.stat(p).st_mtime_ns == mtime
    assert p.read_bytes() == before


# ------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_stable_and_location_independent(tmp_path: Path, archive_path: Path) -> None:
    with Archive(archive_path) as a:
        fp = a.fingerprint()
        assert fp == a.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    with Archive(archive_path) as a:
        assert a.fingerprint() == fp
    copy = tmp_path / "elsewhere.h5"
    copy.write_bytes(archive_path.read_bytes())
    with Archive(copy) as a:
        assert a.fingerprint() == fp


def _fingerprint_after(tmp_path: Path, mutate: Mutator, **kw: Any) -> str:
    p = tmp_path / "changed.h5"
    make_archive(p, mutate=mutate)
    with Archive(p, **kw) as a:
        return a.fingerprint()


def _bump(path: str, frame: int) -> Mutator:
    def mutate(f: h5py.File) -> None:
        ds = f[path]
        ds[frame] = ds[frame] + 1

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_bump("/exchange/data_lr", 0), id="first-lr-frame"),
        pytest.param(_bump("/exchange/data_lr", N - 1), id="last-lr-frame"),
        pytest.param(_bump("/exchange/data_lr", 13), id="middle-sampled-lr-frame"),
        pytest.param(_bump("/exchange/data_hr", 0), id="first-hr-frame"),
        pytest.param(_bump("/exchange/data_hr", K - 1), id="last-hr-frame"),
        pytest.param(_bump("/exchange/data_dark_lr", 0), id="dark"),
        pytest.param(
            lambda f: f["/exchange/hr_index"].__setitem__(2, 21), id="hr_index-value"
        ),
        pytest.param(lambda f: f.__delitem__("/exchange/data_white_hr"), id="calibration-removed"),
    ],
)
def test_fingerprint_changes(tmp_path: Path, archive_path: Path, mutate: Mutator) -> None:
    with Archive(archive_path) as a:
        reference = a.fingerprint()
    assert _fingerprint_after(tmp_path, mutate) != reference


def test_fingerprint_changes_with_dtype(tmp_path: Path, archive_path: Path) -> None:
    with Archive(archive_path) as a:
        reference = a.fingerprint()
    p = tmp_path / "float.h5"
    make_archive(p, dtype=np.float32)
    with Archive(p) as a:
        assert a.fingerprint() != reference


# ------------------------------------------------------------------------------------------
# NaN / Inf


def _poison(path: str, frame: int, value: float = np.nan) -> Mutator:
    def mutate(f: h5py.File) -> None:
        ds = f[path]
        data = ds[frame]
        data[1, 2] = value
        ds[frame] = data

    return mutate


@pytest.mark.parametrize(
    "path,frame,value",
    [
        ("/exchange/data_lr", 17, np.nan),
        ("/exchange/data_lr", 0, np.inf),
        ("/exchange/data_hr", 2, np.nan),
        ("/exchange/data_white_lr", 3, -np.inf),
    ],
)
def test_check_finite_catches_nan(tmp_path: Path, path: str, frame: int, value: float) -> None:
    p = tmp_path / "float.h5"
    make_archive(p, dtype=np.float32, mutate=_poison(path, frame, value))
    with Archive(p) as a:  # opening does not scan frames
        with pytest.raises(UserError) as err:
            a.check_finite(block_frames=4)
    msg = str(err.value)
    assert path in msg and f"frame {frame} " in msg and str(p) in msg


def test_reads_raise_on_nan(tmp_path: Path) -> None:
    p = tmp_path / "float.h5"

    def both(f: h5py.File) -> None:
        _poison("/exchange/data_lr", 17)(f)
        _poison("/exchange/data_hr", 1)(f)
        _poison("/exchange/data_dark_hr", 0)(f)

    make_archive(p, dtype=np.float32, mutate=both)
    with Archive(p) as a:
        a.read_lr(0, 17)  # clean frames read fine
        with pytest.raises(UserError, match=r"/exchange/data_lr frame 17 contains NaN"):
            a.read_lr(10, 20)
        with pytest.raises(UserError, match=r"/exchange/data_lr frame 17 contains NaN"):
            a.read_lr_at([3, 17])
        a.read_hr(0)
        with pytest.raises(UserError, match=r"/exchange/data_hr key frame 1 contains NaN"):
            a.read_hr(1)
        with pytest.raises(UserError, match=r"/exchange/data_dark_hr"):
            a.calibration("dark_hr")


def _compress_as_uint16(*names: str) -> Mutator:
    """Rewrite the named /exchange datasets as gzip-chunked uint16 (one chunk per frame)."""

    def mutate(f: h5py.File) -> None:
        for name in names:
            data = np.asarray(f["exchange"][name][()], dtype=np.uint16)
            del f["exchange"][name]
            chunks = (1, *data.shape[1:]) if data.ndim == 3 else data.shape
            f["exchange"].create_dataset(name, data=data, chunks=chunks, compression="gzip")

    return mutate


def _scribble_chunks(path: Path, *names: str) -> None:
    """Overwrite every stored chunk of the named /exchange datasets, so that any read of them fails."""
    with h5py.File(path, "r") as f:
        spans = [(info.byte_offset, info.size)
                 for name in names
                 for info in map(f["exchange"][name].id.get_chunk_info,
                                 range(f["exchange"][name].id.get_num_chunks()))]
    with open(path, "r+b") as fh:
        for offset, size in spans:
            fh.seek(offset)
            fh.write(b"\xff" * size)


def test_check_finite_passes_clean_float_and_skips_integers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, *args: Any, **kwargs: Any) -> Any:
        read.append(self.name)
        return real_getitem(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    data = ["data_lr", "data_hr", *(f"data_{c}" for c in CALIBRATIONS)]

    # All float: every dataset reconstruction reads is streamed, and clean data passes.
    p = tmp_path / "float.h5"
    make_archive(p, dtype=np.float32)
    with Archive(p) as a:
        read.clear()
        a.check_finite(block_frames=7)
    assert set(read) == {f"/exchange/{d}" for d in data}

    # All integer, with every chunk of every data dataset scribbled over: any read would fail
    # (checked below), so passing proves that no integer dataset was read, by any API.
    def all_int(f: h5py.File) -> None:
        _compress_as_uint16(*data)(f)
        dark = f["exchange"]["data_dark_lr"][0]  # one 2-D (pre-averaged) calibration too
        del f["exchange"]["data_dark_lr"]
        f["exchange"].create_dataset("data_dark_lr", data=dark, chunks=dark.shape, compression="gzip")

    q = tmp_path / "int.h5"
    make_archive(q, mutate=all_int)
    _scribble_chunks(q, *data)
    with Archive(q) as a:
        assert a.lr_dtype == np.uint16
        read.clear()
        a.check_finite()
        a.check_finite(block_frames=1)
        assert read == []
        with pytest.raises(UserError, match="corrupt"):  # the scribbling really makes reads fail
            a.read_lr(0, 1)
        with pytest.raises(UserError, match="corrupt"):
            a.calibration("dark_lr")

    # Mixed: float LR/HR are streamed, integer calibrations are not touched.
    m = tmp_path / "mixed.h5"
    make_archive(m, dtype=np.float32, mutate=_compress_as_uint16(*data[2:]))
    _scribble_chunks(m, *data[2:])
    with Archive(m) as a:
        read.clear()
        a.check_finite(block_frames=4)
    assert set(read) == {"/exchange/data_lr", "/exchange/data_hr"}


# ------------------------------------------------------------------------------------------
# describe / inspect


def test_describe(archive_path: Path) -> None:
    d = inspect_file(archive_path)
    json.dumps(d)  # serialisable
    assert d["file"] == str(archive_path)
    assert d["n_frames"] == N and d["scale"] == SCALE
    assert d["lr_shape"] == [H_LR, W_LR] and d["hr_shape"] == [H_LR * SCALE, W_LR * SCALE]
    assert d["lr_dtype"] == "uint16" and d["n_key_frames"] == K
    assert d["hr_index_source"] == "dataset"
    found = {x["path"]: x for x in d["datasets"]}
    assert set(found) == {
        "/exchange/data_lr",
        "/exchange/data_hr",
        "/exchange/hr_index",
        "/exchange/data_dark_lr",
        "/exchange/data_white_lr",
        "/exchange/data_dark_hr",
        "/exchange/data_white_hr",
    }
    assert found["/exchange/data_lr"]["shape"] == [N, H_LR, W_LR]
    assert found["/exchange/data_lr"]["chunks"] == [1, H_LR, W_LR]
    assert found["/exchange/data_lr"]["compression"] is None
    kf = d["key_frames"]
    assert (kf["gap_min"], kf["gap_median"], kf["gap_max"]) == (10, 10.0, 10)
    assert kf["regular"] and kf["frames_before_first"] == 0 and kf["frames_after_last"] == 9
    assert all(d["calibrations"][c] is not None for c in CALIBRATIONS)
    assert d["has_gt"] is False
    assert any("after the last key frame" in w for w in d["warnings"])
    assert not any("irregular" in w or "darks/flats" in w for w in d["warnings"])


def test_describe_warnings(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    make_archive(p, n=130, keys=[3, 10, 70, 129], calib=False)
    d = inspect_file(p)
    kf = d["key_frames"]
    assert (kf["gap_min"], kf["gap_max"], kf["frames_before_first"]) == (7, 60, 3)
    warnings = " | ".join(d["warnings"])
    assert "irregular" in warnings
    assert "60 frames (> 50)" in warnings
    assert "before the first key frame" in warnings
    assert "no darks/flats" in warnings


def test_inspect_file_raises_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        inspect_file(tmp_path / "nope.h5")


# ------------------------------------------------------------------------------------------
# validation errors


def _replace(path: str, data: Any = None, **kw: Any) -> Mutator:
    """Mutator: delete ``path`` and write ``data`` (or a group when data is None) there."""

    def mutate(f: h5py.File) -> None:
        if path in f:
            del f[path]
        if data is None and not kw:
            f.create_group(path)
        else:
            f.create_dataset(path, data=data, **kw)

    return mutate


def _delete(path: str) -> Mutator:
    return lambda f: f.__delitem__(path)


HH, WW = H_LR * SCALE, W_LR * SCALE
LR, HR, IDX = "/exchange/data_lr", "/exchange/data_hr", "/exchange/hr_index"
compound = np.dtype([("a", "u2"), ("b", "f4")])
strings = np.full((N, H_LR, W_LR), b"x", dtype="S3")

# (id, mutator, Archive kwargs, substrings the message must contain)
ERROR_CASES: list[tuple[str, Mutator | None, dict[str, Any], list[str]]] = [
    ("lr-missing", _delete(LR), {}, [LR, "--lr PATH"]),
    ("hr-missing", _delete(HR), {}, [HR, "--hr PATH"]),
    ("lr-is-group", _replace(LR), {}, [LR, "group", "--lr"]),
    ("hr-is-group", _replace(HR), {}, [HR, "group", "--hr"]),
    ("lr-2d", _replace(LR, np.zeros((N, H_LR), np.uint16)), {}, [LR, "3-D"]),
    ("hr-4d", _replace(HR, np.zeros((K, HH, WW, 1), np.uint16)), {}, [HR, "3-D"]),
    ("lr-no-frames", _replace(LR, shape=(0, H_LR, W_LR), dtype=np.uint16), {}, [LR, "empty"]),
    ("lr-zero-size-frames", _replace(LR, shape=(N, 0, W_LR), dtype="u2"), {}, [LR, "empty"]),
    ("hr-no-frames", _replace(HR, shape=(0, HH, WW), dtype=np.uint16), {}, [HR, "empty"]),
    ("lr-strings", _replace(LR, strings), {}, [LR, "dtype"]),
    ("hr-compound", _replace(HR, np.zeros((K, HH, WW), dtype=compound)), {}, [HR, "dtype"]),
    ("lr-bool", _replace(LR, np.zeros((N, H_LR, W_LR), bool)), {}, [LR, "bool"]),
    ("lr-complex", _replace(LR, np.zeros((N, H_LR, W_LR), np.complex64)), {}, [LR, "complex"]),
    ("hr-not-multiple", _replace(HR, np.zeros((K, 50, WW), np.uint16)), {}, [HR, LR, "50x64"]),
    ("hr-axes-differ", _replace(HR, np.zeros((K, HH, 32), np.uint16)), {}, [HR, "both axes"]),
    ("hr-smaller", _replace(HR, np.zeros((K, 6, 8), np.uint16)), {}, [HR, "multiple"]),
    ("index-missing", _delete(IDX), {}, [IDX, "--hr-stride S [--hr-offset O]"]),
    ("index-is-group", _replace(IDX), {}, [IDX, "group"]),
    ("index-non-whole", _replace(IDX, np.array([0.0, 10.5, 20.0])), {}, [IDX, "10.5", "index 1"]),
    ("index-nan", _replace(IDX, np.array([0.0, np.nan, 20.0])), {}, [IDX, "whole number"]),
    ("index-strings", _replace(IDX, np.array([b"0", b"10", b"20"])), {}, [IDX, "integer"]),
    ("index-bool", _replace(IDX, np.array([False, True, True])), {}, [IDX, "integer"]),
    ("index-2d", _replace(IDX, np.array([[0, 10, 20]])), {}, [IDX, "1-D"]),
    ("index-repeat", _replace(IDX, np.array([0, 10, 10])), {}, [IDX, "index 2: 10 after 10"]),
    ("index-decreasing", _replace(IDX, np.array([0, 20, 10])), {}, [IDX, "strictly increasing"]),
    ("index-too-big", _replace(IDX, np.array([0, 10, 30])), {}, [IDX, "30", "[0, 30)"]),
    ("index-negative", _replace(IDX, np.array([-1, 10, 20])), {}, [IDX, "-1", "[0, 30)"]),
    ("index-huge-unsigned", _replace(IDX, np.array([0, 10, 2**64 - 1], np.uint64)), {}, [IDX]),
    ("index-too-short", _replace(IDX, np.array([0, 10])), {}, [IDX, "2 entries", "3 key frames"]),
    ("index-too-long", _replace(IDX, np.array([0, 10, 20, 25])), {}, [IDX, "4 entries"]),
    ("stride-zero", None, {"hr_stride": 0}, ["--hr-stride", "at least 1"]),
    ("stride-not-int", None, {"hr_stride": 2.5}, ["--hr-stride", "integer"]),
    ("offset-negative", None, {"hr_stride": 10, "hr_offset": -1}, ["--hr-offset -1", "[0, 30)"]),
    ("offset-too-big", None, {"hr_stride": 10, "hr_offset": 30}, ["--hr-offset 30", "[0, 30)"]),
    ("stride-count", None, {"hr_stride": 7}, ["--hr-stride 7", "5 key frames", HR, "has 3"]),
    ("offset-count", None, {"hr_stride": 20, "hr_offset": 5}, ["--hr-offset 5", "2 key", "has 3"]),
    ("offset-without-stride", None, {"hr_offset": 3}, ["--hr-offset 3", "without --hr-stride"]),
    (
        "one-key-frame",
        lambda f: (_replace(HR, np.zeros((1, HH, WW), np.uint16))(f), _replace(IDX, [0])(f)),
        {},
        [HR, "at least 2"],
    ),
    (
        "dark-lr-frame-shape",
        _replace("/exchange/data_dark_lr", np.zeros((5, 13, 16), np.uint16)),
        {},
        ["/exchange/data_dark_lr", "(n, 12, 16)"],
    ),
    (
        "white-hr-frame-shape",
        _replace("/exchange/data_white_hr", np.zeros((2, HH, 60), np.uint16)),
        {},
        ["/exchange/data_white_hr", "(n, 48, 64)"],
    ),
    (
        "dark-hr-at-lr-size",
        _replace("/exchange/data_dark_hr", np.zeros((2, H_LR, W_LR), np.uint16)),
        {},
        ["/exchange/data_dark_hr", "HR"],
    ),
    (
        "dark-lr-1d",
        _replace("/exchange/data_dark_lr", np.zeros(5, np.uint16)),
        {},
        ["/exchange/data_dark_lr", "(5,)"],
    ),
    (
        "white-lr-no-frames",
        _replace("/exchange/data_white_lr", shape=(0, H_LR, W_LR), dtype=np.uint16),
        {},
        ["/exchange/data_white_lr", "no frames"],
    ),
    ("dark-lr-group", _replace("/exchange/data_dark_lr"), {}, ["/exchange/data_dark_lr", "group"]),
    (
        "dark-lr-strings",
        _replace("/exchange/data_dark_lr", np.full((2, H_LR, W_LR), b"a", "S1")),
        {},
        ["/exchange/data_dark_lr", "dtype"],
    ),
]


@pytest.mark.parametrize(
    "mutate,kwargs,expected", [pytest.param(*c[1:], id=c[0]) for c in ERROR_CASES]
)
def test_invalid_archive(
    tmp_path: Path, mutate: Mutator | None, kwargs: dict[str, Any], expected: list[str]
) -> None:
    p = tmp_path / "archive.h5"
    make_archive(p, mutate=mutate)
    with pytest.raises(UserError) as err:
        Archive(p, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ")
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def _truncated(p: Path) -> None:
    make_archive(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


FILE_CASES: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("missing", lambda p: None, ["not found"]),
    ("directory", lambda p: p.mkdir(), ["directory"]),
    ("not-hdf5", lambda p: p.write_text("frame,value\n1,2\n"), ["not an HDF5 file"]),
    ("empty", lambda p: p.write_bytes(b""), ["empty"]),
    ("truncated", _truncated, ["truncated or corrupt"]),
]


@pytest.mark.parametrize("prepare,expected", [pytest.param(*c[1:], id=c[0]) for c in FILE_CASES])
def test_invalid_file(
    tmp_path: Path, prepare: Callable[[Path], None], expected: list[str]
) -> None:
    p = tmp_path / "archive.h5"
    prepare(p)
    with pytest.raises(UserError) as err:
        Archive(p)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ")
    for part in expected:
        assert part in msg


def test_corrupt_chunk_raises_user_error_on_read(tmp_path: Path) -> None:
    p = tmp_path / "archive.h5"
    make_archive(p, lr_kwargs={"compression": "gzip"})
    with h5py.File(p, "r") as f:
        info = f["/exchange/data_lr"].id.get_chunk_info_by_coord((5, 0, 0))
    with open(p, "r+b") as fh:  # scribble over the compressed bytes of frame 5
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with Archive(p) as a:  # metadata is intact, so opening works
        a.read_lr(0, 5)
        with pytest.raises(UserError) as err:
            a.read_lr(4, 8)
    msg = str(err.value)
    assert str(p) in msg and "/exchange/data_lr" in msg and "corrupt" in msg


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "archive.h5"
    link.symlink_to(tmp_path / "gone.h5")
    with pytest.raises(UserError, match="broken symbolic link"):
        Archive(link)


@pytest.mark.may_skip_in_ci(reason="root without CAP_SETUID cannot drop privileges to make a file unreadable")
def test_unreadable_file(archive_path: Path) -> None:
    archive_path.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(UserError, match="permission denied") as err:
                Archive(archive_path)
        else:
            # Root reads any file; drop the effective uid so the permission check really fails.
            try:
                os.seteuid(65534)
            except OSError:
                pytest.skip("running as root without the right to drop privileges")
            try:
                with pytest.raises(UserError, match="permission denied") as err:
                    Archive(archive_path)
            finally:
                os.seteuid(0)
        assert str(archive_path) in str(err.value)
    finally:
        archive_path.chmod(0o644)
