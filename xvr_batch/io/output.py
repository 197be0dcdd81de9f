"""The stitched output file (DESIGN.md §4).

    /exchange/data      (N, H, W) float32 or uint16, chunks (1, H, W), compressed through hdf5plugin
                        (attrs: compression = codec name, units = "HR camera counts")
    /exchange/hr_index  (K,) copied from the input
    /process/xvr_batch  attrs: version, command_line, config, settings, weights, weights_sha256,
                        input (path, fingerprint), normalisation, plan, edge_policy (JSON strings)

The file is written to ``.NAME.tmp-PID`` beside the final name, flushed and fsynced, and renamed only when
complete: ``OUT.h5`` is either complete or absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import hdf5plugin
import numpy as np

from xvr_batch.errors import UserError
from xvr_batch.workdir import fsync_dir

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
    out = Path(output)
    return out.with_name(f".{out.name}.tmp-{os.getpid()}")


def _remove_stale_temps(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            p.unlink(missing_ok=True)


def stitch_output(output: str | os.PathLike, parts: Sequence[os.PathLike], shape: tuple[int, int, int],
                  dtype: np.dtype, compression: str, hr_index: np.ndarray, process: dict[str, Any],
                  progress: bool = False) -> Path:
    """Copy the parts, in order, frame by frame into a new output file; rename it into place."""
    out = Path(output)
    _remove_stale_temps(out)
    tmp = temp_output_path(out)
    n, hh, ww = shape
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="frame", desc="stitch", leave=False)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            ex = f.create_group("exchange")
            ds = ex.create_dataset("data", shape=shape, dtype=dtype, chunks=(1, hh, ww),
                                   **compression_kwargs(compression))
            ds.attrs["compression"] = compression
            ds.attrs["units"] = "HR camera counts"
            ex.create_dataset("hr_index", data=np.asarray(hr_index, dtype=np.int64))
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
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar:
            bar.close()
    return out
