"""Part files: round trip, checksums, corruption, atomic replacement."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from xvr_batch.errors import UserError
from xvr_batch.io.parts import read_part, read_part_attrs, verify_part, write_part
from xvr_batch.durable import sha256_file


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


# -- full disks and the final rename (real small tmpfs, in a subprocess so that a crash shows) -------------

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import tmpfs  # noqa: E402
from xvr_batch.io.output import stitch_output  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a tmpfs")




def run_sweep(code: str, *args) -> list:
    """Run ``code`` in a fresh interpreter; it prints one JSON list. A crash (rc -11) fails the test."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# Shared by the sweep scripts: empty the tmpfs ``d`` and fill it so that ``free_kib`` KiB are left.
FILL_TO = """
import os
def fill_to(d, free_kib):
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    st = os.statvfs(d)
    with open(os.path.join(d, "filler"), "wb") as fh:
        fh.write(b"x" * max(0, st.f_bavail * st.f_frsize - free_kib * 1024))
"""


# For each amount of free space (4 KiB steps across the whole part), write a part of 8 frames of 64x64
# float32 (~130 KiB): the failure lands on the first frame, in the middle, at the flush, at the close and at
# the final fsync/rename, and each must be a DiskFullError with nothing left behind.
PART_SWEEP = FILL_TO + """
import json, os, sys
import numpy as np
from xvr_batch.durable import DiskFullError
from xvr_batch.io.parts import StreamingPart, verify_part
d = sys.argv[1]
out = []
for free_kib in range(0, 168, 4):
    fill_to(d, free_kib)
    path = os.path.join(d, "unit-000003.h5")
    try:
        part = StreamingPart(path, 24, 8, (64, 64), np.float32, attrs={"unit": 3})
        for i in range(8):
            part.write(i, np.full((64, 64), i, np.float32))
        sha = part.commit()
        assert verify_part(path, sha)
        out.append("ok")
    except DiskFullError as exc:
        assert exc.errno == 28 and exc.filename == path, exc
        left = sorted(n for n in os.listdir(d) if n != "filler")
        assert left == [], left
        out.append("full")
print(json.dumps(out))
"""


@needs_root
def test_full_disk_at_any_moment_of_a_part_write_is_a_clean_error(tmp_path):
    with tmpfs(tmp_path / "small", "256k") as d:
        outcomes = run_sweep(PART_SWEEP, d)
    assert outcomes[0] == "full" and outcomes[-1] == "ok", outcomes
    assert outcomes.count("full") >= 20  # the failure moved through the whole write


STITCH_SWEEP = FILL_TO + """
import json, os, sys
import numpy as np
from xvr_batch.durable import DiskFullError
from xvr_batch.io.output import stitch_output
parts_dir, d, compression = sys.argv[1], sys.argv[2], sys.argv[3]
parts = [os.path.join(parts_dir, f"unit-{u:06d}.h5") for u in range(3)]
out = []
for free_kib in range(0, 264, 8):
    fill_to(d, free_kib)
    target = os.path.join(d, "out.h5")
    try:
        stitch_output(target, parts, (12, 64, 64), np.dtype("float32"), compression, np.array([0, 11]),
                      {"version": "test", "plan": {"n_frames": 12}})
        out.append("ok")
    except DiskFullError as exc:
        assert exc.errno == 28 and exc.filename == target, exc
        left = sorted(n for n in os.listdir(d) if n != "filler")
        assert left == [], left
        out.append("full")
print(json.dumps(out))
"""


@needs_root
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_full_disk_at_any_moment_of_the_stitch_is_a_clean_error(tmp_path, compression):
    rng = np.random.default_rng(0)
    for u in range(3):
        write_part(tmp_path / f"unit-{u:06d}.h5", 4 * u, rng.random((4, 64, 64)).astype(np.float32))
    with tmpfs(tmp_path / "small", "384k") as d:
        outcomes = run_sweep(STITCH_SWEEP, tmp_path, d, compression)
    assert outcomes[0] == "full" and outcomes[-1] == "ok", outcomes
    assert outcomes.count("full") >= 3


def _stitch(parts, out, **kw):
    return stitch_output(out, parts, (4, 8, 8), np.dtype("float32"), "none", np.array([0, 3]), {"v": "1"}, **kw)


def test_stitch_never_replaces_an_existing_output_without_overwrite(tmp_path):
    part = tmp_path / "unit-000000.h5"
    write_part(part, 0, np.ones((4, 8, 8), np.float32))
    out = tmp_path / "out.h5"
    out.write_bytes(b"someone else's result")  # e.g. another run finished meanwhile
    with pytest.raises(UserError, match="appeared while it was being written.*--overwrite") as err:
        _stitch([part], out)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"someone else's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5", "unit-000000.h5"]  # no temporary left
    _stitch([part], out, overwrite=True)
    with h5py.File(out, "r") as f:
        assert f["/exchange/data"].shape == (4, 8, 8)
    out.unlink()
    assert _stitch([part], out) == out  # nothing there: published


def test_stitch_removes_temporaries_of_dead_processes_only(tmp_path):
    part = tmp_path / "unit-000000.h5"
    write_part(part, 0, np.ones((4, 8, 8), np.float32))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from xvr_batch.durable import temp_path
    mine = temp_path(tmp_path / "out.h5")
    stale_new = tmp_path / mine.name.replace(f"tmp-{os.getpid()}-", f"tmp-{dead.pid}-")
    stale_old = tmp_path / f".out.h5.tmp-{dead.pid}"  # the scheme of earlier releases
    other_host = tmp_path / f".out.h5.tmp-{dead.pid}-00000000-12345678"
    for p in (stale_new, stale_old, other_host):
        p.write_bytes(b"x")
    _stitch([part], tmp_path / "out.h5")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([other_host.name, "out.h5", "unit-000000.h5"])
