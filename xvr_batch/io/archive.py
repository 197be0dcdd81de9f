"""Read-only, validated access to an input archive.

An archive is an HDF5 file with

=========================  ===========  ==============================================
path (default)             shape        meaning
=========================  ===========  ==============================================
``/exchange/data_lr``      (N, h, w)    LR frames, one per time step
``/exchange/data_hr``      (K, H, W)    HR key frames, ``H = s*h``, ``W = s*w``
``/exchange/hr_index``     (K,)         LR time index of each key frame
``/exchange/data_dark_lr`` (n, h, w)    optional darks/flats (also ``data_white_lr``,
                                        ``data_dark_hr``, ``data_white_hr``)
``/exchange/data_gt``      (N, H, W)    optional dense HR truth (``evaluate`` only)
=========================  ===========  ==============================================

:class:`Archive` checks all of this once, when it is opened, and raises
:class:`~xvr_batch.errors.UserError` with a one-line message (file, dataset, what to do) for
anything a user can fix. After that, reads are lazy: frames are read in blocks with h5py
slicing, so the LR stack is never loaded whole. The file is opened with ``h5py.File(path, "r")``
and never written.

Decisions worth knowing
-----------------------
* ``hr_index`` may be stored with any integer dtype. A float dtype is accepted when every value
  is finite and a whole number (some writers store indices as float64); any other float value is
  an error. Booleans, strings and compound types are errors.
* When ``hr_stride`` is given it overrides ``/exchange/hr_index``: the dataset, if present, is not
  validated or used (``describe()`` warns that it was ignored). ``hr_offset`` without
  ``hr_stride`` is an error, because it would otherwise be silently ignored.
* The scale may be any integer >= 1 that is the same on both axes; whether the model supports it
  is the pipeline's check (``describe()`` warns when it is not 4).
* A calibration dataset may be 3-D ``(n, h, w)`` or, as a single pre-averaged frame, 2-D
  ``(h, w)``. A path set to ``""`` in :class:`ArchivePaths` means "not used".
* ``/exchange/data_gt`` is validated lazily: a malformed ground truth does not stop
  reconstruction, ``has_gt`` is then False, ``describe()`` warns, and ``read_gt`` raises the
  reason as a :class:`UserError`.
* Index errors in ``read_*`` calls (out-of-range frame numbers) are programming errors of the
  caller and raise :class:`IndexError`, not :class:`UserError`.
* A file another process has open for writing is refused ("is being written by another
  process"), or waited for with ``wait_for_writer`` seconds. A writer is recognised by HDF5's
  write lock (errno EAGAIN/EWOULDBLOCK, or a shared ``flock`` probe that fails) or, for a SWMR
  writer, which drops its lock, by the superblock's file-consistency flags. The retry without
  locks (``locking=False``) is taken only when the file system does not support locks (ENOSYS,
  ENOLCK, EOPNOTSUPP, ...); on such a file system a writer that leaves no flags (superblock
  version 0-2) cannot be seen.
* Every dataset read (LR, HR, ``hr_index``, darks/flats; the ground truth lazily, as above) is
  checked for data that would silently read as fill values: virtual datasets with a missing
  source file or dataset, a source too small for its mapping, or unmapped elements; external
  links to a missing file or object and dangling soft links; external raw files that are
  missing or short; chunked datasets with chunks never written (``get_num_chunks``, which costs
  about 0.1 s per million stored chunks); contiguous datasets never written. A dataset whose
  storage is allocated but was never written (early allocation, no fill) is not detected.
* A frame whose float32 copy is larger than the memory available (``psutil``) is refused, as is
  an ``hr_index`` too large to read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import numbers
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import h5py
import hdf5plugin  # noqa: F401  (importing registers the compression filters used by writers)
import numpy as np
import psutil

from xvr_batch.errors import UserError

try:  # POSIX only; without it, lock probing is skipped
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["ArchivePaths", "Archive", "inspect_file", "CALIBRATIONS", "FINGERPRINT_VERSION", "REGISTRATION_PATH"]

#: Names accepted by :meth:`Archive.calibration`, in a fixed order.
CALIBRATIONS: tuple[str, ...] = ("dark_lr", "white_lr", "dark_hr", "white_hr")

#: Tag hashed first by :meth:`Archive.fingerprint`; bump it when the recipe changes.
FINGERPRINT_VERSION = "xvr_batch.archive.fingerprint/1"

#: Number of LR frames sampled by :meth:`Archive.fingerprint` (first, last and evenly spaced).
FINGERPRINT_LR_SAMPLES = 10

#: Key-frame gaps above this are warned about by :meth:`Archive.describe`.
LARGE_KEY_GAP = 50

#: Where ``xvr-batch assemble`` stores the LR->HR registration (2x3 matrix, see xvr_batch.registration).
REGISTRATION_PATH = "/exchange/registration"

#: Spatial factor of the default model; other scales are warned about by describe().
DEFAULT_MODEL_SCALE = 4

# Chunk cache per opened dataset: large enough for a few compressed HR frames, so block reads
# that straddle chunk boundaries do not decompress a chunk twice.
_RDCC_NBYTES = 64 * 2**20
_RDCC_NSLOTS = 10007

# The command-line flag that changes each path, where the CLI has one the message can name.
_FLAG = {"lr": "--lr PATH", "hr": "--hr PATH"}

# Errors h5py raises for unreadable, corrupt or truncated content.
_H5_ERRORS = (OSError, RuntimeError, KeyError)


@dataclass(frozen=True)
class ArchivePaths:
    """Where each dataset lives inside the archive. ``""`` disables an optional dataset."""

    lr: str = "/exchange/data_lr"
    hr: str = "/exchange/data_hr"
    hr_index: str = "/exchange/hr_index"
    dark_lr: str = "/exchange/data_dark_lr"
    white_lr: str = "/exchange/data_white_lr"
    dark_hr: str = "/exchange/data_dark_hr"
    white_hr: str = "/exchange/data_white_hr"
    gt: str = "/exchange/data_gt"

    def to_dict(self) -> dict[str, str]:
        """Plain ``{name: path}`` dict (JSON-serialisable), the inverse of :meth:`from_dict`."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ArchivePaths":
        """Build from a (possibly partial) mapping; missing keys keep their defaults.

        Raises :class:`UserError` for an unknown key or a non-string value, since such a mapping
        comes from a user's config file or a manifest.
        """
        if d is None:
            return cls()
        known = [f.name for f in dataclasses.fields(cls)]
        kwargs: dict[str, str] = {}
        for key, value in d.items():
            if key not in known:
                raise UserError(
                    f"unknown archive path name {key!r}; expected one of {', '.join(known)}"
                )
            if not isinstance(value, str):
                raise UserError(
                    f"archive path {key!r} must be a string (an HDF5 path such as "
                    f"'/exchange/data_lr'), got {value!r}"
                )
            kwargs[key] = value
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# small helpers


def _short(err: BaseException) -> str:
    """First line of an exception message, for embedding in a one-line UserError."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _dtype_str(ds: h5py.Dataset) -> str:
    try:
        return str(ds.dtype)
    except (TypeError, ValueError):  # HDF5 types with no NumPy equivalent
        return "<no NumPy equivalent>"


def _is_numeric(dtype: np.dtype) -> bool:
    """Plain integer or float scalar dtype (not bool, complex, string, compound or array)."""
    return dtype.kind in "iuf" and dtype.fields is None and dtype.subdtype is None


def _as_int(value: Any, what: str, file: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise UserError(f"{file}: {what} must be an integer, got {value!r}")
    return int(value)


def _first_bad_frame(block: np.ndarray) -> int | None:
    """Index (within ``block``) of the first frame holding NaN or Inf, or None if all finite."""
    finite = np.isfinite(block)
    if finite.all():
        return None
    per_frame = finite.reshape(block.shape[0], -1).all(axis=1)
    return int(np.flatnonzero(~per_frame)[0])


def _canonical_bytes(a: np.ndarray) -> bytes:
    """Platform-independent bytes of an array: C order, little-endian."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


