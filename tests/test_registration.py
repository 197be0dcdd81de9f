"""Registration of the LR camera's view onto the HR grid (xvr_batch.registration) and its use in reconstruct."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import make_archive, read_data
from xvr_batch import registration as R
from xvr_batch import synth
from xvr_batch.errors import UserError


def _pairs(d: Path, truth: dict):
    import tifffile
    with h5py.File(d / "lr.h5") as f:
        lr = f["/entry/data/data"][()].astype(float)
        dark, flat = f["/entry/instrument/detector/dark"][()].mean(0), f["/entry/instrument/detector/flat"][()].mean(0)
    hr = tifffile.imread(d / "hr/hr.tif").astype(float)
    hd, hf = tifffile.imread(d / "hr/dark.tif").mean(0), tifffile.imread(d / "hr/flat.tif").mean(0)
    lrs = [R._flat(lr[i], dark, flat) for i in truth["hr_index"]]
    hrs = [R._flat(hr[k + 1], hd, hf) for k in range(len(truth["hr_index"]))]
    return lrs, hrs


@pytest.fixture(scope="module")
def cams(tmp_path_factory):
    pytest.importorskip("tifffile")
    d = tmp_path_factory.mktemp("cams")
    truth = synth.two_cameras(d, n_frames=61, hr_shape=(128, 160), stride=10, offset=3, seed=3, tiff=True)
    return d, truth


def test_fit_matches_truth(cams):
    d, truth = cams
    reg = R.fit_pairs(*_pairs(d, truth), 4)
    err = reg.displacement_px(np.array(truth["matrix"]))
    p = reg.params()
    assert err < 0.1, err  # largest error over the LR field, LR px
    assert abs(p["rotation_deg"] - truth["rotation_deg"]) < 0.05
    assert not p["flip_x"] and reg.stats["overlap"] > 0.9 and reg.stats["ncc"] > 0.99


def test_fit_finds_a_flip(tmp_path):
    pytest.importorskip("tifffile")
    truth = synth.two_cameras(tmp_path, n_frames=31, hr_shape=(128, 160), stride=10, offset=3, seed=4, flip=True,
                              rotation_deg=-2.0, shift=(0.7, 0.4), tiff=True)
    reg = R.fit_pairs(*_pairs(tmp_path, truth), 4)
    assert reg.params()["flip_x"]
    assert reg.displacement_px(np.array(truth["matrix"])) < 0.3


def test_fit_fails_clearly_on_unrelated_views():
    rng = np.random.default_rng(0)
    lrs = [rng.normal(size=(32, 40)) for _ in range(4)]
    hrs = [rng.normal(size=(128, 160)) for _ in range(4)]
    with pytest.raises(R.RegistrationError) as exc:
        R.fit_pairs(lrs, hrs, 4)
    msg = str(exc.value)
    assert "correlation" in msg and "--registration FILE.json" in msg and "\n" not in msg


def test_params_and_json_round_trip(tmp_path):
    m = synth._lr_view_matrix((32, 40), 1.5, 1.02, (1.5, -1.2), False)
    reg = R.Registration(m, (32, 40), (32, 40))
    p = reg.params()
    assert math.isclose(p["rotation_deg"], 1.5, abs_tol=1e-9) and math.isclose(p["scale"], 1.02, rel_tol=1e-9)
    f = tmp_path / "reg.json"
    f.write_text(json.dumps(reg.to_dict()))
    back = R.load_json(str(f), (32, 40), (32, 40))
    assert np.allclose(back.matrix, m)
    flipped = R.Registration(synth._lr_view_matrix((32, 40), 0, 1, (0, 0), True), (32, 40), (32, 40))
    assert flipped.params()["flip_x"]
    assert R.Registration.identity((8, 8), (8, 8)).is_identity()


@pytest.mark.parametrize("content, words", [
    ("{not json", "cannot read"),
    ('{"matrix": [[1, 0], [0, 1]]}', "not 2x3"),
    ('{"matrix": [[0, 0, 0], [0, 0, 0]]}', "degenerate"),
    ('{"matrix": [[1, 0, 0], [0, 1, 0]], "lr_shape": [3, 3]}', "another archive"),
    ('[1, 2]', "matrix"),
    ('{"matrix": [[1, 0, 500], [0, 1, 0]]}', "over only 0.0% of the HR field"),
    ('{"matrix": [[0.1, 0, 0], [0, 0.1, 0]]}', "of the HR field (at least 50% is needed)"),
])
def test_bad_registration_file_is_a_one_line_error(run_cli, tmp_path, tiny_weights, content, words):
    arc = make_archive(tmp_path / "a.h5")
    bad = tmp_path / "reg.json"
    bad.write_text(content)
    out = tmp_path / "out.h5"
    r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--registration", bad, "-q")
    assert r.code == 2, r.err
    assert words in r.err and r.err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))
    r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--registration", tmp_path / "missing.json")
    assert r.code == 2 and "not found" in r.err


def test_aligned_archive_keeps_its_bytes(run_cli, tmp_path, tiny_weights):
    """auto on an aligned archive (no stored transform) gives exactly the bytes of --registration none."""
    arc = tmp_path / "a.h5"
    synth.synthesize(arc, n_frames=24, hr_shape=(64, 96), stride=8, seed=2)
    outs = {}
    for mode in ("auto", "none"):
        out = tmp_path / f"{mode}.h5"
        r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--registration", mode, "-q",
                    "--unit-frames", "8")
        assert r.code == 0, r.err
        outs[mode] = read_data(out)
        with h5py.File(out) as f:
            assert "registration" not in json.loads(f["/process/xvr_batch"].attrs.get("settings", "{}")
                                                    if isinstance(f["/process/xvr_batch"].attrs.get("settings"), str)
                                                    else "{}")
    assert outs["auto"].tobytes() == outs["none"].tobytes()
    small = make_archive(tmp_path / "small.h5")
    assert R.resolve(__import__("xvr_batch.io.archive", fromlist=["Archive"]).Archive(small), "auto") is None


def test_register_command(run_cli, tmp_path, cams):
    d, truth = cams
    arc = tmp_path / "arc.h5"
    f = truth["files"]
    r = run_cli("assemble", "-o", arc, "--lr", d / f["lr"], "--lr-time", d / f["lr_time"], "--lr-dark",
                d / f["lr_dark"], "--lr-flat", d / f["lr_flat"], "--hr", d / f["hr"], "--hr-time", d / f["hr_time"],
                "--hr-delay", truth["hr_delay"], "--hr-dark", d / f["hr_dark"], "--hr-flat", d / f["hr_flat"])
    assert r.code == 0, r.err
    r = run_cli("register", arc, "-o", tmp_path / "reg.json", "--plot", tmp_path / "reg.png")
    assert r.code == 0, r.err
    assert "rotation +1.5" in r.out and "overlap" in r.out
    reg = json.loads((tmp_path / "reg.json").read_text())
    assert np.max(np.abs(np.array(reg["matrix"]) - np.array(truth["matrix"]))) < 0.1
    assert (tmp_path / "reg.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("inspect", arc)
    assert "registration shift" in r.out and "clocks" in r.out
    r = run_cli("plan", arc)
    assert r.code == 0 and "registration (archive)" in r.out
    r = run_cli("plan", arc, "--registration", "none")
    assert "registration: none" in r.out
    r = run_cli("register", tmp_path / "missing.h5")
    assert r.code == 2 and "not found" in r.err


def test_resume_refuses_another_registration(run_cli, tmp_path, tiny_weights, cams):
    d, truth = cams
    f = truth["files"]
    arc = tmp_path / "arc.h5"
    assert run_cli("assemble", "-o", arc, "--lr", d / f["lr"], "--lr-time", d / f["lr_time"], "--hr", d / f["hr"],
                   "--hr-time", d / f["hr_time"], "--hr-delay", truth["hr_delay"]).code == 0
    out = tmp_path / "o.h5"
    wd = tmp_path / "wd"
    r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--workdir", wd, "--keep-workdir", "-q")
    assert r.code == 0, r.err
    man = json.loads((wd / "manifest.json").read_text())
    assert man["job"]["settings"]["registration"]["source"] == "archive"
    out.unlink()
    r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--workdir", wd, "--registration", "none")
    assert r.code == 2 and "settings changed" in r.err and "registration" in r.err


def test_resume_reuses_the_transform_fitted_at_plan_time(tmp_path, tiny_weights, cams):
    """auto on an archive without a stored transform fits one when the run is planned; a resume of that run
    takes the recorded transform instead of fitting again, and refits when the archive is another one."""
    import shutil

    from xvr_batch.errors import UserError
    from xvr_batch.pipeline import Options, prepare
    d, truth = cams
    f = truth["files"]
    arc = tmp_path / "arc.h5"
    from click.testing import CliRunner
    from xvr_batch.cli import main_group
    r = CliRunner().invoke(main_group, ["assemble", "-o", str(arc), "--lr", str(d / f["lr"]), "--lr-time",
                                        str(d / f["lr_time"]), "--hr", str(d / f["hr"]), "--hr-time",
                                        str(d / f["hr_time"]), "--hr-delay", str(truth["hr_delay"])])
    assert r.exit_code == 0, r.output
    with h5py.File(arc, "a") as h:  # as if another tool had written the archive: no stored transform
        del h["/exchange/registration"]
    opts = Options(archive=str(arc), output=str(tmp_path / "o.h5"), weights=str(tiny_weights),
                   workdir=str(tmp_path / "wd"))
    logs: list[str] = []
    job = prepare(opts, log=logs.append)
    job.close()
    assert any("fitted at plan time" in s for s in logs), logs
    first = job.settings["registration"]
    logs.clear()
    job = prepare(opts, log=logs.append)
    job.close()
    assert any("fitted when this run was planned" in s for s in logs), logs
    assert not any("fitted at plan time" in s for s in logs), logs
    assert job.settings["registration"] == first and job.config_hash
    other = tmp_path / "other.h5"
    shutil.copy(arc, other)
    with h5py.File(other, "a") as h:  # another archive (its first LR frame differs): the fit is not reused
        h["/exchange/data_lr"][0] = h["/exchange/data_lr"][0] // 2
    logs.clear()
    with pytest.raises(UserError):
        prepare(Options(archive=str(other), output=str(tmp_path / "o.h5"), weights=str(tiny_weights),
                        workdir=str(tmp_path / "wd")), log=logs.append)
    assert any("fitted at plan time" in s for s in logs), logs


def test_registered_output_is_byte_identical_across_unit_sizes(run_cli, tmp_path, tiny_weights, cams):
    """A registered run reconstructs in the LR camera's frame and resamples each frame back on the device:
    the output is the same bytes whatever the unit size; HR pixels the LR field misses hold the key blend."""
    d, truth = cams
    f = truth["files"]
    arc = tmp_path / "arc.h5"
    assert run_cli("assemble", "-o", arc, "--lr", d / f["lr"], "--lr-time", d / f["lr_time"], "--hr", d / f["hr"],
                   "--hr-time", d / f["hr_time"], "--hr-delay", truth["hr_delay"]).code == 0
    outs = []
    for unit in (8, 23):
        out = tmp_path / f"u{unit}.h5"
        r = run_cli("reconstruct", arc, "-o", out, "--weights", tiny_weights, "--unit-frames", unit, "-q",
                    "--dtype", "float32")
        assert r.code == 0, r.err
        outs.append(read_data(out))
    assert outs[0].shape == (61, 128, 160) and np.array_equal(outs[0], outs[1])
    with h5py.File(arc) as h:
        reg = R.Registration(h["/exchange/registration"][()], h["/exchange/data_lr"].shape[1:], (32, 40))
        keys, idx = h["/exchange/data_hr"][()].astype(np.float32), h["/exchange/hr_index"][()]
    from xvr_batch.warp import SplineWarp, model_to_hr_affine
    a = model_to_hr_affine(reg.matrix, 4)
    outside = ~SplineWarp(np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2], (128, 160), (128, 160)).inside
    assert 0.01 < outside.mean() < 0.2
    # at a key time the blend is that key frame itself (in counts, up to float rounding of the mapping)
    k = 2
    got, want = outs[0][idx[k]][outside], keys[k][outside]
    assert np.abs(got - want).max() < 1e-2 * max(1.0, float(np.abs(want).max()))


def _shifted_pairs(seed: int, shift_lr: tuple[float, float], n: int = 3):
    """HR key frames of a smooth random field and LR frames that see it shifted by ``shift_lr`` LR px."""
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    lrs, hrs = [], []
    for _ in range(n):
        field = ndimage.gaussian_filter(rng.normal(size=(160, 160)), 3.0)
        field = (field - field.min()) / np.ptp(field)
        hr = field[16:144, 16:144]
        moved = ndimage.shift(field, (-4 * shift_lr[1], -4 * shift_lr[0]), order=3)[16:144, 16:144]
        lrs.append(moved.reshape(32, 4, 32, 4).mean(axis=(1, 3)))
        hrs.append(hr)
    return lrs, hrs


def test_fit_leaves_out_clipped_readings():
    # the LR camera clips the brightest third of every frame: those readings are not the field, and a fit that
    # uses them is pulled off the true shift; with the validity maps it is not
    lrs, hrs = _shifted_pairs(5, (0.3, -0.2))
    truth = np.array([[1.0, 0, 0.3], [0, 1.0, -0.2]])
    level = [float(np.quantile(x, 0.66)) for x in lrs]
    clipped = [np.minimum(x, c) for x, c in zip(lrs, level)]
    valid = [x < c for x, c in zip(lrs, level)]
    masked = R.fit_pairs(clipped, hrs, 4, lr_valid=valid, local=True)
    assert masked.displacement_px(truth) < 0.05, masked.summary()
    plain = R.fit_pairs(clipped, hrs, 4, local=True)
    assert plain.displacement_px(truth) > 2 * masked.displacement_px(truth)


def test_cost_refuses_anticorrelated_matches():
    # the per-pair linear fit takes an anticorrelated match with a negative gain and a small residual (a frame
    # with a gradient turned by 180 degrees matches that way); the search must not start from one
    lrs, hrs = _shifted_pairs(6, (0.0, 0.0))
    ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    lv = R._Pairs(lrs, hrs, 4, 1)
    assert math.isfinite(R._cost(lv, ident, [0, 1, 2]))
    inverted = R._Pairs([1.0 - x for x in lrs], hrs, 4, 1)
    assert np.mean(inverted.residuals(ident, [0, 1, 2])[0] ** 2) < 1e-3  # a perfect fit, for the linear model
    assert R._cost(inverted, ident, [0, 1, 2]) == math.inf


@pytest.mark.parametrize("seed,effects,misregistered", [
    (29012, ["saturation", "read", "fpn", "defects", "flicker"], False),
    (29017, ["texture", "saturation", "psf", "fpn", "defects", "flicker", "misreg"], True),
])
def test_auto_registration_of_standard_archives_with_detector_effects(tmp_path, seed, effects, misregistered):
    # --registration auto on a standard archive: a local, masked fit. An aligned archive whose cameras clip and
    # have defects is read as it is (the global search fitted a 0.4 px transform here); a misregistered one gets
    # a transform close to the true one (the global search: 0.24 px off)
    from xvr_batch.io.archive import Archive
    p = tmp_path / "a.h5"
    summary = synth.synthesize(p, n_frames=41, hr_shape=(128, 128), stride=20, seed=seed,
                               families=["collide"] if misregistered else ["spatter"], effects=effects)
    reg = R.resolve(Archive(str(p)), "auto")
    if not misregistered:
        assert reg is None
    else:
        truth = np.array(summary["effect_params"]["misreg"]["matrix"])
        assert reg is not None and reg.displacement_px(truth) < 0.2, reg.summary()


def test_local_fit_falls_back_to_the_search_when_far_from_the_identity():
    # a "standard" archive that is not nearly aligned (6 LR px off): the fit from the identity does not
    # correlate, so the global search runs and finds the shift
    lrs, hrs = _shifted_pairs(5, (6.0, 4.0))
    truth = np.array([[1.0, 0, 6.0], [0, 1.0, 4.0]])
    lv = R._Pairs(lrs, hrs, 4, 1)
    assert np.mean([s[0] for s in lv.residuals(np.array([[1.0, 0, 0], [0, 1.0, 0]]), [0, 1, 2])[1]]) < 0.5
    reg = R.fit_pairs(lrs, hrs, 4, local=True)
    assert reg.displacement_px(truth) < 0.05, reg.summary()


def test_auto_does_not_apply_a_search_fit_that_correlates_poorly(tmp_path):
    # HR flats equal to the darks (a broken calibration): every HR pixel looks defective and the HR frames cannot
    # be flat-fielded, so no fit from the identity correlates and the search finds a wild transform (37 px,
    # -175 deg, ncc 0.68 here); auto must read the archive as it is rather than apply that
    from xvr_batch.io.archive import Archive
    p = tmp_path / "a.h5"
    synth.synthesize(p, n_frames=41, hr_shape=(128, 128), stride=20, seed=29000, families=["particles"],
                     effects=["texture", "saturation", "read", "misreg"])
    with h5py.File(p, "r+") as f:
        d = f["exchange/data_dark_hr"][()].mean(0)
        w = f["exchange/data_white_hr"]
        w[...] = np.broadcast_to(d, w.shape).astype(w.dtype)
    logs: list[str] = []
    assert R.resolve(Archive(str(p)), "auto", log=logs.append) is None
    assert any("correlates less than" in m for m in logs), logs


def _fitted(shift_x: float, **stats) -> R.Registration:
    st = {"residual": 0.08, "residual_identity": 0.10, "ncc": 0.99, "consistency_px": 0.05, "start": "identity"}
    st.update(stats)
    return R.Registration(np.array([[1.0, 0, shift_x], [0, 1.0, 0]]), (32, 32), (32, 32), stats=st)


@pytest.mark.parametrize("reg,applied,reason", [
    (_fitted(0.4), True, None),
    (_fitted(0.2), False, ""),  # within IDENTITY_TOL_PX
    (_fitted(0.4, residual=0.095), False, ""),  # lowers the residual by 5 %, less than MIN_IMPROVEMENT
    (_fitted(3.0, start="search", ncc=0.68), False, "correlates less than"),
    (_fitted(3.0, start="search", ncc=0.95), True, None),
    (_fitted(0.4, consistency_px=0.67), False, "scatter by 0.67 px"),
    (_fitted(0.4, consistency_px=None), True, None),  # fewer than 3 pairs: no scatter to compare with
])
def test_why_auto_does_not_apply_a_fit(reg, applied, reason):
    why = R.why_not_applied(reg)
    assert (why is None) == applied
    if reason is not None:
        assert reason in why
