"""Part files: one small HDF5 file per finished work unit.

Layout of a part::

    /data          (n, H, W) the unit's own output frames, exactly as computed (dtype kept),
                   contiguous and uncompressed (parts are short-lived; speed matters more)
    attrs start    first frame index of the unit in the output (int)
    attrs stop     start + n (int)
    attrs ...      caller's provenance; scalars as they are, anything else as a JSON string

Crash-safety guarantees:

* A part under its final name is complete. :func:`write_part` writes ``PATH.tmp-PID`` in the
  same directory, closes it, fsyncs it, renames it over ``PATH`` with :func:`os.replace` and
  fsyncs the directory. A crash leaves at worst a ``.tmp-PID`` file, never a half-written part.
* The sha256 returned by :func:`write_part` is computed from the bytes on disk after the file was
  closed, so it is what :func:`verify_part` will see later. The caller records it in the journal
  (:meth:`xvr_batch.workdir.WorkDir.record_done`) only after this function returns.
* Writing the same frames and attrs again gives the same bytes (HDF5 timestamps are off), so a
  redone unit has the same checksum.
* :func:`read_part` raises :class:`~xvr_batch.errors.UserError` on any damaged part, so that a
  corrupt part is reported with its path rather than as an HDF5 traceback.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, Optional, Tuple, Union

import h5py
import numpy as np

from xvr_batch.errors import UserError
from xvr_batch.workdir import fsync_dir, sha256_file

__all__ = ["StreamingPart", "write_part", "read_part", "verify_part", "read_part_attrs"]

PathLike = Union[str, "os.PathLike[str]"]

_RESERVED_ATTRS = frozenset({"start", "stop"})


def _h5open(path: PathLike, mode: str) -> h5py.File:
    """Open without HDF5 file locking: parts are private to one writer, and some parallel
    filesystems refuse HDF5's locks."""
    try:
        return h5py.File(path, mode, locking=False)
    except (TypeError, ValueError):  # pragma: no cover - old h5py/HDF5 without the option
        return h5py.File(path, mode)


def _attr_value(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value)
    if isinstance(value, (int, float, str, bytes, np.integer, np.floating)):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value[()]
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class StreamingPart:
    """A part written frame by frame, so that a unit never holds all its frames in memory.

    Frames go into ``PATH.tmp-PID``; :meth:`commit` closes, fsyncs, hashes and renames it to ``PATH``
    (the same guarantees as :func:`write_part`); :meth:`abort` removes the temporary file."""

    def __init__(self, path: PathLike, start: int, n: int, frame_shape: Tuple[int, int], dtype: Any,
                 attrs: Optional[Dict[str, Any]] = None):
        self.path = pathlib.Path(path)
        start = int(start)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        attrs = dict(attrs or {})
        clash = _RESERVED_ATTRS.intersection(attrs)
        if clash:
            raise ValueError(f"attrs may not set {sorted(clash)}")
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._fh: Optional[h5py.File] = _h5open(self.tmp, "w")
        try:
            self._ds = self._fh.create_dataset("data", shape=(int(n), *frame_shape), dtype=np.dtype(dtype),
                                               track_times=False)
            self._fh.attrs["start"] = np.int64(start)
            self._fh.attrs["stop"] = np.int64(start + int(n))
            for key in sorted(attrs):
                self._fh.attrs[key] = _attr_value(attrs[key])
        except BaseException:
            self.abort()
            raise

    def write(self, i: int, frame: np.ndarray) -> None:
        self._ds[i] = frame

    def write_all(self, frames: np.ndarray) -> None:
        self._ds[...] = frames

    def commit(self) -> str:
        """Make the part durable under its final name; return the sha256 of its bytes."""
        try:
            assert self._fh is not None, "part already closed"
            self._fh.close()
            self._fh = None
            fd = os.open(self.tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            sha = sha256_file(self.tmp)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        return sha

    def abort(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:
                pass
            self._fh = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


def write_part(
    path: PathLike, start: int, frames: np.ndarray, attrs: Optional[Dict[str, Any]] = None
) -> str:
    """Write ``frames`` (n, H, W) of the unit starting at ``start`` to ``path``; return its sha256.

    The file appears under ``path`` only once it is complete and durable (see the module
    docstring). Raises ``ValueError`` for bad arguments and ``OSError`` if the disk fails.
    """
    frames = np.ascontiguousarray(np.asarray(frames))
    if frames.ndim != 3:
        raise ValueError(f"frames must be (n, H, W), got shape {frames.shape}")
    part = StreamingPart(path, start, frames.shape[0], frames.shape[1:], frames.dtype, attrs)
    try:
        part.write_all(frames)
    except BaseException:
        part.abort()
        raise
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
