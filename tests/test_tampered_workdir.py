"""Hostile conditions: tampered work directories, read-only work directories, full disks (issue 9).

Every reader of a work directory must return a result or raise a one-line UserError, never a traceback or a
hang, whatever the files hold; writers on a read-only or full filesystem must fail with one line too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_archive, tmpfs
from xvr_batch.errors import UserError
from xvr_batch.workdir import WorkDir, journal_crc

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount a tmpfs")


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def pipeline_workdir(tmp_path_factory, tiny_weights) -> Path:
    """A work directory made by the real pipeline: 4 units planned, 2 of them done."""
    from xvr_batch.pipeline import Options, UnitRunner, pending_units, prepare

    base = tmp_path_factory.mktemp("pipeline_wd")
    archive = make_archive(base / "archive.h5")
    opts = Options(archive=str(archive), output=str(base / "o.h5"), weights=str(tiny_weights), unit_frames=10)
    job = prepare(opts)
    wd = job.workdir_obj()
    runner = UnitRunner(job)
    try:
        for unit in pending_units(job)[:2]:
            rec = runner.run_unit(unit)
            wd.record_done(rec["unit"], rec["part"], rec["sha256"], rec["frames"])
    finally:
        runner.close()
    return Path(job.workdir)


@pytest.fixture
def workdir(pipeline_workdir, tmp_path) -> WorkDir:
    """A private copy of the pipeline-made work directory."""
    dst = tmp_path / "o.h5.xvr"
    shutil.copytree(pipeline_workdir, dst, symlinks=True)
    return WorkDir(dst)


def forge(wd: WorkDir, **record) -> None:
    """Append a record with a valid crc (anyone can compute one)."""
    record.setdefault("status", "done")
    record.setdefault("t", 1.0)
    record["crc"] = journal_crc(record)
    with open(wd.journal_path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and len(msg) < 2000, msg
    return msg


def readers_are_total(wd: WorkDir) -> None:
    """Every reader returns or raises a one-line UserError."""
    for call in (lambda: wd.status(verify=True), lambda: wd.completed_units(verify=True), wd.status,
                 wd.read_journal, wd.read_manifest, wd.plan_units):
        try:
            call()
        except UserError as exc:
            one_line(exc)




def remount_ro(path: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")


# ------------------------------------------------------------------------------------------------ forged records

def test_pipeline_workdir_is_valid(workdir):
    st = workdir.status(verify=True)
    assert st["done"] == [0, 1] and st["pending"] == [2, 3] and st["problems"] == {}


def test_forged_record_pointing_at_the_manifest_is_not_trusted(workdir):
    sha = __import__("hashlib").sha256(workdir.manifest_path.read_bytes()).hexdigest()
    forge(workdir, unit=2, part="manifest.json", sha256=sha, frames=list(workdir.plan_units()[2]))
    done = workdir.completed_units(verify=True)
    assert sorted(done) == [0, 1]
    assert "parts/unit-000002.h5" in workdir.problems[2]
    assert workdir.status(verify=True)["pending"] == [2, 3]


def test_forged_record_pointing_at_another_units_part_is_not_trusted(workdir):
    rec0 = workdir.read_journal()[0]
    plan = workdir.plan_units()  # forged records with the right frames: only the part path gives them away
    forge(workdir, unit=3, part=rec0["part"], sha256=rec0["sha256"], frames=list(plan[3]))
    forge(workdir, unit=2, part="parts/../parts/unit-000002.h5", sha256=rec0["sha256"], frames=list(plan[2]))
    forge(workdir, unit=1, part="parts//unit-000001.h5", sha256=workdir.read_journal()[1]["sha256"],
          frames=list(plan[1]))
    assert sorted(workdir.completed_units(verify=True)) == [0]
    assert set(workdir.problems) == {1, 2, 3}
    assert all("was recorded for frames" not in r for r in workdir.problems.values()), workdir.problems
    for reason in workdir.problems.values():
        one_line(UserError(reason))


def test_a_part_that_is_a_symlink_or_fifo_is_not_trusted(workdir):
    part1 = workdir.part_path(1)
    sha1 = workdir.read_journal()[1]["sha256"]
    real = workdir.path / "real.h5"
    os.rename(part1, real)
    os.symlink("../real.h5", part1)  # stays inside the work directory, same bytes
    assert 1 not in workdir.completed_units(verify=True) and "symlink" in workdir.problems[1]
    part1.unlink()
    os.mkfifo(part1)
    forge(workdir, unit=1, part="parts/unit-000001.h5", sha256=sha1, frames=list(workdir.plan_units()[1]))
    assert 1 not in workdir.completed_units(verify=True) and "FIFO" in workdir.problems[1]


@pytest.mark.parametrize("units", [
    [{"id": -1, "start": 0, "stop": 10}],
    [{"id": 0, "start": 0, "stop": 10}, {"id": 0, "start": 10, "stop": 20}],
    [{"id": "0", "start": 0, "stop": 10}],
    [{"id": 0, "start": 10, "stop": 5}],
    [{"id": True, "start": 0, "stop": 10}],
    {"id": 0},
    [[0, 0, 10]],
    None,
], ids=["negative-id", "duplicate", "string-id", "reversed", "bool-id", "object", "list", "null"])
def test_edited_plan_units_are_a_user_error(workdir, units):
    man = json.loads(workdir.manifest_path.read_text())
    man["plan"]["units"] = units
    workdir.manifest_path.write_text(json.dumps(man))
    for call in (workdir.plan_units, workdir.status, lambda: workdir.completed_units(verify=True)):
        with pytest.raises(UserError, match="corrupt plan"):
            call()


@pytest.mark.parametrize("key,value", [("job", "x"), ("options", [1]), ("job.config_hash", 3),
                                       ("job.fingerprint", None), ("plan", [])])
def test_manifest_fields_of_the_wrong_type_are_a_user_error(workdir, key, value):
    man = json.loads(workdir.manifest_path.read_text())
    if key.startswith("job."):
        man["job"][key[4:]] = value
    else:
        man[key] = value
    workdir.manifest_path.write_text(json.dumps(man))
    with pytest.raises(UserError, match="corrupt"):
        workdir.read_manifest()


# ------------------------------------------------------------------------------------------------ odd content

def test_huge_deep_nul_and_non_utf8_journal_lines_are_skipped(workdir):
    with open(workdir.journal_path, "ab") as fh:
        fh.write(b'{"unit": 2, "x": "' + b"a" * (3 << 20) + b'"}\n')  # a 3 MiB line
        fh.write(b"[" * 200000 + b"\n")  # RecursionError territory
        fh.write(b"\x00" * 4096 + b"\n")
        fh.write(b"\xc3\x28\xff\n")
    rec = dict(unit=3, status="failed", error="x", t=10 ** 400)  # an int too large for a float
    rec["crc"] = journal_crc(rec)
    with open(workdir.journal_path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    journal = workdir.read_journal()
    assert sorted(journal) == [0, 1] and workdir.journal_skipped == 5
    assert workdir.status(verify=True)["done"] == [0, 1]


@pytest.mark.parametrize("content", [b"[" * 200000, b"{\"a\":" * 100000, b"\x00" * 100, b"\xff\xfe{}",
                                     b'{"version": 1e999}', b"9" * 10000])
def test_odd_manifests_are_a_user_error(workdir, content):
    workdir.manifest_path.write_bytes(content)
    with pytest.raises(UserError, match="manifest") as err:
        workdir.status()
    one_line(err.value)


@pytest.mark.timeout(30)
def test_fifos_are_never_opened_for_real(workdir):
    os.unlink(workdir.journal_path)
    os.mkfifo(workdir.journal_path)
    with pytest.raises(UserError, match="journal .* is a FIFO"):
        workdir.status()
    with pytest.raises(UserError, match="is a FIFO"):
        workdir.record_failed(2, "boom")
    os.unlink(workdir.manifest_path)
    os.mkfifo(workdir.manifest_path)
    with pytest.raises(UserError, match="manifest .* is a FIFO"):
        workdir.read_manifest()
    assert not workdir.exists()
    readers_are_total(workdir)


def test_a_journal_directory_or_symlink_and_a_parts_file_are_user_errors(workdir, tmp_path):
    os.unlink(workdir.journal_path)
    workdir.journal_path.mkdir()
    with pytest.raises(UserError, match="journal .* is a directory"):
        workdir.status(verify=True)
    with pytest.raises(UserError):
        workdir.record_failed(2, "boom")
    workdir.journal_path.rmdir()
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("")
    os.symlink(elsewhere, workdir.journal_path)
    with pytest.raises(UserError, match="symlink"):
        workdir.completed_units()
    os.unlink(workdir.journal_path)
    shutil.rmtree(workdir.parts_dir)
    workdir.parts_dir.write_text("not a folder")
    forge(workdir, unit=0, part="parts/unit-000000.h5", sha256="0" * 64, frames=list(workdir.plan_units()[0]))
    st = workdir.status(verify=True)  # a result, with the reason
    assert st["done"] == [] and "unit-000000.h5" in st["problems"][0]
    readers_are_total(workdir)


def test_a_workdir_that_is_a_file_is_a_user_error(tmp_path):
    path = tmp_path / "wd"
    path.write_text("x")
    wd = WorkDir(path)
    for call in (wd.status, wd.read_journal, lambda: wd.create(
            {"version": 2, "plan": {"units": []}, "job": {"fingerprint": "f", "config_hash": "c"}, "options": {}}),
                 lambda: wd.record_failed(0, "x"), lambda: wd.lock().acquire()):
        with pytest.raises(UserError) as err:
            call()
        one_line(err.value)


# ------------------------------------------------------------------------------------------------ fuzz

_VALUES = [-1, 0, 7, 10 ** 400, 1e308, -0.0, True, None, "", "manifest.json", "../x.h5", "/etc/passwd",
           "parts/unit-000001.h5", "parts/unit-000000.h5", "parts", "\x00", [], {}, [0], [0, 10], [10, 0],
           [[[[[[]]]]]], {"a": {"b": {}}}, "done", "failed", "0" * 64, "x" * 5000]
_SNIPPETS = [b"\x00" * 8, b"\xff\xfe", b"NaN", b"-Infinity", b"1e999", b"9" * 5000, b'"', b"\n", b"{}", b"[]",
             b"-1", b"true", b"null", b"[" * 5000, b"\\u0000", b"\r\n"]


def _mutate_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        if not b:
            b = bytearray(b"{")
        i = int(rng.integers(0, len(b)))
        op = int(rng.integers(0, 8))
        if op == 0:
            b[i] = int(rng.integers(0, 256))
        elif op == 1:
            b[i] ^= 1 << int(rng.integers(0, 8))
        elif op == 2:
            del b[i:i + int(rng.integers(1, 64))]
        elif op == 3:
            b[i:i] = rng.bytes(int(rng.integers(1, 16)))
        elif op == 4:
            j = int(rng.integers(0, len(b)))
            b[i:i] = b[j:j + int(rng.integers(1, 200))]
        elif op == 5:
            b[i:i] = b"[" * int(rng.integers(1000, 100000))
        elif op == 6:
            del b[i:]
        else:
            b[i:i] = _SNIPPETS[int(rng.integers(0, len(_SNIPPETS)))]
    return bytes(b)


def _pick(rng: np.random.Generator):
    return _VALUES[int(rng.integers(0, len(_VALUES)))]


def _mutate_structure(manifest: bytes, journal: bytes, rng: np.random.Generator):
    """Edit a field of the plan or of a journal record to an odd value; re-sign the record's crc."""
    man = json.loads(manifest)
    lines = [json.loads(line) for line in journal.splitlines() if line.strip()]
    if rng.random() < 0.5:
        units = man["plan"]["units"]
        unit = units[int(rng.integers(0, len(units)))]
        unit[["id", "start", "stop"][int(rng.integers(0, 3))]] = _pick(rng)
    else:
        rec = dict(lines[int(rng.integers(0, len(lines)))])
        rec[["unit", "part", "sha256", "frames", "t", "status", "error", "bytes"][int(rng.integers(0, 8))]] = _pick(rng)
        try:
            rec["crc"] = journal_crc(rec)
        except ValueError:
            pass
        lines.append(rec)
    man_bytes = json.dumps(man).encode()
    journal_bytes = b"".join(json.dumps(r).encode() + b"\n" for r in lines)
    return man_bytes, journal_bytes


