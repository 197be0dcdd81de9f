"""Resampling through a fixed affine map with cubic B-spline interpolation, in torch (CPU or GPU).

A registered two-camera run (:mod:`xvr_batch.registration`) reconstructs in the LR camera's own frame: the HR
key frames are resampled into that frame (once per key) and every reconstructed frame is resampled back onto
the HR camera's pixels (once per frame, on the device). Both resample well-sampled HR images, which cubic
B-splines do almost without loss (measured in ``docs/TWO_CAMERAS.md``); resampling the aliased LR frames
instead cost about twice as much quality.

:class:`SplineWarp` precomputes, for a given map and pair of shapes, the 16 source indices and weights of every
destination pixel. A call is a separable prefilter (the B-spline's inverse filter, truncated to
``2 * PREFILTER_TAPS + 1`` taps, as a fixed sum of shifted slices) and 16 gathers: only elementwise arithmetic in a
fixed order, so each frame's result is the same bytes whatever the batch it is in, on one device type.
Source pixels beyond the edge repeat the edge pixel; :attr:`SplineWarp.inside` tells which destination pixels
map inside the source field.

Coordinates: pixel centres at integers, ``x`` the column and ``y`` the row (the convention of
:data:`xvr_batch.registration.CONVENTION`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SplineWarp", "PREFILTER_TAPS", "model_to_hr_affine"]

#: Half-length of the truncated prefilter: its taps decay as (2 - sqrt(3))**k, 1.4e-7 at k = 12.
PREFILTER_TAPS = 12
#: Coefficients are kept this many pixels beyond the source field (the cubic's reach past its last sample).
_MARGIN = 2


def _prefilter_taps(k: int = PREFILTER_TAPS) -> tuple[float, ...]:
    """The inverse of the sampled cubic B-spline (1, 4, 1) / 6: sqrt(3) * z**|i|, z = sqrt(3) - 2, normalised."""
    z = math.sqrt(3.0) - 2.0
    taps = np.array([math.sqrt(3.0) * z ** abs(i) for i in range(-k, k + 1)])
    return tuple(float(t) for t in taps / taps.sum())


def _bspline_weights(f: np.ndarray) -> np.ndarray:
    """(4, ...) cubic B-spline weights of the taps at floor - 1 .. floor + 2, for fractions ``f`` in [0, 1)."""
    f2, f3 = f * f, f * f * f
    return np.stack([(1 - f) ** 3 / 6, (3 * f3 - 6 * f2 + 4) / 6, (-3 * f3 + 3 * f2 + 3 * f + 1) / 6, f3 / 6])


def model_to_hr_affine(matrix: np.ndarray, scale: int) -> np.ndarray:
    """(2, 3): a pixel (x, y) of the LR camera's frame upsampled ``scale``x -> the HR camera pixel it sees.

    ``matrix`` maps LR pixels to the HR/scale grid (the registration). LR pixel x covers model-frame pixels
    ``scale * x .. scale * x + scale - 1``, centred at ``scale * x + c`` with ``c = (scale - 1) / 2``; grid pixel u
    likewise covers HR pixels centred at ``scale * u + c``."""
    m = np.asarray(matrix, np.float64).reshape(2, 3)
    a, t = m[:, :2], m[:, 2]
    c = (scale - 1) / 2.0
    return np.c_[a, scale * t + c - a @ np.array([c, c])]


class SplineWarp:
    """Resample (..., Hs, Ws) images to (..., Hd, Wd): destination pixel (x, y) takes the source at
    ``affine @ (x, y, 1)`` (cubic B-spline interpolation)."""

    def __init__(self, affine: np.ndarray, src_shape: tuple[int, int], dst_shape: tuple[int, int]):
        self.affine = np.asarray(affine, np.float64).reshape(2, 3)
        self.src_shape = (int(src_shape[0]), int(src_shape[1]))
        self.dst_shape = (int(dst_shape[0]), int(dst_shape[1]))
        hs, ws = self.src_shape
        hd, wd = self.dst_shape
        yy, xx = np.mgrid[0:hd, 0:wd].astype(np.float64)
        a = self.affine
        sx = a[0, 0] * xx + a[0, 1] * yy + a[0, 2]
        sy = a[1, 0] * xx + a[1, 1] * yy + a[1, 2]
        #: (Hd, Wd) bool: destination pixels whose source point lies in the source field.
        self.inside = (sx >= -0.5) & (sx <= ws - 0.5) & (sy >= -0.5) & (sy <= hs - 0.5)
        fx, fy = np.floor(sx), np.floor(sy)
        wx, wy = _bspline_weights(sx - fx), _bspline_weights(sy - fy)  # 4, Hd, Wd
        # taps index the coefficients of the field grown by _MARGIN pixels on each side (edge repeated)
        e = _MARGIN
        ix = np.clip(fx[None] + np.arange(-1, 3)[:, None, None] + e, 0, ws + 2 * e - 1).astype(np.int64)
        iy = np.clip(fy[None] + np.arange(-1, 3)[:, None, None] + e, 0, hs + 2 * e - 1).astype(np.int64)
        idx = (iy[:, None] * (ws + 2 * e) + ix[None, :]).reshape(16, -1)  # (row tap, column tap) pairs
        wts = (wy[:, None] * wx[None, :]).reshape(16, -1)
        self._idx = torch.from_numpy(idx)
        self._wts = torch.from_numpy(wts.astype(np.float32))
        self._taps = _prefilter_taps()
        self._on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        t = self._on.get(key)
        if t is None:
            t = self._on[key] = (self._idx.to(device), self._wts.to(device))
        return t

    def _prefilter(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline coefficients of (N, Hs, Ws) float32 images with the edge pixels repeated beyond the field:
        (N, Hs + 2 e, Ws + 2 e), e = _MARGIN (the taps of destination pixels at the edge reach e beyond it)."""
        k = len(self._taps) // 2
        e = _MARGIN
        hs, ws = self.src_shape[0] + 2 * e, self.src_shape[1] + 2 * e
        p = F.pad(x[:, None], (k + e,) * 4, mode="replicate")[:, 0]  # N, Hs + 2(k + e), Ws + 2(k + e)
        rows = p[:, :, 0:ws] * self._taps[0]
        for i in range(1, 2 * k + 1):
            rows.add_(p[:, :, i:i + ws], alpha=self._taps[i])
        out = rows[:, 0:hs] * self._taps[0]
        for i in range(1, 2 * k + 1):
            out.add_(rows[:, i:i + hs], alpha=self._taps[i])
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-2]
        if tuple(x.shape[-2:]) != self.src_shape:
            raise ValueError(f"SplineWarp: images are {tuple(x.shape[-2:])}, expected {self.src_shape}")
        idx, wts = self._tables(x.device)
        # coefficients pixel-major (pixels, N): each tap gathers N contiguous values per destination pixel
        c = self._prefilter(x.reshape(-1, *self.src_shape).float()).flatten(1).t().contiguous()
        out = torch.index_select(c, 0, idx[0]) * wts[0][:, None]
        for j in range(1, 16):
            out.addcmul_(torch.index_select(c, 0, idx[j]), wts[j][:, None])
        return out.t().reshape(*lead, *self.dst_shape)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """The same on numpy float32 arrays (CPU)."""
        with torch.inference_mode():
            return self(torch.from_numpy(np.array(x, dtype=np.float32))).numpy()  # a copy: x may be read-only
