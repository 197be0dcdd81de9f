"""Frame sources for ``xvr-batch assemble``: HDF5 datasets, TIFF files (folders, globs, multi-page) and
Photron .mraw (pyMRAW), and per-frame timestamps (datasets or text/CSV sidecars).

``SRC`` is one of

* ``FILE.h5:/path/to/dataset`` (any HDF5 file; checked as the archive reader checks its inputs: no live
  writer, virtual sources and external links resolve, no unwritten chunks);
* a folder of ``*.tif``/``*.tiff`` files, or a glob (``'run/*.tif'``), one frame per file, sorted by name;
* a (multi-page) TIFF file (needs ``tifffile``);
* a Photron ``.cih``/``.cihx`` file, or its ``.mraw`` (needs ``pyMRAW``).

Every problem is a one-line :class:`~xvr_batch.errors.UserError` naming the source.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
from typing import Any

import h5py
import numpy as np

from xvr_batch.errors import UserError

__all__ = ["FrameSource", "open_source", "read_times"]

_H5_RE = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|nxs|nx5|he5)):(?P<ds>/.*)$", re.IGNORECASE)
_TIFF_EXT = (".tif", ".tiff")


def _need(module: str, extra: str, src: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{src}: reading this source needs the optional package {module!r}; install it with "
                        f"pip install 'xvr_batch[{extra}]'") from None


class FrameSource:
    """A stack of frames ``(n, h, w)`` read lazily by block (:meth:`read`)."""

    def __init__(self, src: str, kind: str, shape: tuple[int, ...], dtype: np.dtype, reader, h5: tuple | None = None,
                 closer=None):
        self.src, self.kind, self.shape, self.dtype = src, kind, tuple(int(v) for v in shape), np.dtype(dtype)
        self._reader, self.h5, self._closer = reader, h5, closer

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            out = np.asarray(self._reader(int(start), int(stop)))
        except UserError:
            raise
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise UserError(f"{self.src}: cannot read frames {start}..{stop - 1} ({str(exc).splitlines()[0]}); "
                            "the source is truncated or corrupt") from None
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise UserError(f"{self.src}: frames {start}..{stop - 1} hold NaN or Inf; fix the source")
        return out

    def mean(self) -> np.ndarray:
        acc = np.zeros(self.shape[1:], np.float64)
        for a in range(0, self.shape[0], 16):
            acc += self.read(a, min(self.shape[0], a + 16)).astype(np.float64).sum(axis=0)
        return (acc / self.shape[0]).astype(np.float32)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None


def _as_frames(shape, src: str, what: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3 or 0 in shape:
        raise UserError(f"{src}: {what} has shape {shape}; expected frames (n, height, width)")
    return shape


def _open_hdf5(src: str, fname: str, dsname: str, what: str) -> FrameSource:
    from xvr_batch.io.archive import _is_numeric, _link_problem, _open_h5, _storage_problem

    f = _open_h5(fname)  # refuses live writers, truncated and non-HDF5 files (one-line UserError)
    try:
        obj = f.get(dsname)
        if obj is None:
            why = _link_problem(f, dsname)
            raise UserError(f"{src}: " + (why if why else f"no dataset {dsname} in {fname}") + f" ({what})")
        if not isinstance(obj, h5py.Dataset):
            raise UserError(f"{src}: {dsname} is not a dataset ({what})")
        if not _is_numeric(obj.dtype):
            raise UserError(f"{src}: dataset {dsname} has dtype {obj.dtype}, not integer or float ({what})")
        problem = _storage_problem(obj, dsname)
        if problem:
            raise UserError(f"{src}: {problem} ({what}); the source is incomplete")
    except BaseException:
        f.close()
        raise
    ds = obj
    if ds.ndim == 1:
        return FrameSource(src, "hdf5", ds.shape, ds.dtype, lambda a, b: ds[a:b], h5=(os.path.abspath(fname), dsname),
                           closer=f.close)
    shape = _as_frames(ds.shape, src, what)
    if ds.ndim == 2:
        return FrameSource(src, "hdf5", shape, ds.dtype, lambda a, b: ds[()][None][a:b], closer=f.close)
    return FrameSource(src, "hdf5", shape, ds.dtype, lambda a, b: ds[a:b], h5=(os.path.abspath(fname), dsname),
                       closer=f.close)


def _open_tiff_files(src: str, files: list[str], what: str) -> FrameSource:
    tifffile = _need("tifffile", "cameras", src)
    try:
        first = tifffile.imread(files[0])
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for bad files
        raise UserError(f"{src}: {files[0]} is not a readable TIFF ({exc})") from None
    if first.ndim != 2:
        raise UserError(f"{src}: {files[0]} holds an image of shape {first.shape}; expected one 2-D frame per file")

    def read(a: int, b: int) -> np.ndarray:
        out = np.empty((b - a, *first.shape), first.dtype)
        for i in range(a, b):
            try:
                img = tifffile.imread(files[i])
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"{src}: {files[i]} is not a readable TIFF ({exc})") from None
            if img.shape != first.shape:
                raise UserError(f"{src}: {files[i]} has shape {img.shape}, unlike {files[0]} {first.shape}")
            out[i - a] = img
        return out

    return FrameSource(src, "tiff-files", (len(files), *first.shape), first.dtype, read)


def _open_tiff_stack(src: str, path: str, what: str) -> FrameSource:
    tifffile = _need("tifffile", "cameras", src)
    try:
        tf = tifffile.TiffFile(path)
        series = tf.series[0]
        shape, dtype = series.shape, series.dtype
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{src}: not a readable TIFF ({exc})") from None
    shape = _as_frames(shape, src, what)
    pages = len(tf.pages)

    def read(a: int, b: int) -> np.ndarray:
        if pages >= shape[0]:
            return np.stack([tf.pages[i].asarray() for i in range(a, b)])
        return series.asarray().reshape(shape)[a:b]

    return FrameSource(src, "tiff", shape, dtype, read, closer=tf.close)


def _open_mraw(src: str, path: str, what: str) -> FrameSource:
    pymraw = _need("pyMRAW", "cameras", src)
    base, ext = os.path.splitext(path)
    cih = path
    if ext.lower() == ".mraw":
        cih = next((base + e for e in (".cihx", ".cih") if os.path.isfile(base + e)), "")
        if not cih:
            raise UserError(f"{src}: no {os.path.basename(base)}.cihx or .cih beside the .mraw; Photron's header "
                            "file is needed to read it")
    try:
        images, info = pymraw.load_video(cih)
    except Exception as exc:  # noqa: BLE001 - pyMRAW raises many types
        raise UserError(f"{src}: cannot read the Photron recording ({exc})") from None
    shape = _as_frames(images.shape, src, what)
    return FrameSource(src, "mraw", shape, images.dtype, lambda a, b: np.asarray(images[a:b]))


def open_source(src: str, what: str = "frames") -> FrameSource:
    """Open ``src`` (see the module docstring); ``what`` names its role in messages ("--lr")."""
    src = str(src)
    m = _H5_RE.match(src)
    if m:
        fname = m.group("file")
        if not os.path.exists(fname):
            raise UserError(f"{src}: file {fname} not found ({what})")
        return _open_hdf5(src, fname, m.group("ds"), what)
    if any(c in src for c in "*?["):
        files = sorted(glob.glob(src))
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise UserError(f"{src}: the pattern matches no files ({what})")
        return _open_tiff_files(src, files, what)
    if os.path.isdir(src):
        files = sorted(f for f in glob.glob(os.path.join(src, "*")) if f.lower().endswith(_TIFF_EXT))
        if not files:
            raise UserError(f"{src}: the folder holds no .tif/.tiff files ({what})")
        return _open_tiff_files(src, files, what)
    if not os.path.exists(src):
        raise UserError(f"{src}: not found ({what}); give FILE.h5:/dataset, a TIFF file, folder or glob, or a "
                        "Photron .cihx/.mraw")
    if not os.path.isfile(src):
        raise UserError(f"{src}: is not a regular file ({what})")
    low = src.lower()
    if low.endswith(_TIFF_EXT):
        return _open_tiff_stack(src, src, what)
    if low.endswith((".mraw", ".cih", ".cihx")):
        return _open_mraw(src, src, what)
    if low.endswith((".h5", ".hdf5", ".hdf", ".nxs")):
        raise UserError(f"{src}: name the dataset too, as {src}:/path/to/dataset ({what})")
    raise UserError(f"{src}: unknown kind of source ({what}); give FILE.h5:/dataset, a TIFF file, folder or glob, "
                    "or a Photron .cihx/.mraw")


def read_times(src: str, what: str) -> np.ndarray:
    """Per-frame timestamps in seconds from an HDF5 dataset (``FILE.h5:/ds``) or a text/CSV sidecar (one
    number per line, or columns with a header naming ``time``/``timestamp``/``t``; else the last column)."""
    if _H5_RE.match(str(src)):
        s = open_source(src, what)
        try:
            t = np.asarray(s.read(0, len(s)), dtype=np.float64).ravel()
        finally:
            s.close()
    else:
        if not os.path.isfile(src):
            raise UserError(f"{src}: timestamp file not found ({what})")
        if os.path.getsize(src) > 256 * 2**20:
            raise UserError(f"{src}: timestamp file is larger than 256 MiB ({what})")
        try:
            text = open(src, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{src}: cannot read the timestamps ({exc}) ({what})") from None
        rows = [r for r in csv.reader(io.StringIO(text.replace("\t", ",").replace(";", ","))) if any(c.strip() for c in r)]
        rows = [[c.strip() for c in r if c.strip()] if len(r) > 1 else r[0].split() for r in rows]
        if not rows:
            raise UserError(f"{src}: no timestamps in the file ({what})")
        col = -1
        try:
            float(rows[0][-1])
        except ValueError:
            header = [c.lower() for c in rows.pop(0)]
            for name in ("time", "timestamp", "t", "time_s"):
                if name in header:
                    col = header.index(name)
                    break
        vals = []
        for i, r in enumerate(rows):
            try:
                vals.append(float(r[col]))
            except (ValueError, IndexError):
                raise UserError(f"{src}: line {i + 1} holds no number in the time column ({r!r:.60}) ({what})") from None
        t = np.asarray(vals, dtype=np.float64)
    if t.size == 0 or not np.isfinite(t).all():
        raise UserError(f"{src}: timestamps must be finite numbers ({what})")
    return t
