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
import time

import numpy as np
import pytest

from xvr_batch.errors import UserError
from xvr_batch.io.parts import write_part
from xvr_batch.lock import WorkDirLock
from xvr_batch.workdir import MANIFEST_VERSION, WorkDir, journal_crc

REPO = pathlib.Path(__file__).resolve().parents[1]
SHA0 = "0" * 64


def make_manifest(units=((0, 0, 10), (1, 10, 20), (2, 20, 30), (3, 30, 35))):
    return {
        "version": MANIFEST_VERSION,
        "plan": {
            "n_frames": max(stop for _, _, stop in units),
            "units": [{"id": i, "start": a, "stop": b, "halo": [1, 1]} for i, a, b in units],
        },
        "job": {"fingerprint": "ab" * 32, "config_hash": "cd" * 32, "weights": {"sha256": "ef" * 32},
                "normalisation": {"lr": [0.0, 1.0], "hr": [0.5, 2.0]}},
        "options": {},
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
        json.dumps(dict(make_manifest(), version=1)).encode(),
        json.dumps(dict(make_manifest(), version="2")).encode(),
        json.dumps({k: v for k, v in make_manifest().items() if k != "job"}).encode(),
        json.dumps(dict(make_manifest(), plan=[1, 2])).encode(),
    ],
    ids=[
        "garbage", "truncated", "not-object", "version-1", "version-str", "missing-key",
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
    sha9 = write_part(wd.part_path(9), 0, np.zeros((5, 4, 4), np.float32))
    wd.record_done(9, wd.part_relpath(9), sha9, (0, 5))  # not in the plan
    assert wd.completed_units() == {}
    assert "frames" in wd.problems[0] and "not in the plan" in wd.problems[9]
    with pytest.raises(ValueError, match="part of unit 9"):  # a record must name its own part
        wd.record_done(9, wd.part_relpath(0), sha, (0, 5))


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
    """The flock is held by a bare-forked child, but the record names its parent, which is gone."""
    wd = WorkDir(tmp_path / "w")
    code = """
    import os, sys, time
    from xvr_batch.workdir import WorkDir
    WorkDir(sys.argv[1]).lock().acquire()
    if os.fork() == 0:  # the child inherits the locked descriptor
        print("child", os.getpid(), flush=True)
        time.sleep(60)
        os._exit(0)
    time.sleep(0.2)
    os._exit(0)  # the parent dies without releasing
    """
    parent = popen_py(code, wd.path)
    line = parent.stdout.readline().split()
    parent.wait(timeout=10)
    assert line[0] == "child", line
    child_pid = int(line[1])
    try:
        holder = json.loads(wd.lock_path.read_text())
        assert holder["pid"] == parent.pid
        with pytest.raises(UserError, match=f"leftover child of pid {parent.pid}"):
            wd.lock(grace_s=0.2).acquire()
    finally:
        os.kill(child_pid, signal.SIGKILL)
        parent.stdout.close()
    deadline = time.monotonic() + 10
    while True:  # the child is reparented to init, which reaps it
        try:
            with wd.lock():
                break
        except UserError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


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


# -- replanning never deletes through links (issue 9, defect 4) ----------------------------------


def test_replan_does_not_delete_through_a_symlinked_parts(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    precious = [elsewhere / "unit-000000.h5", elsewhere / "unit-000001.h5", elsewhere / ".unit-000002.h5.tmp-1"]
    for p in precious:
        p.write_bytes(b"not yours")
    wd.parts_dir.rmdir()
    os.symlink(elsewhere, wd.parts_dir)
    outside_journal = tmp_path / "journal-elsewhere.jsonl"
    outside_journal.write_bytes(b"keep me\n")
    os.symlink(outside_journal, wd.journal_path)
    os.symlink(elsewhere / "unit-000000.h5", elsewhere / "unit-000009.h5")  # a link inside the target

    wd.create(make_manifest())  # --force-replan

    assert all(p.read_bytes() == b"not yours" for p in precious)
    assert outside_journal.read_bytes() == b"keep me\n"
    assert wd.parts_dir.is_dir() and not wd.parts_dir.is_symlink() and os.listdir(wd.parts_dir) == []
    assert not os.path.lexists(wd.journal_path)
    finish_unit(wd, 0, 0, 10)
    assert (elsewhere / "unit-000000.h5").read_bytes() == b"not yours"


def test_replan_removes_links_and_leftovers_inside_parts_but_not_their_targets(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    target = tmp_path / "target.h5"
    target.write_bytes(b"data")
    os.symlink(target, wd.part_path(4))
    (wd.parts_dir / ".unit-000001.h5.tmp-123-abcdef01-23456789").write_bytes(b"t")
    (wd.parts_dir / "unit-000002.h5.tmp-123").write_bytes(b"t")  # older releases' temporary
    (wd.parts_dir / "unit-000005.h5").mkdir()  # a directory is left alone, not an error
    (wd.parts_dir / "notes.txt").write_text("mine")
    wd.create(make_manifest())
    assert target.read_bytes() == b"data"
    assert sorted(os.listdir(wd.parts_dir)) == ["notes.txt", "unit-000005.h5"]


def test_replan_refuses_a_parts_file_or_a_journal_directory(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    wd.parts_dir.rmdir()
    wd.parts_dir.write_text("a file")
    with pytest.raises(UserError, match="parts folder belongs"):
        wd.create(make_manifest())
    wd.parts_dir.unlink()
    wd.journal_path.mkdir()
    with pytest.raises(UserError, match="journal .* is a directory"):
        wd.create(make_manifest())


def test_journal_append_never_writes_through_a_symlink(tmp_path):
    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    outside = tmp_path / "outside.jsonl"
    outside.write_bytes(b"")
    os.symlink(outside, wd.journal_path)
    with pytest.raises(UserError, match="journal.jsonl"):
        wd.record_failed(0, "boom")
    assert outside.read_bytes() == b""


# -- the lock survives the deletion of its file (issue 9, defect 11) ------------------------------


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    wd = WorkDir(tmp_path / "w")
    child = popen_py(HOLD_LOCK, wd.path)
    try:
        assert child.stdout.readline().strip() == "locked"
        wd.lock_path.unlink()  # a user "cleans up"
        res = run_py(TRY_LOCK, wd.path)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "in use by another process" in res.stdout and "\n" not in res.stdout.strip()
        assert not wd.lock_path.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    res = run_py(TRY_LOCK, wd.path)
    assert res.returncode == 0 and "acquired" in res.stdout, res.stdout + res.stderr


def test_release_removes_only_its_own_record(tmp_path):
    wd = WorkDir(tmp_path / "w")
    with wd.lock():
        assert json.loads(wd.lock_path.read_text())["pid"] == os.getpid()
    assert not wd.lock_path.exists()
    with wd.lock():
        wd.lock_path.write_text('{"pid": 1, "host": "x", "started": "?"}')  # not ours any more
    assert wd.lock_path.exists()
    with wd.lock():  # a stale record is simply replaced
        assert json.loads(wd.lock_path.read_text())["pid"] == os.getpid()


# -- the output lock (issue 9, defect 11, second half) -----------------------------------------------

HOLD_OUTPUT = """
import sys, time
from xvr_batch.lock import OutputLock
OutputLock(sys.argv[1], workdir=sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(60)
"""

TRY_OUTPUT = """
import sys
from xvr_batch.errors import UserError
from xvr_batch.lock import OutputLock
try:
    with OutputLock(sys.argv[1], grace_s=0.2):
        print("acquired")
except UserError as exc:
    print(exc)
    sys.exit(2)
"""


def test_output_lock_refuses_a_second_run_naming_the_first(tmp_path):
    from xvr_batch.lock import OutputLock

    out = tmp_path / "o.h5"
    child = popen_py(HOLD_OUTPUT, out, tmp_path / "first.xvr")
    try:
        assert child.stdout.readline().strip() == "locked"
        lock_file = tmp_path / ".o.h5.lock"
        assert json.loads(lock_file.read_text())["pid"] == child.pid
        res = run_py(TRY_OUTPUT, out)
        assert res.returncode == 2, res.stderr
        assert f"{out} is being written by another run (pid {child.pid}" in res.stdout
        assert "first.xvr" in res.stdout and "choose another -o" in res.stdout
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdout.close()
    with OutputLock(out) as lock:  # the holder died: taken over
        assert lock.held and json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match="being written by another run"):
            OutputLock(out, grace_s=0.1).acquire()
    assert not lock_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_lock_pidfile_fallback(tmp_path):
    from xvr_batch.lock import OutputLock

    out = tmp_path / "o.h5"
    with OutputLock(out, use_flock=False, grace_s=0.1):
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            OutputLock(out, use_flock=False, grace_s=0.1).acquire()
    assert not (tmp_path / ".o.h5.lock").exists()
    (tmp_path / ".o.h5.lock").write_text(json.dumps(
        {"pid": _dead_pid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00"}))
    with OutputLock(out, use_flock=False, grace_s=0.1):  # a dead holder is taken over
        pass


def test_a_run_of_an_older_release_holding_the_lock_file_is_respected(tmp_path):
    """Older releases flocked the file ``lock``; a newer run must not start beside one."""
    wd = WorkDir(tmp_path / "w")
    wd.path.mkdir()
    code = f"""
    import fcntl, json, os, socket, time
    fd = os.open({str(wd.lock_path)!r}, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({{"pid": os.getpid(), "host": socket.gethostname(), "started": "then"}}).encode())
    print("locked", flush=True)
    time.sleep(60)
    """
    child = popen_py(code)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {child.pid}"):
            wd.lock(grace_s=0.1).acquire()
    finally:
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    with wd.lock():
        pass


def test_journal_crc_is_the_canonical_form_of_earlier_releases():
    """On-disk format: journal lines written by earlier releases must stay valid."""
    record = {"unit": 1, "status": "done", "part": "parts/unit-000001.h5", "sha256": "0" * 64,
              "frames": [10, 20], "t": 1.5, "note": "\u00e9 \u2603",
              "nested": {"b": [1, 2.25, None, True], "a": "x"}}
    assert journal_crc(record) == "7c436cc81a64b3838676d30f5855f13a0ea97576b930808b42bfad1d22c74fb7"
    assert journal_crc(dict(record, crc="anything")) == journal_crc(record)


def test_remove_stale_part_temporaries(tmp_path):
    from xvr_batch.durable import temp_path

    wd = WorkDir(tmp_path / "w")
    wd.create(make_manifest())
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = temp_path(wd.part_path(1)).name  # .unit-000001.h5.tmp-PID-HOST-RANDOM
        names = {
            "dead": mine.replace(f"tmp-{os.getpid()}-", f"tmp-{dead}-"),
            "live": mine.replace(f"tmp-{os.getpid()}-", f"tmp-{live.pid}-"),
            "other-host": f".unit-000001.h5.tmp-{dead}-00000000-0badcafe",
            "legacy-dead": f"unit-000002.h5.tmp-{dead}",
            "mine": mine,
            "not-a-part": f".notes.txt.tmp-{dead}-00000000-0badcafe",
        }
        for name in names.values():
            (wd.parts_dir / name).write_bytes(b"x")
        assert wd.remove_stale_temps() == 2
        left = set(os.listdir(wd.parts_dir))
        assert left == {names[k] for k in ("live", "other-host", "mine", "not-a-part")}
    finally:
        live.kill()
        live.wait()
