"""The fast I/O path: compressed parts, chunk-copy stitch, codecs outside HDF5, batch-aligned units."""

from __future__ import annotations

import subprocess
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (filters for reading)
import numpy as np
import pytest

from conftest import read_data
from xvr_batch.driver import reconstruct
from xvr_batch.errors import UserError
from xvr_batch.io import output
from xvr_batch.io.output import COMPRESSIONS, ChunkCodec, stitch_output
from xvr_batch.io.parts import StreamingPart, known_sha256, write_part
from xvr_batch.pipeline import Options
from xvr_batch.plan import duplicate_batch_fraction, make_plan


def _frames(dtype, n=5, shape=(24, 40), seed=0):
    rng = np.random.default_rng(seed)
    base = rng.poisson(900, size=(n, *shape)).astype(np.float32)
    return base.astype(dtype) if dtype == np.uint16 else (base / 7.0).astype(dtype)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_codec_chunks_decode_like_a_plain_write(tmp_path, compression, dtype):
    frames = _frames(dtype)
    codec = ChunkCodec.for_compression(compression, dtype, frames.shape[1:])
    with h5py.File(tmp_path / "direct.h5", "w") as f:
        ds = f.create_dataset("d", shape=frames.shape, dtype=dtype, chunks=(1, *frames.shape[1:]),
                              **output.compression_kwargs(compression))
        for i, fr in enumerate(frames):
            data, mask = codec.encode(fr)
            ds.id.write_direct_chunk((i, 0, 0), data, mask)
    with h5py.File(tmp_path / "direct.h5", "r") as f:
        back = f["d"][()]
    assert back.dtype == frames.dtype and back.tobytes() == frames.tobytes()
    r = subprocess.run(["h5dump", "-H", str(tmp_path / "direct.h5")], capture_output=True, text=True)
    if r.returncode != 127:
        assert r.returncode == 0 and "DATASET" in r.stdout, r.stderr


@pytest.mark.parametrize("compression", ["zstd", "blosc-lz4", "gzip", "none"])
def test_compressed_parts_are_stitched_by_chunk_copy(tmp_path, compression):
    frames = _frames(np.float32, n=9)
    parts = []
    for u, (a, b) in enumerate([(0, 4), (4, 5), (5, 9)]):
        parts.append(tmp_path / f"unit-{u:06d}.h5")
        sha = write_part(parts[-1], a, frames[a:b], attrs={"unit": u}, compression=compression)
        assert known_sha256(parts[-1]) == sha  # this process hashed it at commit
    before = dict(output.STITCH_STATS)
    out = stitch_output(tmp_path / "out.h5", parts, frames.shape, np.dtype(np.float32), compression,
                        np.array([0, 8]), {"v": "1"})
    assert output.STITCH_STATS["chunks_copied"] - before["chunks_copied"] == 9
    assert output.STITCH_STATS["frames_decoded"] == before["frames_decoded"]  # never decoded
    assert read_data(out).tobytes() == frames.tobytes()
    # a plain h5py write of the same frames decodes to the same array
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("d", data=frames, chunks=(1, *frames.shape[1:]), **output.compression_kwargs(compression))
    with h5py.File(tmp_path / "plain.h5", "r") as f:
        assert f["d"][()].tobytes() == read_data(out).tobytes()


def test_parts_of_another_codec_are_recoded(tmp_path):
    frames = _frames(np.uint16, n=6)
    p = tmp_path / "unit-000000.h5"
    write_part(p, 0, frames)  # uncompressed (an older layout)
    before = output.STITCH_STATS["frames_decoded"]
    out = stitch_output(tmp_path / "o.h5", [p], frames.shape, np.dtype(np.uint16), "zstd", np.array([0, 5]), {})
    assert output.STITCH_STATS["frames_decoded"] - before == 6
    assert read_data(out).tobytes() == frames.tobytes()


