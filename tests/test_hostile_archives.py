"""Hostile and faulty input archives (issue 9, defects 1, 2 and 7).

1. an archive that another process is still writing (HDF5 write lock, or SWMR) is refused, or waited
   for with ``wait_for_writer``; never read half-written, never called "corrupt";
2. data that would read as fill values is refused: virtual datasets with missing or short sources or
   gaps, external links to missing files or objects, missing or short external raw files, chunks that
   were never written;
3. sizes: frames too large for memory and plans too large to hold are refused with the numbers before
   anything big is allocated, and a plan of a million frames stays fast and small.

Every archive is a real HDF5 file under ``tmp_path``; writers are real second processes. The only
stand-in is a file system without locks (``test_no_lock_support_falls_back_to_unlocked_read``), which
cannot be had here.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import hdf5plugin
import numpy as np
import psutil
import pytest

from xvr_batch.errors import UserError
from xvr_batch.io import archive as archive_mod
from xvr_batch.io.archive import Archive, inspect_file
from xvr_batch.plan import MAX_UNITS, make_plan, plan_units, plan_windows, reflect
from xvr_batch.planinfo import describe_plan

N, H, W, S = 12, 4, 6, 4
KEYS = [0, 5, 11]


# ------------------------------------------------------------------------------------------------ helpers


def arrays(n: int = N, keys: list[int] | None = None) -> dict[str, np.ndarray]:
    keys = KEYS if keys is None else keys
    rng = np.random.default_rng(1)
    return {
        "lr": rng.integers(1, 4000, (n, H, W)).astype(np.uint16),
        "hr": rng.integers(1, 60000, (len(keys), H * S, W * S)).astype(np.uint16),
        "hr_index": np.asarray(keys, dtype=np.int64),
    }


def write(path: Path, skip: tuple[str, ...] = (), extra: Callable[[h5py.File], None] | None = None,
          **kw: Any) -> dict[str, np.ndarray]:
    """A valid archive; ``skip`` leaves out standard datasets that ``extra`` then writes its own way."""
    a = arrays()
    with h5py.File(path, "w", **kw) as f:
        for name, ds in (("lr", "data_lr"), ("hr", "data_hr"), ("hr_index", "hr_index")):
            if name not in skip:
                f[f"/exchange/{ds}"] = a[name]
        if extra is not None:
            extra(f)
    return a


def content_sha(path: Path) -> str:
    """sha256 of a file's content; data extents only (holes read as zeros) so sparse files are cheap."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as fh:
        fd, pos = fh.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # no more data
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            fh.seek(start)
            h.update(str(start).encode())
            left = stop - start
            while left:
                block = fh.read(min(left, 1 << 20))
                h.update(block)
                left -= len(block)
            pos = stop
    return h.hexdigest()


def cli_refuses(capsys: pytest.CaptureFixture[str], path: Path, *patterns: str, cmd: str = "plan",
                args: tuple[str, ...] = ()) -> str:
    """Run ``xvr-batch CMD PATH`` in-process; it must exit 2 with one ``error:`` line, input untouched."""
    from xvr_batch.cli import main

    before = content_sha(path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([cmd, str(path), *args])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.err + captured.out).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert content_sha(path) == before
    return lines[0]


def refuses(path: Path, *patterns: str, **kw: Any) -> str:
    """``Archive(path)`` and ``inspect_file(path)`` both raise one UserError line matching ``patterns``."""
    before = content_sha(path)
    msgs = []
    for opener in (Archive, inspect_file):
        with pytest.raises(UserError) as err:
            opener(path, **kw)
        msgs.append(str(err.value))
    for msg in msgs:
        assert "\n" not in msg and msg.startswith(f"{path}: "), msg
        assert "corrupt" not in msg, msg
        for pattern in patterns:
            assert re.search(pattern, msg), (pattern, msg)
    assert content_sha(path) == before
    return msgs[0]


# ------------------------------------------------------------------------------------------------ 1. writers

