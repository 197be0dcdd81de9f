"""End to end, HDF5 in -> HDF5 out, at the paper's size (LR 100x256 -> HR 400x1024), with the time of each stage.

    python benchmarks/bench_e2e.py --frames 2000 --device cuda --weights paper.pt     # a GPU
    python benchmarks/bench_e2e.py --frames 64                                       # the CPU, lite weights
    python benchmarks/bench_e2e.py --frames 512 --null-model                         # the I/O ceiling
    python benchmarks/bench_e2e.py --frames 512 --null-model --layout virtual        # virtual output + compact

A synthetic archive (``xvr_batch.synth``) is reconstructed the way the ``local`` backend does it (prepare, every
unit through ``UnitRunner.run_unit``, journal, ``finalise``). Reported:

* end-to-end frames/s (compute of every unit + stitch), and compute-phase frames/s (units only);
* model-only frames/s: the same batches, read into memory beforehand, through ``UnitRunner._compute``;
* efficiency = model-only time / compute-phase time, and model-only / end-to-end (both sides after one warm-up
  call);
* seconds per stage (``UnitRunner.stats``: read [reader thread], read_wait, h2d, compute, d2h [on CUDA it includes
  the wait for the GPU], convert and compress [summed over codec threads], write, commit), and the stitch;
* the stitch against ``cp`` of the same bytes (parts concatenated into one file, fsynced), both from the page cache;
* ``--null-model``: the network is replaced by nearest upsampling of the LR frames (same output shape), the key
  encoder by zeros: what is left is the I/O path's ceiling.
* ``--layout virtual``: ``finalise`` writes the virtual dataset over the parts (``stitch_s`` is then its time);
  then ``xvr-batch compact`` of it into a second file (``compact_s``), and a full read of every frame through
  h5py from the virtual file and from the compacted one (``read_virtual_s``, ``read_single_s``, page cache).
* ``--vds-scale PARTS``: no model, no archive: PARTS parts of ``--unit-frames`` small frames (16x16 uint16) are
  written directly, then timed: ``write_virtual_output`` over them (the parts trusted, as after a local run),
  ``compact``, and 2000 sequential and 2000 random single-frame reads from each file. PARTS=7813 at unit 128 is
  the part count of a 1,000,000-frame run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path


def _null_model(runner) -> None:
    import torch

    cfg = runner.cfg
    model = runner.model

    def encode_keys(x):  # (b, k, 1, H, W) -> (b, k, E, h, w) zeros
        b, k, _, hh, ww = x.shape
        return torch.zeros(b, k, 1, hh // cfg.scale, ww // cfg.scale, device=x.device)

    def forward_features(lr, feats, base=None):  # (B, NL, 1, h, w) -> (B, n_out, 1, H, W)
        y = torch.nn.functional.interpolate(lr[:, :, 0], scale_factor=cfg.scale, mode="nearest")
        if cfg.head != "all":
            y = y[:, lr.shape[1] // 2:lr.shape[1] // 2 + 1]
        return y[:, :, None]

    model.encode_keys = encode_keys
    model.forward_features = forward_features
    runner._features = forward_features  # the runner binds its forward (eager or compiled) at start-up


def _copy_like_cp(srcs: list[Path], dst: Path) -> float:
    t0 = time.perf_counter()
    with open(dst, "wb") as out:
        for s in srcs:
            with open(s, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - t0


def _virtual_extras(virtual: Path, compacted: Path) -> dict:
    """Time ``compact`` of the virtual output into ``compacted``, and a full read of each (page cache)."""
    import h5py
    import hdf5plugin  # noqa: F401

    from xvr_batch.io.vds import compact

    def read_all(path: Path) -> float:
        t = time.perf_counter()
        with h5py.File(path, "r") as f:
            ds = f["exchange/data"]
            for i in range(ds.shape[0]):
                ds[i]
        return time.perf_counter() - t

    def first_frame(path: Path) -> float:
        t = time.perf_counter()
        with h5py.File(path, "r") as f:
            f["exchange/data"][0]
        return time.perf_counter() - t

    virtual_bytes = virtual.stat().st_size
    t0 = time.perf_counter()
    compact(virtual, compacted)
    compact_s = time.perf_counter() - t0
    return {"virtual_file_bytes": virtual_bytes, "compact_s": round(compact_s, 3),
            "compact_bytes": compacted.stat().st_size,
            "read_virtual_s": round(read_all(virtual), 3), "read_single_s": round(read_all(compacted), 3),
            "open_read_frame0_virtual_ms": round(1e3 * first_frame(virtual), 2),
            "open_read_frame0_single_ms": round(1e3 * first_frame(compacted), 2)}


def vds_scale(d: Path, n_parts: int, m: int, compression: str, frame: tuple[int, int] = (16, 16)) -> dict:
    """The metadata side of ``--layout virtual`` at a large part count (see ``--vds-scale``)."""
    import h5py
    import numpy as np

    from xvr_batch.io.output import compression_kwargs
    from xvr_batch.io.vds import compact, write_virtual_output

    (d / "wd").mkdir(parents=True, exist_ok=True)
    block = np.broadcast_to(np.arange(frame[0] * frame[1], dtype=np.uint16).reshape(frame), (m, *frame))
    t0 = time.perf_counter()
    parts = []
    for k in range(n_parts):
        p = d / "wd" / f"unit-{k:06d}.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("data", data=block, chunks=(1, *frame), **compression_kwargs(compression))
            f.attrs["start"] = k * m
            f["lr_consistency"] = np.ones(m, np.float32)
        parts.append(p)
    make_s = time.perf_counter() - t0
    n = n_parts * m
    virtual, single = d / "out.h5", d / "single.h5"
    t0 = time.perf_counter()
    write_virtual_output(virtual, parts, (n, *frame), np.uint16, compression, np.arange(0, n, 20), {"version": "bench"},
                         {"sigma": 1.0, "threshold": 1.5}, False, part_sha256=["0" * 64] * n_parts,
                         verified=[True] * n_parts)
    write_s = time.perf_counter() - t0
    with h5py.File(virtual, "r+") as f:  # the fake sha256s above, replaced by the real ones for compact
        g = f["process/xvr_batch"]
        recs = json.loads(g.attrs["parts"])
        for r in recs:
            r["sha256"] = _sha(d / r["file"])
        g.attrs["parts"] = json.dumps(recs)
    t0 = time.perf_counter()
    compact(virtual, single)
    compact_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    picks = [int(i) for i in rng.integers(0, n, 2000)]

    def reads(path: Path) -> dict:
        out = {}
        t = time.perf_counter()
        with h5py.File(path, "r") as f:
            ds = f["exchange/data"]
            ds[0]
            out["open_read_frame0_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            t = time.perf_counter()
            for i in range(min(2000, n)):
                ds[i]
            out["seq_2000_frames_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            for i in picks:
                ds[i]
            out["random_2000_frames_s"] = round(time.perf_counter() - t, 3)
        return out

    return {"parts": n_parts, "unit_frames": m, "frames": n, "frame": list(frame), "make_parts_s": round(make_s, 2),
            "write_virtual_s": round(write_s, 3), "virtual_file_bytes": virtual.stat().st_size,
            "compact_s": round(compact_s, 2), "single_file_bytes": single.stat().st_size,
            "virtual_reads": reads(virtual), "single_reads": reads(single)}


def _sha(path: Path) -> str:
    from xvr_batch.durable import sha256_file
    return sha256_file(path)


def codec_table(path: str, dataset: str, n: int, threads: int) -> list[dict]:
    """Ratio and speed of every --compression on ``n`` frames of ``path:dataset`` (ChunkCodec, as the pipeline
    encodes: one thread, then ``threads`` threads)."""
    from concurrent.futures import ThreadPoolExecutor

    import h5py
    import numpy as np

    from xvr_batch.io.output import COMPRESSIONS, ChunkCodec

    with h5py.File(path, "r") as f:
        frames = f[dataset][:n]
    rows = []
    for name in COMPRESSIONS:
        codec = ChunkCodec.for_compression(name, frames.dtype, frames.shape[1:])
        t0 = time.perf_counter()
        size = sum(len(codec.encode(fr)[0]) for fr in frames)
        one = time.perf_counter() - t0
        with ThreadPoolExecutor(threads) as ex:
            t0 = time.perf_counter()
            list(ex.map(codec.encode, frames))
            many = time.perf_counter() - t0
        rows.append({"codec": name, "ratio": round(frames.nbytes / size, 3), "fps_1_thread": round(len(frames) / one, 1),
                     f"fps_{threads}_threads": round(len(frames) / many, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=None, help="default: 2000 on CUDA, 64 on the CPU")
    ap.add_argument("--hr-size", nargs=2, type=int, default=(400, 1024))
    ap.add_argument("--stride", type=int, default=20, help="key frame every N frames")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--unit-frames", type=int, default=128)
    ap.add_argument("--dtype", default="uint16")
    ap.add_argument("--compression", default="bitshuffle")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--null-model", action="store_true")
    ap.add_argument("--layout", choices=("single", "virtual"), default="single", help="finalise's output layout")
    ap.add_argument("--vds-scale", type=int, default=None, metavar="PARTS",
                    help="only time the virtual layout over PARTS small synthetic parts (see above)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder, removed)")
    ap.add_argument("--model-batches", type=int, default=64, help="batches timed for model-only (at most)")
    ap.add_argument("--codecs", nargs=2, metavar=("FILE", "DATASET"), default=None,
                    help="only measure every codec on the frames of FILE:DATASET (e.g. out.h5 /exchange/data)")
    a = ap.parse_args()
    if a.codecs:
        print(json.dumps(codec_table(*a.codecs, n=a.frames or 64, threads=a.threads or 2), indent=1))
        return
    if a.vds_scale:
        d = Path(a.dir or tempfile.mkdtemp(prefix="xvr-vds-"))
        try:
            print(json.dumps(vds_scale(d, a.vds_scale, a.unit_frames, a.compression), indent=1))
        finally:
            if not a.dir:
                shutil.rmtree(d, ignore_errors=True)
        return

    import torch
    from xvr_batch import synth
    from xvr_batch.pipeline import Options, UnitRunner, finalise, prepare

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    frames = a.frames or (2000 if device.startswith("cuda") else 64)
    d = Path(a.dir or tempfile.mkdtemp(prefix="xvr-e2e-"))
    d.mkdir(parents=True, exist_ok=True)
    arc = d / "archive.h5"
    t0 = time.perf_counter()
    synth.synthesize(str(arc), n_frames=frames, hr_shape=tuple(a.hr_size), stride=a.stride, seed=5)
    synth_s = time.perf_counter() - t0
    opts = Options(archive=str(arc), output=str(d / "out.h5"), weights=a.weights, batch=a.batch,
                   unit_frames=a.unit_frames, dtype=a.dtype, compression=a.compression, device=device,
                   threads=a.threads, overwrite=True, force_replan=True, keep_workdir=True)
    job = prepare(opts)
    runner = UnitRunner(job)
    if a.null_model:
        _null_model(runner)
    wd = job.workdir_obj()
    units = job.plan().units
    # warm-up, as the model-only timing below has one: the first model call builds kernels and caches
    # (seconds on the CPU), a one-off cost of a run that is not a stage of the pipeline
    runner._compute(*runner._read_batch(units[0].batches[0], OrderedDict())[1:])
    runner._keys.clear()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for u in units:
        rec = runner.run_unit(u)
        wd.record_done(rec["unit"], rec["part"], rec["sha256"], tuple(rec["frames"]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    compute_s = time.perf_counter() - t0
    parts = sorted((wd.path / "parts").glob("unit-*.h5"))
    part_bytes = sum(p.stat().st_size for p in parts)
    t1 = time.perf_counter()
    finalise(job, overwrite=True, layout=a.layout)
    stitch_s = time.perf_counter() - t1
    e2e_s = time.perf_counter() - t0
    out_bytes = (d / "out.h5").stat().st_size
    extra = {}
    if a.layout == "virtual":
        extra = _virtual_extras(d / "out.h5", d / "compact.h5")
        out_bytes = extra["compact_bytes"]
    cp_s = _copy_like_cp(parts, d / "cp.bin")
    stats = dict(runner.stats)

    # model only: the same batches, inputs in memory beforehand
    cache: OrderedDict = OrderedDict()
    todo = [b for u in units for b in range(*u.batches)][:a.model_batches]
    batches = [runner._read_batch(b, cache) for b in todo]
    runner._compute(*batches[0][1:])  # warm-up
    runner._keys.clear()  # key features are computed again, as the pipeline did
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    for _, wins, lr, hr in batches:
        runner._compute(wins, lr, hr)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    model_s = time.perf_counter() - t2
    model_fps = sum(sum(1 for w in wins[:len(wins)] for _ in w.emit) for _, wins, _, _ in batches) / model_s
    runner.close()

    n = frames
    res = {
        "device": device, "threads": torch.get_num_threads(), "null_model": a.null_model,
        "weights": job.weights.get("source"), "frames": n, "hr_size": list(a.hr_size), "batch": a.batch,
        "unit_frames": a.unit_frames, "units": len(units), "dtype": a.dtype, "compression": a.compression,
        "synth_s": round(synth_s, 2),
        "compute_phase_s": round(compute_s, 3), "stitch_s": round(stitch_s, 3), "end_to_end_s": round(e2e_s, 3),
        "fps_end_to_end": round(n / e2e_s, 2), "fps_compute_phase": round(n / compute_s, 2),
        "fps_model_only": round(model_fps, 2),
        "efficiency_compute_phase": round(model_fps and (n / compute_s) / model_fps, 4),
        "efficiency_end_to_end": round(model_fps and (n / e2e_s) / model_fps, 4),
        "stages_s": {k: round(v, 3) for k, v in sorted(stats.items()) if k != "frames"},
        "part_bytes": part_bytes, "output_bytes": out_bytes, "ratio": round(n * a.hr_size[0] * a.hr_size[1]
                                                                          * (2 if a.dtype == "uint16" else 4)
                                                                          / out_bytes, 3),
        "cp_same_bytes_s": round(cp_s, 3), "stitch_over_cp": round(stitch_s / cp_s, 2),
        "stitch_MBps": round(out_bytes / stitch_s / 1e6, 1), "layout": a.layout, **extra,
    }
    print(json.dumps(res, indent=2))
    if not a.dir:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