# Names for filter ids: HDF5's built-ins, then the plugins hdf5plugin registers (bshuf, blosc, ...).
_FILTER_NAMES: dict[int, str] = {
    1: "gzip",
    2: "shuffle",
    3: "fletcher32",
    4: "szip",
    5: "nbit",
    6: "scaleoffset",
    32000: "lzf",
    **{int(fid): str(name) for name, fid in getattr(hdf5plugin, "FILTERS", {}).items()},
}

# Filters that transform or check data but do not compress it by themselves.
_NON_CODECS = {"shuffle", "fletcher32", "nbit", "scaleoffset"}


def _filters(ds: h5py.Dataset) -> list[str]:
    """Names of the filters in a dataset's pipeline, in order (plugins included)."""
    try:
        plist = ds.id.get_create_plist()
        names = []
        for i in range(plist.get_nfilters()):
            fid, _flags, _opts, raw = plist.get_filter(i)
            name = _FILTER_NAMES.get(int(fid))
            if name is None:
                text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                name = text.split(";")[0].strip() or f"filter {int(fid)}"
            names.append(name)
        return names
    except _H5_ERRORS:
        return []


def _compression(filters: Sequence[str]) -> str | None:
    """The compression codec of a filter pipeline (e.g. "gzip", "blosc", "zstd"), or None."""
    for name in filters:
        if name not in _NON_CODECS:
            return name
    return None