WRITER = textwrap.dedent("""
    import sys, h5py, numpy as np
    path, mode, n, half = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    f = h5py.File(path, "w", **({"libver": "latest"} if mode in ("latest", "swmr") else {}))
    lr = f.create_dataset("/exchange/data_lr", shape=(half, 4, 6), maxshape=(None, 4, 6), dtype="u2",
                          chunks=(1, 4, 6))
    lr[:] = 7
    f["/exchange/data_hr"] = np.full((2, 16, 24), 9, "u2")
    index = f.create_dataset("/exchange/hr_index", data=np.array([0, half - 1]), maxshape=(None,))
    if mode == "swmr":
        f.swmr_mode = True
    f.flush()
    print("ready", flush=True)
    sys.stdin.readline()
    lr.resize((n, 4, 6))
    lr[half:] = 7
    index[1] = n - 1
    f.close()
    print("closed", flush=True)
""")


class Writer:
    """A second process that writes an archive: the first ``half`` frames, then (on ``finish``) the rest."""

    def __init__(self, path: Path, mode: str, n: int = 10, half: int = 5) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode, str(n), str(half)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def finish(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "closed"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(params=["plain", "latest", "swmr"])
def writer(request: pytest.FixtureRequest, tmp_path: Path):
    """A live writer in each mode: default file format, libver='latest', and SWMR (which drops its lock)."""
    path = tmp_path / f"live_{request.param}.h5"
    w = Writer(path, request.param)
    try:
        yield path, request.param, w
    finally:
        w.close()


def test_live_writer_is_refused_not_read_half_written(writer: tuple[Path, str, Writer]) -> None:
    path, mode, _w = writer
    msg = refuses(path, r"is being written by another process", r"--wait-for-writer SECONDS")
    if mode == "swmr":
        assert "file-consistency flags" in msg and "h5clear" in msg
    else:
        assert "write lock" in msg


def test_live_writer_cli_exits_2(writer: tuple[Path, str, Writer], capsys: pytest.CaptureFixture[str]) -> None:
    path, _mode, _w = writer
    cli_refuses(capsys, path, r"is being written by another process")
    cli_refuses(capsys, path, r"is being written by another process", cmd="inspect")


def test_wait_for_writer_times_out(writer: tuple[Path, str, Writer]) -> None:
    path, _mode, _w = writer
    t0 = time.monotonic()
    refuses(path, r"still being written by another process after waiting 0\.3 s",
            r"longer --wait-for-writer", wait_for_writer=0.3)
    assert time.monotonic() - t0 >= 0.6  # both openers waited


def test_wait_for_writer_reads_the_finished_archive(writer: tuple[Path, str, Writer]) -> None:
    path, _mode, w = writer
    timer = threading.Timer(0.5, w.finish)
    timer.start()
    try:
        t0 = time.monotonic()
        with Archive(path, wait_for_writer=60) as a:
            assert time.monotonic() - t0 >= 0.4
            assert a.n_frames == 10 and a.hr_index.tolist() == [0, 9]
            assert (a.read_lr(0, 10) == 7).all()
    finally:
        timer.join()


def test_wait_for_writer_is_validated(tmp_path: Path) -> None:
    p = tmp_path / "a.h5"
    write(p)
    for bad in (-1, float("nan"), "soon"):
        with pytest.raises(UserError, match="--wait-for-writer must be"):
            Archive(p, wait_for_writer=bad)  # type: ignore[arg-type]
    with Archive(p, wait_for_writer=0) as a:  # nobody writes: opens at once
        assert a.n_frames == N


def test_writer_check_survives_pickling(tmp_path: Path) -> None:
    import pickle
    p = tmp_path / "a.h5"
    write(p)
    with Archive(p, wait_for_writer=5) as a:
        b = pickle.loads(pickle.dumps(a))
        try:
            assert b._init_args == (None, 0, 5)
        finally:
            b.close()


def test_no_lock_support_falls_back_to_unlocked_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system without locks (ENOSYS from flock, as on some Lustre mounts) is still read."""
    p = tmp_path / "a.h5"
    write(p)
    real = h5py.File
    calls: list[Any] = []

    def no_locks(*args: Any, **kw: Any) -> h5py.File:
        calls.append(kw.get("locking"))
        if kw.get("locking", True) is not False:
            raise OSError(errno.ENOSYS, "Unable to synchronously open file (unable to lock file, errno = 38, "
                                        "error message = 'Function not implemented')")
        return real(*args, **kw)

    monkeypatch.setattr(archive_mod.h5py, "File", no_locks)
    with Archive(p) as a:
        assert a.n_frames == N
    assert calls == [None, False]


def test_lock_errors_are_told_apart(tmp_path: Path) -> None:
    p = tmp_path / "a.h5"
    write(p)
    kind = archive_mod._open_error_kind
    held = "Unable to synchronously open file (unable to lock file, errno = 11, error message = 'Resource ...')"
    assert kind(BlockingIOError(errno.EAGAIN, held), str(p)) == "writer-lock"
    assert kind(OSError(held), str(p)) == "writer-lock"  # errno only in the text
    assert kind(OSError("unable to lock file, errno = 37, error message = 'No locks available'"), str(p)) == "no-locks"
    assert kind(OSError("file is already open for write (may use <h5clear file> to clear file consistency "
                        "flags)"), str(p)) == "writer-flags"
    assert kind(OSError("truncated file: eof = 96, sblock->base_addr = 0"), str(p)) == "other"
    assert archive_mod._flock_probe(str(p)) == "free"


def test_writer_that_crashed_in_swmr_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A SWMR writer killed with SIGKILL leaves the consistency flags set: refused with the h5clear hint."""
    path = tmp_path / "crashed.h5"
    w = Writer(path, "swmr")
    w.proc.kill()
    w.close()
    msg = refuses(path, r"is being written by another process", r"a writer crashed without closing it",
                  r"h5clear -s")
    assert "write lock" not in msg
    cli_refuses(capsys, path, r"h5clear -s", cmd="inspect")


def test_reader_does_not_block_a_second_reader(tmp_path: Path) -> None:
    p = tmp_path / "a.h5"
    write(p)
    with h5py.File(p, "r"), Archive(p) as a:  # a reader's shared lock is no writer
        assert a.n_frames == N


# ------------------------------------------------------------------------------------------------ 2. fill values


def vds_archive(tmp_path: Path, sources: dict[str, np.ndarray] | None = None,
                mapping: Callable[[h5py.VirtualLayout], None] | None = None, role: str = "data_lr") -> Path:
    """An archive whose ``role`` dataset is virtual: frames 0..5 from part0.h5:/lr, 6..11 from part1.h5:/lr."""
    a = arrays()
    data = a["lr"] if role in ("data_lr", "data_gt") else a["lr"][:4]
    if role == "data_gt":
        data = np.repeat(np.repeat(a["lr"], S, axis=1), S, axis=2)
    half = len(data) // 2
    if sources is None:
        sources = {"part0.h5": data[:half], "part1.h5": data[half:]}
    for name, block in sources.items():
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("lr", data=block, chunks=(1, *block.shape[1:]), compression="gzip")
    layout = h5py.VirtualLayout(data.shape, data.dtype)
    if mapping is None:
        layout[:half] = h5py.VirtualSource("part0.h5", "lr", shape=(half, *data.shape[1:]))
        layout[half:] = h5py.VirtualSource("part1.h5", "lr", shape=(len(data) - half, *data.shape[1:]))
    else:
        mapping(layout)
    path = tmp_path / "vds.h5"
    skip = ("lr",) if role == "data_lr" else ()
    write(path, skip=skip, extra=lambda f: f.create_virtual_dataset(f"/exchange/{role}", layout, fillvalue=0))
    return path


def test_complete_virtual_dataset_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = vds_archive(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # sources are found next to the archive, as HDF5 does
    with Archive(path) as a:
        np.testing.assert_array_equal(a.read_lr(0, N), arrays()["lr"].astype(np.float32))


def test_virtual_dataset_with_missing_source_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = vds_archive(tmp_path)
    (tmp_path / "part1.h5").unlink()
    refuses(path, r"virtual dataset /exchange/data_lr maps frames 6\.\.11 to lr in part1\.h5, which is not found",
            r"\(LR frames\)", "incomplete")
    cli_refuses(capsys, path, r"part1\.h5, which is not found")


def test_virtual_dataset_with_missing_source_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = vds_archive(tmp_path)
    with h5py.File(tmp_path / "part1.h5", "w") as f:
        f["other"] = np.zeros((6, H, W), np.uint16)
    refuses(path, r"maps frames 6\.\.11 to lr in part1\.h5, but that file has no dataset lr")
    cli_refuses(capsys, path, r"has no dataset lr")


def test_virtual_dataset_with_short_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lr = arrays()["lr"]
    path = vds_archive(tmp_path, sources={"part0.h5": lr[:6], "part1.h5": lr[6:9]})  # 3 frames, 6 mapped
    refuses(path, r"part1\.h5, whose shape \(3, 4, 6\) does not match the 144 elements mapped")

    def sliced(layout: h5py.VirtualLayout) -> None:
        layout[:6] = h5py.VirtualSource("part0.h5", "lr", shape=(6, H, W))
        layout[6:] = h5py.VirtualSource("part1.h5", "lr", shape=(6, H, W))[0:6]

    path = vds_archive(tmp_path, sources={"part0.h5": lr[:6], "part1.h5": lr[6:9]}, mapping=sliced)
    refuses(path, r"whose shape \(3, 4, 6\) does not cover the selected region \(needs at least \(6, 4, 6\)\)")
    cli_refuses(capsys, path, r"does not cover the selected region")


def test_virtual_dataset_with_a_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def first_half(layout: h5py.VirtualLayout) -> None:
        layout[:6] = h5py.VirtualSource("part0.h5", "lr", shape=(6, H, W))

    path = vds_archive(tmp_path, mapping=first_half)
    refuses(path, r"virtual dataset /exchange/data_lr maps only 144 of its 288 elements")
    cli_refuses(capsys, path, r"maps only 144 of its 288 elements")


def test_virtual_source_with_unwritten_chunks(tmp_path: Path) -> None:
    path = vds_archive(tmp_path)
    with h5py.File(tmp_path / "part1.h5", "w") as f:
        d = f.create_dataset("lr", shape=(6, H, W), dtype=np.uint16, chunks=(1, H, W))
        d[0] = 1
    refuses(path, r"part1\.h5, and there dataset lr declares shape \(6, 4, 6\)", r"1 of the 6 chunks")


def test_virtual_calibration_and_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = vds_archive(tmp_path, role="data_dark_lr")
    with Archive(path) as a:
        assert a.calibration("dark_lr") is not None
    (tmp_path / "part1.h5").unlink()
    refuses(path, r"/exchange/data_dark_lr maps frames 2\.\.3 to lr in part1\.h5", r"\(LR dark frames\)")
    cli_refuses(capsys, path, r"data_dark_lr")

    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    path = vds_archive(gt_dir, role="data_gt")
    (gt_dir / "part0.h5").unlink()
    with Archive(path) as a:  # a bad truth does not stop reconstruction, evaluate refuses it
        assert not a.has_gt
        assert any("part0.h5, which is not found" in w for w in a.describe()["warnings"])
        with pytest.raises(UserError, match=r"no usable ground truth .*part0\.h5, which is not found"):
            a.read_gt(0, 1)


def test_external_link_to_missing_file_or_object(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    lr = arrays()["lr"]
    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["lr"] = lr
    path = tmp_path / "linked.h5"
    write(path, skip=("lr",), extra=lambda f: f.__setitem__("/exchange/data_lr", h5py.ExternalLink("frames.h5", "/lr")))
    monkeypatch.chdir(tmp_path / "..")
    with Archive(path) as a:  # a working link is followed
        np.testing.assert_array_equal(a.read_lr(0, N), lr.astype(np.float32))

    with h5py.File(tmp_path / "frames.h5", "w") as f:
        f["other"] = lr
    refuses(path, r"/exchange/data_lr is an external link to /lr in frames\.h5, which has no object /lr",
            r"LR frames cannot be read")
    (tmp_path / "frames.h5").unlink()
    msg = refuses(path, r"/exchange/data_lr is an external link to /lr in frames\.h5, which is not found "
                        r"\(looked for ")
    assert str(tmp_path / "frames.h5") in msg
    cli_refuses(capsys, path, r"external link to /lr in frames\.h5, which is not found")


def test_broken_links_on_the_way_and_for_calibrations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "group_link.h5"
    with h5py.File(path, "w") as f:
        f["/exchange"] = h5py.ExternalLink("exchange.h5", "/exchange")
    refuses(path, r"/exchange is an external link to /exchange in exchange\.h5, which is not found")

    path = tmp_path / "dark_link.h5"
    write(path, extra=lambda f: f.__setitem__("/exchange/data_dark_lr", h5py.ExternalLink("darks.h5", "/dark")))
    refuses(path, r"/exchange/data_dark_lr is an external link to /dark in darks\.h5", r"LR dark frames")
    cli_refuses(capsys, path, r"darks\.h5, which is not found")

    path = tmp_path / "soft.h5"
    write(path, skip=("hr",), extra=lambda f: f.__setitem__("/exchange/data_hr", h5py.SoftLink("/raw/hr")))
    refuses(path, r"/exchange/data_hr is a soft link to /raw/hr, which does not exist")


def external_archive(tmp_path: Path, raw_bytes: int | None = None) -> Path:
    """An archive whose LR frames live in the external raw file lr.raw (relative to the current directory)."""
    lr = arrays()["lr"]
    path = tmp_path / "external.h5"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        write(path, skip=("lr",), extra=lambda f: f.create_dataset(
            "/exchange/data_lr", data=lr, external=[("lr.raw", 0, lr.nbytes)]))
    finally:
        os.chdir(cwd)
    if raw_bytes is not None:
        with open(tmp_path / "lr.raw", "r+b") as fh:
            fh.truncate(raw_bytes)
    return path


def test_external_raw_storage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = external_archive(tmp_path)
    monkeypatch.chdir(tmp_path)
    with Archive(path) as a:
        np.testing.assert_array_equal(a.read_lr(0, N), arrays()["lr"].astype(np.float32))
    external_archive(tmp_path, raw_bytes=100)
    refuses(path, r"stores its data in the external file lr\.raw, which holds 100 bytes but the dataset needs "
                  r"bytes 0\.\.575")
    cli_refuses(capsys, path, r"which holds 100 bytes")
    monkeypatch.chdir(tmp_path.parent)
    external_archive(tmp_path)
    refuses(path, r"external file lr\.raw, which is not found", r"HDF5_EXTFILE_PREFIX")
    cli_refuses(capsys, path, r"external file lr\.raw, which is not found")


def test_unwritten_chunks_are_refused_with_the_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def half_written(f: h5py.File) -> None:
        d = f.create_dataset("/exchange/data_lr", shape=(N, H, W), dtype=np.uint16, chunks=(1, H, W),
                             compression="gzip")
        d[:6] = 1

    path = tmp_path / "half.h5"
    write(path, skip=("lr",), extra=half_written)
    refuses(path, r"dataset /exchange/data_lr declares shape \(12, 4, 6\) \(0\.0 MB uncompressed\) but stores only "
                  r"[0-9.]+ MB in 6 of the 12 chunks it needs: the other chunks were never written", r"\(LR frames\)")
    cli_refuses(capsys, path, r"6 of the 12 chunks")


def test_billion_declared_frames_are_refused_cheaply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def declared(f: h5py.File) -> None:
        d = f.create_dataset("/exchange/data_lr", shape=(10**9, H, W), dtype=np.uint16, chunks=(1, H, W),
                             compression="gzip")
        d[0] = 1

    path = tmp_path / "billion.h5"
    write(path, skip=("lr", "hr_index"),
          extra=lambda f: (declared(f), f.__setitem__("/exchange/hr_index", np.array([0, 5, 10**9 - 1]))))
    assert path.stat().st_size < 1_000_000
    t0 = time.monotonic()
    refuses(path, r"declares shape \(1000000000, 4, 6\) \(48\.0 GB uncompressed\) but stores only 0\.0 MB in 1 of "
                  r"the 1000000000 chunks")
    with pytest.raises(UserError, match="chunks were never written"):
        describe_plan(str(path))
    cli_refuses(capsys, path, r"1 of the 1000000000 chunks")
    assert time.monotonic() - t0 < 20


def test_contiguous_dataset_never_written(tmp_path: Path) -> None:
    path = tmp_path / "empty_hr.h5"
    write(path, skip=("hr",), extra=lambda f: f.create_dataset("/exchange/data_hr", shape=(3, H * S, W * S),
                                                               dtype=np.uint16))
    refuses(path, r"dataset /exchange/data_hr declares shape \(3, 16, 24\) but no data was ever written",
            r"HR key frames")


@pytest.mark.parametrize("compression", ["gzip", "lzf", "zstd", "blosc", "none"])
def test_normal_compressed_archives_are_accepted(tmp_path: Path, compression: str) -> None:
    from xvr_batch.synth import generate

    data = generate(n_frames=24, hr_shape=(32, 32), stride=6, seed=3)
    data["/exchange/data_lr"][3] = 0  # a frame equal to the fill value is still stored
    opts: dict[str, Any] = {
        "gzip": {"compression": "gzip", "shuffle": True}, "lzf": {"compression": "lzf"},
        "zstd": dict(hdf5plugin.Zstd()), "blosc": dict(hdf5plugin.Blosc()), "none": {},
    }[compression]
    path = tmp_path / "synth.h5"
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            arr = np.asarray(value)
            chunks = (1, *arr.shape[1:]) if arr.ndim == 3 else None
            f.create_dataset(key, data=arr, chunks=chunks, **(opts if chunks else {}))
    with Archive(path) as a:
        assert a.n_frames == 24
        a.check_finite()
        np.testing.assert_array_equal(a.read_lr(0, 24), np.asarray(data["/exchange/data_lr"], np.float32))


def test_synthesize_output_is_accepted(tmp_path: Path) -> None:
    from xvr_batch.synth import synthesize

    path = tmp_path / "synth.h5"
    synthesize(path, n_frames=20, hr_shape=(32, 32), stride=5)
    info = inspect_file(path)
    assert info["n_frames"] == 20


# ------------------------------------------------------------------------------------------------ 7. sizes


def sparse_archive(path: Path, lr_shape: tuple[int, ...], hr_shape: tuple[int, ...], keys: list[int]) -> Path:
    """An archive with storage allocated up front but never written: a sparse file, declared huge, instant."""
    def allocated(f: h5py.File, name: str, shape: tuple[int, ...]) -> None:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        f.create_dataset(name, shape=shape, dtype=np.uint8, dcpl=dcpl)

    with h5py.File(path, "w") as f:
        allocated(f, "/exchange/data_lr", lr_shape)
        allocated(f, "/exchange/data_hr", hr_shape)
        f["/exchange/hr_index"] = np.asarray(keys, dtype=np.int64)
    return path


def test_frame_too_large_for_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    side = 200_000
    need = side * side * 4
    if psutil.virtual_memory().available > need:
        pytest.skip("this machine could hold a 149 GiB frame")
    path = sparse_archive(tmp_path / "huge.h5", (3, side // S, side // S), (2, side, side), [0, 2])
    refuses(path, r"HR frame 200000x200000 float32 \(/exchange/data_hr\) needs 149\.0 GiB per frame, more than "
                  r"the [0-9.]+ GiB available; reconstruct on a machine with more memory")
    cli_refuses(capsys, path, r"HR frame 200000x200000 float32 .* needs 149\.0 GiB per frame")
    with pytest.raises(UserError, match="needs 149.0 GiB per frame"):
        describe_plan(str(path))


def test_plan_too_large_is_refused_before_allocating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 10**10
    path = sparse_archive(tmp_path / "long.h5", (n, 1, 1), (2, S, S), [0, n - 1])
    with Archive(path) as a:  # the archive itself is fine, only its plan is too big
        assert a.n_frames == n
    cli_refuses(capsys, path, r"10000000000 frames in units of 128 frames make 78125000 work units, more than the "
                              rf"{MAX_UNITS}", r"--unit-frames 100000 or more")
    cli_refuses(capsys, path, r"planning 10000000000 frames with 2 key frames needs about [0-9.]+ GiB of memory, "
                              r"more than half of the [0-9.]+ GiB available", args=("--unit-frames", "1000000"))
    with pytest.raises(UserError, match=r"planning 10000000000 frames"):
        describe_plan(str(path), unit_frames=10**6)
    # and in a separate process, the refusal costs little memory
    proc = subprocess.Popen([sys.executable, "-m", "xvr_batch", "plan", str(path), "--unit-frames", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.startswith("error: planning 10000000000 frames")


def test_plan_refusals_at_library_level() -> None:
    with pytest.raises(UserError, match=rf"make 1000000 work units, more than the {MAX_UNITS}.*--unit-frames 10 "):
        make_plan(10**6, [0, 10**6 - 1], 3, "all", unit_frames=1, batch=4)
    with pytest.raises(UserError, match=r"planning 100000000000 frames .* GiB of memory"):
        make_plan(10**11, [0, 10**11 - 1], 3, "centre", unit_frames=10**7, batch=4)


def test_plan_warns_when_the_model_would_not_fit(tmp_path: Path) -> None:
    from xvr_batch.planinfo import estimate_memory, format_plan
    from xvr_batch.weights import resolve_weights

    path = tmp_path / "a.h5"
    write(path)
    info = describe_plan(str(path))
    assert info["warnings"] == []
    per_call = estimate_memory(resolve_weights(None).config, 1, H, W)
    batch = 2 * psutil.virtual_memory().available // per_call + 1
    info = describe_plan(str(path), batch=int(batch))
    assert len(info["warnings"]) == 1 and re.match(r"estimated peak memory [0-9.]+ GiB per process is more "
                                                   r"than the [0-9.]+ GiB available", info["warnings"][0])
    assert "warning: estimated peak memory" in format_plan(info)


def test_million_frame_plan_is_fast_and_small() -> None:
    import resource

    n = 10**6
    keys = list(range(0, n, 10))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    plan = make_plan(n, keys, 3, "all", unit_frames=128, batch=4)
    seconds = time.perf_counter() - t0
    assert seconds < 20
    assert len(plan.units) == 7813 and plan.units[-1].stop == n
    assert len(plan.windows) == 400_000 - 1  # 9 frames per bracket -> 3 windows, the last bracket has 10 -> 4
    # windows are built on demand and agree with the units
    for u in (plan.units[0], plan.units[3906], plan.units[-1]):
        wins = plan.windows[u.batches[0] * 4:u.batches[1] * 4]
        assert {t for w in wins for t, _ in w.emit} >= set(range(u.start, u.stop))
        frames = [f for w in wins for f in w.frames]
        assert u.halo_lr == (min(frames), max(frames) + 1)
        assert set(u.keys) == {k for w in wins for k in w.keys}
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 1000, grown_mb


def test_million_frame_archive_plans_at_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xvr_batch.cli import main

    n = 10**6
    path = tmp_path / "million.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("/exchange/data_lr", data=np.zeros((n, 2, 2), np.uint8), chunks=(65536, 2, 2),
                         compression="gzip")
        f["/exchange/data_hr"] = np.zeros((n // 100, 8, 8), np.uint8)
        f["/exchange/hr_index"] = np.arange(0, n, 100)
    t0 = time.monotonic()
    main(["plan", str(path), "--unit-frames", "1000"])
    assert time.monotonic() - t0 < 60
    out = capsys.readouterr().out
    assert f"{path}: {n} LR frames 2x2" in out and "units: 1000 of up to 1000 frames" in out


# ------------------------------------------------------------------------------------------------ plan equivalence


def reference_windows(n: int, keys: list[int], nl: int, head: str) -> list[tuple]:
    """The window rules of plan.py written out frame by frame (the original implementation)."""
    segs = []
    if keys[0] > 0:
        segs.append((0, keys[0], 0, 0))
    for i in range(len(keys) - 1):
        segs.append((keys[i], keys[i + 1] + 1 if i == len(keys) - 2 else keys[i + 1], i, i + 1))
    if keys[-1] + 1 < n:
        segs.append((keys[-1] + 1, n, len(keys) - 1, len(keys) - 1))
    wins: list[tuple] = []
    for start, stop, kp, kn in segs:
        if head == "centre":
            for t in range(start, stop):
                frames = tuple(reflect(t - nl // 2 + j, n) for j in range(nl))
                wins.append((len(wins), frames, (kp, kn), ((t, nl // 2),)))
            continue
        if stop - start >= nl:
            starts = list(range(start, stop - nl + 1, nl))
            if starts[-1] + nl < stop:
                starts.append(stop - nl)
        else:
            starts = [max(0, min(start, n - nl))]
        done = start
        for p in starts:
            frames = tuple(reflect(p + j, n) for j in range(nl))
            emit = tuple((t, t - p) for t in range(max(p, done), min(p + nl, stop)))
            done = max(done, p + nl)
            wins.append((len(wins), frames, (kp, kn), emit))
    return wins


@pytest.mark.parametrize("head", ["all", "centre"])
def test_windows_and_units_match_the_frame_by_frame_rules(head: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(150):
        n = int(rng.integers(2, 90))
        k = int(rng.integers(2, min(n, 9) + 1))
        keys = sorted(int(x) for x in rng.choice(n, size=k, replace=False))
        nl = int(rng.integers(1, 8))
        ref = reference_windows(n, keys, nl, head)
        table = plan_windows(n, keys, nl, head)
        assert [(w.index, w.frames, w.keys, w.emit) for w in table] == ref
        assert [(w.index, w.frames, w.keys, w.emit) for w in table[2:7]] == ref[2:7]
        assert table[-1].index == len(ref) - 1
        uf, b = int(rng.integers(1, 20)), int(rng.integers(1, 5))
        assert plan_units(table, n, uf, b) == plan_units(list(table), n, uf, b)
