"""Image-quality metrics and the bicubic baseline used by ``evaluate`` and the benchmarks.

All functions are pure (they never modify their inputs) and vectorised; they work in float64.

Conventions
-----------
* :func:`psnr` and :func:`ssim` take the *reference* second, as ``metric(x, ref)``. When
  ``data_range`` is not given, it is the dynamic range of the **reference** array,
  ``ref.max() - ref.min()``, so that scoring several reconstructions of the same frame uses
  the same scale whatever the reconstructions contain. Pass ``data_range`` explicitly to
  compare frames on a fixed scale (e.g. 1.0 for images normalised to [0, 1], or 65535 for
  uint16 counts).
* Both accept one 2-D frame or a stack ``(..., H, W)``; a stack gives one number for the
  whole stack (mean squared error over all pixels for PSNR, mean of the SSIM map over all
  frames for SSIM; use a loop for per-frame values).
* :func:`ssim` is the Gaussian-window SSIM of Wang et al. (2004): window sigma 1.5 truncated at
  3.5 sigma (11 x 11), K1 = 0.01, K2 = 0.03, population (biased) statistics, and the mean of
  the SSIM map over the *valid* region (no padding: a 5-pixel border is not scored), so the
  frames must be at least 11 x 11.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["psnr", "ssim", "bicubic_upsample"]

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _as_pair(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {x.shape} vs reference {ref.shape}")
    if x.ndim < 2:
        raise ValueError(f"expected a 2-D frame or a stack of frames, got shape {x.shape}")
    return x, ref


def _data_range(ref: np.ndarray, data_range: float | None) -> float:
    if data_range is None:
        return float(ref.max() - ref.min())
    data_range = float(data_range)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return data_range


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio of ``x`` against ``ref``, in dB.

    ``10 * log10(data_range**2 / mean((x - ref)**2))``; ``data_range`` defaults to
    ``ref.max() - ref.min()`` (of the reference). Returns ``inf`` when the arrays are identical.
    Raises ValueError when they differ but the default range is zero (constant reference).
    """
    x, ref = _as_pair(x, ref)
    mse = float(np.mean((x - ref) ** 2))
    if mse == 0.0:
        return math.inf
    rng = _data_range(ref, data_range)
    if rng == 0.0:
        raise ValueError("the reference is constant: pass data_range explicitly")
    return 10.0 * math.log10(rng * rng / mse)


def _gaussian_window(sigma: float = _SSIM_SIGMA, truncate: float = _SSIM_TRUNCATE) -> np.ndarray:
    r = int(truncate * sigma + 0.5)
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable correlation with ``w`` over the last two axes, 'valid' output."""
    n = len(w)
    h = img.shape[-2] - n + 1
    tmp = w[0] * img[..., 0:h, :]
    for i in range(1, n):
        tmp = tmp + w[i] * img[..., i : i + h, :]
    wd = img.shape[-1] - n + 1
    out = w[0] * tmp[..., :, 0:wd]
    for i in range(1, n):
        out = out + w[i] * tmp[..., :, i : i + wd]
    return out


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity of ``x`` against ``ref`` (Gaussian window, sigma 1.5).

    ``data_range`` defaults to ``ref.max() - ref.min()``; identical frames give 1.0. Frames
    must be at least 11 x 11 (the window). See the module docstring for the details.
    """
    x, ref = _as_pair(x, ref)
    w = _gaussian_window()
    if x.shape[-1] < len(w) or x.shape[-2] < len(w):
        raise ValueError(f"frames must be at least {len(w)}x{len(w)} for SSIM, got {x.shape}")
    if np.array_equal(x, ref):
        return 1.0
    rng = _data_range(ref, data_range)
    if rng == 0.0:
        raise ValueError("the reference is constant: pass data_range explicitly")
    c1 = (_SSIM_K1 * rng) ** 2
    c2 = (_SSIM_K2 * rng) ** 2
    mx = _filter_valid(x, w)
    my = _filter_valid(ref, w)
    sxx = _filter_valid(x * x, w) - mx * mx
    syy = _filter_valid(ref * ref, w) - my * my
    sxy = _filter_valid(x * ref, w) - mx * my
    num = (2.0 * mx * my + c1) * (2.0 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def bicubic_upsample(frame: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upsampling of a 2-D frame (or a stack ``(..., h, w)``) by an integer ``scale``.

    Uses ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` (cubic
    convolution, a = -0.75, edge replication), computed in float64 when the input is float64
    and in float32 otherwise; the result has that dtype and shape ``(..., scale*h, scale*w)``.
    Values are not clipped (cubic interpolation can overshoot at edges).
    """
    import torch
    import torch.nn.functional as F

    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    arr = np.asarray(frame)
    if arr.ndim < 2:
        raise ValueError(f"expected a 2-D frame or a stack of frames, got shape {arr.shape}")
    dtype = np.float64 if arr.dtype == np.float64 else np.float32
    lead, (h, w) = arr.shape[:-2], arr.shape[-2:]
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype).reshape(-1, 1, h, w))
    with torch.no_grad():
        out = F.interpolate(t, scale_factor=scale, mode="bicubic", align_corners=False)
    return out.numpy().reshape(lead + (scale * h, scale * w))
