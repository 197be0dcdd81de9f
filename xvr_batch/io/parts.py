"""Part files: one small HDF5 file per finished work unit.

Layout of a part::

    /data          (n, H, W) the unit's own output frames, exactly as computed (dtype kept), chunks
                   (1, H, W) compressed with the output's codec (``compression``; "none" by default),
                   so that the stitch copies the chunks into the output without decoding them
    /lr_consistency  (n,) float32 per-frame LR consistency of those frames (:mod:`xvr_batch.consistency`),
                   written by :meth:`StreamingPart.write_vector` just before the commit; parts of older
                   releases lack it (the stitch then stores NaN for their frames)
    attrs start    first frame index of the unit in the output (int)
    attrs stop     start + n (int)
    attrs ...      caller's provenance; scalars as they are, anything else as a JSON string

Crash-safety guarantees:

* A part under its final name is complete. :class:`StreamingPart` and :func:`write_part` write
  ``.NAME.tmp-PID-HOST-RANDOM`` in the same directory (:class:`xvr_batch.durable.AtomicH5File`),
  flush and close it, fsync it, rename it over ``PATH`` and fsync the directory. A crash leaves at
  worst a temporary file, never a half-written part.
* A full disk at any moment (first frame, flush, close, fsync, rename) closes the HDF5 file
  safely, removes the temporary file and raises :class:`xvr_batch.durable.DiskFullError` (an
  ``OSError`` with errno ENOSPC); other write failures also remove the temporary file.
* The sha256 returned by :meth:`StreamingPart.commit` / :func:`write_part` is computed from the
  bytes on disk after the file was closed, so it is what :func:`verify_part` will see later. The
  caller records it in the journal (:meth:`xvr_batch.workdir.WorkDir.record_done`) only after
  this returns.
* Writing the same frames and attrs again gives the same bytes (HDF5 timestamps are off, chunks are
  written in frame order), so a redone unit has the same checksum.
* :func:`remember_verified` / :func:`known_sha256`: a process remembers the sha256 of the parts it
  committed (or verified) together with their inode, size and change times, so that it never hashes
  the same unchanged part twice (``finalise`` relies on it).
* :func:`read_part` raises :class:`~xvr_batch.errors.UserError` on any damaged part, so that a
  corrupt part is reported with its path rather than as an HDF5 traceback.
"""

from __future__ import annotations

import os
import pathlib
import threading
import stat
from typing import Any, Dict, Optional, Tuple, Union

import h5py
import numpy as np

from xvr_batch.durable import AtomicH5File, canonical_json, sha256_file
from xvr_batch.errors import UserError

__all__ = ["StreamingPart", "write_part", "read_part", "verify_part", "read_part_attrs", "remember_verified",
           "known_sha256"]

PathLike = Union[str, "os.PathLike[str]"]

_RESERVED_ATTRS = frozenset({"start", "stop"})


def _h5open(path: PathLike, mode: str) -> h5py.File:
    """Open without HDF5 file locking: parts are private to one writer, and some parallel
    filesystems refuse HDF5's locks."""
    return h5py.File(path, mode, locking=False)


def _attr_value(value: Any) -> Any:
    """An attribute value: scalars as they are, anything else as canonical JSON text."""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, str, bytes, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return canonical_json(value)


_known_lock = threading.Lock()
_known: Dict[str, Tuple[str, Tuple[int, ...]]] = {}


