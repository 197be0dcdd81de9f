"""The virtual output layout (``reconstruct --layout virtual``) and ``xvr-batch compact``.

``--layout virtual`` writes, instead of one stitched file::

    OUT.h5                       /exchange/data: an HDF5 virtual dataset (N, H, W) over the parts' ``data``
                                 (NaN fill for float32, 0 for uint16, where a part cannot be found);
                                 /exchange/hr_index, /exchange/lr_consistency, /process/xvr_batch as in
                                 the single-file layout (:mod:`xvr_batch.io.output`), plus two attributes
                                 of /process/xvr_batch: ``layout`` = "virtual" and ``parts`` (JSON: file,
                                 start, frames, bytes, sha256 of every part, in order)
    OUT.h5.parts/unit-*.h5       the verified parts of the work directory, moved here, not copied

The virtual dataset names its sources relative to the folder of ``OUT.h5`` (``OUT.h5.parts/unit-...``, a
``%`` escaped as ``%%``), and HDF5 resolves a relative source name against the virtual file's own folder
(before the working directory; ``HDF5_VDS_PREFIX`` would override it), so ``OUT.h5`` and ``OUT.h5.parts``
can be moved or copied together, anywhere. ``OUT.h5`` without its folder reads NaN (or 0) frames, silently:
that is HDF5's behaviour for a missing source.

Writing it is metadata only: the parts are hard-linked into a hidden staging folder beside the output
(renamed where the filesystem has no hard links, copied across filesystems), the output is written under a
temporary name, the staging folder is renamed to ``OUT.h5.parts`` and the output published; the parts' old
names in the work directory are removed only then. A failure before the publication leaves the
work directory as it was.

:func:`compact` turns such a file into the single-file layout later: it checks the parts against the recorded
sha256 (one read of each, during the copy) and calls :func:`xvr_batch.io.output.stitch_output` with the very
arguments the single layout would have used, so the compacted file has the same bytes (the same sha256) as
``reconstruct`` with the default layout writes for that run. The process record is layout-free for that
reason: both layouts leave ``--layout`` out of ``command_line`` and ``config``
(:func:`record_without_layout`), and ``layout``/``parts`` are written after every other attribute, so
that ``compact`` drops them and writes the rest, in order, as it was.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import hdf5plugin  # noqa: F401  (the parts are compressed through hdf5plugin)
import numpy as np

from xvr_batch.durable import (AtomicH5File, OutputExistsError, fsync_dir, fsync_file, parse_temp_name, pid_alive,
                               remove_stale_temps, sha256_file, temp_path)
from xvr_batch.errors import UserError

__all__ = ["LAYOUTS", "check_layout", "parts_dir_for", "record_without_layout", "run_layout",
           "write_virtual_output", "compact"]

LAYOUTS = ("single", "virtual")
#: Attributes of /process/xvr_batch that only the virtual layout writes (last, after the process record).
LAYOUT_ATTR, PARTS_ATTR = "layout", "parts"
_PART_NAME = re.compile(r"unit-\d{1,12}\.h5")


def check_layout(name: Any) -> str:
    """``name`` if it is a layout (``single`` or ``virtual``), else one clear :class:`UserError`."""
    if name not in LAYOUTS:
        raise UserError(f"--layout {name!r}: choose one of {', '.join(LAYOUTS)}")
    return name


def parts_dir_for(output: str | os.PathLike) -> Path:
    """The folder of the parts of a virtual output: ``OUT.h5`` -> ``OUT.h5.parts`` beside it."""
    out = Path(output)
    return out.with_name(out.name + ".parts")


def record_without_layout(command: Sequence[str], config: dict) -> tuple[list[str], dict]:
    """``(command_line, config)`` as the output's process record stores them: without ``--layout`` (both
    forms, ``--layout X`` and ``--layout=X``) and without the ``layout`` key, so the record, and the bytes of a
    single-file output, do not depend on the layout it was first written in."""
    out: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
            continue
        if arg == "--layout":
            skip = True
            continue
        if isinstance(arg, str) and arg.startswith("--layout="):
            continue
        out.append(arg)
    return out, {k: v for k, v in config.items() if k != "layout"}


def run_layout(job: Any, layout: str | None = None) -> str:
    """The layout a run's output is written in: ``layout`` if given, else the run's ``--layout`` (its config,
    as the command line or the resumed manifest gave it, else the options recorded in its manifest), else
    ``single``; checked."""
    if layout is None:
        layout = (job.config or {}).get("layout")
    if layout is None:
        try:
            layout = (job.workdir_obj().read_manifest().get("options") or {}).get("layout")
        except Exception:  # noqa: BLE001 - no usable manifest: the default
            layout = None
    return check_layout(layout or "single")


# ---------------------------------------------------------------------------------------------- writing

def write_virtual_output(output: str | os.PathLike, parts: Sequence[os.PathLike], shape: tuple[int, int, int],
                         dtype: np.dtype, compression: str, hr_index: np.ndarray, process: dict[str, Any],
                         consistency: dict | None, overwrite: bool, *,
                         part_sha256: Sequence[str] | None = None, verified: Sequence[bool] | None = None,
                         keep_sources: bool = False) -> Path:
    """Move ``parts`` into ``OUT.parts/`` and write ``output`` as a virtual dataset over them (see the module
    docstring); returns the output path.

    ``part_sha256`` gives each part's expected sha256 (None: computed here); a part whose entry in ``verified``
    is true was checked by this process already, the others are hashed (as :func:`stitch_output` does when
    given a sha256) and a mismatch is a :class:`UserError`. The parts must follow each other from frame 0
    (attribute ``start``) with the output's dtype and frame shape. Without ``overwrite`` an existing output or
    ``OUT.parts`` is refused; with it both are replaced (the old parts folder is removed after the new output
    is published). With ``keep_sources`` the parts keep their old names too (hard links, else copies)."""
    from xvr_batch.io.output import _read_part_bytes, _read_consistency

    out = Path(output)
    final_dir = parts_dir_for(out)
    remove_stale_temps(out)
    _remove_stale_staging(final_dir)
    if not overwrite:
        for p in (out, final_dir):
            if os.path.lexists(p):
                raise UserError(f"{p}: already exists; pass --overwrite to replace it, or choose another -o")
    parts = [Path(p) for p in parts]
    names = [p.name for p in parts]
    if len(set(names)) != len(names) or not all(_PART_NAME.fullmatch(nm) for nm in names):
        raise ValueError(f"part files must be distinct unit-N.h5 names, got {names[:3]}...")
    n, hh, ww = shape
    dtype = np.dtype(dtype)
    if part_sha256 is None:  # hashed here, so verified
        shas, check = [_sha(p) for p in parts], [True] * len(parts)
    else:
        shas = list(part_sha256)
        check = list(verified) if verified is not None else [False] * len(parts)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda ps: _read_part_bytes(ps[0], None if ps[2] else ps[1]), zip(parts, shas, check)))
    cons = np.full(n, np.nan, np.float32) if consistency is not None else None
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    records, t = [], 0
    for part, sha in zip(parts, shas):
        m = _part_frames(part, t, dtype, (hh, ww), cons, _read_consistency)
        rel = f"{final_dir.name}/{part.name}"
        layout[t:t + m] = h5py.VirtualSource(rel.replace("%", "%%"), "data", shape=(m, hh, ww), dtype=dtype)
        records.append({"file": rel, "start": t, "frames": m, "bytes": part.stat().st_size, "sha256": str(sha).lower()})
        t += m
    if t != n:
        raise UserError(f"{out}: parts cover {t} of {n} frames; resume the run")
    staging = temp_path(final_dir)
    placed: list[tuple[Path, Path, str]] = []
    try:
        staging.mkdir()
        for part in parts:
            placed.append((part, staging / part.name, _place(part, staging / part.name, keep_sources)))
        fsync_dir(staging)
        _publish(out, final_dir, staging, overwrite, lambda f: _write_file(
            f, layout, shape, dtype, compression, hr_index, process, consistency, cons, records))
    except BaseException:
        for src, dst, how in reversed(placed):
            if how == "moved":
                os.replace(dst, src)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not keep_sources:
        for src, _, how in placed:
            if how != "moved":
                _unlink_quietly(src)
    return out


def _sha(path: Path) -> str:
    try:
        return sha256_file(path, bufsize=1 << 22)
    except OSError as exc:
        raise UserError(f"part {path} is unreadable ({exc.strerror}); run `xvr-batch resume` on its work "
                        "directory to redo that unit") from None


def _part_frames(part: Path, t: int, dtype: np.dtype, frame: tuple[int, int], cons: np.ndarray | None,
                 read_consistency: Callable) -> int:
    """Check that ``part`` holds frames ``t..t+m`` of the output (its metadata only); return ``m``. Its
    ``lr_consistency`` vector goes into ``cons[t:t+m]``."""
    from xvr_batch.io.output import open_part

    with open_part(part) as pf:
        src = pf.get("data")
        start = pf.attrs.get("start")
        if not isinstance(src, h5py.Dataset) or start is None or int(start) != t or src.dtype != dtype \
                or src.ndim != 3 or src.shape[1:] != frame:
            raise UserError(f"{part}: does not fit the output (start {start}, expected {t}); "
                            "resume with --force-replan")
        m = int(src.shape[0])
        if cons is not None:
            read_consistency(pf, part, m, cons, t)
    return m


def _place(src: Path, dst: Path, keep: bool) -> str:
    """Give the part ``src`` the name ``dst`` without copying its bytes where possible: a hard link
    ("linked"); where the filesystem has no hard links a rename ("moved"), or a copy with ``keep``; a copy
    across filesystems ("copied")."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
        if exc.errno != errno.EXDEV and not keep:
            os.replace(src, dst)
            return "moved"
    shutil.copyfile(src, dst)
    fsync_file(dst)
    return "copied"


