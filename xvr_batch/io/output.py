"""The stitched output file.

    /exchange/data      (N, H, W) float32 or uint16, chunks (1, H, W), compressed through hdf5plugin
                        (attrs: compression = codec name, units = "HR camera counts")
    /exchange/hr_index  (K,) copied from the input
    /process/xvr_batch  attrs: version, command_line, config, settings, weights, weights_sha256,
                        input (path, fingerprint), normalisation, plan, edge_policy (JSON strings)

The file is written to a temporary name beside the final one (``.NAME.tmp-PID-HOST-RANDOM``, see
:class:`xvr_batch.durable.AtomicH5File`), flushed and fsynced, and renamed only when complete: ``OUT.h5`` is
either complete or absent. The rename never replaces an existing ``OUT.h5`` unless the caller passes
``overwrite=True``. A full disk at any moment removes the temporary file and raises
:class:`xvr_batch.durable.DiskFullError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import hdf5plugin
import numpy as np

from xvr_batch.durable import AtomicH5File, OutputExistsError, remove_stale_temps, temp_path
from xvr_batch.errors import UserError

__all__ = ["COMPRESSIONS", "check_compression", "compression_kwargs", "stitch_output", "temp_output_path"]

COMPRESSIONS = ("zstd", "lz4", "blosc-zstd", "gzip", "none")


def check_compression(name: str) -> None:
    if name not in COMPRESSIONS:
        raise UserError(f"--compression {name!r}: choose one of {', '.join(COMPRESSIONS)}")


def compression_kwargs(name: str) -> dict:
    check_compression(name)
    if name == "zstd":
        return dict(hdf5plugin.Zstd(clevel=3))
    if name == "lz4":
        return dict(hdf5plugin.LZ4())
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
                  progress: bool = False, overwrite: bool = False) -> Path:
    """Copy the parts, in order, frame by frame into a new output file; rename it into place.

    Without ``overwrite`` an existing ``output`` is never replaced, even one that appeared while the
    output was being written (:class:`UserError`). Temporaries left by dead processes are removed first.
    """
    out = Path(output)
    remove_stale_temps(out)
    n, hh, ww = shape
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="frame", desc="stitch", leave=False)
    try:
        with AtomicH5File(out, overwrite=overwrite, track_order=True) as f:
            _fill(f, out, parts, shape, dtype, compression, hr_index, process, bar)
    except OutputExistsError:
        raise UserError(f"{out}: output appeared while it was being written (another run?); it was left as it "
                        "was: pass --overwrite to replace it, or choose another -o") from None
    finally:
        if bar:
            bar.close()
    return out


def _fill(f: h5py.File, out: Path, parts: Sequence[os.PathLike], shape: tuple[int, int, int], dtype: np.dtype,
          compression: str, hr_index: np.ndarray, process: dict[str, Any], bar: Any) -> None:
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
    t = 0
    for part in parts:
        with h5py.File(part, "r", locking=False) as pf:
            src = pf["data"]
            start = int(pf.attrs["start"])
            if start != t or src.dtype != dtype or src.shape[1:] != (hh, ww):
                raise UserError(f"{part}: does not fit the output (start {start}, expected {t}); "
                                "resume with --force-replan")
            for i in range(src.shape[0]):
                ds[t + i] = src[i]
            t += src.shape[0]
            if bar:
                bar.update(src.shape[0])
    if t != n:
        raise UserError(f"{out}: parts cover {t} of {n} frames; resume the run")
    grp = f.create_group("process").create_group("xvr_batch")
    for key, value in process.items():
        grp.attrs[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    f.flush()  # while ds and index are open; a failure raises here, and AtomicH5File cleans up
    del ds, index