def _signature(path: PathLike) -> Optional[Tuple[int, ...]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def remember_verified(path: PathLike, sha256: str) -> None:
    """Remember that ``path``, as it is now (inode, size, mtime, ctime), has ``sha256``."""
    sig = _signature(path)
    if sig is not None:
        with _known_lock:
            _known[os.path.abspath(os.fspath(path))] = (str(sha256).lower(), sig)


def known_sha256(path: PathLike) -> Optional[str]:
    """The sha256 this process computed for ``path`` if the file has not changed since; else None."""
    key = os.path.abspath(os.fspath(path))
    with _known_lock:
        entry = _known.get(key)
    if entry is None:
        return None
    return entry[0] if _signature(path) == entry[1] else None


class StreamingPart:
    """A part written frame by frame, so that a unit never holds all its frames in memory.

    Frames go into a temporary file beside ``PATH``; :meth:`commit` closes, fsyncs, hashes and
    renames it to ``PATH`` (replacing an older part); :meth:`abort` removes the temporary file.
    Every method that fails has already aborted; a full disk raises
    :class:`~xvr_batch.durable.DiskFullError`."""

    def __init__(self, path: PathLike, start: int, n: int, frame_shape: Tuple[int, int], dtype: Any,
                 attrs: Optional[Dict[str, Any]] = None, compression: str = "none"):
        self.path = pathlib.Path(path)
        start = int(start)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        attrs = dict(attrs or {})
        clash = _RESERVED_ATTRS.intersection(attrs)
        if clash:
            raise ValueError(f"attrs may not set {sorted(clash)}")
        values = {key: _attr_value(attrs[key]) for key in sorted(attrs)}  # bad values fail here
        from xvr_batch.io.output import ChunkCodec, compression_kwargs

        self.n, self.frame_shape, self.dtype = int(n), tuple(int(v) for v in frame_shape), np.dtype(dtype)
        kwargs = compression_kwargs(compression)
        self.codec = ChunkCodec.for_compression(compression, self.dtype, self.frame_shape) if self.n else None
        self._out: Optional[AtomicH5File] = AtomicH5File(self.path, overwrite=True, locking=False)
        self.tmp = self._out.tmp
        fh = self._out.file
        try:
            chunked = dict(chunks=(1, *self.frame_shape), **kwargs) if self.n and all(self.frame_shape) else {}
            self._ds = fh.create_dataset("data", shape=(self.n, *self.frame_shape), dtype=self.dtype,
                                         track_times=False, **chunked)
            fh.attrs["start"] = np.int64(start)
            fh.attrs["stop"] = np.int64(start + int(n))
            for key, value in values.items():
                fh.attrs[key] = value
        except BaseException as exc:
            raise self._fail(exc) from exc

    def _fail(self, exc: BaseException) -> BaseException:
        out, self._out = self._out, None
        return exc if out is None else out.fail(exc)

    def _live(self) -> AtomicH5File:
        if self._out is None:
            raise ValueError(f"part {self.path} is already committed or aborted")
        return self._out

    def write(self, i: int, frame: np.ndarray) -> None:
        """Write frame ``i`` of the unit (0-based within the part), encoding it in this thread."""
        self._live()
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise ValueError(f"frame shape {frame.shape} != {self.frame_shape}")
        if self.codec is None or self._ds.chunks is None:
            try:
                self._ds[i] = frame
            except BaseException as exc:
                raise self._fail(exc) from exc
            return
        data, mask = self.codec.encode(frame.astype(self.dtype, copy=False))
        self.write_chunk(i, data, mask)

    def write_chunk(self, i: int, data: bytes, filter_mask: int = 0) -> None:
        """Store frame ``i`` already encoded by :attr:`codec` (``write_direct_chunk``; thread: one writer)."""
        self._live()
        if not 0 <= int(i) < self.n:
            raise IndexError(f"frame {i} outside the part's {self.n} frames")
        try:
            self._ds.id.write_direct_chunk((int(i), 0, 0), data, int(filter_mask))
        except BaseException as exc:
            raise self._fail(exc) from exc

    def write_vector(self, name: str, values: np.ndarray, attrs: Optional[Dict[str, Any]] = None) -> None:
        """Store a small per-frame dataset ``name`` ((n,), contiguous, uncompressed; e.g. ``lr_consistency``)
        beside ``data``; call it once per name, before :meth:`commit` (the same calls give the same bytes)."""
        self._live()
        values = np.ascontiguousarray(np.asarray(values))
        if values.shape[:1] != (self.n,) or name == "data":
            raise ValueError(f"{name}: shape {values.shape} does not hold one value per frame ({self.n})")
        try:
            ds = self._out.file.create_dataset(name, data=values, track_times=False)
            for key in sorted(attrs or {}):
                ds.attrs[key] = _attr_value(attrs[key])
        except BaseException as exc:
            raise self._fail(exc) from exc

    def write_all(self, frames: np.ndarray) -> None:
        """Write all frames at once."""
        self._live()
        frames = np.asarray(frames)
        if frames.shape != (self.n, *self.frame_shape):
            raise ValueError(f"frames shape {frames.shape} != {(self.n, *self.frame_shape)}")
        for i in range(self.n):
            self.write(i, frames[i])

    def commit(self) -> str:
        """Make the part durable under its final name; return the sha256 of its bytes."""
        out = self._live()
        self._out = None
        out.close()  # on failure it has aborted and raises
        try:
            sha = sha256_file(out.tmp)
        except BaseException as exc:
            raise out.fail(exc) from exc
        out.publish()
        remember_verified(self.path, sha)
        return sha

    def abort(self) -> None:
        """Remove the temporary file (idempotent; also fine after a failure or a commit)."""
        out, self._out = self._out, None
        if out is not None:
            out.abort()


def write_part(
    path: PathLike, start: int, frames: np.ndarray, attrs: Optional[Dict[str, Any]] = None,
    compression: str = "none",
) -> str:
    """Write ``frames`` (n, H, W) of the unit starting at ``start`` to ``path``; return its sha256.

    The file appears under ``path`` only once it is complete and durable (see the module
    docstring). Raises ``ValueError`` for bad arguments, ``TypeError`` for attrs that JSON cannot
    hold, :class:`~xvr_batch.durable.DiskFullError` on a full disk and ``OSError`` if the disk fails.
    """
    frames = np.ascontiguousarray(np.asarray(frames))
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, H, W), got shape {frames.shape}")
    part = StreamingPart(path, start, frames.shape[0], frames.shape[1:], frames.dtype, attrs, compression)
    part.write_all(frames)
    return part.commit()


