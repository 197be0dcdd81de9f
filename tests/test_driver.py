"""The driver and the backend interface: resume from anywhere, on the recorded backend; failed units show."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_archive, read_data
from xvr_batch.backends import get_backend
from xvr_batch.backends.base import Backend
from xvr_batch.cli import main
from xvr_batch.driver import reconstruct
from xvr_batch.pipeline import Options, prepare
from xvr_batch.workdir import WorkDir


def _cli(capsys, *args) -> tuple[int, str, str]:
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["local", "torch", "mpi", "dask", "dask-slurm"])
def test_every_backend_implements_the_interface(name):
    b = get_backend(name)
    assert isinstance(b, Backend)
    for method in ("start", "follow", "execute", "finish", "close"):
        assert callable(getattr(b, method))


def test_engine_does_not_import_backends():
    """pipeline (the unit engine) must not depend on backends: the driver is the only module using both."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "xvr_batch" / "pipeline.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.startswith(("xvr_batch.backends", "xvr_batch.driver"))}, imported


def test_relative_paths_resume_from_another_folder(tmp_path, tiny_weights, capsys, monkeypatch):
    """The manifest stores absolute paths: `resume` from another folder writes the output where the run said."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    make_archive(run_dir / "a.h5")
    (run_dir / "w.pt").write_bytes(Path(tiny_weights).read_bytes())
    monkeypatch.chdir(run_dir)
    job = prepare(Options(archive="a.h5", output="o.h5", weights="w.pt", unit_frames=10))
    job.close()
    man = WorkDir(run_dir / "o.h5.xvr").read_manifest()
    for key in ("archive", "output", "workdir", "weights"):
        assert os.path.isabs(man["options"][key]), (key, man["options"][key])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = _cli(capsys, "resume", run_dir / "o.h5.xvr", "-q")
    assert code == 0, err
    assert out.strip() == str(run_dir / "o.h5")
    assert (run_dir / "o.h5").is_file() and not list(elsewhere.iterdir())
    ref = tmp_path / "ref.h5"
    monkeypatch.chdir(run_dir)
    reconstruct(Options(archive="a.h5", output=str(ref), weights="w.pt", unit_frames=10), progress=False)
    assert read_data(run_dir / "o.h5").tobytes() == read_data(ref).tobytes()


def test_resume_uses_the_recorded_backend(tmp_path, tiny_weights, capsys):
    arc = make_archive(tmp_path / "a.h5")
    out = tmp_path / "o.h5"
    opts = Options(archive=str(arc), output=str(out), weights=str(tiny_weights), unit_frames=10)
    prepare(opts, config={"backend": "dask", "workers": 1}).close()
    code, stdout, err = _cli(capsys, "resume", tmp_path / "o.h5.xvr", "-q")
    assert code == 0, err
    assert "on --backend dask" in err and "LocalCluster with 1 worker" in err, err
    ref = tmp_path / "ref.h5"
    reconstruct(Options(archive=str(arc), output=str(ref), weights=str(tiny_weights), unit_frames=10),
                progress=False)
    assert read_data(out).tobytes() == read_data(ref).tobytes()


def test_resume_backend_can_be_overridden(tmp_path, tiny_weights, capsys):
    arc = make_archive(tmp_path / "a.h5")
    opts = Options(archive=str(arc), output=str(tmp_path / "o.h5"), weights=str(tiny_weights), unit_frames=10)
    prepare(opts, config={"backend": "dask", "workers": 1}).close()
    code, _, err = _cli(capsys, "resume", tmp_path / "o.h5.xvr", "--backend", "local", "-q")
    assert code == 0, err
    assert "on --backend local" in err and "LocalCluster" not in err


def _corrupt_one_chunk(path: Path, frame: int) -> None:
    """Flip the bytes of the compressed chunk that holds LR frame ``frame``: reading it fails in the filter."""
    with h5py.File(path, "r") as f:
        ds = f["/exchange/data_lr"]
        info = next(ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())
                    if ds.id.get_chunk_info(i).chunk_offset[0] == frame)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        data = bytearray(fh.read(info.size))
        fh.seek(info.byte_offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_status_shows_a_failed_unit(tmp_path, tiny_weights, capsys):
    """A unit whose input cannot be read fails: the journal records it and `status` shows it."""
    arc = tmp_path / "a.h5"
    make_archive(arc, n=40)
    with h5py.File(arc, "r") as f:
        lr = f["/exchange/data_lr"][()]
    with h5py.File(arc, "a") as f:  # rewrite LR chunked one frame per chunk, gzip (a filter to break)
        del f["/exchange/data_lr"]
        f.create_dataset("/exchange/data_lr", data=lr, chunks=(1, *lr.shape[1:]), compression="gzip")
    workdir = tmp_path / "wd"
    opts = Options(archive=str(arc), output=str(tmp_path / "o.h5"), weights=str(tiny_weights), unit_frames=10,
                   workdir=str(workdir))
    prepare(opts).close()  # plan on the intact file
    _corrupt_one_chunk(arc, 38)  # a frame only unit 3 (frames 30-39) reads
    code, _, err = _cli(capsys, "resume", workdir, "-q")
    assert code != 0
    code, out, err = _cli(capsys, "status", workdir, "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["failed"] == [3], st
    code, out, _ = _cli(capsys, "status", workdir)
    assert "1 failed" in out and "unit 3 failed" in out, out
    assert set(st["errors"]) == {"3"} and "data_lr" in st["errors"]["3"], st
