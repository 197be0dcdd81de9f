"""Registration of the LR camera's view onto the HR camera's view (the HR/scale grid).

Conventions (also in docs/TWO_CAMERAS.md)
----------------------------------------
* Coordinates are ``(x, y) = (column, row)`` with **pixel centres at integers**: the centre of pixel
  ``[i, j]`` is ``(x=j, y=i)``; a frame of width ``w`` spans ``x`` in ``[-0.5, w - 0.5]``.
* The **grid** is the HR frame binned ``scale x scale``: grid pixel ``[i, j]`` is the mean of HR pixels
  ``[s*i : s*i+s, s*j : s*j+s]``; its centre is at HR coordinate ``s*j + (s-1)/2``.
* The transform is a 2x3 matrix ``M`` mapping an **LR pixel** ``(x, y, 1)`` to the grid point ``(u, v)``
  where the LR camera sees it: ``[u, v] = M @ [x, y, 1]``. The identity means "LR is the HR field binned
  exactly by ``scale``" (the layout of a standard archive).
* A **flip** is part of the matrix (a negative determinant). ``flip_x`` is reported when the LR image is
  mirrored left-right: ``M = [R(theta) * S] @ diag(-1, 1)`` plus the shift (a flip of rows is a flip of
  columns plus a 180 degree rotation, and is reported that way).
* Parameters: ``rotation_deg`` is counter-clockwise in ``(x, y)`` (x right, y down: clockwise on screen),
  ``scale`` = grid pixels per LR pixel, ``shift_x``/``shift_y`` = where LR pixel ``(0, 0)`` lands.
* To reconstruct (:class:`RegisteredArchive`), the model works in the **LR camera's frame**: the LR frames
  are read as recorded, each HR key frame is resampled into that frame upsampled ``scale`` x (model-frame
  pixel ``(X, Y)`` reads the HR camera at :func:`xvr_batch.warp.model_to_hr_affine`), and each reconstructed
  frame is resampled back onto the HR camera's pixels on the device (cubic B-splines, :mod:`xvr_batch.warp`).
  HR pixels the LR field does not cover are the time-weighted blend of the two bracketing key frames.
  (Resampling the aliased LR frames onto the grid instead lost 0.4 dB more; ``Registration.warp`` still does
  that for the fit and the plot.)
* The HR camera is the geometric reference; the LR camera is the time reference (see ``assemble``).

Fit (:func:`fit_pairs`): on the key pairs (LR frame at each key time, HR key frame), flat-fielded when
darks and flats exist, with the readings a camera did not measure (clipped, defective) left out. A
Fourier-Mellin + phase-correlation start (rotation, scale, flip, shift; ``local``: the identity), then a
joint robust least-squares refinement, coarse to fine, that samples the HR frame (box-filtered to the LR
footprint) at the grid position of every LR pixel with a per-pair gain/offset; then every pair is refined
alone and pairs that disagree with the joint fit are rejected as outliers, and the joint fit is redone.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage, optimize

from xvr_batch.errors import UserError

__all__ = ["Registration", "RegistrationError", "fit_pairs", "fit_archive", "key_pairs", "load_json",
           "resolve", "why_not_applied", "RegisteredArchive", "CONVENTION", "IDENTITY_TOL_PX", "plot"]

CONVENTION = ("xvr_batch.registration/1: M maps LR pixel (x=column, y=row, 1) to the HR/scale grid; "
              "pixel centres at integers")
#: A fitted transform whose largest displacement over the LR field is below this (LR px) is the identity.
IDENTITY_TOL_PX = 0.25
#: ``auto`` applies a fitted transform only if it lowers the relative residual by at least this fraction
#: (on aligned synthetic archives the fit finds spurious ~0.1 px transforms that lower it by ~5%).
MIN_IMPROVEMENT = 0.10
MIN_OVERLAP = 0.5
MIN_NCC = 0.3
MAX_RESIDUAL = 1.0
MAX_PAIRS = 12
#: ``local`` fits keep the fit from the identity when its correlation reaches this, else search globally; ``auto``
#: applies a fit from the global search to a standard archive only if it correlates this well
LOCAL_MIN_NCC = 0.9
#: below this share of valid pixels (mean over the key pairs), a camera's validity mask is not used
MIN_VALID = 0.25
#: Spline order of ``Registration.warp`` (LR onto the grid: the fit's residual maps and the plot; 3: cubic B-spline).
WARP_ORDER = 3
HOW_BY_HAND = ("give the transform by hand: --registration FILE.json with {\"matrix\": [[a, b, tx], "
               "[c, d, ty]]} mapping LR pixel (x, y) to the HR/4 grid (docs/TWO_CAMERAS.md)")


class RegistrationError(UserError):
    """The transform cannot be fitted well enough (numbers in the message) or is malformed."""


# --------------------------------------------------------------------------------------------- the transform

@dataclass
class Registration:
    matrix: np.ndarray  # (2, 3) float64, LR (x, y, 1) -> grid (u, v)
    lr_shape: tuple[int, int]
    grid_shape: tuple[int, int]
    source: str = "fit"
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(2, 3)
        self.lr_shape = tuple(int(v) for v in self.lr_shape)
        self.grid_shape = tuple(int(v) for v in self.grid_shape)

    @classmethod
    def identity(cls, lr_shape, grid_shape) -> "Registration":
        return cls(np.array([[1.0, 0, 0], [0, 1.0, 0]]), lr_shape, grid_shape, source="identity")

    @property
    def inverse(self) -> np.ndarray:
        a = np.vstack([self.matrix, [0.0, 0.0, 1.0]])
        return np.linalg.inv(a)[:2]

    def params(self) -> dict:
        a = self.matrix[:, :2]
        flip = bool(np.linalg.det(a) < 0)
        b = a @ np.diag([-1.0, 1.0]) if flip else a
        sx = math.hypot(b[0, 0], b[1, 0])
        theta = math.atan2(b[1, 0], b[0, 0])
        sy = float(np.linalg.det(b)) / sx
        shear = float(b[0, 0] * b[0, 1] + b[1, 0] * b[1, 1]) / (sx * sx)
        return {"shift_x": float(self.matrix[0, 2]), "shift_y": float(self.matrix[1, 2]),
                "rotation_deg": math.degrees(theta), "scale": math.sqrt(abs(sx * sy)), "scale_x": sx,
                "scale_y": sy, "shear": shear, "flip_x": flip}

    def displacement_px(self, other: np.ndarray | None = None) -> float:
        """Largest distance (grid px) between this transform and ``other`` (identity) over the LR field."""
        other = np.array([[1.0, 0, 0], [0, 1.0, 0]]) if other is None else np.asarray(other)
        h, w = self.lr_shape
        c = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [-0.5, h - 0.5, 1], [w - 0.5, h - 0.5, 1]]).T
        return float(np.max(np.hypot(*((self.matrix - other) @ c))))

    def is_identity(self, tol: float = IDENTITY_TOL_PX) -> bool:
        return self.lr_shape == self.grid_shape and self.displacement_px() <= tol

    def to_dict(self) -> dict:
        """The ``--registration FILE.json`` format (and the manifest/settings record)."""
        return {"convention": CONVENTION, "matrix": [[float(v) for v in row] for row in self.matrix],
                "lr_shape": list(self.lr_shape), "grid_shape": list(self.grid_shape), "source": self.source,
                "params": self.params(), "stats": _plain(self.stats)}

    def settings_record(self) -> dict:
        """What goes into the job's settings (hashed: resume refuses another transform)."""
        return {"matrix": [[float(v) for v in row] for row in self.matrix], "lr_shape": list(self.lr_shape),
                "grid_shape": list(self.grid_shape), "source": self.source, "fill": "key_blend",
                "frame": "lr_camera", "interpolation": "cubic B-spline"}

    def summary(self) -> str:
        p = self.params()
        s = (f"shift ({p['shift_x']:+.3f}, {p['shift_y']:+.3f}) px, rotation {p['rotation_deg']:+.3f} deg, "
             f"scale {p['scale']:.4f}" + (", flipped left-right" if p["flip_x"] else ""))
        st = self.stats
        if st.get("ncc") is not None:
            s += (f"; ncc {st['ncc']:.3f}, residual {st.get('residual', float('nan')):.3f}, overlap "
                  f"{100 * st.get('overlap', float('nan')):.1f}%, {st.get('n_pairs')} pairs"
                  + (f" ({st['n_outliers']} outliers rejected)" if st.get("n_outliers") else ""))
        return s

    # ----------------------------------------------------------------------------------- resampling
    def _coords(self) -> tuple[np.ndarray, np.ndarray]:
        cached = self.__dict__.get("_coords_cache")
        if cached is None:
            gh, gw = self.grid_shape
            v, u = np.mgrid[0:gh, 0:gw].astype(np.float64)
            inv = self.inverse
            x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
            y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
            h, w = self.lr_shape
            inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
            cached = self.__dict__["_coords_cache"] = (np.stack([y, x]), inside)
        return cached

    @property
    def outside(self) -> np.ndarray:
        """(gh, gw) bool: grid pixels that the LR field does not cover."""
        return ~self._coords()[1]

    def overlap(self) -> float:
        return float(self._coords()[1].mean())

    def warp(self, frames: np.ndarray) -> np.ndarray:
        """LR frames (n, h, w) or (h, w) resampled onto the grid, float32; outside pixels edge-clamped."""
        frames = np.asarray(frames, dtype=np.float32)
        single = frames.ndim == 2
        stack = frames[None] if single else frames
        coords, _ = self._coords()
        out = np.empty((stack.shape[0], *self.grid_shape), np.float32)
        for i, f in enumerate(stack):
            out[i] = ndimage.map_coordinates(f, coords, order=WARP_ORDER, mode="nearest")
        return out[0] if single else out


