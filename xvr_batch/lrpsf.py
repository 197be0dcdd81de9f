"""The LR camera's blur relative to the binned HR camera: a small transfer kernel fitted on the key frames.

The refinement steps (:mod:`xvr_batch.motion`, :mod:`xvr_batch.refine`) compare a candidate HR frame with the LR
frame by binning it ``s x s``. A real LR camera does not see the binned HR frame: its scintillator spreads light
over a wider point spread than the HR camera's, a residual misregistration shifts it by a fraction of a pixel, and
both stay fixed through the experiment. At each key time the archive holds both a measured HR frame and its LR
frame, so the relation can be measured: on the LR grid (h x w), model space,

    LR_k  ~  H * bin_s(HR_k)          H: (2 R + 1) x (2 R + 1) (R = 2), its weights summing to 1

fitted by least squares over the pixels measured in the LR frame (with their whole neighbourhood), each pair
with its own gain and offset (the beam of that instant), with a small pull towards the identity kernel
(:data:`RIDGE`). A blurred LR camera gives a kernel with a spread-out centre; a sharp, registered pair, or LR
frames dominated by noise, give a kernel that explains no more than the plain binning, and then none is kept
(:data:`MIN_GAIN`).

Measured on the held-out split of issue 13 (its LR cameras blur by 0.3-1.2 LR px): the RMS residual of the key
frames against their LR frames (model units, measured pixels) is 0.016 with the kernel against 0.051 with the
plain binning on an archive with a strong LR blur (29005), 0.011 against 0.027 on a plain one (29004); what is
left is the cameras' noise. ``sigma`` of :mod:`xvr_batch.consistency` keeps its meaning (the plain binned
residual, what the per-frame consistency reports); the kernel and the residual it leaves (``sigma_kernel``) are
recorded beside it. The motion step (:mod:`xvr_batch.motion`, step ``psf`` of ``--refine lr``) compares through
it. The residual step of :mod:`xvr_batch.refine` does not: comparing through the kernel there raised the
validation archives (+2.94 -> +3.11 dB) but lowered the worst held-out archive from -0.39 to -0.99 dB.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

__all__ = ["RADIUS", "fit_kernel", "check_kernel", "apply_kernel", "apply_kernel_np", "residual", "kernel_sigma"]

#: Kernel radius on the LR grid: (2 R + 1) ** 2 weights.
RADIUS = 2
#: Pull towards the identity kernel, relative to the mean squared signal of the fitted pixels.
RIDGE = 1e-3
#: Fewest fitted pixels for a kernel (else none: the plain binning is used).
MIN_PIXELS = 200
#: Most pixels fitted per key frame (evenly spaced among those that qualify): bounds the memory and time of the fit
#: on large detectors.
MAX_PIXELS = 16384
#: Largest absolute weight a kernel may have (a fit beyond it is taken as ill-posed and dropped).
MAX_WEIGHT = 1.5
#: A kernel is kept only when it leaves at most this fraction of the plain binning's RMS residual: where noise
#: dominates (a starved LR camera) a fitted kernel explains nothing and is not used.
MIN_GAIN = 0.95
#: The noise level the motion step uses with a kernel: the residual the kernel leaves, but not below this fraction
#: of the plain binning's (``sigma``). The step's thresholds also have to absorb what its search over 81
#: displacements explains by chance where an object moved beyond its reach; chosen on the validation archives of
#: issue 13 (+2.98 dB against +2.93 without the floor; a fast spatter archive lost 1.1 dB without it).
SIGMA_FRACTION = 0.5


def _erode(ok: np.ndarray, r: int) -> np.ndarray:
    """True where the whole (2 r + 1)^2 neighbourhood lies inside the frame and is True."""
    h, w = ok.shape
    out = np.zeros_like(ok, dtype=bool)
    if h <= 2 * r or w <= 2 * r:
        return out
    inner = np.ones((h - 2 * r, w - 2 * r), bool)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            inner &= ok[dy:dy + h - 2 * r, dx:dx + w - 2 * r]
    out[r:h - r, r:w - r] = inner
    return out


def _affine(pred: np.ndarray, lr: np.ndarray) -> tuple[float, float]:
    """``(gain, offset)`` of the least-squares line ``lr ~ gain * pred + offset`` ((1, 0) when degenerate)."""
    v = float(np.var(pred))
    if not v > 0:
        return 1.0, 0.0
    g = float(np.mean((pred - pred.mean()) * (lr - lr.mean()))) / v
    if not (np.isfinite(g) and g > 0):
        return 1.0, 0.0
    return g, float(lr.mean() - g * pred.mean())


def _gather(x: np.ndarray, yy: np.ndarray, xx: np.ndarray, radius: int) -> np.ndarray:
    """(h, w) and pixel coordinates (n,) at least ``radius`` from the edge -> (n, (2R+1)^2): each pixel's
    neighbourhood, row by row."""
    k = 2 * radius + 1
    return np.stack([x[yy + dy - radius, xx + dx - radius] for dy in range(k) for dx in range(k)], -1)


def fit_kernel(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], radius: int = RADIUS
               ) -> tuple[np.ndarray, float, float] | None:
    """``pairs``: ``(binned_hr, lr, measured)`` on the LR grid, model space, one per key frame ->
    ``(kernel (2R+1, 2R+1) float64 summing to 1, rms before, rms after)`` over the fitted pixels (before: the plain
    binning, after: the kernel; each with its pair's fitted line), or None when fewer than :data:`MIN_PIXELS`
    pixels could be fitted, the fit is ill-posed, or the kernel explains too little (:data:`MIN_GAIN`).

    Each pair gets its own least-squares fit ``lr ~ u * binned + offset`` (``u``: (2R+1)^2 free weights, the
    off-centre ones pulled towards 0 by :data:`RIDGE`), so the beam of that instant (``sum(u)``) and an offset
    between the cameras are fitted with the blur and do not bias it; the kernel is the pixel-weighted mean of the
    pairs' ``u / sum(u)``."""
    k = 2 * radius + 1
    centre = (k * k) // 2
    data = []
    for binned, lr, ok in pairs:
        binned = np.asarray(binned, np.float64)
        lr = np.asarray(lr, np.float64)
        sel = np.flatnonzero(_erode(np.asarray(ok, bool) & np.isfinite(lr) & np.isfinite(binned), radius))
        if len(sel) < 16:
            continue
        if len(sel) > MAX_PIXELS:  # evenly spaced, so large frames cost no more than MAX_PIXELS each
            sel = sel[np.linspace(0, len(sel) - 1, MAX_PIXELS).astype(np.int64)]
        yy, xx = np.divmod(sel, lr.shape[1])
        data.append((_gather(binned, yy, xx, radius), lr[yy, xx]))
    n_all = sum(len(b) for _, b in data)
    if n_all < MIN_PIXELS:
        return None
    acc = np.zeros(k * k)
    for a, b in data:
        design = np.concatenate([a, np.ones((len(b), 1))], 1)
        gram = design.T @ design
        off = np.ones(k * k + 1)
        off[centre] = off[-1] = 0.0  # the centre and the offset are free
        gram += np.diag(off) * RIDGE * max(float(np.mean((a - a.mean()) ** 2)), 1e-12) * len(b)
        try:
            u = np.linalg.solve(gram, design.T @ b)[:-1]
        except np.linalg.LinAlgError:
            return None
        total = u.sum()
        if not (np.isfinite(total) and total > 0):
            return None
        acc += len(b) * u / total
    h = (acc / n_all).reshape(k, k)
    h /= h.sum()
    if not np.all(np.isfinite(h)) or np.abs(h).max() > MAX_WEIGHT:
        return None
    before, after = [], []
    for a, b in data:
        for pred, dest in ((a[:, centre], before), (a @ h.ravel(), after)):
            g, o = _affine(pred, b)
            dest.append(np.sum((b - g * pred - o) ** 2))
    rms_before, rms_after = float(np.sqrt(sum(before) / n_all)), float(np.sqrt(sum(after) / n_all))
    if not rms_after <= MIN_GAIN * rms_before:
        return None
    return h, rms_before, rms_after


def residual(binned: np.ndarray, lr: np.ndarray, measured: np.ndarray, kernel: np.ndarray | None) -> float | None:
    """RMS of ``lr - (gain * (kernel * binned) + offset)`` over the measured pixels (the line fitted there), or
    None with fewer than 16 of them."""
    m = np.asarray(measured, bool) & np.isfinite(lr)
    if m.sum() < 16:
        return None
    pred = binned if kernel is None else apply_kernel_np(binned, kernel)
    g, o = _affine(pred[m], lr[m])
    return float(np.sqrt(np.mean((lr[m] - g * pred[m] - o) ** 2)))


def kernel_sigma(sigma: float, sigma_kernel: float) -> float:
    """The motion step's noise level with a kernel (:data:`SIGMA_FRACTION`)."""
    return max(float(sigma_kernel), SIGMA_FRACTION * float(sigma))


def check_kernel(value) -> np.ndarray | None:
    """A recorded kernel (nested lists) if it is usable: square, odd, finite, summing to 1 -> float64 array."""
    try:
        h = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        return None
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] % 2 != 1 or h.shape[0] > 9:
        return None
    if not np.all(np.isfinite(h)) or abs(h.sum() - 1.0) > 1e-6 or np.abs(h).max() > MAX_WEIGHT:
        return None
    return h


def apply_kernel(x, kernel, dilation: int = 1):
    """``x`` (N, h, w) torch -> the same convolved with ``kernel`` ((k, k) torch, same dtype and device), its taps
    ``dilation`` pixels apart, the frame edge replicated; ``kernel`` None returns ``x``."""
    if kernel is None:
        return x
    import torch.nn.functional as F

    k = kernel.shape[-1]
    p = (k // 2) * dilation
    y = F.pad(x[:, None], (p, p, p, p), mode="replicate")
    return F.conv2d(y, kernel.view(1, 1, k, k), dilation=dilation)[:, 0]


def apply_kernel_np(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """:func:`apply_kernel` for one (h, w) numpy frame (float64)."""
    k = kernel.shape[0]
    r = k // 2
    h, w = x.shape
    p = np.pad(np.asarray(x, np.float64), r, mode="edge")
    return sum(kernel[dy, dx] * p[dy:dy + h, dx:dx + w] for dy in range(k) for dx in range(k))
