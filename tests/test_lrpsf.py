"""The LR camera's transfer kernel (:mod:`xvr_batch.lrpsf`): fitted on key-frame pairs, recorded with the
consistency sigma, and used by the motion step of ``--refine lr`` (step ``psf``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xvr_batch.consistency import check_record, fit_baseline
from xvr_batch.io.archive import Archive
from xvr_batch.lrpsf import apply_kernel, apply_kernel_np, check_kernel, fit_kernel
from xvr_batch.normalise import Calibration, fit_normalisation


def _gauss(sigma: float, r: int = 2) -> np.ndarray:
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    k = np.outer(g, g)
    return k / k.sum()


def _pairs(kernel: np.ndarray | None, n: int = 3, noise: float = 0.002, gains=(1.0, 1.1, 0.9), seed: int = 0):
    """``n`` (binned, lr, measured) pairs: a textured binned HR frame (48 x 48), and its LR frame = gain * (kernel *
    binned) + offset + noise; the last pair has a clipped band (not measured)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c = 0.5 + 0.3 * rng.random((48, 48))
        pred = c if kernel is None else apply_kernel_np(c, kernel)
        lr = gains[i % len(gains)] * pred + 0.01 * i + noise * rng.standard_normal(c.shape)
        ok = np.ones(c.shape, bool)
        if i == n - 1:
            ok[10:20] = False
            lr[10:20] = 5.0  # what a clipped reading might read: never fitted
        out.append((c, lr, ok))
    return out


def test_a_known_blur_is_recovered_through_gains_offsets_and_clipping():
    true = _gauss(0.8)
    fit = fit_kernel(_pairs(true))
    assert fit is not None
    h, before, after = fit
    assert h.shape == (5, 5) and abs(h.sum() - 1) < 1e-12
    assert np.abs(h - true).max() < 0.02, np.round(h - true, 3)
    assert after < 0.3 * before and after < 0.003  # what is left is the noise (0.002)


def test_a_sharp_pair_gives_no_kernel():
    """LR frames that are the binned HR frames (plus noise): nothing to gain over the plain binning -> None."""
    assert fit_kernel(_pairs(None)) is None
    assert fit_kernel(_pairs(_gauss(0.5))) is not None  # a mild blur is worth a kernel


def test_too_few_measured_pixels_give_no_kernel():
    pairs = [(c, lr, np.zeros_like(ok)) for c, lr, ok in _pairs(None)]
    pairs[0][2][:8, :8] = True  # 4 x 4 interior pixels: below the minimum
    assert fit_kernel(pairs) is None
    assert fit_kernel([]) is None


def test_recorded_kernels_are_checked():
    good = _gauss(0.7)
    assert np.array_equal(check_kernel(good.tolist()), good)
    for bad in (None, "x", [[1.0, 0.0]], np.ones((4, 4)) / 16, (good * 2).tolist(), np.full((5, 5), np.nan),
                np.ones((11, 11)) / 121, [[0.0, 0.0, 0.0], [0.0, 3.0, -2.0], [0.0, 0.0, 0.0]]):
        assert check_kernel(bad) is None, bad


def test_torch_and_numpy_convolutions_agree_and_dilation_spaces_the_taps():
    rng = np.random.default_rng(1)
    x = rng.random((2, 20, 24))
    k = _gauss(0.9)
    t = apply_kernel(torch.from_numpy(x), torch.from_numpy(k))
    for i in range(2):
        assert np.allclose(t[i].numpy(), apply_kernel_np(x[i], k), atol=1e-12)
    assert apply_kernel(torch.from_numpy(x), None) is not None
    # dilation s on the s-times finer grid equals the kernel on the coarse grid, sampled every s-th pixel
    fine = torch.from_numpy(np.kron(x[0], np.ones((4, 4))))[None]
    coarse = apply_kernel(torch.from_numpy(x[:1]), torch.from_numpy(k))[0]
    dil = apply_kernel(fine, torch.from_numpy(k), dilation=4)[0]
    assert torch.allclose(dil[::4, ::4], coarse, atol=1e-12)


@pytest.mark.parametrize("effects", [["psf"], None])
def test_fit_baseline_records_the_kernel_of_a_real_archive(tmp_path, effects):
    """On a synthetic archive whose LR camera blurs (effect psf) the kernel leaves far less residual than the
    plain binning; the record survives check_record, and a record from before the kernel has none."""
    from xvr_batch.synth import synthesize

    path = tmp_path / "a.h5"
    info = synthesize(str(path), n_frames=41, hr_shape=(96, 96), stride=10, families=["particles"], seed=5,
                      effects=effects)
    with Archive(str(path)) as arc:
        rec = fit_baseline(arc, Calibration(arc, fit_normalisation(arc)))
    h = check_kernel(rec["kernel"])
    assert h is not None and rec["sigma_kernel"] > 0
    if effects:
        assert info["effect_params"]["psf"]["sigma_lr"] > 0.25
        assert rec["sigma_kernel"] < 0.7 * rec["sigma"], rec
        assert h[2, 2] < 0.9  # a spread-out centre
    again = check_record(rec)
    assert again["kernel"] == rec["kernel"] and again["sigma_kernel"] == rec["sigma_kernel"]
    old = {k: v for k, v in rec.items() if k not in ("kernel", "sigma_kernel")}
    assert check_record(old)["kernel"] is None and check_record(old)["sigma_kernel"] is None
    assert check_record(dict(rec, kernel=[[1.0]], sigma_kernel=float("nan")))["kernel"] is None


def test_a_kernel_that_explains_nothing_is_not_used():
    """LR frames that are mostly noise: a fitted kernel leaves about the plain binning's residual -> None."""
    assert fit_kernel(_pairs(_gauss(0.8), noise=0.5)) is None


def test_blurred_lr_camera_end_to_end(tmp_path, with_and_without):
    """An archive whose LR camera blurs (effect psf) with a moving occluder: the motion step compared through the
    fitted kernel (step psf) brings the output closer to the truth than the plain binning, byte-identically across
    unit sizes and batches."""
    from xvr_batch.synth import synthesize

    arc = tmp_path / "blurred.h5"
    synthesize(str(arc), n_frames=33, hr_shape=(64, 64), stride=16, families=["occluder"], seed=29005,
               effects=["psf"])
    data, psnr = with_and_without(arc, "psf", ("denoise", "motion", "residual", "beam", "blind"))
    assert np.array_equal(data["with"], data["with_units"])
    assert psnr["with"] > psnr["without"] + 0.6, psnr  # measured: 26.62 vs 25.32 dB


def test_large_frames_fit_a_bounded_sample(monkeypatch):
    """Above MAX_PIXELS qualifying pixels per key frame an evenly spaced sample is fitted: the same kernel."""
    import xvr_batch.lrpsf as lrpsf

    full = fit_kernel(_pairs(_gauss(0.8)))[0]
    monkeypatch.setattr(lrpsf, "MAX_PIXELS", 600)
    sampled = fit_kernel(_pairs(_gauss(0.8)))[0]
    assert np.abs(sampled - full).max() < 0.02
