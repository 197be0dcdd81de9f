"""The stitched output file.

    /exchange/data      (N, H, W) float32 or uint16, chunks (1, H, W), compressed through hdf5plugin
                        (attrs: compression = codec name, units = "HR camera counts"); the chunks are
                        encoded outside HDF5 (:class:`ChunkCodec`, a thread pool) and stored with
                        ``write_direct_chunk``; the parts use the same codec, so the stitch copies
                        chunks without decoding them
    /exchange/hr_index  (K,) copied from the input
    /exchange/lr_consistency  (N,) float32 per-frame LR consistency (:mod:`xvr_batch.consistency`), stitched
                        from the parts; attrs: metric, units, threshold, flag_rule, sigma, n_flagged,
                        flagged_frames (the first 1000), median, max, worst_frame
    /process/xvr_batch  attrs: version, command_line, config, settings, weights, weights_sha256,
                        input (path, fingerprint), normalisation, plan, edge_policy (JSON strings)

The file is written to a temporary name beside the final one (``.NAME.tmp-PID-HOST-RANDOM``, see
:class:`xvr_batch.durable.AtomicH5File`), flushed and fsynced, and renamed only when complete: ``OUT.h5`` is
either complete or absent. The rename never replaces an existing ``OUT.h5`` unless the caller passes
``overwrite=True``. A full disk at any moment removes the temporary file and raises
:class:`xvr_batch.durable.DiskFullError`.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import h5py
import hdf5plugin
import numpy as np

from xvr_batch.durable import AtomicH5File, OutputExistsError, remove_stale_temps, temp_path
from xvr_batch.errors import UserError

__all__ = ["COMPRESSIONS", "check_compression", "compression_kwargs", "stitch_output", "temp_output_path",
           "ChunkCodec", "filter_pipeline", "STITCH_STATS"]

#: Counters of the last stitches in this process (tests check that chunks are copied, not decoded).
STITCH_STATS = {"chunks_copied": 0, "frames_decoded": 0, "parts_hashed": 0, "parts_trusted": 0}

COMPRESSIONS = ("zstd", "lz4", "blosc-lz4", "blosc-zstd", "bitshuffle", "gzip", "none")


def check_compression(name: str) -> None:
    if name not in COMPRESSIONS:
        raise UserError(f"--compression {name!r}: choose one of {', '.join(COMPRESSIONS)}")


def compression_kwargs(name: str) -> dict:
    check_compression(name)
    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=3))
    if name == "lz4":
        return dict(hdf5plugin.LZ4())
    if name == "blosc-lz4":
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "bitshuffle":
        return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
    if name == "blosc-zstd":
        return dict(hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    return {}


def temp_output_path(output: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``output`` (the scheme of :func:`xvr_batch.durable.temp_path`)."""
    return temp_path(output)


def stitch_output(output: str | os.PathLike, parts: Sequence[os.PathLike], shape: tuple[int, int, int],
                  dtype: np.dtype, compression: str, hr_index: np.ndarray, process: dict[str, Any],
                  progress: bool = False, overwrite: bool = False,
                  part_sha256: Sequence[str | None] | None = None, consistency: dict | None = None) -> Path:
    """Copy the parts, in order, into a new output file; rename it into place.

    Each part file is read once (the next one is read ahead in a thread). If ``part_sha256`` gives its
    expected sha256, that read is hashed and a mismatch is a :class:`UserError` (None: the caller verified it).
    Chunks are copied as they are stored (``read_direct_chunk`` -> ``write_direct_chunk``) when the part uses
    the output's filter pipeline, so nothing is decoded; other parts (older layouts) are decoded and
    re-encoded in a thread pool. Without ``overwrite`` an existing ``output`` is never replaced, even one that
    appeared while the output was being written (:class:`UserError`). Temporaries left by dead processes are
    removed first. With ``consistency`` (the job's LR consistency baseline) the parts' per-frame
    ``lr_consistency`` vectors are stitched into ``/exchange/lr_consistency`` (NaN for a part that has none).
    """
    out = Path(output)
    remove_stale_temps(out)
    n, hh, ww = shape
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="frame", desc="stitch", leave=False)
    shas = list(part_sha256) if part_sha256 is not None else [None] * len(parts)
    try:
        with AtomicH5File(out, overwrite=overwrite, track_order=True) as f:
            _fill(f, out, list(parts), shas, shape, dtype, compression, hr_index, process, bar, consistency)
    except OutputExistsError:
        raise UserError(f"{out}: output appeared while it was being written (another run?); it was left as it "
                        "was: pass --overwrite to replace it, or choose another -o") from None
    finally:
        if bar:
            bar.close()
    return out


