"""Pixels a camera did not measure: clipped (saturated) readings and defective pixels, found from the
archive's own darks, flats and dtype, and what the calibration puts in their place.

Real detectors clip at their full scale (the dtype's maximum, or a lower plateau such as 4095 for a 12-bit
camera stored in uint16), have hot pixels whose dark is already at full scale and dead pixels that read
nothing. Flat-fielding such a pixel gives a number that is not a transmission: a flat that clipped
underestimates the open beam, a clipped reading underestimates the sample's transmission, and a dead or
hot pixel reads black. The network never saw such numbers and fails on them (a clipped LR frame cost the
shipped weights 8-15 dB, a dead pixel a black 4x4 HR blob).

What is found, per camera, from the averaged darks ``D`` and flats ``W`` (all pure functions of the
archive, so every unit and every chunking sees the same masks):

* the **clip level** (:func:`clip_level`): the dtype's maximum for integers; a lower level when at least
  :data:`PLATEAU_FRACTION` of the flat pixels sit exactly on one maximum value (a plateau); for float
  data only such a plateau;
* **defective** pixels (:func:`flat_defects`): ``W - D`` at most :data:`DEFECT_FRACTION` of the flat's
  99th percentile (dead pixels and hot pixels whose dark is saturated both read ``W - D ~ 0``);
* pixels whose **flat clipped** (:func:`near_clip`): the mean flat within :data:`CLIP_MARGIN` of the
  clip level, above the dark.

:class:`xvr_batch.normalise.Calibration` uses them: the LR flat of a pixel whose flat clipped is
estimated from the HR camera's flat (binned, times the LR/HR flat ratio measured where neither clipped);
defective pixels take the mean of their valid neighbours (:func:`inpaint`); an LR reading at the clip
level, or without any usable flat, takes the time blend of the two bracketing key frames binned to the LR
grid, but never less than what the clipped reading itself says (the truth is at least that bright). The
LR->HR intensity fit leaves out every block that holds such a pixel.

An archive without clipped or defective pixels gets empty masks and exactly the numbers it got before.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PLATEAU_FRACTION", "DEFECT_FRACTION", "CLIP_MARGIN", "clip_level", "flat_defects", "near_clip",
           "inpaint", "bin_any", "bin_mean"]

#: share of flat pixels that must sit exactly on one maximum value for it to count as a clip plateau
PLATEAU_FRACTION = 1e-3
#: a pixel whose flat minus dark is at most this share of the flat's 99th percentile is defective
DEFECT_FRACTION = 0.02
#: a mean flat within this share of (level - dark) below the clip level clipped in some of its frames
CLIP_MARGIN = 0.02


def clip_level(dtype: np.dtype, flats: list[np.ndarray]) -> float | None:
    """The value at which this camera clips, or None when nothing says it clips.

    ``flats`` are raw frames (any of the camera's flat frames or data frames); a value that at least
    :data:`PLATEAU_FRACTION` of their pixels share exactly at their maximum is a plateau. For integer
    dtypes the dtype's maximum is the level unless a lower plateau is found."""
    dtype = np.dtype(dtype)
    level: float | None = float(np.iinfo(dtype).max) if dtype.kind in "ui" else None
    for f in flats:
        if f is None or f.size == 0:
            continue
        top = float(np.max(f))
        if not np.isfinite(top) or top <= 0:
            continue
        if np.count_nonzero(f == top) >= max(4, PLATEAU_FRACTION * f.size):
            level = top if level is None else min(level, top)
    return level


def flat_defects(dark: np.ndarray, white: np.ndarray) -> np.ndarray:
    """Dead and hot pixels: flat minus dark at most :data:`DEFECT_FRACTION` of its 99th percentile."""
    span = np.asarray(white, np.float64) - np.asarray(dark, np.float64)
    ref = float(np.percentile(span, 99)) if span.size else 0.0
    if not ref > 0:
        return np.zeros(span.shape, bool)
    return span <= DEFECT_FRACTION * ref


def near_clip(mean_frame: np.ndarray, dark: np.ndarray, level: float | None) -> np.ndarray:
    """Pixels of an averaged frame within :data:`CLIP_MARGIN` of ``level`` (some of their frames clipped)."""
    if level is None:
        return np.zeros(np.shape(mean_frame), bool)
    d = np.asarray(dark, np.float64)
    return np.asarray(mean_frame, np.float64) >= level - CLIP_MARGIN * np.maximum(level - d, 0.0)


def bin_any(mask: np.ndarray, s: int) -> np.ndarray:
    """True for each ``s x s`` block holding a True pixel (the shape must be a multiple of ``s``)."""
    h, w = mask.shape[0] // s, mask.shape[1] // s
    return mask[: h * s, : w * s].reshape(h, s, w, s).any(axis=(1, 3))


def bin_mean(x: np.ndarray, s: int) -> np.ndarray:
    """Mean over ``s x s`` blocks, float32."""
    h, w = x.shape[-2] // s, x.shape[-1] // s
    v = x[..., : h * s, : w * s].reshape(*x.shape[:-2], h, s, w, s)
    return v.mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)


def inpaint(x: np.ndarray, mask: np.ndarray, max_rounds: int = 64) -> np.ndarray:
    """Fill ``x[mask]`` (2-D, in place, returned) with the mean of its valid 3x3 neighbours, growing inwards
    round by round; pixels still unreached after ``max_rounds`` (a frame with no valid pixel near) take the
    mean of all valid pixels, or 0. The work is proportional to the number of masked pixels."""
    todo = np.array(mask, bool)
    if not todo.any():
        return x
    h, w = x.shape
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for _ in range(max_rounds):
        ys, xs = np.nonzero(todo)
        acc = np.zeros(ys.size)
        cnt = np.zeros(ys.size)
        for dy, dx in offsets:
            ny, nx = ys + dy, xs + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            nyc, nxc = np.clip(ny, 0, h - 1), np.clip(nx, 0, w - 1)
            ok = inside & ~todo[nyc, nxc]
            acc += np.where(ok, x[nyc, nxc], 0.0)
            cnt += ok
        reach = cnt > 0
        if not reach.any():
            break
        x[ys[reach], xs[reach]] = (acc[reach] / cnt[reach]).astype(x.dtype)
        todo[ys[reach], xs[reach]] = False
        if not todo.any():
            return x
    if todo.any():
        good = ~todo
        x[todo] = x[good].mean() if good.any() else 0
    return x
