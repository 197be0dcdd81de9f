"""xvr_batch.warp: the cubic B-spline resampling a registered run uses in both directions."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from xvr_batch.warp import SplineWarp, model_to_hr_affine


def _smooth(shape, seed=0):
    return ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2).astype(np.float32)


def _rot(deg, scale, shift):
    th = math.radians(deg)
    a = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return np.c_[a, shift]


@pytest.mark.parametrize("src,dst", [((60, 80), (60, 80)), ((48, 64), (52, 70))])
def test_matches_scipy_cubic_spline(src, dst):
    """The same numbers as scipy's order-3 map_coordinates with mode='nearest', edges included."""
    img = _smooth(src)
    aff = _rot(1.5, 1.02, (1.3, -0.8))
    yy, xx = np.mgrid[0:dst[0], 0:dst[1]].astype(np.float64)
    sx = aff[0, 0] * xx + aff[0, 1] * yy + aff[0, 2]
    sy = aff[1, 0] * xx + aff[1, 1] * yy + aff[1, 2]
    ref = ndimage.map_coordinates(img, [sy, sx], order=3, mode="nearest")
    w = SplineWarp(aff, src, dst)
    out = w.numpy(img)
    assert out.shape == dst and out.dtype == np.float32
    assert np.abs(out - ref)[w.inside].max() < 1e-5
    inside_ref = (sx >= -0.5) & (sx <= src[1] - 0.5) & (sy >= -0.5) & (sy <= src[0] - 0.5)
    assert np.array_equal(w.inside, inside_ref) and 0.8 < w.inside.mean() < 1.0


def test_identity_and_constant():
    img = _smooth((40, 56), seed=1)
    ident = SplineWarp(np.array([[1.0, 0, 0], [0, 1.0, 0]]), img.shape, img.shape)
    assert np.abs(ident.numpy(img) - img).max() < 1e-5
    const = np.full((40, 56), 7.25, np.float32)
    assert np.abs(SplineWarp(_rot(10, 0.9, (3, 2)), const.shape, (30, 30)).numpy(const) - 7.25).max() < 1e-5


def test_batch_invariant_bytes():
    """A frame's result is the same bytes whatever else is in the batch (the pipeline's byte-identity)."""
    w = SplineWarp(_rot(-0.7, 1.01, (0.4, 0.9)), (32, 40), (36, 44))
    x = torch.from_numpy(np.stack([_smooth((32, 40), s) for s in range(5)]))
    whole = w(x)
    for i in range(5):
        assert torch.equal(whole[i], w(x[i:i + 1])[0])
        assert torch.equal(whole[i], w(x[i]))
    assert w(x[None]).shape == (1, 5, 36, 44)
    with pytest.raises(ValueError, match="expected"):
        w(torch.zeros(2, 10, 10))


def test_model_frame_round_trip():
    """HR camera -> LR camera's frame (x4) -> HR camera is close to the identity on a smooth image."""
    s, lr = 4, (24, 32)
    m = _rot(1.2, 1.015, (0.8, -0.6))
    a = model_to_hr_affine(m, s)
    hr = _smooth((s * lr[0], s * lr[1]), seed=3)
    fwd = SplineWarp(a, hr.shape, (s * lr[0], s * lr[1]))
    back = SplineWarp(np.linalg.inv(np.vstack([a, [0, 0, 1]]))[:2], fwd.dst_shape, hr.shape)
    rt = back.numpy(fwd.numpy(hr))
    core = back.inside & ndimage.binary_erosion(back.inside, iterations=6)
    assert np.abs(rt - hr)[core].max() < 2e-3
    # the identity registration gives the identity map: LR pixel x covers model pixels 4x..4x+3
    assert np.allclose(model_to_hr_affine(np.array([[1.0, 0, 0], [0, 1.0, 0]]), s), [[1, 0, 0], [0, 1, 0]])