@pytest.mark.timeout(60)
def test_fuzzed_manifest_and_journal_never_give_a_traceback(workdir):
    manifest = workdir.manifest_path.read_bytes()
    journal = workdir.journal_path.read_bytes()
    rng = np.random.default_rng(20240917)
    outcomes = {"result": 0, "user_error": 0}
    for i in range(400):
        man, jou = manifest, journal
        kind = i % 4
        if kind == 0:
            man = _mutate_bytes(manifest, rng)
        elif kind == 1:
            jou = _mutate_bytes(journal, rng)
        elif kind == 2:
            man, jou = _mutate_bytes(manifest, rng), _mutate_bytes(journal, rng)
        else:
            man, jou = _mutate_structure(manifest, journal, rng)
        workdir.manifest_path.write_bytes(man)
        workdir.journal_path.write_bytes(jou)
        for call in (lambda: workdir.status(verify=True), lambda: workdir.completed_units(verify=True)):
            try:
                result = call()
            except UserError as exc:
                one_line(exc)
                outcomes["user_error"] += 1
            else:
                assert isinstance(result, dict)
                for reason in workdir.problems.values():
                    assert "\n" not in reason and len(reason) < 2000
                outcomes["result"] += 1
    assert outcomes["result"] > 100 and outcomes["user_error"] > 50, outcomes


