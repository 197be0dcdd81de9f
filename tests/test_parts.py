"""Part files: round trip, checksums, corruption, atomic replacement."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from xvr_batch.errors import UserError
from xvr_batch.io.parts import read_part, read_part_attrs, verify_part, write_part
from xvr_batch.workdir import sha256_file


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_round_trip_keeps_values_and_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    if np.issubdtype(dtype, np.integer):
        frames = rng.integers(0, 65535, size=(5, 12, 16)).astype(dtype)
    else:
        frames = rng.standard_normal((5, 12, 16)).astype(dtype)
    path = tmp_path / "unit-000003.h5"
    sha = write_part(path, 40, frames, attrs={"unit": 3, "halo": [2, 2], "codec": "none"})
    start, back = read_part(path)
    assert start == 40
    assert back.dtype == frames.dtype and back.shape == frames.shape
    np.testing.assert_array_equal(back, frames)
    with h5py.File(path, "r") as fh:
        assert fh.attrs["stop"] == 45
        assert fh["data"].compression is None
    attrs = read_part_attrs(path)
    assert attrs["unit"] == 3 and attrs["halo"] == "[2,2]" and attrs["codec"] == "none"
    assert sha == sha256_file(path)


def test_sha256_is_stable_and_reproducible(tmp_path):
    frames = np.arange(2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8)
    a = write_part(tmp_path / "a.h5", 0, frames, attrs={"unit": 0})
    b = write_part(tmp_path / "b.h5", 0, frames, attrs={"unit": 0})
    assert a == b == sha256_file(tmp_path / "a.h5")
    assert verify_part(tmp_path / "a.h5", a)
    assert verify_part(tmp_path / "a.h5", a.upper())
    # Rewriting over an existing part replaces it atomically with the same bytes.
    assert write_part(tmp_path / "a.h5", 0, frames, attrs={"unit": 0}) == a
    assert write_part(tmp_path / "a.h5", 1, frames, attrs={"unit": 0}) != a


def test_verify_part_false_after_corruption_or_loss(tmp_path):
    path = tmp_path / "p.h5"
    sha = write_part(path, 0, np.ones((3, 4, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 7] ^= 0xFF  # a byte of the frame data
    path.write_bytes(bytes(raw))
    assert not verify_part(path, sha)
    path.unlink()
    assert not verify_part(path, sha)


def test_truncated_or_garbage_part_raises_user_error(tmp_path):
    path = tmp_path / "p.h5"
    write_part(path, 10, np.zeros((4, 32, 32), np.uint16))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt"):
        read_part(path)
    path.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(UserError, match=str(path)):
        read_part(path)
    with pytest.raises(UserError, match="does not exist"):
        read_part(tmp_path / "missing.h5")


def test_part_without_frames_metadata_is_corrupt(tmp_path):
    path = tmp_path / "p.h5"
    with h5py.File(path, "w") as fh:
        fh["data"] = np.zeros((2, 3, 3), np.float32)
    with pytest.raises(UserError, match="start/stop"):
        read_part(path)


def test_no_tmp_file_left_behind(tmp_path):
    write_part(tmp_path / "p.h5", 0, np.zeros((1, 4, 4), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["p.h5"]
    # A failing write leaves neither the part nor a temporary file.
    with pytest.raises(TypeError):
        write_part(tmp_path / "q.h5", 0, np.zeros((1, 4, 4), np.float32), attrs={"bad": object()})
    assert sorted(os.listdir(tmp_path)) == ["p.h5"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_part(tmp_path / "p.h5", 0, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError):
        write_part(tmp_path / "p.h5", 0, np.zeros((1, 4, 4), np.float32), attrs={"start": 3})
    assert os.listdir(tmp_path) == []
