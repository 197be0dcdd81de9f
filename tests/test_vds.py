"""``reconstruct --layout virtual`` (a virtual dataset over the parts) and ``xvr-batch compact``, on real files.

A 40-frame archive (HR 32x48), tiny weights and ``--unit-frames 10`` make four parts; each run takes about a
second. The outputs are compared with the default single-file layout of the same command: the frames, and
after ``compact`` the whole file's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the parts are compressed)
import numpy as np
import pytest

from conftest import Result, sha256

#: A '%' in the name checks that it is escaped in the virtual dataset's source names.
NAME = "recon%1.h5"


def _reconstruct(run_cli, archive: Path, weights: Path, where: Path, *extra: str) -> Result:
    """``reconstruct ARCHIVE -o NAME`` run in ``where`` (the same relative -o, so the same process record)."""
    where.mkdir(parents=True, exist_ok=True)
    r = run_cli("reconstruct", archive, "-o", NAME, "--weights", weights, "--unit-frames", "10", "-q",
                "--keep-workdir", *extra, cwd=where)
    assert r.code == 0, r.err
    return r


def _frames(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("exchange/data", "exchange/hr_index", "exchange/lr_consistency")}


def _process(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return dict(f["process/xvr_batch"].attrs)


def _one_line_error(r: Result, expect: str) -> None:
    assert r.code == 2, (r.code, r.out, r.err)
    assert "Traceback" not in r.err, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    assert expect.lower() in lines[0].lower(), (expect, lines[0])


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


@pytest.fixture
def pair(tmp_path, archive, tiny_weights, run_cli) -> tuple[Path, Path]:
    """(single-layout output, virtual-layout output) of the same command, in two folders."""
    _reconstruct(run_cli, archive, tiny_weights, tmp_path / "single")
    r = _reconstruct(run_cli, archive, tiny_weights, tmp_path / "virtual", "--layout", "virtual")
    assert "virtual dataset" in r.err
    return tmp_path / "single" / NAME, tmp_path / "virtual" / NAME


def test_virtual_output_reads_like_the_single_file_and_compacts_to_its_bytes(pair, tmp_path, run_cli):
    single, virtual = pair
    parts = virtual.with_name(NAME + ".parts")
    names = sorted(p.name for p in parts.iterdir())
    assert names == [f"unit-{i:06d}.h5" for i in range(4)]
    # --keep-workdir: the work directory keeps its parts too (the same files, hard links)
    assert os.path.samefile(parts / names[0], virtual.with_name(NAME + ".xvr") / "parts" / names[0])
    with h5py.File(virtual, "r") as f:
        ds = f["exchange/data"]
        assert ds.is_virtual and ds.attrs["compression"] == "bitshuffle"
        assert all(not os.path.isabs(s.file_name) for s in ds.virtual_sources())
    want = _frames(single)
    got = _frames(virtual)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    with h5py.File(single, "r") as a, h5py.File(virtual, "r") as b:
        sa, sb = a["exchange/lr_consistency"].attrs, b["exchange/lr_consistency"].attrs
        assert set(sa) == set(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
    ps, pv = _process(single), _process(virtual)
    assert pv.pop("layout") == "virtual"
    listed = json.loads(pv.pop("parts"))
    assert [p["file"] for p in listed] == [f"{NAME}.parts/{n}" for n in names]
    assert [p["sha256"] for p in listed] == [sha256(parts / n) for n in names]
    assert pv == ps and "--layout" not in ps["command_line"] and "layout" not in json.loads(ps["config"])

    # the file and its folder moved together, read from another working directory
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    shutil.move(virtual, moved / NAME)
    shutil.move(parts, moved / parts.name)
    os.chdir(tmp_path)
    for key, value in _frames(moved / NAME).items():
        np.testing.assert_array_equal(value, want[key])

    # compact -o: a new file with the single layout's bytes; the virtual pair is left as it was
    r = run_cli("compact", moved / NAME, "-o", tmp_path / "final.h5", "-q")
    assert r.code == 0, r.err
    assert sha256(tmp_path / "final.h5") == sha256(single)
    assert (moved / parts.name).is_dir() and _process(moved / NAME)["layout"] == "virtual"
    # compact in place: the same bytes under the same name; the parts folder is removed
    r = run_cli("compact", NAME, cwd=moved)
    assert r.code == 0, r.err
    assert sha256(moved / NAME) == sha256(single)
    assert sorted(os.listdir(moved)) == [NAME]


def test_compact_refuses_what_it_cannot_compact(pair, tmp_path, run_cli):
    single, virtual = pair
    parts = virtual.with_name(NAME + ".parts")
    before = sha256(single)
    r = run_cli("compact", single, "-q")
    _one_line_error(r, "already a single-file output")
    assert sha256(single) == before
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5" * 100)
    _one_line_error(run_cli("compact", junk, "-q"), "not a readable HDF5 file")

    vsha = sha256(virtual)
    final = tmp_path / "final.h5"
    # a corrupt part (same size): refused during the copy; nothing under either name, no temporaries left
    victim = parts / "unit-000002.h5"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    victim.write_bytes(bytes(bad))
    for target in ((), ("-o", final)):
        r = run_cli("compact", virtual, "-q", *target)
        _one_line_error(r, "corrupt")
        assert str(victim) in r.err
        assert sha256(virtual) == vsha and not final.exists()
        assert _temps(virtual.parent) == [] and _temps(tmp_path) == []
    # a missing part: refused before anything is written
    victim.write_bytes(good)
    victim.unlink()
    r = run_cli("compact", virtual, "-o", final, "-q")
    _one_line_error(r, "missing")
    assert "unit-000002.h5" in r.err and not final.exists() and sha256(virtual) == vsha
    # an existing -o is kept unless --overwrite
    victim.write_bytes(good)
    final.write_bytes(b"precious")
    _one_line_error(run_cli("compact", virtual, "-o", final, "-q"), "--overwrite")
    assert final.read_bytes() == b"precious"
    assert run_cli("compact", virtual, "-o", final, "-q", "--overwrite").code == 0
    assert sha256(final) == before
    # the parts folder a link to somewhere else: refused (an in-place compact deletes the parts it lists)
    elsewhere = tmp_path / "elsewhere"
    parts.rename(elsewhere)
    parts.symlink_to(elsewhere, target_is_directory=True)
    _one_line_error(run_cli("compact", virtual, "-q"), "symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) and sha256(virtual) == vsha
    parts.unlink()
    elsewhere.rename(parts)


def test_virtual_run_removes_its_work_directory_and_refuses_a_stray_parts_folder(tmp_path, archive, tiny_weights,
                                                                                 run_cli):
    out = tmp_path / "o.h5"
    stray = tmp_path / "o.h5.parts"
    stray.mkdir()
    (stray / "unit-000000.h5").write_bytes(b"someone's")
    args = ("reconstruct", archive, "-o", out, "--weights", tiny_weights, "--unit-frames", "10", "-q",
            "--layout", "virtual")
    r = run_cli(*args)
    assert r.code == 2 and "o.h5.parts" in r.err and "--overwrite" in r.err, r.err
    assert not out.exists() and (stray / "unit-000000.h5").read_bytes() == b"someone's"
    assert not (tmp_path / "o.h5.xvr").exists()  # refused before any compute (check_output_target)
    r = run_cli(*args, "--overwrite")
    assert r.code == 0, r.err
    assert not (tmp_path / "o.h5.xvr").exists()
    assert sorted(p.name for p in stray.iterdir()) == [f"unit-{i:06d}.h5" for i in range(4)]
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
    with h5py.File(out, "r") as f:
        assert f["exchange/data"].is_virtual and np.isfinite(f["exchange/data"][()]).all()


def test_resume_keeps_the_recorded_layout(tmp_path, archive, tiny_weights, run_cli):
    """A run planned through the API with layout="virtual" (no config) and finished by `xvr-batch resume`."""
    from xvr_batch.pipeline import Options, prepare

    opts = Options(archive=str(archive), output=str(tmp_path / "o.h5"), weights=str(tiny_weights), unit_frames=10,
                   layout="virtual")
    prepare(opts).close()
    r = run_cli("resume", tmp_path / "o.h5.xvr", "-q")
    assert r.code == 0, r.err
    assert _process(tmp_path / "o.h5")["layout"] == "virtual"
    assert len(list((tmp_path / "o.h5.parts").iterdir())) == 4


def test_layout_option_is_checked_and_recorded_options_default_to_single(tmp_path):
    from xvr_batch.errors import UserError
    from xvr_batch.pipeline import Options

    rec = {"archive": "a.h5", "output": "o.h5"}
    assert Options.from_record(rec, "m").layout == "single"
    assert Options.from_record(dict(rec, layout="virtual"), "m").layout == "virtual"
    with pytest.raises(UserError, match="--layout 'vds'"):
        Options(archive="a.h5", output="o.h5", layout="vds")


def test_help_describes_the_layout_and_compact(run_cli):
    r = run_cli("reconstruct", "--help")
    assert r.code == 0 and "--layout" in r.out and "compact" in r.out
    r = run_cli("compact", "--help")
    assert r.code == 0 and "--layout virtual" in r.out and "-o, --output" in r.out


def _workdir_parts(output: Path) -> tuple[list[Path], list[str]]:
    from xvr_batch.workdir import WorkDir

    wd = WorkDir(output.with_name(output.name + ".xvr"))
    done = wd.completed_units(verify=False)
    recs = [done[u] for u in sorted(done)]
    return [wd.resolve_part(r["part"]) for r in recs], [r["sha256"] for r in recs]


def _write_args(single: Path) -> tuple:
    with h5py.File(single, "r") as f:
        ds = f["exchange/data"]
        return ds.shape, ds.dtype, "bitshuffle", f["exchange/hr_index"][()]


def test_write_virtual_output_hashes_untrusted_parts_and_leaves_them_on_failure(pair, tmp_path, monkeypatch):
    from xvr_batch.errors import UserError
    from xvr_batch.io import vds

    single, _ = pair
    parts, shas = _workdir_parts(single)
    shape, dtype, codec, index = _write_args(single)
    out = tmp_path / "x.h5"
    victim = parts[1]
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    victim.write_bytes(bytes(bad))
    with pytest.raises(UserError, match="corrupt"):
        vds.write_virtual_output(out, parts, shape, dtype, codec, index, {"version": "t"}, None, False,
                                 part_sha256=shas)
    victim.write_bytes(good)
    # no hard links on this filesystem: the parts are renamed, and renamed back when the write fails
    import errno

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    def boom(*a, **k):
        raise RuntimeError("write failed")

    monkeypatch.setattr(vds.os, "link", no_link)
    monkeypatch.setattr(vds, "_write_file", boom)
    with pytest.raises(RuntimeError, match="write failed"):
        vds.write_virtual_output(out, parts, shape, dtype, codec, index, {"version": "t"}, None, False,
                                 part_sha256=shas)
    assert all(p.is_file() for p in parts) and [sha256(p) for p in parts] == shas
    # no output, parts folder or staging folder left
    assert sorted(os.listdir(tmp_path)) == ["archive.h5", "single", "virtual"]
    monkeypatch.undo()
    vds.write_virtual_output(out, parts, shape, dtype, codec, index, {"version": "t"}, None, False,
                             part_sha256=shas)  # every part hashed (none was verified by this process)
    assert not any(p.exists() for p in parts)
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["exchange/data"][()], _frames(single)["exchange/data"])
