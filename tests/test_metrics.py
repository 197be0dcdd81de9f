"""Tests for xvr_batch.metrics: PSNR, SSIM and the bicubic baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xvr_batch.metrics import bicubic_upsample, psnr, ssim


@pytest.fixture()
def frame() -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:48]
    img = 0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 7.0) + 0.05 * rng.standard_normal((64, 48))
    return np.clip(img, 0, 1)


def test_psnr_identical_is_inf(frame: np.ndarray) -> None:
    assert psnr(frame, frame) == math.inf
    f32 = frame.astype(np.float32)
    assert psnr(f32, f32.copy()) == math.inf


def test_psnr_known_value() -> None:
    ref = np.zeros((16, 16))
    ref[0, 0] = 1.0  # range 1
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref - 0.01, ref) == pytest.approx(40.0, abs=1e-9)
    assert psnr(ref + 0.1, ref, data_range=10.0) == pytest.approx(40.0, abs=1e-9)


def test_psnr_uses_reference_range(frame: np.ndarray) -> None:
    noisy = frame + 0.02
    expected = 10 * math.log10((frame.max() - frame.min()) ** 2 / 0.02**2)
    assert psnr(noisy, frame) == pytest.approx(expected)
    # a stack gives one number over all pixels
    stack = np.stack([frame, frame])
    assert psnr(stack + 0.02, stack) == pytest.approx(expected)


def test_psnr_errors(frame: np.ndarray) -> None:
    with pytest.raises(ValueError):
        psnr(frame, frame[:-1])
    with pytest.raises(ValueError):
        psnr(np.ones((8, 8)), np.zeros((8, 8)))  # constant reference, no range
    assert psnr(np.ones((8, 8)), np.zeros((8, 8)), data_range=1.0) == pytest.approx(0.0)


def test_ssim_identical_is_one(frame: np.ndarray) -> None:
    assert ssim(frame, frame) == 1.0
    assert ssim(frame, frame.copy(), data_range=1.0) == pytest.approx(1.0)


def test_ssim_decreases_with_noise(frame: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(frame.shape)
    values = [ssim(frame + s * noise, frame, data_range=1.0) for s in (0.01, 0.05, 0.2)]
    assert 1.0 > values[0] > values[1] > values[2]
    assert values[2] < 0.6


def test_ssim_symmetric_ish(frame: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    other = frame + 0.05 * rng.standard_normal(frame.shape)
    a = ssim(other, frame, data_range=1.0)
    b = ssim(frame, other, data_range=1.0)
    assert a == pytest.approx(b, abs=1e-12)  # symmetric for a fixed range
    assert ssim(other, frame) == pytest.approx(ssim(frame, other), abs=0.05)


def test_ssim_matches_scipy_reference(frame: np.ndarray) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    x = frame + 0.05 * rng.standard_normal(frame.shape)
    y = frame

    def filt(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")[5:-5, 5:-5]

    c1, c2 = 0.01**2, 0.03**2
    mx, my = filt(x), filt(y)
    vx, vy, vxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    ref = np.mean((2 * mx * my + c1) * (2 * vxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert ssim(x, y, data_range=1.0) == pytest.approx(ref, abs=1e-10)


def test_ssim_too_small() -> None:
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8)), np.ones((8, 8)))


def test_bicubic_upsample_shape_and_dtype(frame: np.ndarray) -> None:
    up = bicubic_upsample(frame, 4)
    assert up.shape == (256, 192)
    assert up.dtype == np.float64
    up32 = bicubic_upsample(frame.astype(np.uint16), 2)
    assert up32.shape == (128, 96) and up32.dtype == np.float32
    stack = bicubic_upsample(np.stack([frame, frame]), 3)
    assert stack.shape == (2, 192, 144)
    np.testing.assert_allclose(stack[0], stack[1])


def test_bicubic_upsample_values() -> None:
    const = np.full((5, 7), 3.25)
    np.testing.assert_allclose(bicubic_upsample(const, 4), 3.25, atol=1e-12)
    # a linear ramp stays a monotone ramp through the half-pixel-centred grid (cubic
    # convolution with a = -0.75 is not exactly linear-preserving, hence the tolerance)
    ramp = np.tile(np.arange(16, dtype=np.float64), (8, 1))
    up = bicubic_upsample(ramp, 2)
    expected = (np.arange(32) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(up[4, 4:-4], expected[4:-4], atol=0.06)
    assert np.all(np.diff(up[4]) >= 0)
    # the input is not modified, and upsampling then block-averaging is close to the input
    frame = np.random.default_rng(0).random((12, 12))
    before = frame.copy()
    up = bicubic_upsample(frame, 4)
    np.testing.assert_array_equal(frame, before)
    assert np.abs(up.reshape(12, 4, 12, 4).mean(axis=(1, 3)) - frame).mean() < 0.1
    with pytest.raises(ValueError):
        bicubic_upsample(frame, 0)