def _write_file(f: h5py.File, layout: h5py.VirtualLayout, shape: tuple[int, int, int], dtype: np.dtype,
                compression: str, hr_index: np.ndarray, process: dict[str, Any], consistency: dict | None,
                cons: np.ndarray | None, records: list[dict]) -> None:
    """The datasets and attributes of a virtual output, into the open file ``f`` (flushed at the end, while
    every dataset is still referenced)."""
    ex = f.create_group("exchange")
    fill = np.nan if dtype.kind == "f" else 0
    ds = ex.create_virtual_dataset("data", layout, fillvalue=fill)
    ds.attrs["compression"] = compression
    ds.attrs["units"] = "HR camera counts"
    index = ex.create_dataset("hr_index", data=np.asarray(hr_index, dtype=np.int64))
    cds = None
    if cons is not None:
        from xvr_batch.consistency import attrs_for

        cds = ex.create_dataset("lr_consistency", data=cons, track_times=False)
        for key, value in attrs_for(cons, consistency).items():
            cds.attrs[key] = value
    grp = f.create_group("process").create_group("xvr_batch", track_order=True)
    for key, value in process.items():  # as stitch_output writes them
        grp.attrs[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    grp.attrs[LAYOUT_ATTR] = "virtual"
    grp.attrs[PARTS_ATTR] = json.dumps(records)
    f.flush()
    del ds, index, cds


def _publish(out: Path, final_dir: Path, staging: Path, overwrite: bool, fill: Callable[[h5py.File], None]) -> None:
    """Write ``out`` through ``fill`` under a temporary name; then rename ``staging`` to ``final_dir`` (an
    existing one aside first) and publish ``out``. If the publication fails, the folders are put back."""
    h5 = AtomicH5File(out, overwrite=overwrite, track_order=True)
    try:
        fill(h5.file)
    except BaseException as exc:
        err = h5.fail(exc)
        if err is not exc:
            raise err from exc
        raise
    h5.close()
    aside = temp_path(final_dir) if os.path.lexists(final_dir) else None
    try:
        if aside is not None:
            os.rename(final_dir, aside)
        os.rename(staging, final_dir)
        try:
            h5.publish()
        except BaseException:
            os.rename(final_dir, staging)
            raise
    except OutputExistsError:
        _restore(aside, final_dir)
        raise UserError(f"{out}: output appeared while it was being written (another run?); it was left as it "
                        "was: pass --overwrite to replace it, or choose another -o") from None
    except BaseException:
        _restore(aside, final_dir)
        h5.abort()
        raise
    fsync_dir(out.parent)
    if aside is not None:
        _remove_tree(aside)


def _restore(aside: Path | None, final_dir: Path) -> None:
    if aside is not None and not os.path.lexists(final_dir):
        os.rename(aside, final_dir)


def _remove_tree(path: Path) -> None:
    """Remove a folder (never following a link) or a file/link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink_quietly(path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_stale_staging(final_dir: Path) -> None:
    """Remove staging folders of ``final_dir`` left by dead processes of this host."""
    try:
        names = os.listdir(final_dir.parent)
    except OSError:
        return
    from xvr_batch.durable import _host_tag

    for name in names:
        parsed = parse_temp_name(name)
        if parsed is None or parsed[0] != final_dir.name:
            continue
        _, pid, host = parsed
        if host == _host_tag() and pid != os.getpid() and not pid_alive(pid):
            _remove_tree(final_dir.parent / name)


# ---------------------------------------------------------------------------------------------- compact

def compact(path: str | os.PathLike, output: str | os.PathLike | None = None, progress: bool = False,
            overwrite: bool = False) -> Path:
    """Turn the virtual output ``path`` into the single-file layout; returns the file written.

    Without ``output`` (or with ``output`` naming ``path`` itself) the compacted file replaces ``path``
    atomically and the parts folder is removed afterwards (the listed parts, then the folder if it is empty).
    With another ``output``, ``path`` and its parts are left as they are (an existing ``output`` is replaced
    only with ``overwrite``). The parts are checked against their recorded sha256 during the copy; a file that
    is not a virtual output, or a missing or corrupt part, is a :class:`UserError` and nothing is written
    under the final name. The result has the bytes ``reconstruct`` writes with ``--layout single``."""
    from xvr_batch.io.output import stitch_output
    from xvr_batch.lock import OutputLock

    src = Path(path)
    rec = _read_virtual(src)
    target = Path(output) if output is not None else src
    in_place = _same_file(src, target)
    if not in_place:
        if target.is_dir():
            raise UserError(f"{target}: is a directory; give -o a file name")
        if os.path.lexists(target) and not overwrite:
            raise UserError(f"{target}: already exists; pass --overwrite to replace it, or choose another -o")
    parts = _check_parts(src, rec["parts"])
    with OutputLock(target):
        try:
            stitch_output(target, parts, rec["shape"], rec["dtype"], rec["compression"], rec["hr_index"],
                          rec["process"], progress=progress, overwrite=in_place or overwrite,
                          part_sha256=[p["sha256"] for p in rec["parts"]], consistency=rec["consistency"])
        except UserError as exc:  # stitch_output's advice (resume the work directory) does not apply here
            bad = next((p for p in parts if str(p) in str(exc)), None)
            if bad is None:
                raise UserError(f"{src}: cannot compact ({exc}); {target} was not written") from None
            raise UserError(f"{src}: part {bad} is corrupt or unreadable (its sha256 or contents differ from "
                            f"what {src.name} records); restore the parts folder from a copy, or reconstruct "
                            f"again; {target} was not written") from None
    if in_place:
        for p in parts:
            _unlink_quietly(p)
        try:
            os.rmdir(parts[0].parent)
        except OSError:  # something else is in it: left there
            pass
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _read_virtual(src: Path) -> dict:
    """Everything :func:`compact` needs from a virtual output: process record (strings, in order), parts,
    shape, dtype, compression, hr_index, consistency baseline. Anything else is a :class:`UserError`."""
    if not src.is_file():
        raise UserError(f"{src}: no such file; give the output written by `reconstruct --layout virtual`")
    try:
        f = h5py.File(src, "r", locking=False)
    except (OSError, ValueError, RuntimeError):
        raise UserError(f"{src}: not a readable HDF5 file; give the output written by "
                        "`reconstruct --layout virtual`") from None
    with f:
        grp = f.get("process/xvr_batch")
        ds = f.get("exchange/data")
        if not isinstance(grp, h5py.Group) or not isinstance(ds, h5py.Dataset):
            raise UserError(f"{src}: not an xvr-batch output (no /process/xvr_batch or /exchange/data); give the "
                            "output written by `reconstruct --layout virtual`")
        if grp.attrs.get(LAYOUT_ATTR) != "virtual" or not ds.is_virtual:
            raise UserError(f"{src}: already a single-file output (not written with --layout virtual); there is "
                            "nothing to compact")
        process: dict[str, str] = {}
        for key in grp.attrs:
            value = grp.attrs[key]
            if key in (LAYOUT_ATTR, PARTS_ATTR):
                continue
            if not isinstance(value, str):
                raise UserError(f"{src}: /process/xvr_batch attribute {key!r} is not text (the file was edited?); "
                                "it cannot be compacted")
            process[key] = value
        try:
            records = json.loads(grp.attrs[PARTS_ATTR])
            consistency = json.loads(process["lr_consistency"]) if "lr_consistency" in process else None
            hr_index = np.asarray(f["exchange/hr_index"][()], dtype=np.int64)
            compression = str(ds.attrs["compression"])
        except (KeyError, ValueError, TypeError):
            raise UserError(f"{src}: its virtual-layout record is incomplete or corrupt (the file was edited?); "
                            "it cannot be compacted") from None
        return {"process": process, "parts": records, "shape": tuple(int(v) for v in ds.shape),
                "dtype": ds.dtype, "compression": compression, "hr_index": hr_index, "consistency": consistency}


def _check_parts(src: Path, records: Any) -> list[Path]:
    """The parts' paths (beside ``src``) after checking the records and that every part is there with its
    recorded size (the sha256 is checked during the copy)."""
    bad = UserError(f"{src}: its parts list is corrupt (the file was edited?); it cannot be compacted")
    if not isinstance(records, list) or not records:
        raise bad
    folders = set()
    paths = []
    for r in records:
        if not isinstance(r, dict) or not isinstance(r.get("file"), str) or not isinstance(r.get("sha256"), str):
            raise bad
        folder, _, name = r["file"].partition("/")
        if not folder or folder in (".", "..") or "/" in name or not _PART_NAME.fullmatch(name):
            raise bad
        folders.add(folder)
        paths.append(src.parent / folder / name)
    if len(folders) != 1:
        raise bad
    folder = src.parent / next(iter(folders))
    if folder.is_symlink():  # an in-place compact deletes the parts it lists: only in the real folder
        raise UserError(f"{src}: its parts folder {folder} is a symbolic link; move the real folder beside "
                        f"{src.name} (in its place), then compact again")
    for r, p in zip(records, paths):
        if not p.is_file() or p.is_symlink():
            raise UserError(f"{src}: part {p} is missing; the {p.parent.name} folder must stay beside "
                            f"{src.name} (move them together); restore it, then compact again")
        if p.stat().st_size != r.get("bytes"):
            raise UserError(f"{src}: part {p} is corrupt (its size differs from the one recorded); restore the "
                            f"{p.parent.name} folder from a copy, or reconstruct again")
    return paths
