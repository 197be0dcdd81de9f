"""``xvr-batch preview``: real reconstructions, real PNG/GIF/MP4 files, bad requests refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import make_archive
from xvr_batch.driver import reconstruct
from xvr_batch.pipeline import Options
from xvr_batch.preview import _movie_frame, parse_frames, preview_frames, write_preview


@pytest.fixture(scope="module")
def recon(tmp_path_factory, tiny_weights) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("preview")
    arc = make_archive(d / "a.h5", n=24, hr_index=(3, 11, 20), gt=True)
    out = d / "r.h5"
    reconstruct(Options(archive=str(arc), output=str(out), weights=str(tiny_weights)), progress=False)
    return arc, out


def test_parse_frames():
    assert parse_frames(None, 10) == (0, 10)
    assert parse_frames("2:5", 10) == (2, 5)
    assert parse_frames("-3:", 10) == (7, 10)
    assert parse_frames(":4", 10) == (0, 4)
    for bad in ("5:2", "a:b", "1:2:3", "20:30"):
        with pytest.raises(Exception, match="--frames"):
            parse_frames(bad, 10)


def test_panels_are_the_images_they_claim(recon):
    """LR upsampled, the reconstruction itself, the key-frame blend and the truth, frame by frame."""
    import h5py
    import hdf5plugin  # noqa: F401

    arc, out = recon
    titles, rows = preview_frames(out, arc, [5, 20])
    assert titles == ["LR (bicubic)", "reconstruction", "key-frame blend", "truth"]
    with h5py.File(out, "r") as f, h5py.File(arc, "r") as g:
        for t, row in zip([5, 20], rows):
            np.testing.assert_array_equal(row[1], f["/exchange/data"][t])
            np.testing.assert_array_equal(row[3], g["/exchange/data_gt"][t])
            assert row[0].shape == row[1].shape == row[2].shape
    # frame 3 is a key frame: the blend there is that key frame itself
    _, (row,) = preview_frames(out, arc, [3])
    with h5py.File(arc, "r") as g:
        np.testing.assert_allclose(row[2], g["/exchange/data_hr"][0].astype(np.float32))


def test_without_archive_only_the_reconstruction(recon, tmp_path):
    arc, out = recon
    moved = tmp_path / "r.h5"
    moved.write_bytes(out.read_bytes())
    arc_bytes = arc.read_bytes()
    arc.rename(arc.with_suffix(".gone"))  # the recorded input path no longer exists
    try:
        titles, rows = preview_frames(moved, None, [1])
    finally:
        arc.with_suffix(".gone").rename(arc)
    assert titles == ["reconstruction"] and len(rows[0]) == 1
    assert arc.read_bytes() == arc_bytes


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".gif", b"GIF8"), (".mp4", b"ftyp")])
def test_files_are_written_atomically(recon, tmp_path, suffix, magic):
    arc, out = recon
    dest = tmp_path / f"p{suffix}"
    info = write_preview(out, dest, archive=arc, frames="2:12")
    data = dest.read_bytes()
    assert magic in data[:16]
    assert info["frames"] == (list(range(2, 12)) if suffix != ".png" else info["frames"])
    assert len(info["frames"]) == (6 if suffix == ".png" else 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # no temporary left


def test_movie_frames_share_one_scale_and_codec_friendly_size(recon):
    arc, out = recon
    _, rows = preview_frames(out, arc, [7])
    frame = _movie_frame(rows[0])
    assert frame.dtype == np.uint8 and frame.shape[0] % 16 == 0 and frame.shape[1] % 16 == 0


def test_cli_preview_and_its_errors(recon, tmp_path, run_cli):
    arc, out = recon
    r = run_cli("preview", out, "-o", tmp_path / "s.png", "--frames", "0:4")
    assert r.code == 0, r.err
    assert "4 frame(s)" in r.out and (tmp_path / "s.png").is_file()
    for args, needle in ((["-o", tmp_path / "s.txt"], ".png"), (["-o", tmp_path / "t.png", "--frames", "9:3"],
                                                              "--frames"),
                         (["-o", tmp_path / "nowhere" / "t.png"], "does not exist"),
                         (["-o", tmp_path / "t.png", "--archive", tmp_path / "missing.h5"], "missing.h5")):
        r = run_cli("preview", out, *args)
        assert r.code == 2, r.err
        lines = r.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.err


def test_demo_scores_and_writes_a_preview(tmp_path, run_cli):
    """The README's first command: the demo reconstructs with the shipped weights, scores and previews."""
    r = run_cli("demo", "--dir", tmp_path, "--frames", "21", "-q")
    assert r.code == 0, r.err
    assert "swin_xvr" in r.out and "key_blend" in r.out
    assert f"preview: {tmp_path / 'demo_preview.png'}" in r.out
    assert (tmp_path / "demo_preview.png").read_bytes()[:4] == b"\x89PNG"