# Errno values of a lock another process holds (flock: EWOULDBLOCK; fcntl: EACCES/EAGAIN).
_LOCK_HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
# Errno values of a file system that does not support locks at all.
_LOCK_UNSUPPORTED_ERRNOS = frozenset(
    {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)
# HDF5's refusal to open a file whose superblock says a writer (SWMR or not) has it open.
_WRITER_FLAGS_RE = re.compile(r"already open for (write|swmr)|consistency flags", re.IGNORECASE)
_ERRNO_RE = re.compile(r"errno\s*=\s*(\d+)")
_LOCK_WORD_RE = re.compile(r"\block", re.IGNORECASE)

#: Longest pause between two attempts to open an archive that a writer holds (--wait-for-writer).
WRITER_POLL_MAX_S = 2.0


class _LiveWriter(Exception):
    """Internal: another process has the file open for writing; ``how`` says how we know."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


def _flock_probe(path: str) -> str:
    """Try a non-blocking shared ``flock`` on ``path`` (what HDF5's readers take) and release it.

    Returns "held" when another process holds an exclusive lock (an HDF5 writer), "unsupported"
    when the file system refuses locks, and "free" otherwise (also when the probe cannot run).
    """
    if fcntl is None:
        return "free"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return "free"
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return "held" if err.errno in _LOCK_HELD_ERRNOS else "unsupported"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "free"
    finally:
        os.close(fd)


def _open_error_kind(err: BaseException, path: str) -> str:
    """Classify a failed ``h5py.File(path, "r")``.

    "writer-lock": another process holds HDF5's write lock; "writer-flags": the superblock's
    file-consistency flags say a writer has the file open (a SWMR writer releases its lock, so this
    is the only sign of one; a writer that crashed leaves the flags set too); "no-locks": the file
    system does not support locks (then a read-only open without locks is safe); "other": anything
    else (truncated or corrupt file).
    """
    text = str(err)
    if _WRITER_FLAGS_RE.search(text):
        return "writer-flags"
    if not _LOCK_WORD_RE.search(text):  # "unable to lock file", not "sblock->base_addr"
        return "other"
    code = getattr(err, "errno", None)
    if not isinstance(code, int) or code == 0:
        found = _ERRNO_RE.search(text)
        code = int(found.group(1)) if found else None
    if code in _LOCK_HELD_ERRNOS:
        return "writer-lock"
    if code in _LOCK_UNSUPPORTED_ERRNOS:
        return "no-locks"
    # Unknown errno: ask the file system directly.
    return "writer-lock" if _flock_probe(path) == "held" else "no-locks"


def _check_file(path: str) -> os.stat_result:
    """Raise a one-line UserError unless ``path`` is an existing, readable regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"{path}: is a broken symbolic link; point it at the archive") from None
        raise UserError(f"{path}: file not found; check the archive path") from None
    except PermissionError:
        raise UserError(
            f"{path}: permission denied (the file or a parent directory is not accessible); "
            "check the permissions"
        ) from None
    except OSError as err:
        raise UserError(f"{path}: cannot access the file ({_short(err)}); check the path") from None
    if os.path.isdir(path):
        raise UserError(
            f"{path}: is a directory, not an HDF5 archive; pass the path of the .h5 file"
        )
    if not os.path.isfile(path):
        raise UserError(f"{path}: is not a regular file; pass the path of an HDF5 archive")
    try:
        with open(path, "rb") as fh:
            fh.read(8)
    except PermissionError:
        raise UserError(
            f"{path}: permission denied reading the file; make it readable (e.g. chmod u+r)"
        ) from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the file ({_short(err)})") from None
    return st


def _open_once(path: str) -> h5py.File:
    """One attempt to open ``path`` read-only; raises :class:`_LiveWriter` or UserError."""
    st = _check_file(path)
    try:
        is_h5 = st.st_size > 0 and h5py.is_hdf5(path)
    except _H5_ERRORS:
        is_h5 = False
    if not is_h5 and _flock_probe(path) == "held":
        raise _LiveWriter("writer-lock")  # a writer that has not flushed its superblock yet
    if st.st_size == 0:
        raise UserError(
            f"{path}: is empty (0 bytes), not an HDF5 archive; re-copy or regenerate it"
        )
    if not is_h5:
        raise UserError(
            f"{path}: is not an HDF5 file (no HDF5 signature found); pass an HDF5 archive "
            "with /exchange/data_lr and /exchange/data_hr"
        )
    kwargs: dict[str, Any] = {"rdcc_nbytes": _RDCC_NBYTES, "rdcc_nslots": _RDCC_NSLOTS}
    try:
        return h5py.File(path, "r", **kwargs)
    except _H5_ERRORS as err:
        first: BaseException = err
    kind = _open_error_kind(first, path)
    if kind.startswith("writer"):
        raise _LiveWriter(kind)
    if kind == "no-locks":
        # Some parallel file systems refuse locks; a read-only open does not need them. Only
        # taken when the error really is "locks not supported", never for a lock someone holds.
        try:
            return h5py.File(path, "r", locking=False, **kwargs)
        except (_H5_ERRORS + (TypeError, ValueError)) as err:
            first = err
        if _open_error_kind(first, path) == "writer-flags":
            raise _LiveWriter("writer-flags")
    raise UserError(
        f"{path}: cannot open the HDF5 file, it is truncated or corrupt ({_short(first)}); "
        "re-copy or regenerate the archive"
    ) from first


def _wait_seconds(wait_for_writer: float | None) -> float | None:
    if wait_for_writer is None:
        return None
    if isinstance(wait_for_writer, bool) or not isinstance(wait_for_writer, numbers.Real):
        raise UserError(f"--wait-for-writer must be a number of seconds, got {wait_for_writer!r}")
    wait = float(wait_for_writer)
    if not (wait >= 0 and math.isfinite(wait)):
        raise UserError(f"--wait-for-writer must be a finite number of seconds >= 0, got {wait:g}")
    return wait


def _writer_message(path: str, how: str, waited: float | None) -> str:
    if how == "writer-flags":
        why = (
            "its HDF5 file-consistency flags say a writer has it open, e.g. in SWMR mode; if no "
            "process writes it any more, a writer crashed without closing it: clear the flags "
            "of a copy with 'h5clear -s COPY' and use the copy"
        )
    else:
        why = "another process holds its HDF5 write lock"
    if waited is None:
        return (
            f"{path}: is being written by another process ({why}); wait for it to finish, or "
            "pass --wait-for-writer SECONDS"
        )
    return (
        f"{path}: is still being written by another process after waiting {waited:g} s ({why}); "
        "wait for the writer to finish, or pass a longer --wait-for-writer SECONDS"
    )


def _open_h5(path: str, wait_for_writer: float | None = None) -> h5py.File:
    """Open ``path`` read-only, turning every way it can fail into a one-line UserError.

    A file that another process has open for writing (HDF5 write lock held, or file-consistency
    flags set by a SWMR writer) is refused, or, with ``wait_for_writer`` seconds, retried with a
    growing pause (up to :data:`WRITER_POLL_MAX_S`) until the writer is gone or the time is up.
    """
    wait = _wait_seconds(wait_for_writer)
    deadline = None if wait is None else time.monotonic() + wait
    pause = 0.05
    while True:
        try:
            return _open_once(path)
        except _LiveWriter as busy:
            left = 0.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise UserError(_writer_message(path, busy.how, wait)) from None
            time.sleep(min(pause, left))
            pause = min(2 * pause, WRITER_POLL_MAX_S)


# --------------------------------------------------------------------------------------------
# where a dataset's bytes live: links to other files, virtual sources, external raw files, chunks

#: Virtual datasets whose sources are themselves virtual are followed this many levels deep.
MAX_VIRTUAL_DEPTH = 4


def _mb(nbytes: int) -> str:
    """A byte count for messages about storage: "0.2 MB", "12.0 GB"."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def _gib(nbytes: int) -> str:
    """A byte count for messages about memory: "37.3 GiB"."""
    return f"{nbytes / 2**30:.1f} GiB"


def _available_memory() -> int:
    """Bytes of memory this process can still allocate without swapping (psutil's estimate)."""
    return int(psutil.virtual_memory().available)


def _candidates(name: str, parent_file: str, env_var: str) -> list[str]:
    """Where HDF5 looks for the file of an external link or virtual-dataset source, in order.

    As HDF5 does: an absolute name as given, then (by its last component if it was absolute)
    under each ``:``-separated prefix of ``env_var`` (``${ORIGIN}`` = the parent file's
    directory), next to the parent file, and finally relative to the current directory.
    """
    origin = os.path.dirname(os.path.abspath(parent_file))
    found: list[str] = []
    if os.path.isabs(name):
        found.append(name)
        name = os.path.basename(name)
    for prefix in filter(None, os.environ.get(env_var, "").split(":")):
        found.append(os.path.join(prefix.replace("${ORIGIN}", origin), name))
    found.append(os.path.join(origin, name))
    found.append(name)
    out: list[str] = []
    for c in found:
        if c not in out:
            out.append(c)
    return out


def _open_other(name: str, parent_file: str, env_var: str) -> tuple[h5py.File | None, str]:
    """Open the HDF5 file an external link or a virtual source names, read-only.

    Returns ``(file, "")`` or ``(None, why)``, ``why`` being a phrase such as "which is not found
    (looked for a.h5, /data/a.h5)" or "which is being written by another process".
    """
    tried = _candidates(name, parent_file, env_var)
    problems: list[str] = []
    for cand in tried:
        if not os.path.isfile(cand):
            continue
        try:
            return h5py.File(cand, "r"), ""
        except _H5_ERRORS as err:
            kind = _open_error_kind(err, cand)
            if kind.startswith("writer"):
                return None, f"which is being written by another process ({cand})"
            if kind == "no-locks":
                try:
                    return h5py.File(cand, "r", locking=False), ""
                except (_H5_ERRORS + (TypeError, ValueError)) as err2:
                    err = err2
            problems.append(f"{cand} cannot be opened: {_short(err)}")
    if problems:
        return None, "which cannot be opened (" + "; ".join(problems) + ")"
    return None, f"which is not found (looked for {', '.join(tried)})"


def _link_problem(root: h5py.File, path: str) -> str | None:
    """Why ``path`` resolves to nothing although a link on the way to it exists, or None.

    Walks ``path`` one link at a time; a dangling soft link or an external link whose file or
    object is missing is described ("/exchange/data_lr is an external link to /d in lr.h5, which
    is not found (...)"); a plainly absent name gives None (the caller reports "not found").
    """
    parts = [p for p in path.split("/") if p]
    group: h5py.Group = root
    here = ""
    for i, part in enumerate(parts):
        here += "/" + part
        try:
            link = group.get(part, getlink=True)
        except (*_H5_ERRORS, ValueError, TypeError):
            return None
        if link is None:
            return None
        try:
            target = group.get(part)
        except (*_H5_ERRORS, ValueError, TypeError):
            target = None
        if target is None:
            if isinstance(link, h5py.ExternalLink):
                other, why = _open_other(link.filename, group.file.filename, "HDF5_EXT_PREFIX")
                if other is not None:
                    with other:
                        why = f"which has no object {link.path}"
                return f"{here} is an external link to {link.path} in {link.filename}, {why}"
            if isinstance(link, h5py.SoftLink):
                return f"{here} is a soft link to {link.path}, which does not exist"
            return None
        if i < len(parts) - 1:
            if not isinstance(target, h5py.Group):
                return None
            group = target
    return None


def _layout(ds: h5py.Dataset) -> int | None:
    try:
        return int(ds.id.get_create_plist().get_layout())
    except _H5_ERRORS:
        return None


def _storage_problem(ds: h5py.Dataset, path: str, depth: int = 0) -> str | None:
    """Why reading ``ds`` would return fill values (or fail) instead of stored data, or None.

    Cheap for any archive size: it reads metadata only. Checks that

    * every source of a virtual dataset resolves (file found and openable, dataset present, shape
      covering the mapped region, itself storing its data) and the mappings cover the dataset;
    * every external raw-data file exists, is readable and long enough;
    * a chunked dataset has every chunk its shape needs allocated (``get_num_chunks`` walks the
      chunk index, about 0.1 s per million chunks), a contiguous one has storage at all.
    """
    layout = _layout(ds)
    if layout == h5py.h5d.VIRTUAL:
        return _virtual_problem(ds, path, depth)
    try:
        external = ds.external
    except _H5_ERRORS:
        external = None
    if external:
        return _external_problem(ds, path, external)
    shape = tuple(int(s) for s in (ds.shape or ()))
    if not shape or 0 in shape:
        return None
    if layout == h5py.h5d.CHUNKED and ds.chunks:
        needed = 1
        for s, c in zip(shape, ds.chunks):
            needed *= -(-s // int(c))
        try:
            stored = int(ds.id.get_num_chunks())
        except _H5_ERRORS:
            return None
        if stored < needed:
            try:
                size = _mb(int(ds.id.get_storage_size()))
            except _H5_ERRORS:
                size = "?"
            return (
                f"dataset {path} declares shape {_shape_str(shape)} "
                f"({_mb(math.prod(shape) * ds.dtype.itemsize)} uncompressed) but stores only "
                f"{size} in {stored} of the {needed} chunks it needs: the other chunks were never "
                "written and would read as fill values"
            )
    elif layout == h5py.h5d.CONTIGUOUS:
        try:
            allocated = int(ds.id.get_storage_size())
        except _H5_ERRORS:
            return None
        if allocated == 0:
            return (
                f"dataset {path} declares shape {_shape_str(shape)} but no data was ever written "
                "to it: it would read as fill values"
            )
    return None


def _virtual_problem(ds: h5py.Dataset, path: str, depth: int) -> str | None:
    """:func:`_storage_problem` for a virtual dataset (see there)."""
    if depth >= MAX_VIRTUAL_DEPTH:
        return (
            f"virtual dataset {path} has sources nested more than {MAX_VIRTUAL_DEPTH} levels deep"
        )
    shape = tuple(int(s) for s in (ds.shape or ()))
    parent = ds.file.filename
    dcpl = ds.id.get_create_plist()
    count = int(dcpl.get_virtual_count())
    if count == 0 and math.prod(shape) > 0:
        return f"virtual dataset {path} has no sources: every frame would read as fill values"
    mapped = 0
    verifiable = True
    files: dict[str, tuple[h5py.File | None, str]] = {}
    try:
        for i in range(count):
            fname = dcpl.get_virtual_filename(i)
            dname = dcpl.get_virtual_dsetname(i)
            vspace = dcpl.get_virtual_vspace(i)
            srcspace = dcpl.get_virtual_srcspace(i)
            try:
                npoints = int(vspace.get_select_npoints())
                lo, hi = vspace.get_select_bounds()
                region = f"frames {lo[0]}..{hi[0]}" if len(lo) == 3 else "a region"
            except _H5_ERRORS + (ValueError,):
                verifiable = False  # unlimited mapping: its extent follows the sources
                continue
            if "%b" in fname or "%b" in dname:
                verifiable = False  # printf-style names of an unlimited mapping
                continue
            mapped += npoints
            what = f"virtual dataset {path} maps {region} to {dname} in {fname}"
            if fname == ".":
                other: h5py.File | None = ds.file
            else:
                if fname not in files:
                    files[fname] = _open_other(fname, parent, "HDF5_VDS_PREFIX")
                other, why = files[fname]
                if other is None:
                    return f"{what}, {why}"
            try:
                src = other.get(dname)
            except (*_H5_ERRORS, ValueError, TypeError):
                src = None
            if not isinstance(src, h5py.Dataset):
                return f"{what}, but that file has no dataset {dname}"
            src_shape = tuple(int(s) for s in (src.shape or ()))
            if int(srcspace.get_select_type()) == h5py.h5s.SEL_ALL:
                if math.prod(src_shape) != npoints:
                    return (
                        f"{what}, whose shape {_shape_str(src_shape)} does not match the "
                        f"{npoints} elements mapped"
                    )
            else:
                try:
                    _slo, shi = srcspace.get_select_bounds()
                except _H5_ERRORS + (ValueError,):
                    shi = None
                if shi is not None and (
                    len(shi) != len(src_shape) or any(h >= s for h, s in zip(shi, src_shape))
                ):
                    need = _shape_str([h + 1 for h in shi])
                    return (
                        f"{what}, whose shape {_shape_str(src_shape)} does not cover the "
                        f"selected region (needs at least {need})"
                    )
            inner = _storage_problem(src, dname, depth + 1)
            if inner is not None:
                return f"{what}, and there {inner}"
    finally:
        for other, _why in files.values():
            if other is not None:
                with contextlib.suppress(Exception):
                    other.close()
    total = math.prod(shape)
    if verifiable and mapped < total:
        return (
            f"virtual dataset {path} maps only {mapped} of its {total} elements to sources: the "
            "rest would read as fill values"
        )
    return None


def _external_problem(
    ds: h5py.Dataset, path: str, external: Sequence[tuple[Any, int, int]]
) -> str | None:
    """:func:`_storage_problem` for a dataset with external raw storage (see there)."""
    prefix = os.environ.get("HDF5_EXTFILE_PREFIX", "")
    origin = os.path.dirname(os.path.abspath(ds.file.filename))
    remaining = math.prod(int(s) for s in (ds.shape or ())) * int(ds.id.get_type().get_size())
    for name, offset, size in external:
        if remaining <= 0:
            break
        name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
        where = name if not prefix else os.path.join(prefix.replace("${ORIGIN}", origin), name)
        take = remaining if int(size) == h5py.h5f.UNLIMITED else min(int(size), remaining)
        what = f"dataset {path} stores its data in the external file {name}"
        try:
            have = os.path.getsize(where)
            with open(where, "rb"):
                pass
        except FileNotFoundError:
            hint = "" if prefix else (
                f"; relative names are looked up from the current directory {os.getcwd()}: run "
                "from the archive's directory, or set HDF5_EXTFILE_PREFIX='${ORIGIN}'"
            )
            return f"{what}, which is not found ({os.path.abspath(where)}){hint}"
        except OSError as err:
            return f"{what}, which cannot be read ({_short(err)})"
        if have < int(offset) + take:
            return (
                f"{what}, which holds {have} bytes but the dataset needs bytes "
                f"{int(offset)}..{int(offset) + take - 1} of it: the rest would read as zeros"
            )
        remaining -= take
    return None


# --------------------------------------------------------------------------------------------


class Archive:
    """Read-only, validated view of an input archive. Opens with ``h5py.File(path, "r")`` only.

    Parameters
    ----------
    path:
        The HDF5 file.
    paths:
        Where each dataset lives (see :class:`ArchivePaths`).
    hr_stride, hr_offset:
        Key frames at LR indices ``hr_offset, hr_offset + hr_stride, ...`` instead of reading
        ``paths.hr_index``. When ``hr_stride`` is given the ``hr_index`` dataset is ignored.
    wait_for_writer:
        A file that another process has open for writing is refused at once when this is None;
        otherwise opening is retried for up to this many seconds before it is refused.

    Opening refuses, with a :class:`UserError`, an archive whose data would read as fill values
    (virtual datasets with missing sources, broken external links, missing external raw files,
    chunks never written) and one whose frames do not fit in the memory available.

    Attributes (set by validation)
    ------------------------------
    path, paths, n_frames (N), lr_shape (h, w), hr_shape (H, W), scale, hr_index (K,) int64,
    hr_index_source ("dataset" or "stride"), hr_stride, hr_offset, lr_dtype, hr_dtype, has_gt.

    All ``read_*`` methods return new float32 arrays of raw counts (no normalisation) and raise
    :class:`UserError` when a float frame they return holds NaN or Inf.
    """

    path: str
    paths: ArchivePaths
    n_frames: int
    lr_shape: tuple[int, int]
    hr_shape: tuple[int, int]
    scale: int
    hr_index: np.ndarray
    hr_index_source: str
    hr_stride: int | None
    hr_offset: int
    lr_dtype: np.dtype
    hr_dtype: np.dtype

    def __init__(
        self,
        path: str | os.PathLike[str],
        paths: ArchivePaths = ArchivePaths(),
        hr_stride: int | None = None,
        hr_offset: int = 0,
        wait_for_writer: float | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if not isinstance(paths, ArchivePaths):
            raise TypeError(f"paths must be an ArchivePaths, got {type(paths).__name__}")
        self.paths = paths
        self._init_args = (hr_stride, hr_offset, wait_for_writer)
        self._file: h5py.File | None = None
        self._calib_ds: dict[str, h5py.Dataset | None] = {}
        self._calib_cache: dict[str, np.ndarray | None] = {}
        self._gt_ds: h5py.Dataset | None = None
        self._has_gt = False
        self._gt_problem: str | None = None
        self._notes: list[str] = []  # validation remarks that describe() reports as warnings
        self._file = _open_h5(self.path, wait_for_writer)
        try:
            self._validate(hr_stride, hr_offset)
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the file. Idempotent.

        Also drops the dataset handles, so files reached through external links or opened for
        virtual sources are released as well.
        """
        f, self._file = self._file, None
        self._lr = self._hr = self._gt_ds = None  # type: ignore[assignment]
        self._calib_ds = {}
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter teardown
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for process-based backends: the copy reopens (and revalidates) the file.
        return {
            "path": self.path,
            "paths": self.paths,
            "hr_stride": self._init_args[0],
            "hr_offset": self._init_args[1],
            "wait_for_writer": self._init_args[2],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        state = "open" if self._file is not None else "closed"
        return (
            f"Archive({self.path!r}, N={getattr(self, 'n_frames', '?')}, "
            f"lr={getattr(self, 'lr_shape', '?')}, hr={getattr(self, 'hr_shape', '?')}, "
            f"K={len(getattr(self, 'hr_index', ()))}, {state})"
        )

    # ---------------------------------------------------------------- internals

    @property
    def _f(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"archive {self.path} is closed")
        return self._file

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn h5py read failures into a UserError naming the file and ``what`` was read."""
        if self._file is None:  # a programming error, not a corrupt file
            raise RuntimeError(f"archive {self.path} is closed")
        try:
            yield
        except _H5_ERRORS as err:
            raise UserError(
                f"{self.path}: could not read {what} ({_short(err)}); the file may be truncated "
                "or corrupt, or compressed with a filter that is not installed"
            ) from err

    def _lookup(self, path: str, what: str = "", strict: bool = True) -> h5py.HLObject | None:
        """The object at ``path``, or None when absent (or the path is disabled with "").

        With ``strict``, a link on the way that exists but leads nowhere (an external link to a
        missing file or object, a dangling soft link) raises a :class:`UserError` naming it.
        """
        if not path:
            return None
        with self._guard(f"the object at {path}"):
            try:
                obj = self._f.get(path)
            except (ValueError, TypeError):  # malformed path string
                return None
        if obj is None and strict:
            problem = _link_problem(self._f, path)
            if problem is not None:
                raise UserError(
                    f"{self.path}: {problem}, so the {what or 'dataset'} cannot be read; make "
                    "the linked file and object available, or fix the link"
                )
        return obj

    def _require_storage(self, ds: h5py.Dataset, path: str, what: str) -> None:
        """Raise a UserError when ``ds`` would read as fill values (:func:`_storage_problem`)."""
        problem = _storage_problem(ds, path)
        if problem is not None:
            raise UserError(
                f"{self.path}: {problem} ({what}); the archive is incomplete: finish or redo "
                "the export, or make its missing files available"
            )

    def _require_memory(self, nbytes: int, what: str, todo: str, per: str = "") -> None:
        """Raise a UserError when ``nbytes`` exceed the memory available: "``what`` needs 37.3
        GiB``per``, more than the 23.1 GiB available; ``todo``"."""
        avail = _available_memory()
        if nbytes > avail:
            raise UserError(
                f"{self.path}: {what} needs {_gib(nbytes)}{per}, more than the {_gib(avail)} "
                f"available; {todo}"
            )

    def _dataset_list(self, limit: int) -> list[str]:
        names: list[str] = []

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and len(names) < limit + 1:
                names.append("/" + name)

        with contextlib.suppress(*_H5_ERRORS):
            self._f.visititems(visit)
        return names

    def _missing(self, role: str, what: str) -> UserError:
        path = getattr(self.paths, role)
        found = self._dataset_list(6)
        hint = ""
        if found:
            shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
            hint = f" (datasets in the file: {shown})"
        flag = _FLAG.get(role)
        todo = f"pass {flag} with the path of the {what} dataset" if flag else "fix the archive"
        return UserError(f"{self.path}: dataset {path} ({what}) not found{hint}; {todo}")

    def _not_dataset(self, role: str, obj: object, what: str) -> UserError:
        path = getattr(self.paths, role)
        kind = "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"
        flag = _FLAG.get(role)
        todo = f"pass {flag} naming the {what} dataset" if flag else "fix the archive"
        return UserError(f"{self.path}: {path} is {kind}, not a dataset ({what}); {todo}")

    def _check_numeric(
        self,
        ds: h5py.Dataset,
        path: str,
        what: str,
        todo: str = "store frames as uint8, uint16 or float32",
    ) -> np.dtype:
        try:
            dtype = ds.dtype
        except (TypeError, ValueError) as err:
            raise UserError(
                f"{self.path}: dataset {path} ({what}) has an HDF5 type with no NumPy equivalent "
                f"({_short(err)}); {todo}"
            ) from None
        if not _is_numeric(dtype):
            raise UserError(
                f"{self.path}: dataset {path} ({what}) has dtype {dtype}, which is not a plain "
                f"integer or float type; {todo}"
            )
        return dtype

    def _require_frames(self, role: str, what: str) -> h5py.Dataset:
        """Find and check a required 3-D numeric frame stack (LR or HR)."""
        path = getattr(self.paths, role)
        obj = self._lookup(path, what)
        if obj is None:
            raise self._missing(role, what)
        if not isinstance(obj, h5py.Dataset):
            raise self._not_dataset(role, obj, what)
        flag = _FLAG.get(role)
        todo = f"; pass {flag} if this is the wrong dataset" if flag else ""
        if obj.ndim != 3:
            raise UserError(
                f"{self.path}: dataset {path} ({what}) has shape {_shape_str(obj.shape or ())} but "
                f"must be 3-D (frames, height, width){todo}"
            )
        if 0 in obj.shape:
            raise UserError(
                f"{self.path}: dataset {path} ({what}) is empty (shape {_shape_str(obj.shape)}); "
                f"it needs at least one frame of nonzero size{todo}"
            )
        self._check_numeric(obj, path, what)
        self._require_storage(obj, path, what)
        return obj

    def _validate(self, hr_stride: int | None, hr_offset: int) -> None:
        p = self.paths
        self._lr = self._require_frames("lr", "LR frames")
        self._hr = self._require_frames("hr", "HR key frames")
        n, h, w = (int(s) for s in self._lr.shape)
        k, hh, ww = (int(s) for s in self._hr.shape)
        self.n_frames = n
        self.lr_shape = (h, w)
        self.hr_shape = (hh, ww)
        self.lr_dtype = np.dtype(self._lr.dtype)
        self.hr_dtype = np.dtype(self._hr.dtype)

        if hh % h or ww % w or hh // h != ww // w:
            raise UserError(
                f"{self.path}: HR frame size {hh}x{ww} ({p.hr}) is not the same integer multiple "
                f"of the LR frame size {h}x{w} ({p.lr}) on both axes; HR frames must be "
                f"(s*h)x(s*w) for one integer s, check --lr/--hr"
            )
        self.scale = hh // h
        for camera, (fh, fw), path in (("HR", self.hr_shape, p.hr), ("LR", self.lr_shape, p.lr)):
            self._require_memory(
                fh * fw * 4,
                f"{camera} frame {fh}x{fw} float32 ({path})",
                "reconstruct on a machine with more memory, or crop or bin the frames into a "
                "smaller archive",
                per=" per frame",
            )

        if k < 2:
            raise UserError(
                f"{self.path}: dataset {p.hr} has {k} key frame but at least 2 are needed "
                "(each reconstructed frame is bracketed by two key frames); add key frames"
            )
        self._resolve_hr_index(hr_stride, hr_offset, n, k)

        for name in CALIBRATIONS:
            self._calib_ds[name] = self._check_calibration(name)

        self._check_gt()
        self._registration: dict[str, Any] | None = None
        self._registration_problem: str | None = None
        self._read_registration()

    def _read_registration(self) -> None:
        """``/exchange/registration`` (written by ``xvr-batch assemble``): a 2x3 float matrix mapping LR
        pixel (x, y, 1) to the HR/scale grid, with attributes. Malformed: noted, and refused when used."""
        obj = self._lookup(REGISTRATION_PATH, strict=False)
        if obj is None:
            return
        problem = None
        matrix = None
        if not isinstance(obj, h5py.Dataset):
            problem = f"{REGISTRATION_PATH} is not a dataset"
        elif tuple(obj.shape or ()) != (2, 3):
            problem = f"dataset {REGISTRATION_PATH} has shape {_shape_str(obj.shape or ())}, not (2, 3)"
        else:
            try:
                if not _is_numeric(obj.dtype):
                    problem = f"dataset {REGISTRATION_PATH} has non-numeric dtype {_dtype_str(obj)}"
                else:
                    matrix = np.asarray(obj[()], dtype=np.float64)
            except (*_H5_ERRORS, TypeError, ValueError) as err:
                problem = f"dataset {REGISTRATION_PATH} cannot be read ({_short(err)})"
            if matrix is not None and not np.isfinite(matrix).all():
                problem, matrix = f"dataset {REGISTRATION_PATH} holds NaN or Inf", None
        if problem is not None:
            self._registration_problem = problem
            self._notes.append(f"registration ignored: {problem}")
            return
        attrs: dict[str, Any] = {}
        with contextlib.suppress(*_H5_ERRORS, TypeError, ValueError):
            for key, value in obj.attrs.items():
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                elif isinstance(value, np.ndarray):
                    value = value.tolist()
                elif isinstance(value, np.generic):
                    value = value.item()
                attrs[str(key)] = value
        stats = {}
        if isinstance(attrs.get("stats_json"), str):
            with contextlib.suppress(ValueError):
                stats = json.loads(attrs["stats_json"])
        self._registration = {
            "matrix": matrix.tolist(),  # type: ignore[union-attr]
            "lr_shape": list(self.lr_shape),
            "grid_shape": [self.hr_shape[0] // self.scale, self.hr_shape[1] // self.scale],
            "stats": stats if isinstance(stats, dict) else {},
            "attrs": {k: v for k, v in attrs.items() if k != "stats_json"},
        }

    @property
    def registration(self) -> dict[str, Any] | None:
        """The stored LR->grid transform ``{matrix, lr_shape, grid_shape, stats, attrs}``, or None when
        absent. A malformed ``/exchange/registration`` raises :class:`UserError` here."""
        if self._registration_problem is not None:
            raise UserError(
                f"{self.path}: {self._registration_problem}; fix it, re-run xvr-batch assemble, or pass "
                "--registration none or FILE.json"
            )
        return self._registration

    def _resolve_hr_index(self, hr_stride: int | None, hr_offset: int, n: int, k: int) -> None:
        p = self.paths
        if hr_stride is None:
            offset = _as_int(hr_offset, "--hr-offset", self.path)
            if offset != 0:
                raise UserError(
                    f"{self.path}: --hr-offset {offset} was given without --hr-stride; pass "
                    "--hr-stride S too, or drop --hr-offset to use the archive's hr_index"
                )
            self.hr_index = self._read_hr_index_dataset(n, k)
            self.hr_index_source = "dataset"
            self.hr_stride = None
            self.hr_offset = 0
            return

        stride = _as_int(hr_stride, "--hr-stride", self.path)
        offset = _as_int(hr_offset, "--hr-offset", self.path)
        if stride < 1:
            raise UserError(f"{self.path}: --hr-stride must be at least 1, got {stride}")
        if not 0 <= offset < n:
            raise UserError(
                f"{self.path}: --hr-offset {offset} is outside [0, {n}) ({p.lr} has {n} LR "
                f"frames); pass an offset between 0 and {n - 1}"
            )
        index = np.arange(offset, n, stride, dtype=np.int64)
        if len(index) != k:
            shown = ", ".join(str(int(i)) for i in index[:4]) + (", ..." if len(index) > 4 else "")
            raise UserError(
                f"{self.path}: --hr-stride {stride} --hr-offset {offset} implies {len(index)} key "
                f"frames ({shown}) in {n} LR frames, but {p.hr} has {k}; fix "
                "--hr-stride/--hr-offset"
            )
        if p.hr_index and self._lookup(p.hr_index, strict=False) is not None:
            self._notes.append(
                f"{p.hr_index} is ignored because --hr-stride was given"
            )
        self.hr_index = index
        self.hr_index_source = "stride"
        self.hr_stride = stride
        self.hr_offset = offset

    def _read_hr_index_dataset(self, n: int, k: int) -> np.ndarray:
        p = self.paths
        path = p.hr_index
        todo = "fix the archive or pass --hr-stride S [--hr-offset O]"
        obj = self._lookup(path, "key-frame index")
        if obj is None:
            raise UserError(
                f"{self.path}: dataset {path or '(hr_index path disabled)'} not found and no "
                f"key-frame stride given; add {path or '/exchange/hr_index'} (LR index of each "
                "key frame) or pass --hr-stride S [--hr-offset O]"
            )
        if not isinstance(obj, h5py.Dataset):
            kind = "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"
            raise UserError(f"{self.path}: {path} is {kind}, not a dataset; {todo}")
        try:
            dtype = obj.dtype
        except (TypeError, ValueError):
            dtype = np.dtype("V1")
        if dtype.kind not in "iuf" or dtype.fields is not None or dtype.subdtype is not None:
            raise UserError(
                f"{self.path}: dataset {path} has dtype {_dtype_str(obj)} but must hold integer "
                f"LR frame indices; {todo}"
            )
        if obj.ndim != 1:
            raise UserError(
                f"{self.path}: dataset {path} has shape {_shape_str(obj.shape or ())} but must be "
                f"1-D (one LR index per key frame); {todo}"
            )
        if obj.shape[0] != k:
            raise UserError(
                f"{self.path}: dataset {path} has {obj.shape[0]} entries but {p.hr} has {k} key "
                f"frames; they must match one to one; {todo}"
            )
        self._require_storage(obj, path, "key-frame index")
        self._require_memory(k * 32, f"reading the {k} key-frame indices of {path}", todo)
        with self._guard(f"dataset {path}"):
            raw = np.asarray(obj[()])
        if raw.dtype.kind == "f":
            bad = ~np.isfinite(raw) | (raw != np.round(raw))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(
                    f"{self.path}: dataset {path} holds {float(raw[i])!r} at index {i}, which is "
                    f"not a whole number; key-frame indices must be integers; {todo}"
                )
        # Range check in a wide type of the same kind, so huge unsigned values cannot wrap.
        wide = raw.astype({"u": np.uint64, "i": np.int64}.get(raw.dtype.kind, np.float64))
        outside = (wide >= n) if wide.dtype.kind == "u" else (wide < 0) | (wide >= n)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise UserError(
                f"{self.path}: dataset {path} holds {int(wide[i])} at index {i}, outside [0, {n}) "
                f"({p.lr} has {n} LR frames); {todo}"
            )
        values = wide.astype(np.int64)
        steps = np.flatnonzero(np.diff(values) <= 0)
        if steps.size:
            i = int(steps[0]) + 1
            raise UserError(
                f"{self.path}: dataset {path} is not strictly increasing (index {i}: "
                f"{int(values[i])} after {int(values[i - 1])}); {todo}"
            )
        return values

    def _check_calibration(self, name: str) -> h5py.Dataset | None:
        path = getattr(self.paths, name)
        camera = "LR" if name.endswith("_lr") else "HR"
        frame = self.lr_shape if camera == "LR" else self.hr_shape
        what = f"{camera} {'dark' if name.startswith('dark') else 'flat'} frames"
        obj = self._lookup(path, what)
        if obj is None:
            return None
        todo = "fix or remove it"
        if not isinstance(obj, h5py.Dataset):
            kind = "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"
            raise UserError(f"{self.path}: {path} ({what}) is {kind}, not a dataset; {todo}")
        shape = tuple(int(s) for s in (obj.shape or ()))
        ok = (len(shape) == 3 and shape[1:] == frame) or (len(shape) == 2 and shape == frame)
        if not ok:
            raise UserError(
                f"{self.path}: calibration dataset {path} ({what}) has shape {_shape_str(shape)} "
                f"but must be (n, {frame[0]}, {frame[1]}) to match the {camera} frames; {todo}"
            )
        if len(shape) == 3 and shape[0] == 0:
            raise UserError(
                f"{self.path}: calibration dataset {path} ({what}) has no frames; {todo}"
            )
        self._check_numeric(obj, path, what, todo)
        self._require_storage(obj, path, what)
        return obj

    def _check_gt(self) -> None:
        path = self.paths.gt
        obj = self._lookup(path, strict=False)
        if obj is None:
            broken = _link_problem(self._f, path) if path else None
            if broken is not None:
                self._gt_problem = broken
                self._notes.append(f"ground truth ignored: {broken}")
            return
        expected = (self.n_frames, *self.hr_shape)
        problem: str | None = None
        if not isinstance(obj, h5py.Dataset):
            problem = f"{path} is not a dataset"
        else:
            try:
                dtype_ok = _is_numeric(obj.dtype)
            except (TypeError, ValueError):
                dtype_ok = False
            if tuple(int(s) for s in (obj.shape or ())) != expected:
                problem = (
                    f"dataset {path} has shape {_shape_str(obj.shape or ())} but must be "
                    f"{_shape_str(expected)} (N LR frames at HR size)"
                )
            elif not dtype_ok:
                problem = f"dataset {path} has non-numeric dtype {_dtype_str(obj)}"
            else:
                problem = _storage_problem(obj, path)
        if problem is None:
            self._gt_ds = obj
            self._has_gt = True
        else:
            self._gt_problem = problem
            self._notes.append(f"ground truth ignored: {problem}")

    def _read_block(
        self, ds: h5py.Dataset, path: str, start: int, stop: int, label: str = "frame"
    ) -> np.ndarray:
        """Frames ``start:stop`` of ``ds`` as float32, checked for NaN/Inf on float data."""
        with self._guard(f"frames {start}..{stop - 1} of dataset {path}"):
            raw = ds[start:stop]
        out = np.asarray(raw, dtype=np.float32)
        if ds.dtype.kind == "f" and out.size:
            bad = _first_bad_frame(out)
            if bad is not None:
                raise UserError(
                    f"{self.path}: dataset {path} {label} {start + bad} contains NaN or Inf; fix "
                    "the archive (frames with NaN/Inf cannot be normalised or reconstructed)"
                )
        return out

    def _check_range(self, start: int, stop: int, n: int, what: str) -> tuple[int, int]:
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{what} frame range [{start}, {stop}) is outside [0, {n}]")
        return start, stop

    # ---------------------------------------------------------------- reads

    def read_lr(self, start: int, stop: int) -> np.ndarray:
        """LR frames ``start:stop`` as float32 ``(stop - start, h, w)`` raw counts."""
        start, stop = self._check_range(start, stop, self.n_frames, "LR")
        return self._read_block(self._lr, self.paths.lr, start, stop)

    def read_lr_at(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """LR frames at ``indices`` (any order, repeats allowed) as float32 ``(len, h, w)``.

        Each distinct frame is read once; contiguous runs are read as one slice.
        """
        idx = np.asarray(indices)
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if idx.size == 0:
            return np.empty((0, *self.lr_shape), dtype=np.float32)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64)
        if idx.min() < 0 or idx.max() >= self.n_frames:
            raise IndexError(
                f"LR frame indices {int(idx.min())}..{int(idx.max())} outside [0, {self.n_frames})"
            )
        uniq, inverse = np.unique(idx, return_inverse=True)
        frames = np.empty((len(uniq), *self.lr_shape), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(uniq)]):
            a, b = int(uniq[lo]), int(uniq[hi - 1]) + 1
            frames[lo:hi] = self._read_block(self._lr, self.paths.lr, a, b)
        return frames[inverse.reshape(-1)]

    def read_hr(self, k: int) -> np.ndarray:
        """Key frame number ``k`` (0..K-1, at LR time ``hr_index[k]``) as float32 ``(H, W)``."""
        k = int(k)
        if not 0 <= k < len(self.hr_index):
            raise IndexError(f"key frame {k} outside [0, {len(self.hr_index)})")
        return self._read_block(self._hr, self.paths.hr, k, k + 1, label="key frame")[0]

    def read_hr_all(self) -> np.ndarray:
        """All key frames as float32 ``(K, H, W)``."""
        return self._read_block(self._hr, self.paths.hr, 0, len(self.hr_index), label="key frame")

    def calibration(self, name: str) -> np.ndarray | None:
        """Mean over frames of a dark/flat dataset, float32 ``(h, w)`` or ``(H, W)``.

        ``name`` is one of :data:`CALIBRATIONS`. Returns None when the dataset is absent. The
        result is computed once (streaming, in float64) and cached; the returned array is
        read-only, copy it before modifying.
        """
        if name not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {name!r}; expected one of {CALIBRATIONS}")
        if name in self._calib_cache:
            return self._calib_cache[name]
        ds = self._calib_ds.get(name)
        mean: np.ndarray | None = None
        if ds is not None:
            path = getattr(self.paths, name)
            if ds.ndim == 2:
                mean = self._read_block_2d(ds, path)
            else:
                n = int(ds.shape[0])
                acc = np.zeros(ds.shape[1:], dtype=np.float64)
                step = max(1, min(n, (64 * 2**20) // max(1, 8 * int(np.prod(ds.shape[1:])))))
                for a in range(0, n, step):
                    b = min(n, a + step)
                    block = self._read_block(ds, path, a, b)
                    acc += block.sum(axis=0, dtype=np.float64)
                mean = (acc / n).astype(np.float32)
            mean.flags.writeable = False
        self._calib_cache[name] = mean
        return mean

    def _read_block_2d(self, ds: h5py.Dataset, path: str) -> np.ndarray:
        with self._guard(f"dataset {path}"):
            raw = ds[()]
        out = np.asarray(raw, dtype=np.float32)
        if ds.dtype.kind == "f" and not np.isfinite(out).all():
            raise UserError(f"{self.path}: dataset {path} contains NaN or Inf; fix or remove it")
        return out

    @property
    def has_gt(self) -> bool:
        """True when a valid ``(N, H, W)`` ground-truth dataset is present."""
        return self._has_gt

    def read_gt(self, start: int, stop: int) -> np.ndarray:
        """Ground-truth frames ``start:stop`` as float32 ``(stop - start, H, W)``."""
        if not self._has_gt:
            gt_path = self.paths.gt or "(gt path disabled)"
            reason = self._gt_problem or f"dataset {gt_path} not found"
            raise UserError(
                f"{self.path}: no usable ground truth ({reason}); add a (N, H, W) dataset at "
                f"{self.paths.gt or '/exchange/data_gt'} to evaluate"
            )
        start, stop = self._check_range(start, stop, self.n_frames, "ground-truth")
        return self._read_block(self._gt_ds, self.paths.gt, start, stop)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- checks and summaries

    def _used_datasets(self) -> list[tuple[str, str, h5py.Dataset]]:
        """(role, path, dataset) for every dataset reconstruction reads (gt excluded)."""
        used = [("lr", self.paths.lr, self._lr), ("hr", self.paths.hr, self._hr)]
        for name in CALIBRATIONS:
            ds = self._calib_ds.get(name)
            if ds is not None:
                used.append((name, getattr(self.paths, name), ds))
        return used

    def check_finite(self, block_frames: int = 64) -> None:
        """Stream every float dataset that reconstruction reads (LR, HR, calibrations) and raise
        :class:`UserError` naming the dataset and the first frame with NaN or Inf.

        Integer datasets cannot hold NaN/Inf and are skipped without reading.
        """
        block_frames = int(block_frames)
        if block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {block_frames}")
        for _role, path, ds in self._used_datasets():
            if ds.dtype.kind != "f":
                continue
            if ds.ndim == 2:
                self._read_block_2d(ds, path)
                continue
            step = block_frames
            if ds.chunks and ds.chunks[0] > 1:  # whole chunks per block: each is decoded once
                c = int(ds.chunks[0])
                step = max(c, (block_frames // c) * c)
            n = int(ds.shape[0])
            for a in range(0, n, step):
                self._read_block(ds, path, a, min(n, a + step))

    def fingerprint(self) -> str:
        """SHA-256 hex digest identifying the archive's content, cheap for any archive size.

        It covers:

        * the recipe version (:data:`FINGERPRINT_VERSION`);
        * path, shape and dtype (including byte order) of every dataset reconstruction reads:
          LR, HR, the ``hr_index`` dataset when it is the source of the key frames, and the
          calibration datasets present;
        * the key-frame indices (``hr_index`` values, however they were obtained);
        * the raw bytes (little-endian) of a deterministic sample of frames: the first, last and
          evenly spaced LR frames (:data:`FINGERPRINT_LR_SAMPLES` in all, fewer if N is smaller),
          the first and last HR key frame, and the first and last frame of each calibration.

        It does not cover the file's name, location, size, mtime, chunking or compression (so a
        copied or recompressed archive keeps its fingerprint), the ground truth (only
        ``evaluate`` reads it), or frames outside the sample: an edit to an unsampled frame that
        keeps shapes and dtypes goes undetected.
        """
        used = self._used_datasets()
        header: dict[str, Any] = {
            "version": FINGERPRINT_VERSION,
            "datasets": [
                {"role": role, "path": path, "shape": list(ds.shape), "dtype": ds.dtype.str}
                for role, path, ds in used
            ],
            "hr_index_dataset": self.paths.hr_index if self.hr_index_source == "dataset" else None,
            "n_key_frames": int(len(self.hr_index)),
        }
        h = hashlib.sha256()
        h.update(json.dumps(header, sort_keys=True).encode())
        h.update(_canonical_bytes(self.hr_index.astype(np.int64)))

        def sample(role: str, path: str, ds: h5py.Dataset, rows: Sequence[int]) -> None:
            for i in rows:
                h.update(f"\n{role}:{int(i)}\n".encode())
                with self._guard(f"frame {int(i)} of dataset {path}"):
                    h.update(_canonical_bytes(np.asarray(ds[int(i)])))

        n = self.n_frames
        lr_rows = np.unique(np.linspace(0, n - 1, FINGERPRINT_LR_SAMPLES).round().astype(np.int64))
        for role, path, ds in used:
            if role == "lr":
                sample(role, path, ds, lr_rows.tolist())
            elif ds.ndim == 2:
                h.update(f"\n{role}:all\n".encode())
                with self._guard(f"dataset {path}"):
                    h.update(_canonical_bytes(np.asarray(ds[()])))
            else:
                last = int(ds.shape[0]) - 1
                sample(role, path, ds, sorted({0, last}))
        return h.hexdigest()

    def _timing_summary(self) -> dict[str, Any] | None:
        """``/exchange/timing`` (written by ``assemble``): the clock match of the key frames, or None."""
        grp = self._lookup("/exchange/timing", strict=False)
        if not isinstance(grp, h5py.Group):
            return None
        out: dict[str, Any] = {}
        with contextlib.suppress(*_H5_ERRORS, TypeError, ValueError):
            res = grp.get("match_residual")
            if isinstance(res, h5py.Dataset) and res.ndim == 1 and res.shape[0] <= 10**7:
                r = np.asarray(res[()], dtype=np.float64)
                if r.size and np.isfinite(r).all():
                    out["max_abs_residual_s"] = float(np.abs(r).max())
                    out["rms_residual_s"] = float(np.sqrt(np.mean(r * r)))
            for key, value in grp.attrs.items():
                out[str(key)] = value.item() if isinstance(value, np.generic) else (
                    value.decode() if isinstance(value, bytes) else value)
        return out

    def _all_datasets(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def visit(name: str, obj: object) -> None:
            if not isinstance(obj, h5py.Dataset):
                return
            filters = _filters(obj)
            found.append(
                {
                    "path": "/" + name,
                    "shape": [int(s) for s in (obj.shape or ())],
                    "dtype": _dtype_str(obj),
                    "chunks": list(obj.chunks) if obj.chunks else None,
                    "compression": _compression(filters),
                    "filters": filters,
                }
            )

        with self._guard("the list of datasets"):
            self._f.visititems(visit)
        return found

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable summary for ``xvr-batch inspect``.

        Keys: ``file``, ``size_bytes``, ``datasets`` (every dataset in the file: path, shape,
        dtype, chunks, compression, filters), ``paths``, ``n_frames``, ``lr_shape``,
        ``hr_shape``, ``scale``, ``lr_dtype``, ``hr_dtype``, ``n_key_frames``,
        ``hr_index_source``, ``hr_stride``, ``hr_offset``, ``key_frames`` (first, last, gap_min,
        gap_median, gap_max, regular, frames_before_first, frames_after_last), ``calibrations``
        (name -> {path, n_frames} or None), ``has_gt`` and ``warnings`` (list of strings).
        """
        idx = self.hr_index
        gaps = np.diff(idx)
        n = self.n_frames
        key = {
            "first": int(idx[0]),
            "last": int(idx[-1]),
            "gap_min": int(gaps.min()),
            "gap_median": float(np.median(gaps)),
            "gap_max": int(gaps.max()),
            "regular": bool(gaps.min() == gaps.max()),
            "frames_before_first": int(idx[0]),
            "frames_after_last": int(n - 1 - idx[-1]),
        }
        calibrations: dict[str, dict[str, Any] | None] = {}
        for name in CALIBRATIONS:
            ds = self._calib_ds.get(name)
            calibrations[name] = (
                None
                if ds is None
                else {
                    "path": getattr(self.paths, name),
                    "n_frames": int(ds.shape[0]) if ds.ndim == 3 else 1,
                }
            )

        warnings: list[str] = []
        if not key["regular"]:
            warnings.append(
                f"key-frame spacing is irregular (gaps from {key['gap_min']} to "
                f"{key['gap_max']} frames)"
            )
        if key["gap_max"] > LARGE_KEY_GAP:
            warnings.append(
                f"largest key-frame gap is {key['gap_max']} frames (> {LARGE_KEY_GAP}); quality "
                "drops far from key frames (the model is trained with key frames at most 20 "
                "frames away)"
            )
        if key["frames_before_first"]:
            warnings.append(
                f"{key['frames_before_first']} LR frames lie before the first key frame "
                f"(index {key['first']}) and have no key frame before them"
            )
        if key["frames_after_last"]:
            warnings.append(
                f"{key['frames_after_last']} LR frames lie after the last key frame "
                f"(index {key['last']}) and have no key frame after them"
            )
        missing = [getattr(self.paths, c) or c for c in CALIBRATIONS if calibrations[c] is None]
        if len(missing) == len(CALIBRATIONS):
            warnings.append("no darks/flats found; intensities are not flat-field corrected")
        elif missing:
            warnings.append(f"missing darks/flats: {', '.join(missing)}")
        if self.scale != DEFAULT_MODEL_SCALE:
            warnings.append(
                f"HR/LR scale is {self.scale}; the default model upsamples by {DEFAULT_MODEL_SCALE}"
            )
        lr_chunks = self._lr.chunks
        if lr_chunks and lr_chunks[0] > 64:
            warnings.append(
                f"{self.paths.lr} is chunked with {lr_chunks[0]} frames per chunk; reading a few "
                "frames decodes whole chunks (rechunk to 1-16 frames per chunk for speed)"
            )
        warnings.extend(self._notes)

        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = None
        return {
            "file": self.path,
            "size_bytes": size,
            "datasets": self._all_datasets(),
            "paths": self.paths.to_dict(),
            "n_frames": n,
            "lr_shape": list(self.lr_shape),
            "hr_shape": list(self.hr_shape),
            "scale": self.scale,
            "lr_dtype": str(self.lr_dtype),
            "hr_dtype": str(self.hr_dtype),
            "n_key_frames": int(len(idx)),
            "hr_index_source": self.hr_index_source,
            "hr_stride": self.hr_stride,
            "hr_offset": self.hr_offset,
            "key_frames": key,
            "calibrations": calibrations,
            "has_gt": self.has_gt,
            "registration": self._registration,
            "timing": self._timing_summary(),
            "warnings": warnings,
        }


def inspect_file(
    path: str | os.PathLike[str],
    paths: ArchivePaths = ArchivePaths(),
    hr_stride: int | None = None,
    hr_offset: int = 0,
    wait_for_writer: float | None = None,
) -> dict[str, Any]:
    """Open, validate and :meth:`~Archive.describe` an archive; raises :class:`UserError`.

    ``wait_for_writer``: as for :class:`Archive` (None refuses a file being written at once).
    """
    with Archive(
        path, paths=paths, hr_stride=hr_stride, hr_offset=hr_offset, wait_for_writer=wait_for_writer
    ) as archive:
        return archive.describe()