def _read_part_bytes(path: os.PathLike, sha: str | None) -> os.PathLike:
    """Check a part file against ``sha`` when given (read ahead in a thread: the one read from the disk,
    after which the stitch reads it from the page cache)."""
    if sha is not None:
        from xvr_batch.durable import sha256_file

        STITCH_STATS["parts_hashed"] += 1
        try:
            actual = sha256_file(path, bufsize=1 << 22)
        except OSError as exc:
            raise UserError(f"part {path} is unreadable ({exc.strerror}); run `xvr-batch resume` on its work "
                            "directory to redo that unit") from None
        if actual != str(sha).lower():
            raise UserError(f"part {path} is corrupt (sha256 mismatch); run `xvr-batch resume` on its work "
                            "directory to redo that unit")
    else:
        STITCH_STATS["parts_trusted"] += 1
    return path


def _fill(f: h5py.File, out: Path, parts: list, shas: list, shape: tuple[int, int, int], dtype: np.dtype,
          compression: str, hr_index: np.ndarray, process: dict[str, Any], bar: Any,
          consistency: dict | None = None) -> None:
    """Write the datasets and provenance of the output into the open file ``f``.

    The datasets stay referenced until ``f`` is flushed at the end: HDF5 writes a dataset's cached chunks when
    the dataset is closed, and a write that fails there (a full disk) cannot be reported, only crash later.
    """
    n, hh, ww = shape
    ex = f.create_group("exchange")
    ds = ex.create_dataset("data", shape=shape, dtype=dtype, chunks=(1, hh, ww), **compression_kwargs(compression))
    ds.attrs["compression"] = compression
    ds.attrs["units"] = "HR camera counts"
    index = ex.create_dataset("hr_index", data=np.asarray(hr_index, dtype=np.int64))
    pipeline = filter_pipeline(ds)
    codec: ChunkCodec | None = None
    dsid = ds.id
    t = 0
    cons = np.full(n, np.nan, np.float32) if consistency is not None else None
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xvr-stitch-read")
    try:
        ahead = reader.submit(_read_part_bytes, parts[0], shas[0]) if parts else None
        for k, part in enumerate(parts):
            ahead.result()
            ahead = reader.submit(_read_part_bytes, parts[k + 1], shas[k + 1]) if k + 1 < len(parts) else None
            with open_part(part) as pf:
                src = pf["data"]
                start = int(pf.attrs["start"])
                if start != t or src.dtype != dtype or src.shape[1:] != (hh, ww):
                    raise UserError(f"{part}: does not fit the output (start {start}, expected {t}); "
                                    "resume with --force-replan")
                m = src.shape[0]
                if cons is not None:
                    _read_consistency(pf, part, m, cons, t)
                if src.chunks == (1, hh, ww) and filter_pipeline(src) == pipeline:
                    sid = src.id
                    for i in range(m):
                        mask, chunk = sid.read_direct_chunk((i, 0, 0))
                        dsid.write_direct_chunk((t + i, 0, 0), chunk, mask)
                    STITCH_STATS["chunks_copied"] += m
                else:  # another layout: decode here, encode in the pool
                    if codec is None:
                        codec = ChunkCodec(pipeline, dtype, (hh, ww))
                    w = OrderedChunkWriter(codec, lambda i, c, mk: dsid.write_direct_chunk((i, 0, 0), c, mk),
                                           _pool(), window=2 * (_pool()._max_workers + 1))
                    try:
                        for i in range(m):
                            w.submit(t + i, src[i])
                        w.close()
                    except BaseException:
                        w.cancel()
                        raise
                    STITCH_STATS["frames_decoded"] += m
            t += m
            if bar:
                bar.update(m)
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
    if t != n:
        raise UserError(f"{out}: parts cover {t} of {n} frames; resume the run")
    cds = None
    if cons is not None:
        from xvr_batch.consistency import attrs_for

        cds = ex.create_dataset("lr_consistency", data=cons, track_times=False)
        for key, value in attrs_for(cons, consistency).items():
            cds.attrs[key] = value
    grp = f.create_group("process").create_group("xvr_batch")
    for key, value in process.items():
        grp.attrs[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    f.flush()  # while ds and index are open; a failure raises here, and AtomicH5File cleans up
    del ds, index, cds


def open_part(part: os.PathLike) -> h5py.File:
    """A part file, open read-only, or one clear :class:`UserError` (resume redoes an unreadable part)."""
    try:
        return h5py.File(part, "r", locking=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{part}: not a readable part ({' '.join(str(exc).split())[:120]}); resume the "
                        "run to redo it") from None


def _read_consistency(pf: h5py.File, part: os.PathLike, m: int, cons: np.ndarray, t: int) -> None:
    """Copy a part's per-frame ``lr_consistency`` into ``cons[t:t+m]`` (left NaN when the part has none)."""
    from xvr_batch.consistency import PART_DATASET

    v = pf.get(PART_DATASET)
    if v is None:
        return
    if not isinstance(v, h5py.Dataset) or v.shape != (m,) or v.dtype.kind != "f":
        raise UserError(f"{part}: {PART_DATASET} does not fit the part ({getattr(v, 'shape', '?')} for {m} frames); "
                        "resume the run to redo it")
    cons[t:t + m] = v[()]


# ---------------------------------------------------------------------------------------------- chunk codec

def filter_pipeline(dset: h5py.Dataset) -> tuple:
    """A dataset's filter pipeline as ``((id, flags, cd_values), ...)``: two datasets with the same pipeline,
    dtype and chunk shape store interchangeable chunks."""
    plist = dset.id.get_create_plist()
    return tuple((int(f[0]), int(f[1]), tuple(int(v) for v in f[2]))
                 for f in (plist.get_filter(i) for i in range(plist.get_nfilters())))


_H5Z_FLAG_OPTIONAL = 0x0001
_FILTER_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_uint, ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint),
                              ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p))