# ------------------------------------------------------------------------------------------------ read-only

@needs_root
def test_read_only_workdir_gives_one_line_errors(tmp_path, pipeline_workdir):
    from xvr_batch.lock import OutputLock

    with tmpfs(tmp_path / "ro", "1m") as ro:
        shutil.copytree(pipeline_workdir, ro / "wd")
        wd = WorkDir(ro / "wd")
        manifest = wd.read_manifest()
        remount_ro(ro)
        calls = {
            "create": lambda: wd.create(manifest),
            "write_manifest": lambda: wd.write_manifest(manifest),
            "record_done": lambda: wd.record_done(2, wd.part_relpath(2), "0" * 64, (20, 30)),
            "record_failed": lambda: wd.record_failed(2, "boom"),
            "lock": lambda: wd.lock().acquire(),
            "lock-pidfile": lambda: wd.lock(use_flock=False).acquire(),
            "new workdir": lambda: WorkDir(ro / "new").create(manifest),
            "new workdir lock": lambda: WorkDir(ro / "new").lock().acquire(),
        }
        for name, call in calls.items():
            with pytest.raises(UserError) as err:
                call()
            msg = one_line(err.value)
            assert "is not writable (Read-only file system); choose another --workdir" in msg, (name, msg)
        with pytest.raises(UserError, match="not writable .*choose another -o"):
            OutputLock(ro / "o.h5").acquire()
        st = wd.status(verify=True)  # reading still works
        assert st["done"] == [0, 1]


