"""Work directory: manifest, journal, part verification, path safety, lock (real processes)."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from xvr_batch.errors import UserError
from xvr_batch.io.parts import write_part
from xvr_batch.workdir import MANIFEST_VERSION, WorkDir, WorkDirLock, journal_crc

REPO = pathlib.Path(__file__).resolve().parents[1]
SHA0 = "0" * 64


def make_manifest(units=((0, 0, 10), (1, 10, 20), (2, 20, 30), (3, 30, 35))):
    return {
        "version": MANIFEST_VERSION,
        "plan": {
            "n_frames": max(stop for _, _, stop in units),
            "units": [{"id": i, "start": a, "stop": b, "halo": [1, 1]} for i, a, b in units],
        },
        "fingerprint": {"size": 123, "sha256": "ab" * 32},
        "config_hash": "cd" * 32,
        "weights_sha256": "ef" * 32,
        "normalisation": {"lr": [0.0, 1.0], "hr": [0.5, 2.0]},
    }


def finish_unit(wd: WorkDir, uid: int, start: int, stop: int) -> pathlib.Path:
    """Write a real part for a unit and journal it, as the pipeline does."""
    frames = np.full((stop - start, 4, 4), uid, np.float32)
    path = wd.part_path(uid)
    sha = write_part(path, start, frames)
    wd.record_done(uid, wd.part_relpath(uid), sha, (start, stop))
    return path


def _argv(code: str, args) -> list:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def run_py(code: str, *args) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(_argv(code, args), env=env, capture_output=True, text=True, timeout=30)


def popen_py(code: str, *args) -> subprocess.Popen:
    """Start Python code in a fresh interpreter; its stdout is a text pipe."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(_argv(code, args), env=env, stdout=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- manifest ----------------------------------------------------------------------------------


def test_constructor_creates_nothing(tmp_path):
    wd = WorkDir(tmp_path / "out.h5.xvr")
    assert not wd.path.exists() and not wd.exists()
    assert wd.part_path(42) == wd.path / "parts" / "unit-000042.h5"
    assert wd.part_relpath(42) == "parts/unit-000042.h5"


def test_manifest_round_trip_is_atomic(tmp_path):
    wd = WorkDir(tmp_path / "out.h5.xvr")
    manifest = make_manifest()
    wd.create(manifest)
    assert wd.exists() and wd.parts_dir.is_dir()
    assert wd.read_manifest() == manifest
    manifest["plan"]["n_frames"] = 99
    wd.write_manifest(manifest)
    assert wd.read_manifest()["plan"]["n_frames"] == 99
    assert sorted(os.listdir(wd.path)) == ["manifest.json", "parts"]  # no temporary left


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01garbage{",
        b'{"version": 1, "plan": {',  # truncated
        b"[1, 2, 3]",
        json.dumps(dict(make_manifest(), version=2)).encode(),
        json.dumps(dict(make_manifest(), version="1")).encode(),
        json.dumps({k: v for k, v in make_manifest().items() if k != "weights_sha256"}).encode(),
        json.dumps(dict(make_manifest(), plan=[1, 2])).encode(),
    ],
    ids=[
        "garbage", "truncated", "not-object", "version-2", "version-str", "missing-key",
        "bad-plan",
    ],
)
def test_corrupt_manifest_is_a_user_error(tmp_path, content):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    wd.manifest_path.write_bytes(content)
    with pytest.raises(UserError) as err:
        wd.read_manifest()
    msg = str(err.value)
    assert str(wd.manifest_path) in msg and "--force-replan" in msg and "\n" not in msg


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not an xvr_batch work directory"):
        WorkDir(tmp_path / "nowhere").read_manifest()


def test_manifest_is_never_unpickled(tmp_path):
    import pickle

    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    wd.manifest_path.write_bytes(pickle.dumps(make_manifest()))
    with pytest.raises(UserError):
        wd.read_manifest()