class _H5ZClass2(ctypes.Structure):
    """``H5Z_class2_t`` of the HDF5 filter plugin API."""
    _fields_ = [("version", ctypes.c_int), ("id", ctypes.c_int), ("encoder_present", ctypes.c_uint),
                ("decoder_present", ctypes.c_uint), ("name", ctypes.c_char_p), ("can_apply", ctypes.c_void_p),
                ("set_local", ctypes.c_void_p), ("filter", _FILTER_FN)]


_libc = ctypes.CDLL(None)
_libc.malloc.restype, _libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
_libc.free.restype, _libc.free.argtypes = None, [ctypes.c_void_p]
_plugin_lock = threading.Lock()
_plugins: dict[int, Any] = {}


def _plugin_filter(filter_id: int) -> Any:
    """The encoder of the hdf5plugin filter ``filter_id`` (the very function HDF5 calls), or None."""
    with _plugin_lock:
        if filter_id in _plugins:
            return _plugins[filter_id]
        fn = None
        try:
            from hdf5plugin._utils import registered_filters  # name -> (file, ctypes.CDLL), initialised
        except ImportError:  # pragma: no cover - another hdf5plugin layout
            registered_filters = {}
        for _name, (_file, lib) in list(registered_filters.items()):
            try:
                lib.H5PLget_plugin_info.restype = ctypes.c_void_p
                cls = _H5ZClass2.from_address(lib.H5PLget_plugin_info())
            except (AttributeError, ValueError, OSError):  # pragma: no cover
                continue
            if cls.id == filter_id and cls.encoder_present:
                fn = (cls, lib)  # keep the library referenced
                break
        _plugins[filter_id] = fn
        return fn