@needs_root
def test_cli_with_a_read_only_workdir_is_one_line(tmp_path, tiny_weights):
    archive = make_archive(tmp_path / "a.h5")
    with tmpfs(tmp_path / "ro", "1m") as ro:
        (ro / "wd").mkdir()
        remount_ro(ro)
        r = subprocess.run([sys.executable, "-m", "xvr_batch", "reconstruct", str(archive), "-o",
                            str(tmp_path / "o.h5"), "--weights", str(tiny_weights), "--workdir", str(ro / "wd"), "-q"],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "not writable" in last and "Traceback" not in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------------ full disks

@pytest.fixture(scope="module")
def synth_archive(tmp_path_factory) -> Path:
    from xvr_batch.synth import synthesize

    path = tmp_path_factory.mktemp("synth") / "archive.h5"
    synthesize(path, n_frames=30, hr_shape=(64, 64), stride=10, seed=0)
    return path


def _reconstruct(archive: Path, out: Path, workdir: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xvr_batch", "reconstruct", str(archive), "-o", str(out),
                           "--workdir", str(workdir), "-q", *map(str, extra)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONFAULTHANDLER="1"))


@pytest.fixture(scope="module")
def run_sizes(synth_archive, tmp_path_factory) -> dict:
    """Sizes of what a run writes: manifest, part, output (from one run with room to spare)."""
    d = tmp_path_factory.mktemp("reference")
    r = _reconstruct(synth_archive, d / "out.h5", d / "wd", "--keep-workdir")
    assert r.returncode == 0, r.stderr
    parts = list((d / "wd" / "parts").glob("unit-*.h5"))
    return {"manifest": (d / "wd" / "manifest.json").stat().st_size, "part": sum(p.stat().st_size for p in parts),
            "output": (d / "out.h5").stat().st_size}