def test_create_again_discards_previous_completions(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    finish_unit(wd, 0, 0, 10)
    assert set(wd.completed_units()) == {0}
    wd.create(make_manifest())  # e.g. --force-replan
    assert wd.read_journal() == {} and wd.completed_units() == {}
    assert os.listdir(wd.parts_dir) == []


# -- journal -----------------------------------------------------------------------------------


def test_journal_append_and_latest_record_wins(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.record_done(1, "parts/unit-000001.h5", SHA0, (10, 20), extra={"rank": 3, "seconds": 1.5})
    wd.record_failed(2, "CUDA out of memory\n  at line 3")
    wd.record_done(2, "parts/unit-000002.h5", "1" * 64, (20, 30))
    wd.record_failed(1, "node lost")
    journal = wd.read_journal()
    assert wd.journal_skipped == 0
    assert journal[1]["status"] == "failed" and journal[1]["error"] == "node lost"
    assert journal[2]["status"] == "done" and journal[2]["sha256"] == "1" * 64
    assert journal[2]["frames"] == [20, 30]
    lines = wd.journal_path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first["rank"] == 3 and first["crc"] == journal_crc(first)
    assert json.loads(lines[1])["error"] == "CUDA out of memory at line 3"
    with pytest.raises(ValueError):
        wd.record_done(3, "parts/x.h5", SHA0, (0, 1), extra={"crc": "x"})
    with pytest.raises(UserError):
        wd.record_done(3, "../x.h5", SHA0, (0, 1))


def test_journal_tolerates_torn_and_forged_lines(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.record_done(0, "parts/unit-000000.h5", SHA0, (0, 10))
    wd.record_done(1, "parts/unit-000001.h5", SHA0, (10, 20))
    good = json.loads(wd.journal_path.read_text().splitlines()[1])

    forged = dict(good, unit=0, sha256="f" * 64)  # crc no longer matches
    wrong_type = dict(good, unit="0")
    wrong_type["crc"] = journal_crc(wrong_type)  # valid crc, invalid content
    with open(wd.journal_path, "ab") as fh:
        fh.write(json.dumps(forged).encode() + b"\n")
        fh.write(json.dumps(wrong_type).encode() + b"\n")
        fh.write(b"this is not json\n")
        fh.write(b"\x00\x00\x00\x00\n")
        fh.write(b"\xff\xfe\n")
        fh.write(b"[1, 2]\n")
        fh.write(json.dumps(dict(good, unit=5)).encode()[:40])  # torn last line, no newline

    journal = wd.read_journal()
    assert sorted(journal) == [0, 1]
    assert journal[0]["sha256"] == SHA0
    assert wd.journal_skipped == 7

    # The next append starts on a fresh line: only the torn record is lost.
    wd.record_done(2, "parts/unit-000002.h5", SHA0, (20, 30))
    journal = wd.read_journal()
    assert sorted(journal) == [0, 1, 2]
    assert wd.journal_skipped == 7


def test_completed_units_detects_corrupt_and_missing_parts(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    p0 = finish_unit(wd, 0, 0, 10)
    p1 = finish_unit(wd, 1, 10, 20)
    finish_unit(wd, 2, 20, 30)
    assert set(wd.completed_units()) == {0, 1, 2} and wd.problems == {}

    raw = bytearray(p0.read_bytes())
    raw[-5] ^= 0x01
    p0.write_bytes(bytes(raw))
    p1.unlink()

    done = wd.completed_units()
    assert set(done) == {2}
    assert "corrupt" in wd.problems[0] and "missing" in wd.problems[1]
    assert set(wd.completed_units(verify=False)) == {0, 1, 2}

    # Redoing a unit makes it complete again.
    finish_unit(wd, 0, 0, 10)
    assert set(wd.completed_units()) == {0, 2}


def test_completed_units_rejects_records_that_do_not_match_the_plan(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    path = wd.part_path(0)
    sha = write_part(path, 0, np.zeros((5, 4, 4), np.float32))
    wd.record_done(0, wd.part_relpath(0), sha, (0, 5))  # plan says (0, 10)
    wd.record_done(9, wd.part_relpath(0), sha, (0, 5))  # not in the plan
    assert wd.completed_units() == {}
    assert "frames" in wd.problems[0] and "not in the plan" in wd.problems[9]


# -- path safety -------------------------------------------------------------------------------


def test_resolve_part_refuses_escapes(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    assert wd.resolve_part("parts/unit-000001.h5") == wd.part_path(1)
    outside = tmp_path / "secret.h5"
    outside.write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(outside, wd.parts_dir / "unit-000007.h5")
    os.symlink(tmp_path / "elsewhere", wd.parts_dir / "sub")
    os.symlink("loop", wd.parts_dir / "loop")
    refused = ["../x", "/etc/passwd", "parts/../../x", "", ".", "parts/unit-000007.h5",
               "parts/sub/a.h5", "parts/loop"]
    for rel in refused:
        with pytest.raises(UserError):
            wd.resolve_part(rel)
    # A symlink that stays inside the work directory is fine.
    os.symlink(wd.part_path(1), wd.parts_dir / "alias.h5")
    assert wd.resolve_part("parts/alias.h5") == wd.parts_dir / "alias.h5"


def test_journal_record_pointing_outside_is_not_completed(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    outside = tmp_path / "evil.h5"
    sha = write_part(outside, 0, np.zeros((10, 4, 4), np.float32))
    os.symlink(outside, wd.part_path(0))
    record = {"unit": 0, "status": "done", "part": "parts/unit-000000.h5", "sha256": sha,
              "frames": [0, 10], "t": 1.0}
    escape = dict(record, unit=1, part="../evil.h5", frames=[10, 20])
    with open(wd.journal_path, "a") as fh:
        for rec in (record, escape):
            fh.write(json.dumps(dict(rec, crc=journal_crc(rec))) + "\n")
    assert sorted(wd.read_journal()) == [0, 1]  # well-formed records ...
    assert wd.completed_units() == {}  # ... but not trusted
    assert "outside" in wd.problems[0] and "escapes" in wd.problems[1]


# -- status --------------------------------------------------------------------------------------


def test_status_counts(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    finish_unit(wd, 0, 0, 10)
    finish_unit(wd, 3, 30, 35)
    wd.record_failed(2, "boom")
    st = wd.status()
    assert st["n_units"] == 4
    assert st["done"] == [0, 3] and st["failed"] == [2] and st["pending"] == [1]
    assert st["frames_done"] == 15 and st["n_frames"] == 35
    wd.part_path(3).unlink()
    assert wd.status()["done"] == [0, 3]  # journal trusted without verify
    st = wd.status(verify=True)
    assert st["done"] == [0] and st["pending"] == [1, 3] and 3 in st["problems"]
    assert st["frames_done"] == 10


# -- lock ----------------------------------------------------------------------------------------

TRY_LOCK = """
import sys
from xvr_batch.errors import UserError
from xvr_batch.workdir import WorkDir
try:
    with WorkDir(sys.argv[1]).lock(grace_s=0.2):
        print("acquired")
except UserError as exc:
    print(exc)
    sys.exit(2)
"""

HOLD_LOCK = """
import sys, time
from xvr_batch.workdir import WorkDir
lock = WorkDir(sys.argv[1]).lock()
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_process_is_refused_while_lock_is_held(tmp_path):
    wd = WorkDir(tmp_path / "w")
    with wd.lock() as lock:
        assert lock.held
        holder = json.loads(wd.lock_path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        res = run_py(TRY_LOCK, wd.path)
        assert res.returncode == 2, res.stderr
        assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in res.stdout
        assert "wait for it or stop it" in res.stdout
        # Also a second lock in this very process.
        with pytest.raises(UserError):
            wd.lock(grace_s=0.1).acquire()
    assert not lock.held
    res = run_py(TRY_LOCK, wd.path)
    assert res.returncode == 0 and "acquired" in res.stdout


def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path):
    wd = WorkDir(tmp_path / "w")
    child = popen_py(HOLD_LOCK, wd.path)
    try:
        assert child.stdout.readline().strip() == "locked"
        assert json.loads(wd.lock_path.read_text())["pid"] == child.pid
        with pytest.raises(UserError, match=f"in use by pid {child.pid}"):
            wd.lock(grace_s=0.1).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # The lock file still names the dead child, but the kernel released its flock.
    assert json.loads(wd.lock_path.read_text())["pid"] == child.pid
    with wd.lock() as lock:
        assert lock.held
        assert json.loads(wd.lock_path.read_text())["pid"] == os.getpid()


def test_lock_held_by_an_orphan_of_a_dead_pid_is_refused_clearly(tmp_path):
    """The flock is held (e.g. by a forked child) but the record names a pid that is gone."""
    wd = WorkDir(tmp_path / "w")
    wd.path.mkdir()
    dead_pid = _dead_pid()
    code = f"""
    import fcntl, json, os, socket, time
    fd = os.open({str(wd.lock_path)!r}, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({{"pid": {dead_pid}, "host": socket.gethostname(),
                              "started": "2024-01-01T00:00:00+00:00"}}).encode())
    print("locked", flush=True)
    time.sleep(60)
    """
    child = popen_py(code)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"leftover child of pid {dead_pid}"):
            wd.lock(grace_s=0.2).acquire()
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    with wd.lock():
        pass


def test_pidfile_fallback_takes_over_dead_local_holder(tmp_path):
    """Filesystems without flock: a pid file of a dead process on this host is taken over."""
    wd = WorkDir(tmp_path / "w")
    wd.path.mkdir()
    stale = {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}
    wd.lock_path.write_text(json.dumps(stale))
    lock = WorkDirLock(wd.lock_path, use_flock=False, grace_s=0.1)
    with lock:
        assert json.loads(wd.lock_path.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
            WorkDirLock(wd.lock_path, use_flock=False, grace_s=0.1).acquire()
    assert not wd.lock_path.exists()

    # An empty pid file (its writer died before writing) is stale too.
    wd.lock_path.write_text("")
    with WorkDirLock(wd.lock_path, use_flock=False, grace_s=0.1):
        pass


def test_pidfile_fallback_refuses_live_or_remote_holder(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.path.mkdir()
    child = popen_py("import time; print('up', flush=True); time.sleep(60)")
    try:
        assert child.stdout.readline().strip() == "up"
        live = {"pid": child.pid, "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}
        wd.lock_path.write_text(json.dumps(live))
        with pytest.raises(UserError, match=f"in use by pid {child.pid}"):
            WorkDirLock(wd.lock_path, use_flock=False, grace_s=0.1).acquire()
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    remote = {"pid": _dead_pid(), "host": "some-other-node", "started": "2024-01-01T00:00:00"}
    wd.lock_path.write_text(json.dumps(remote))
    with pytest.raises(UserError, match="some-other-node.*delete"):
        WorkDirLock(wd.lock_path, use_flock=False, grace_s=0.1).acquire()
    assert json.loads(wd.lock_path.read_text()) == remote