def _plain(d: Any) -> Any:
    if isinstance(d, dict):
        return {str(k): _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    if isinstance(d, (np.floating, float)):
        return float(d) if math.isfinite(float(d)) else None
    if isinstance(d, (np.integer,)):
        return int(d)
    if isinstance(d, np.bool_):
        return bool(d)
    return d


def _check_matrix(m: Any, where: str, lr_shape, grid_shape) -> np.ndarray:
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        raise RegistrationError(f"{where}: the registration matrix is not numeric; {HOW_BY_HAND}") from None
    if a.shape != (2, 3):
        raise RegistrationError(f"{where}: the registration matrix has shape {a.shape}, not 2x3; {HOW_BY_HAND}")
    if not np.isfinite(a).all():
        raise RegistrationError(f"{where}: the registration matrix holds NaN or Inf; {HOW_BY_HAND}")
    det = float(np.linalg.det(a[:, :2]))
    if not 1e-3 < abs(det) < 1e3:
        raise RegistrationError(f"{where}: the registration matrix is degenerate (determinant {det:g}); "
                                f"{HOW_BY_HAND}")
    return a


def from_record(d: Any, where: str, lr_shape, grid_shape, source: str) -> Registration:
    """A Registration from a JSON/attribute record ``{"matrix": ..., "lr_shape": ..., "grid_shape": ...}``."""
    if not isinstance(d, dict) or "matrix" not in d:
        raise RegistrationError(f"{where}: expected a JSON object with a \"matrix\" key; {HOW_BY_HAND}")
    m = _check_matrix(d["matrix"], where, lr_shape, grid_shape)
    for key, want in (("lr_shape", lr_shape), ("grid_shape", grid_shape)):
        got = d.get(key)
        if got is not None and [int(v) for v in got] != list(want):
            raise RegistrationError(f"{where}: {key} is {list(got)} but this archive's is {list(want)}; the "
                                    "transform was fitted for another archive")
    stats = d.get("stats") if isinstance(d.get("stats"), dict) else {}
    reg = Registration(m, lr_shape, grid_shape, source=source, stats=stats)
    if reg.overlap() < MIN_OVERLAP:  # the reconstruction would be mostly the key-frame blend
        raise RegistrationError(f"{where}: the transform puts the LR field over only {100 * reg.overlap():.1f}% of "
                                f"the HR field (at least {100 * MIN_OVERLAP:.0f}% is needed); check the matrix "
                                f"(it maps LR pixels to the HR/4 grid, pixel centres at integers); {HOW_BY_HAND}")
    return reg


def load_json(path: str, lr_shape, grid_shape) -> Registration:
    try:
        if not os.path.isfile(path):
            raise RegistrationError(f"{path}: registration file not found (--registration auto|none|FILE.json)")
        if os.path.getsize(path) > 1 << 20:
            raise RegistrationError(f"{path}: registration file is larger than 1 MiB; {HOW_BY_HAND}")
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistrationError(f"{path}: cannot read the registration JSON ({exc}); {HOW_BY_HAND}") from None
    return from_record(d, path, lr_shape, grid_shape, source=f"file:{os.path.abspath(path)}")


# --------------------------------------------------------------------------------------------- fitting

def _zs(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    sd = x.std()
    return (x - x.mean()) / (sd if sd > 0 else 1.0)


def _block(x: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return x
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _hann(shape) -> np.ndarray:
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1]))