def _assert_disk_full(r: subprocess.CompletedProcess, out: Path) -> None:
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "disk full" in last, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


# Fractions of (manifest + part + output): the failure lands in the manifest, the part's first frames, the part's
# middle, its close and the journal, the start of the stitch, its middle and its flush/rename.
_FRACTIONS = [0.002, 0.05, 0.25, 0.52, 0.56, 0.75, 0.98]


@needs_root
@pytest.mark.timeout(600)
def test_cli_disk_full_at_any_moment_is_one_line_exit_2(tmp_path, synth_archive, run_sizes):
    total = run_sizes["manifest"] + run_sizes["part"] + run_sizes["output"]
    for frac in _FRACTIONS:
        size_k = max(4, int(total * frac) // 1024)
        with tmpfs(tmp_path / f"full{size_k}", f"{size_k}k") as d:
            r = _reconstruct(synth_archive, d / "out.h5", d / "wd")
            _assert_disk_full(r, d / "out.h5")
            assert not [p for p in d.rglob("*") if ".tmp-" in p.name], list(d.rglob("*"))


@needs_root
@pytest.mark.timeout(600)
def test_cli_disk_full_in_the_output_folder_only(tmp_path, synth_archive, run_sizes):
    """The work directory has room; the output's folder fills up during the stitch."""
    for frac in (0.02, 0.5, 0.97):
        size_k = max(4, int(run_sizes["output"] * frac) // 1024)
        with tmpfs(tmp_path / f"out{size_k}", f"{size_k}k") as d:
            wd = tmp_path / f"wd{size_k}"
            r = _reconstruct(synth_archive, d / "out.h5", wd)
            _assert_disk_full(r, d / "out.h5")
            assert str(d / "out.h5") in r.stderr.strip().splitlines()[-1]
            assert WorkDir(wd).status(verify=True)["pending"] == []  # every unit kept for the rerun


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_an_odd_lock_entry_is_handled(workdir, tmp_path, kind):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    if kind == "directory":
        workdir.lock_path.mkdir()
    elif kind == "fifo":
        os.mkfifo(workdir.lock_path)
    else:
        os.symlink(target, workdir.lock_path)
    try:
        with workdir.lock() as lock:
            assert lock.held
    except UserError as exc:
        assert kind == "directory" and "in the way" in one_line(exc)
    assert target.read_text() == "keep"