class ChunkCodec:
    """Encodes one (H, W) frame into the bytes of one (1, H, W) chunk of a dataset's filter pipeline, outside
    HDF5 (and its global lock), so that several threads compress at once; the chunk is then stored with
    ``write_direct_chunk``. The hdf5plugin filters are called through the plugin's own ``H5Z_class2_t``
    entry (the same code and parameters, ``cd_values`` after ``set_local``, that HDF5 would use); shuffle and
    deflate (gzip) are done with numpy and zlib. The chunks decode with plain h5py + hdf5plugin.

    Thread-safe: ``encode`` only reads the codec's state (ctypes and zlib release the GIL while they work)."""

    def __init__(self, pipeline: tuple, dtype: Any, frame_shape: tuple[int, int]):
        self.pipeline = tuple(pipeline)
        self.dtype = np.dtype(dtype)
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self._steps = []
        for i, (fid, flags, cd) in enumerate(self.pipeline):
            if fid == h5py.h5z.FILTER_SHUFFLE:
                self._steps.append(("shuffle", i, flags, None))
            elif fid == h5py.h5z.FILTER_DEFLATE:
                self._steps.append(("deflate", i, flags, int(cd[0]) if cd else 6))
            else:
                plugin = _plugin_filter(fid)
                if plugin is None:
                    raise ValueError(f"filter {fid} cannot be applied outside HDF5")
                self._steps.append(("plugin", i, flags, (plugin[0].filter, (ctypes.c_uint * len(cd))(*cd), len(cd))))

    @classmethod
    def for_compression(cls, compression: str, dtype: Any, frame_shape: tuple[int, int]) -> "ChunkCodec":
        """The codec of ``--compression NAME`` for chunks (1, H, W) of ``dtype`` (built from a throwaway
        in-memory dataset, so the filter parameters are exactly what HDF5 records)."""
        with h5py.File(io.BytesIO(), "w") as f:
            ds = f.create_dataset("d", shape=(1, *frame_shape), dtype=np.dtype(dtype), chunks=(1, *frame_shape),
                                  **compression_kwargs(compression))
            pipeline = filter_pipeline(ds)
        return cls(pipeline, dtype, frame_shape)

    def encode(self, frame: np.ndarray) -> tuple[bytes, int]:
        """``(chunk bytes, filter_mask)`` of one frame."""
        a = np.ascontiguousarray(frame, dtype=self.dtype)
        if a.shape != self.frame_shape:
            raise ValueError(f"frame shape {a.shape} != {self.frame_shape}")
        data: Any = a
        mask = 0
        for kind, i, flags, arg in self._steps:
            if kind == "shuffle":
                size = self.dtype.itemsize
                raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).reshape(-1)
                n = raw.size // size
                data = np.ascontiguousarray(raw[:n * size].reshape(n, size).T).reshape(-1)
                if raw.size % size:
                    data = np.concatenate((data, raw[n * size:]))
            elif kind == "deflate":
                data = zlib.compress(memoryview(data).cast("B") if isinstance(data, np.ndarray) else data, arg)
            else:
                out = self._plugin(arg, data)
                if out is None:
                    if not flags & _H5Z_FLAG_OPTIONAL:
                        raise OSError(f"filter {self.pipeline[i][0]} failed to encode a chunk")
                    mask |= 1 << i  # HDF5 skips a failing optional filter the same way
                    continue
                data = out
        if isinstance(data, np.ndarray):
            data = data.tobytes()
        return bytes(data) if not isinstance(data, bytes) else data, mask

    @staticmethod
    def _plugin(arg: tuple, data: Any) -> bytes | None:
        fn, cd, ncd = arg
        src = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        n = src.nbytes
        p = _libc.malloc(max(1, n))
        if not p:
            raise MemoryError("malloc failed")
        ctypes.memmove(p, src.ctypes.data, n)
        buf, size = ctypes.c_void_p(p), ctypes.c_size_t(n)
        try:
            r = fn(0, ncd, cd, n, ctypes.byref(size), ctypes.byref(buf))
            return ctypes.string_at(buf.value, r) if r else None
        finally:
            _libc.free(buf.value)  # the filter replaced (and freed) our buffer on success


class OrderedChunkWriter:
    """Encode frames in a thread pool and store them, in order, with ``write_direct_chunk`` (one writer).

    ``submit(i, frame)`` queues frame ``i``; chunks are written in submission order by the calling thread,
    keeping at most ``window`` encodes in flight. ``close()`` writes the rest. ``write(i, data, mask)`` is the
    storing callback (it may raise; nothing more is stored then)."""

    def __init__(self, codec: ChunkCodec, write, pool: ThreadPoolExecutor | None, window: int = 8,
                 prepare=None, stats: dict | None = None, lock: threading.Lock | None = None):
        self.codec, self._write, self.pool, self.window = codec, write, pool, max(1, window)
        self._prepare = prepare
        self._q: deque[tuple[int, Future | tuple]] = deque()
        self.stats = stats
        self._lock = lock or threading.Lock()

    def _task(self, frame: np.ndarray) -> tuple[bytes, int]:
        import time
        t0 = time.perf_counter()
        if self._prepare is not None:
            frame = self._prepare(frame)
        t1 = time.perf_counter()
        out = self.codec.encode(frame)
        if self.stats is not None:
            with self._lock:
                self.stats["convert"] = self.stats.get("convert", 0.0) + (t1 - t0)
                self.stats["compress"] = self.stats.get("compress", 0.0) + (time.perf_counter() - t1)
        return out

    def submit(self, i: int, frame: np.ndarray) -> None:
        if self.pool is None:
            self._store(i, self._task(frame))
            return
        self._q.append((i, self.pool.submit(self._task, frame)))
        while len(self._q) > self.window:
            self._pop()

    def _pop(self) -> None:
        i, fut = self._q.popleft()
        self._store(i, fut.result())

    def _store(self, i: int, chunk: tuple[bytes, int]) -> None:
        import time
        t0 = time.perf_counter()
        self._write(i, chunk[0], chunk[1])
        if self.stats is not None:
            with self._lock:
                self.stats["write"] = self.stats.get("write", 0.0) + (time.perf_counter() - t0)

    def close(self) -> None:
        while self._q:
            self._pop()

    def cancel(self) -> None:
        while self._q:
            _, fut = self._q.popleft()
            fut.cancel()
            try:
                fut.result()
            except BaseException:
                pass


_stitch_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _stitch_pool
    if _stitch_pool is None:
        _stitch_pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                          thread_name_prefix="xvr-codec")
    return _stitch_pool