def _phase_corr(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Shift (dy, dx) such that ``b(y, x) ~ a(y - dy, x - dx)``, and the peak height."""
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    cp = fb * np.conj(fa)
    cp /= np.maximum(np.abs(cp), 1e-12)
    r = np.fft.ifft2(cp).real
    iy, ix = np.unravel_index(int(np.argmax(r)), r.shape)
    peak = float(r[iy, ix])

    def sub(c: float, m: float, p: float) -> float:
        d = m - 2 * c + p
        return 0.0 if d == 0 else 0.5 * (m - p) / d

    h, w = r.shape
    dy = iy + sub(r[iy, ix], r[(iy - 1) % h, ix], r[(iy + 1) % h, ix])
    dx = ix + sub(r[iy, ix], r[iy, (ix - 1) % w], r[iy, (ix + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return float(dy), float(dx), peak


def _pad_to(x: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape)
    out[: x.shape[0], : x.shape[1]] = x[: shape[0], : shape[1]]
    return out


def _log_polar(mag: np.ndarray, n_ang: int, n_rad: int) -> tuple[np.ndarray, float]:
    h, w = mag.shape
    cy, cx = h / 2, w / 2
    rmax = min(cy, cx)
    base = math.log(rmax) / n_rad
    ang = np.linspace(0, math.pi, n_ang, endpoint=False)
    rad = np.exp(np.arange(n_rad) * base)
    y = cy + rad[None, :] * np.sin(ang)[:, None]
    x = cx + rad[None, :] * np.cos(ang)[:, None]
    return ndimage.map_coordinates(mag, [y, x], order=1, mode="constant"), base


def _fourier_mellin(lrs: list[np.ndarray], grids: list[np.ndarray]) -> tuple[float, float]:
    """Rotation (rad, modulo pi) and scale that map LR onto the grid, from magnitude spectra."""
    n = 1 << int(math.ceil(math.log2(max(max(x.shape) for x in lrs + grids))))
    size = (n, n)
    n_ang, n_rad = 360, n
    acc = None
    for lr, g in zip(lrs, grids):
        mags = []
        for img in (lr, g):
            z = _pad_to(_zs(img) * _hann(img.shape), size)
            f = np.fft.fftshift(np.abs(np.fft.fft2(z)))
            yy, xx = np.mgrid[0:n, 0:n]
            rr = np.hypot((yy - n / 2) / n, (xx - n / 2) / n)
            hp = (1 - np.cos(np.pi * np.clip(rr, 0, 0.5)) ** 2)  # high-pass
            mags.append(np.log1p(f) * hp)
        la, base = _log_polar(mags[0], n_ang, n_rad)
        lb, _ = _log_polar(mags[1], n_ang, n_rad)
        fa, fb = np.fft.fft2(la), np.fft.fft2(lb)
        cp = fb * np.conj(fa)
        acc = cp if acc is None else acc + cp
    acc /= np.maximum(np.abs(acc), 1e-12)
    r = np.fft.ifft2(acc).real
    ia, ir = np.unravel_index(int(np.argmax(r)), r.shape)
    ia = ia - n_ang if ia > n_ang / 2 else ia
    ir = ir - n_rad if ir > n_rad / 2 else ir
    theta = ia * math.pi / n_ang
    # image scaled by s in space -> spectrum scaled by 1/s: a peak at +ir means the grid's spectrum is larger
    scale = math.exp(-ir * base)
    return theta, scale


class _Pairs:
    """Key pairs prepared for the fit at one pyramid level."""

    def __init__(self, lrs: list[np.ndarray], hrs: list[np.ndarray], scale: int, level: int,
                 lr_valid: Sequence[np.ndarray | None] | None = None,
                 hr_valid: Sequence[np.ndarray | None] | None = None):
        self.level = level
        self.s = scale
        self.lr = [_block(x, level) for x in lrs]
        # pixels a camera did not measure (clipped, defective): an LR pixel (this level) counts only if all of
        # its fine pixels are valid, and only where its HR footprint holds no invalid HR pixel
        n = len(lrs)
        lr_valid = list(lr_valid) if lr_valid is not None else [None] * n
        hr_valid = list(hr_valid) if hr_valid is not None else [None] * n
        self.lr_ok = [None if v is None or v.all() else (_block(v.astype(np.float64), level) > 0.999).ravel()
                      for v in lr_valid]
        self.hr_bad = [None if v is None or v.all() else
                       ndimage.uniform_filter((~v).astype(np.float64), size=scale * level, mode="nearest")
                       for v in hr_valid]
        h, w = self.lr[0].shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        # fine-LR coordinates of the coarse pixels' centres
        self.x = (level * xx + (level - 1) / 2).ravel()
        self.y = (level * yy + (level - 1) / 2).ravel()
        self.box = [ndimage.uniform_filter(x.astype(np.float64), size=scale * level, mode="nearest") for x in hrs]
        self.hr_shape = hrs[0].shape
        self.lrv = [x.ravel() for x in self.lr]
        # uniform_filter of even size n centres output i at i - 0.5; grid u sits at HR s*u + (s-1)/2
        self.off = (scale - 1) / 2 + (0.5 if (scale * level) % 2 == 0 else 0.0)

    def sample(self, m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        u = m[0, 0] * self.x + m[0, 1] * self.y + m[0, 2]
        v = m[1, 0] * self.x + m[1, 1] * self.y + m[1, 2]
        X, Y = self.s * u + self.off, self.s * v + self.off
        H, W = self.hr_shape
        # the whole coarse footprint must lie in the HR field
        half = self.s * self.level / 2
        inside = (X >= half - 0.5) & (X <= W - half - 0.5) & (Y >= half - 0.5) & (Y <= H - half - 0.5)
        vals = ndimage.map_coordinates(self.box[k], [Y, X], order=1, mode="nearest")
        return vals, inside

    def valid(self, m: np.ndarray, k: int) -> np.ndarray:
        """LR pixels (this level) of pair ``k`` that both cameras measured under ``m`` (all True without masks)."""
        ok = np.ones(self.lrv[k].size, bool) if self.lr_ok[k] is None else self.lr_ok[k].copy()
        if self.hr_bad[k] is not None:
            u = m[0, 0] * self.x + m[0, 1] * self.y + m[0, 2]
            v = m[1, 0] * self.x + m[1, 1] * self.y + m[1, 2]
            X, Y = self.s * u + self.off, self.s * v + self.off
            ok &= ndimage.map_coordinates(self.hr_bad[k], [Y, X], order=1, mode="nearest") < 1e-6
        return ok

    def inside(self, m: np.ndarray, margin: float = 1.0) -> np.ndarray:
        """LR pixels (this level) that land at least ``margin`` grid px inside the HR field under ``m``."""
        u = m[0, 0] * self.x + m[0, 1] * self.y + m[0, 2]
        v = m[1, 0] * self.x + m[1, 1] * self.y + m[1, 2]
        gh, gw = self.hr_shape[0] / self.s, self.hr_shape[1] / self.s
        e = (self.level - 1) / 2 + margin
        return (u >= e - 0.5) & (u <= gw - 0.5 - e) & (v >= e - 0.5) & (v <= gh - 0.5 - e)

    def residuals(self, m: np.ndarray, pairs: Sequence[int], mask: dict[int, np.ndarray] | None = None):
        """Residuals (zero outside the masks, one per pair: masks fixed during one optimisation keep the cost
        smooth; without them, the pixels inside the field that both cameras measured) and per-pair (ncc,
        overlap fraction, relative rms residual)."""
        out = []
        stats = []
        for k in pairs:
            vals, inside = self.sample(m, k)
            # a fixed mask already holds the validity (computed once per optimisation, not per evaluation)
            inside = mask[k] if mask is not None else inside & self.valid(m, k)
            lr = self.lrv[k]
            n_in = int(inside.sum())
            if n_in < 16:
                out.append(np.zeros(lr.size))
                stats.append((0.0, 0.0, 10.0))
                continue
            a_, b_ = lr[inside], vals[inside]
            A = np.stack([a_, np.ones_like(a_)], 1)
            coef, *_ = np.linalg.lstsq(A, b_, rcond=None)
            sd = float(b_.std()) or 1.0
            r = np.where(inside, (coef[0] * lr + coef[1] - vals) / sd, 0.0)
            out.append(r)
            ncc = float(np.corrcoef(a_, b_)[0, 1]) if a_.std() > 0 and b_.std() > 0 else 0.0
            stats.append((ncc, n_in / lr.size, float(np.sqrt(np.mean(r[inside] ** 2)))))
        return np.concatenate(out), stats


def _centre_param(m: np.ndarray, lr_shape, radius: float, affine: bool) -> np.ndarray:
    """Parameter vector (all in grid-px units at the field's edge)."""
    a = m[:, :2]
    if affine:
        return np.r_[m[0, 2], m[1, 2], (a.ravel() - [1, 0, 0, 1]) * radius]
    p = Registration(m, lr_shape, lr_shape).params()
    return np.r_[m[0, 2], m[1, 2], math.radians(p["rotation_deg"]) * radius, math.log(p["scale"]) * radius]


def _matrix(p: np.ndarray, flip: bool, radius: float, affine: bool) -> np.ndarray:
    if affine:
        a = np.array([1.0, 0, 0, 1]) + p[2:6] / radius
        return np.array([[a[0], a[1], p[0]], [a[2], a[3], p[1]]])
    th, s = p[2] / radius, math.exp(p[3] / radius)
    r = s * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    if flip:
        r = r @ np.diag([-1.0, 1.0])
    return np.array([[r[0, 0], r[0, 1], p[0]], [r[1, 0], r[1, 1], p[1]]])


def _about_centres(a2: np.ndarray, lr_shape, grid_shape, t=(0.0, 0.0)) -> np.ndarray:
    """Matrix whose linear part is ``a2`` and that maps the LR field centre to the grid centre + t."""
    cl = np.array([(lr_shape[1] - 1) / 2, (lr_shape[0] - 1) / 2])
    cg = np.array([(grid_shape[1] - 1) / 2, (grid_shape[0] - 1) / 2]) + np.asarray(t)
    return np.c_[a2, cg - a2 @ cl]


def _warp_grid_to_lr(grid: np.ndarray, m: np.ndarray, lr_shape) -> np.ndarray:
    h, w = lr_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    v = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    return ndimage.map_coordinates(grid, [v, u], order=1, mode="nearest")


def _refine(pyr: list[_Pairs], m: np.ndarray, flip: bool, pairs, lr_shape, affine: bool, max_nfev=60):
    radius = 0.5 * math.hypot(*lr_shape)
    p = _centre_param(m, lr_shape, radius, affine)
    for i, lv in enumerate(pyr):
        for _round in range(2 if i == len(pyr) - 1 else 1):
            m0 = _matrix(p, flip, radius, affine)
            geo = lv.inside(m0)
            mask = None if geo.sum() < 16 else {k: geo & lv.valid(m0, k) for k in pairs}

            def fun(q, lv=lv, mask=mask):
                return lv.residuals(_matrix(q, flip, radius, affine), pairs, mask)[0]
            res = optimize.least_squares(fun, p, method="trf", diff_step=0.01, loss="soft_l1", f_scale=1.0,
                                         max_nfev=max_nfev)
            p = res.x
    return _matrix(p, flip, radius, affine)


def _cost(lv: _Pairs, m: np.ndarray, pairs: Sequence[int]) -> float:
    """Mean squared residual of ``m``; infinite when the cameras anti-correlate under it (the per-pair linear
    fit absorbs a negative gain, and a 180 degree turn of a frame with a gradient matches that way)."""
    r_, st = lv.residuals(m, pairs)
    return float(np.mean(r_ ** 2)) if np.mean([c[0] for c in st]) > 0 else math.inf


def fit_pairs(lrs: Sequence[np.ndarray], hrs: Sequence[np.ndarray], scale: int, affine: bool = False,
              log: Callable[[str], None] = lambda s: None, where: str = "archive",
              lr_valid: Sequence[np.ndarray | None] | None = None,
              hr_valid: Sequence[np.ndarray | None] | None = None, local: bool = False) -> Registration:
    """Fit the LR -> grid transform on flat-fielded key pairs. Raises :class:`RegistrationError`.

    ``lr_valid`` / ``hr_valid``: per pair, boolean maps of the pixels each camera measured (None: all); a
    clipped or defective pixel is not a linear reading of the field and biases the fit (a clipped LR camera
    moved the fitted shift by up to 0.7 LR px), so the refinement leaves out every LR pixel that is invalid or
    whose HR footprint holds an invalid HR pixel.

    ``local``: the views are known to be nearly aligned (a standard archive, whose LR frame is the HR frame
    binned): refine from the identity instead of searching rotations, scales, flips and shifts. On small
    frames with a gradient the search can land on a wrong basin that the refinement cannot leave. When the
    refined fit correlates less than :data:`LOCAL_MIN_NCC` (the archive is not nearly aligned after all), the
    global search runs as without ``local``."""
    lrs = [np.asarray(x, np.float64) for x in lrs]
    hrs = [np.asarray(x, np.float64) for x in hrs]
    if len(lrs) == 0:
        raise RegistrationError(f"{where}: no key pairs to fit the registration on")
    lr_shape = lrs[0].shape
    H, W = hrs[0].shape
    grid_shape = (H // scale, W // scale)
    if min(lr_shape) < 8 or min(grid_shape) < 8:
        raise RegistrationError(f"{where}: frames of {lr_shape[0]}x{lr_shape[1]} LR pixels are too small to "
                                f"register (at least 8x8); {HOW_BY_HAND}")
    grids = [_block(x, scale) for x in hrs]
    pairs = list(range(len(lrs)))
    levels = [f for f in (4, 2) if min(lr_shape) // f >= 16] + [1]
    # the start searches with every pixel (a mask changes which candidates look good: few valid pixels make a
    # low cost); the refinement and the statistics leave out the pixels a camera did not measure
    start = [_Pairs(lrs, hrs, scale, levels[0])]
    pyr = [_Pairs(lrs, hrs, scale, f, lr_valid, hr_valid) for f in levels]
    fine = pyr[-1]

    if local and lr_shape == grid_shape:
        m = _refine(pyr, np.array([[1.0, 0, 0], [0, 1.0, 0]]), False, pairs, lr_shape, affine)
        if np.mean([st[0] for st in fine.residuals(m, pairs)[1]]) >= LOCAL_MIN_NCC:
            reg = _finish(m, False, pairs, fine, lr_shape, grid_shape, affine, log, where)
            reg.stats["start"] = "identity"
            return reg
        # not nearly aligned after all (no local fit correlates): the global search
    flip, m = _search(lrs, grids, pairs, start, lr_shape, grid_shape)
    m = _refine(pyr, m, flip, pairs, lr_shape, affine)
    reg = _finish(m, flip, pairs, fine, lr_shape, grid_shape, affine, log, where)
    reg.stats["start"] = "search"
    return reg


def _search(lrs, grids, pairs, start, lr_shape, grid_shape):
    """The global start: Fourier-Mellin (rotation, scale), both flips and the pi ambiguity, phase correlation
    (shift), the best of three candidates refined at the coarsest level. Returns (flip, matrix)."""
    try:
        theta0, s0 = _fourier_mellin(lrs[:8], grids[:8])
    except (ValueError, FloatingPointError):
        theta0, s0 = 0.0, 1.0
    if not (0.25 < s0 < 4):
        s0 = 1.0
    cands = []
    for flip in (False, True):
        for th in {theta0, theta0 + math.pi, 0.0}:
            for sc in {s0, 1.0}:
                r = sc * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
                if flip:
                    r = r @ np.diag([-1.0, 1.0])
                m = _about_centres(r, lr_shape, grid_shape)
                # residual shift by phase correlation of LR against the grid warped into the LR frame
                acc = np.zeros(lr_shape, complex)
                for k in pairs[:8]:
                    wg = _warp_grid_to_lr(grids[k], m, lr_shape)
                    a_, b_ = _zs(lrs[k]) * _hann(lr_shape), _zs(wg) * _hann(lr_shape)
                    acc += np.fft.fft2(a_) * np.conj(np.fft.fft2(b_))
                acc /= np.maximum(np.abs(acc), 1e-12)
                rr = np.fft.ifft2(acc).real
                iy, ix = np.unravel_index(int(np.argmax(rr)), rr.shape)
                dy = iy - lr_shape[0] if iy > lr_shape[0] / 2 else iy
                dx = ix - lr_shape[1] if ix > lr_shape[1] / 2 else ix
                # lr(y) ~ wg(y - d): LR pixel x sees what warped-grid pixel x - d sees
                m2 = m.copy()
                m2[:, 2] = m[:, :2] @ np.array([-dx, -dy], float) + m[:, 2]
                cands.append((_cost(start[0], m2, pairs), flip, m2))
    cands.sort(key=lambda c: c[0])
    best = None
    for cost, flip, m in cands[:3]:
        mr = _refine(start, m, flip, pairs, lr_shape, False, max_nfev=40)
        c = _cost(start[0], mr, pairs)
        if best is None or c < best[0]:
            best = (c, flip, mr)
    _, flip, m = best
    return flip, m


def _finish(m, flip, pairs, fine, lr_shape, grid_shape, affine, log, where) -> Registration:

    # --- outliers: refine each pair alone, reject those that disagree with the joint fit
    reg = Registration(m, lr_shape, grid_shape)
    dev = []
    if len(pairs) >= 3:
        for k in pairs:
            mk = _refine([fine], m, flip, [k], lr_shape, affine, max_nfev=30)
            dev.append(reg.displacement_px(mk))
        dev_a = np.asarray(dev)
        med = float(np.median(dev_a))
        mad = float(np.median(np.abs(dev_a - med))) * 1.4826
        limit = max(0.5, med + 4 * mad)
        inliers = [k for k in pairs if dev_a[k] <= limit]
        if len(inliers) < len(pairs) and len(inliers) >= 2:
            log(f"registration: rejected {len(pairs) - len(inliers)} key pair(s) that disagree with the others "
                f"by more than {limit:.2f} px")
            m = _refine([fine], m, flip, inliers, lr_shape, affine)
            pairs_used = inliers
        else:
            pairs_used = pairs
    else:
        pairs_used = pairs
    reg = Registration(m, lr_shape, grid_shape, source="fit")
    r_, st = fine.residuals(m, pairs_used)
    r_id, st_id = fine.residuals(np.array([[1.0, 0, 0], [0, 1.0, 0]]), pairs_used) if lr_shape == grid_shape \
        else (None, [(float("nan"), 0.0, float("nan"))])
    ncc = float(np.mean([s[0] for s in st]))
    resid = float(np.mean([s[2] for s in st]))
    dev_in = [dev[k] for k in pairs_used] if dev else []
    reg.stats = {
        "ncc": ncc, "residual": resid, "overlap": reg.overlap(), "n_pairs": len(pairs_used),
        "n_outliers": len(pairs) - len(pairs_used),
        "consistency_px": float(np.sqrt(np.mean(np.square(dev_in)))) if dev_in else None,
        "ncc_identity": float(np.mean([s[0] for s in st_id])),
        "residual_identity": float(np.mean([s[2] for s in st_id])),
        "model": "affine" if affine else "similarity",
    }
    problems = []
    if reg.stats["overlap"] < MIN_OVERLAP:
        problems.append(f"overlap {100 * reg.stats['overlap']:.0f}% < {100 * MIN_OVERLAP:.0f}%")
    if not ncc >= MIN_NCC:
        problems.append(f"correlation {ncc:.3f} < {MIN_NCC}")
    if not resid <= MAX_RESIDUAL:
        problems.append(f"relative residual {resid:.3f} > {MAX_RESIDUAL}")
    if problems:
        raise RegistrationError(f"{where}: the LR->HR registration fit failed ({', '.join(problems)}; fitted "
                                f"{reg.summary()}); check that both cameras see the same field, or {HOW_BY_HAND}")
    return reg


def _flat(frame: np.ndarray, dark, flat) -> np.ndarray:
    x = np.asarray(frame, np.float64)
    if dark is not None and flat is not None:
        return (x - dark) / np.maximum(np.asarray(flat, np.float64) - dark, 1e-6)
    if dark is not None:
        return x - dark
    return x


def key_pairs(archive, max_pairs: int = MAX_PAIRS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Flat-fielded (LR at key time, HR key frame) pairs, up to ``max_pairs`` evenly spaced."""
    lrs, hrs, _, _ = key_pairs_valid(archive, max_pairs)
    return lrs, hrs


def key_pairs_valid(archive, max_pairs: int = MAX_PAIRS):
    """:func:`key_pairs` and, per pair, the boolean maps of the LR and HR pixels the camera measured: not
    within :data:`~xvr_batch.pixelmask.CLIP_MARGIN` of its clip level, not defective (:mod:`xvr_batch.pixelmask`).

    The frames are flat-fielded with :func:`xvr_batch.normalise.cameras`, as the reconstruction does: an LR
    flat that clipped is estimated from the HR flat. A pixel whose flat clipped and could not be estimated
    stays in: its value is off by a smooth gain, which the fit's per-pair gain and robust loss absorb, while
    leaving such pixels out can leave a tenth of the field. Invalid pixels take the mean of their valid
    neighbours, for the global search, which sees every pixel."""
    from xvr_batch.normalise import cameras
    from xvr_batch.pixelmask import inpaint, near_clip

    k_all = len(archive.hr_index)
    picks = sorted({int(round(i)) for i in np.linspace(0, k_all - 1, min(k_all, max_pairs))})
    has = {c: archive.calibration(f"dark_{c}") is not None and archive.calibration(f"white_{c}") is not None
           for c in ("lr", "hr")}
    cams = cameras(archive, has["lr"], has["hr"])

    def prep(raw: np.ndarray, cam) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(raw, np.float64)
        dark = 0.0 if cam.dark is None else np.asarray(cam.dark, np.float64)
        ok = np.isfinite(x) & ~near_clip(x, dark, cam.level)
        if cam.defect is not None:
            ok &= ~cam.defect
        with np.errstate(invalid="ignore", over="ignore"):
            y = np.nan_to_num(x) - dark
            if cam.gain is not None:
                y = y * cam.gain
        ok &= np.isfinite(y)  # a dark or flat that is not a number
        return inpaint(np.where(ok, y, 0.0), ~ok), ok

    lrs, hrs, lr_ok, hr_ok = [], [], [], []
    for k in picks:
        a, oa = prep(archive.read_lr_at([int(archive.hr_index[k])])[0], cams["lr"])
        b, ob = prep(archive.read_hr(k), cams["hr"])
        lrs.append(a), lr_ok.append(oa), hrs.append(b), hr_ok.append(ob)
    # a mask that leaves out most of a camera's field says more about its calibration (a flat equal to the
    # dark marks every pixel defective) than about its pixels: that camera is then fitted as it reads
    for oks in (lr_ok, hr_ok):
        if np.mean([o.mean() for o in oks]) < MIN_VALID:
            oks[:] = [np.ones_like(o) for o in oks]
    return lrs, hrs, lr_ok, hr_ok


def fit_archive(archive, affine: bool = False, log: Callable[[str], None] = lambda s: None,
                local: bool = False) -> Registration:
    lrs, hrs, lr_ok, hr_ok = key_pairs_valid(archive)
    return fit_pairs(lrs, hrs, archive.scale, affine=affine, log=log, where=archive.path, lr_valid=lr_ok,
                     hr_valid=hr_ok, local=local)


def resolve(archive, mode: str | None, log: Callable[[str], None] = lambda s: None) -> Registration | None:
    """The transform ``reconstruct --registration MODE`` applies to ``archive``, or None (read as it is).

    ``none``: None. ``FILE.json``: that transform. ``auto``: the archive's ``/exchange/registration``, else a
    fit that is applied only if it differs from the identity by more than :data:`IDENTITY_TOL_PX` and lowers
    the residual by :data:`MIN_IMPROVEMENT`; a failed fit is an error unless the identity already matches.
    """
    mode = "auto" if mode in (None, "") else str(mode)
    grid = archive.lr_shape
    if mode == "none":
        return None
    if mode != "auto":
        reg = load_json(mode, archive.lr_shape, grid)
        return None if reg.is_identity(1e-9) else reg
    stored = archive.registration
    if stored is not None:
        reg = from_record(stored, f"{archive.path}: /exchange/registration", archive.lr_shape, grid,
                          source="archive")
        if reg.is_identity(1e-9):
            return None
        log(f"registration (from the archive): {reg.summary()}")
        return reg
    if min(archive.lr_shape) < 16:  # too small to fit a transform: read as it is (plan shows "none")
        return None
    try:
        reg = fit_archive(archive, log=log, local=True)
    except RegistrationError as exc:
        ident = _identity_score(archive)
        if ident is None or ident >= 0.9:
            log(f"registration: no transform fitted ({exc}); the archive is read as it is")
            return None
        raise
    why = why_not_applied(reg)
    if why is not None:
        if why:
            log(f"registration: the fitted transform ({reg.summary()}) {why}; the archive is read as it is (give a "
                "transform with --registration FILE.json if it is misregistered)")
        return None
    log(f"registration (fitted at plan time): {reg.summary()}")
    return reg


def why_not_applied(reg: Registration) -> str | None:
    """Why ``auto`` does not apply the fitted ``reg`` to a standard archive (None: it applies it; "": it is the
    identity for practical purposes, nothing to say). In order: it moves the field by at most
    :data:`IDENTITY_TOL_PX`, or lowers the residual by less than :data:`MIN_IMPROVEMENT`; it came from the global
    search and correlates below :data:`LOCAL_MIN_NCC`; the key pairs, each fitted alone, disagree by as much as
    the transform moves the field (``consistency_px`` >= the displacement: the fit cannot tell the correction
    from its own scatter; 0.67 px of scatter for a 0.41 px fit that was 0.43 px off the truth)."""
    st = reg.stats
    if reg.is_identity() or not st["residual"] < (1 - MIN_IMPROVEMENT) * st["residual_identity"]:
        return ""
    if st.get("start") == "search" and not st["ncc"] >= LOCAL_MIN_NCC:
        return f"correlates less than {LOCAL_MIN_NCC}"
    cons = st.get("consistency_px")
    if cons is not None and not cons < reg.displacement_px():
        return (f"moves the field by {reg.displacement_px():.2f} px while the key pairs fitted alone scatter by "
                f"{cons:.2f} px")
    return None


def _identity_score(archive) -> float | None:
    try:
        lrs, hrs = key_pairs(archive, 4)
        s = archive.scale
        vals = []
        for lr, hr in zip(lrs, hrs):
            g = _block(hr, s)
            if lr.std() == 0 or g.std() == 0:
                return None
            vals.append(float(np.corrcoef(lr.ravel(), g.ravel())[0, 1]))
        return float(np.mean(vals))
    except (ValueError, FloatingPointError):
        return None


# --------------------------------------------------------------------------------------------- reading

class RegisteredArchive:
    """An :class:`~xvr_batch.io.archive.Archive` seen in the LR camera's frame, where a registered run
    reconstructs: the LR frames and LR darks/flats are the archive's; the HR key frames and HR darks/flats are
    resampled into the LR frame upsampled ``scale`` x (:attr:`hr_shape` is that frame's shape). The HR camera's
    own frames are :meth:`read_hr_native`; :attr:`to_hr` resamples model-frame images onto them."""

    def __init__(self, archive, reg: Registration):
        from xvr_batch.warp import SplineWarp, model_to_hr_affine

        self._archive = archive
        self.registration_applied = reg
        s = int(archive.scale)
        h, w = (int(v) for v in archive.lr_shape)
        self.native_hr_shape = tuple(int(v) for v in archive.hr_shape)
        self.hr_shape = (s * h, s * w)
        self._affine = model_to_hr_affine(reg.matrix, s)
        #: HR camera frame -> model frame; ``to_model.inside`` is the part of the model frame the HR camera sees
        self.to_model = SplineWarp(self._affine, self.native_hr_shape, self.hr_shape)
        #: (h, w) bool: LR pixels whose footprint the HR camera sees (the consistency metric counts these)
        self.lr_inside = self.to_model.inside.reshape(h, s, w, s).all(axis=(1, 3))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_archive"], name)

    @functools.cached_property
    def to_hr(self):
        """Model frame -> HR camera frame (:class:`~xvr_batch.warp.SplineWarp`, built on first use: only the
        reconstruction resamples back); ``to_hr.inside`` is the part of the HR field the LR camera sees."""
        from xvr_batch.warp import SplineWarp

        inv = np.linalg.inv(np.vstack([self._affine, [0.0, 0.0, 1.0]]))[:2]
        return SplineWarp(inv, self.hr_shape, self.native_hr_shape)

    def read_hr(self, k: int) -> np.ndarray:
        """Key frame ``k`` in the model frame, float32 HR counts."""
        return self.to_model.numpy(self._archive.read_hr(k))

    def read_hr_native(self, k: int) -> np.ndarray:
        return self._archive.read_hr(k)

    def calibration(self, name: str):
        c = self._archive.calibration(name)
        if c is None or not name.endswith("_hr"):
            return c
        out = self.to_model.numpy(c)
        out.flags.writeable = False
        return out


# --------------------------------------------------------------------------------------------- plot

def plot(archive, reg: Registration, path: str) -> None:
    """A PNG: checkerboard of the registered LR (flat-fielded) and the binned HR key frame, before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xvr_batch.durable import atomic_path

    lrs, hrs = key_pairs(archive, 1)
    g = _zs(_block(hrs[0], archive.scale))
    before = _zs(Registration.identity(lrs[0].shape, g.shape).warp(lrs[0]) if lrs[0].shape == g.shape
                 else np.resize(lrs[0], g.shape))
    after = _zs(reg.warp(lrs[0]))
    n = max(2, min(g.shape) // 8)
    yy, xx = np.mgrid[0:g.shape[0], 0:g.shape[1]]
    board = ((yy // n + xx // n) % 2).astype(bool)
    fig, ax = plt.subplots(1, 3, figsize=(12, 4))
    for a, img, title in ((ax[0], np.where(board, before, g), "checkerboard, unregistered"),
                          (ax[1], np.where(board, after, g), "checkerboard, registered"),
                          (ax[2], np.dstack([np.clip((after + 3) / 6, 0, 1), np.clip((g + 3) / 6, 0, 1),
                                             np.clip((after + 3) / 6, 0, 1)]), "overlay (magenta LR, green HR)")):
        a.imshow(img, cmap="gray" if img.ndim == 2 else None)
        a.set_title(title)
        a.axis("off")
    fig.suptitle(reg.summary(), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def registered(arc, settings: dict):
    """``arc``, or a :class:`RegisteredArchive` view of it when the job's ``settings`` hold a registration."""
    rec = settings.get("registration") if isinstance(settings, dict) else None
    if not rec:
        return arc
    # one view per archive handle and transform: prepare, the consistency fit and the runner of a process share
    # it (building its resampling tables costs about half a second at 400x1024)
    key = json.dumps(rec, sort_keys=True)
    views = arc.__dict__.setdefault("_registered_views", {})
    view = views.get(key)
    if view is None:
        view = views[key] = RegisteredArchive(arc, Registration(rec["matrix"], rec["lr_shape"], rec["grid_shape"],
                                                                source=str(rec.get("source", ""))))
    return view