def test_stitch_checks_the_sha256_it_is_given(tmp_path):
    frames = _frames(np.float32, n=3)
    p = tmp_path / "unit-000000.h5"
    sha = write_part(p, 0, frames, compression="zstd")
    stitch_output(tmp_path / "ok.h5", [p], frames.shape, np.dtype(np.float32), "zstd", np.array([0, 2]), {},
                  part_sha256=[sha])
    with pytest.raises(UserError, match="sha256 mismatch"):
        stitch_output(tmp_path / "bad.h5", [p], frames.shape, np.dtype(np.float32), "zstd", np.array([0, 2]), {},
                      part_sha256=["0" * 64])
    assert not (tmp_path / "bad.h5").exists() and not list(tmp_path.glob(".bad.h5.tmp-*"))


def test_streaming_part_write_chunk_bounds(tmp_path):
    part = StreamingPart(tmp_path / "unit-000000.h5", 0, 2, (4, 4), np.uint16, compression="blosc-lz4")
    with pytest.raises(IndexError):
        part.write_chunk(2, b"x")
    part.abort()


@pytest.mark.parametrize("batch", [4, 8])
@pytest.mark.parametrize("head,n,stride", [("all", 20_000, 20), ("all", 5_003, 7), ("centre", 20_000, 20)])
def test_no_duplicate_batches_at_the_default_unit_size(head, n, stride, batch):
    plan = make_plan(n, list(range(0, n, stride)), 3, head, unit_frames=128, batch=batch)
    assert duplicate_batch_fraction(plan) <= 0.02
    assert len(plan.units) == -(-n // 128)
    assert plan.units[0].start == 0 and plan.units[-1].stop == n
    assert all(a.stop == b.start and a.start < a.stop for a, b in zip(plan.units, plan.units[1:]))
    assert all(abs((u.stop - u.start) - 128) <= 4 * batch * 3 for u in plan.units[:-1])
    assert plan.to_dict()["unit_layout"] == "batch-aligned"


def test_units_smaller_than_a_batch_keep_their_count():
    plan = make_plan(40, (3, 11, 30), 3, "all", unit_frames=1, batch=3)
    assert [(u.start, u.stop) for u in plan.units] == [(t, t + 1) for t in range(40)]


@pytest.mark.parametrize("compression", ["blosc-lz4", "zstd"])
def test_bytes_identical_across_unit_sizes_with_compressed_parts(tmp_path, archive, tiny_weights, compression):
    ref = None
    for uf in (40, 3, 11):
        out = reconstruct(Options(archive=str(archive), output=str(tmp_path / f"o{uf}.h5"), weights=str(tiny_weights),
                                  unit_frames=uf, batch=3, dtype="uint16", compression=compression), progress=False)
        data = read_data(out)
        with h5py.File(out, "r") as f:
            ds = f["/exchange/data"]
            chunks = [ds.id.read_direct_chunk((i, 0, 0)) for i in range(ds.shape[0])]
        if ref is None:
            ref = (data, chunks)
        assert data.tobytes() == ref[0].tobytes()
        assert chunks == ref[1]  # the stored chunks too


def test_finalise_does_not_rehash_parts_of_this_process(tmp_path, archive, tiny_weights):
    before = dict(output.STITCH_STATS)
    reconstruct(Options(archive=str(archive), output=str(tmp_path / "o.h5"), weights=str(tiny_weights),
                        unit_frames=10), progress=False)
    assert output.STITCH_STATS["parts_hashed"] == before["parts_hashed"]
    assert output.STITCH_STATS["parts_trusted"] - before["parts_trusted"] == 4


@pytest.mark.parametrize("null_model", [True, False])
def test_bench_e2e_runs_and_reports_every_stage(tmp_path, tiny_weights, null_model):
    """The benchmark itself works (its --null-model once silently broke when the runner bound its forward)."""
    import json
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_e2e.py"
    args = [sys.executable, str(bench), "--frames", "24", "--hr-size", "64", "128", "--stride", "8",
            "--unit-frames", "8", "--dir", str(tmp_path)]
    args += ["--null-model"] if null_model else ["--weights", str(tiny_weights)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout[r.stdout.index("{"):])
    assert report["null_model"] is null_model
    assert report["fps_end_to_end"] > 0 and 0 < report["efficiency_end_to_end"]
    assert {"read", "compute", "convert", "compress", "write", "commit"} <= set(report["stages_s"])