def _corrupt(path: pathlib.Path, why: str) -> UserError:
    return UserError(
        f"part {path} is unreadable or corrupt ({why}); delete it and resume: the unit is redone"
    )


def read_part(path: PathLike) -> Tuple[int, np.ndarray]:
    """Return ``(start, frames)`` of a part. :class:`UserError` if it is missing or damaged."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"part {path} does not exist; resume the run to recompute it")
    try:
        with _h5open(path, "r") as fh:
            ds = fh.get("data")
            if not isinstance(ds, h5py.Dataset):
                raise _corrupt(path, "no dataset 'data'")
            if ds.ndim != 3:
                raise _corrupt(path, f"'data' has shape {ds.shape}, expected (n, H, W)")
            start, stop = fh.attrs.get("start"), fh.attrs.get("stop")
            frames = ds[()]
    except UserError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _corrupt(path, " ".join(str(exc).split())[:200] or type(exc).__name__) from None
    try:
        start_i, stop_i = int(start), int(stop)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _corrupt(path, "missing start/stop attributes") from None
    if start_i < 0 or stop_i - start_i != frames.shape[0]:
        raise _corrupt(
            path, f"start={start_i}, stop={stop_i} do not match {frames.shape[0]} frames"
        )
    return start_i, frames


def read_part_attrs(path: PathLike) -> Dict[str, Any]:
    """The root attributes of a part (JSON strings are left as strings). UserError if damaged."""
    path = pathlib.Path(path)
    try:
        with _h5open(path, "r") as fh:
            return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in fh.attrs.items()}
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _corrupt(path, " ".join(str(exc).split())[:200] or type(exc).__name__) from None


def verify_part(path: PathLike, sha256: str) -> bool:
    """True if ``path`` exists and its bytes on disk have the given sha256."""
    try:
        return sha256_file(path) == str(sha256).lower()
    except OSError:
        return False
