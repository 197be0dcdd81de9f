"""Intensity normalisation: camera counts <-> model intensity, fitted once per archive.

1. Flat-field each camera when its darks and flats are present: ``(x - dark) / (flat - dark)``
   (transmission). Without them the counts are used as they are.
2. Fit the LR camera onto the HR camera: ``hr ~ a * lr + b`` on the key frames, where both are known at the
   same time. The HR key frame is binned to the LR grid, and both are averaged further over
   ``FIT_BLOCK x FIT_BLOCK`` LR blocks before the least-squares fit, so that the LR camera's photon noise does
   not bias the slope (regression dilution).
3. Map HR intensity to [0, 1] with the 0.1 / 99.9 percentiles ``lo, hi`` of the key frames.

The fit happens at plan time, is stored in the manifest (plain floats), and every unit uses exactly those
numbers, so the output never depends on the chunking. The output is mapped back into the HR camera's
counts: ``y * (hi - lo) + lo``, then un-flat-fielded when HR darks/flats exist.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NoReturn

import numpy as np

from xvr_batch.errors import UserError
from xvr_batch.pixelmask import bin_any, bin_mean, clip_level, flat_defects, inpaint, near_clip

FIT_BLOCK = 4
MAX_FIT_KEYS = 32
EPS = 1e-6

__all__ = ["Normalisation", "NormalisationError", "Calibration", "fit_normalisation", "time_weight"]


@dataclass(frozen=True)
class Normalisation:
    a: float  # LR (flat-fielded) -> HR (flat-fielded) gain
    b: float  # ... and offset
    lo: float  # HR intensity mapped to 0
    hi: float  # HR intensity mapped to 1
    lr_flat_field: bool
    hr_flat_field: bool
    n_fit_keys: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "work directory manifest",
                  advice: str = "the manifest was edited or is corrupt; rerun with --force-replan") -> "Normalisation":
        """The inverse of :meth:`to_dict`, for numbers read back from a file (``source`` names it, ``advice``
        ends the message).

        Missing or unknown fields, wrong types (a bool is not a number), NaN/Inf, ``hi <= lo`` and mappings
        whose float32 coefficients overflow raise :class:`NormalisationError`: such numbers would turn the
        whole output into NaN or garbage."""
        if not isinstance(d, dict):
            _refuse(source, advice, f"normalisation is a {type(d).__name__}, not a mapping")
        names = list(cls.__dataclass_fields__)
        missing = [k for k in names if k not in d]
        if missing:
            _refuse(source, advice, f"normalisation field {missing[0]!r} is missing")
        unknown = sorted(str(k) for k in d if k not in cls.__dataclass_fields__)
        if unknown:
            _refuse(source, advice, f"normalisation has unknown field {unknown[0][:40]!r}")
        for k in ("a", "b", "lo", "hi"):
            v = d[k]
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                _refuse(source, advice, f"normalisation field {k!r} is {type(v).__name__} {v!r:.40}, not a number")
            if not _finite(v):
                _refuse(source, advice, f"normalisation field {k!r} is {v!r:.40}")
        for k in ("lr_flat_field", "hr_flat_field"):
            if not isinstance(d[k], bool):
                _refuse(source, advice,
                        f"normalisation field {k!r} is {type(d[k]).__name__} {d[k]!r:.40}, not true/false")
        n = d["n_fit_keys"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            _refuse(source, advice,
                    f"normalisation field 'n_fit_keys' is {type(n).__name__} {n!r:.40}, not a positive integer")
        norm = cls(a=float(d["a"]), b=float(d["b"]), lo=float(d["lo"]), hi=float(d["hi"]),
                   lr_flat_field=d["lr_flat_field"], hr_flat_field=d["hr_flat_field"], n_fit_keys=n)
        problem = norm.problem()
        if problem:
            _refuse(source, advice, problem)
        return norm

    def problem(self) -> str | None:
        """Why this mapping cannot be used (a zero or negative span, or coefficients that overflow float32),
        or None."""
        span = self.hi - self.lo
        if not span > 0:
            return f"normalisation span hi - lo is {span:g} (lo {self.lo:g}, hi {self.hi:g}); it must be positive"
        with np.errstate(all="ignore"):
            coeffs = np.array([self.a / span, (self.b - self.lo) / span, 1.0 / span, -self.lo / span, span,
                               self.lo], dtype=np.float32)
        if not np.isfinite(coeffs).all():
            return (f"normalisation (a {self.a:g}, b {self.b:g}, lo {self.lo:g}, hi {self.hi:g}) gives "
                    "coefficients that overflow float32")
        return None


class NormalisationError(UserError, ValueError):
    """A recorded normalisation that cannot be used. A :class:`UserError` (one line, exit 2), and a
    ``ValueError`` for callers that fall back to a fresh fit."""


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _refuse(source: str, advice: str, what: str) -> NoReturn:
    raise NormalisationError(f"{source}: {what}; {advice}")


def time_weight(t: int, t0: int, t1: int) -> float:
    """Weight of the later key (at ``t1``) in the time blend of two key frames at frame ``t``, in [0, 1]."""
    return 0.0 if t1 == t0 else min(1.0, max(0.0, (t - t0) / (t1 - t0)))


class Calibration:
    """Per-pixel darks and flats of both cameras (averaged), and the fitted :class:`Normalisation`.

    Converts raw frames to model input and model output back to HR counts, in float32."""

    def __init__(self, archive, norm: Normalisation):
        self.norm = norm
        self._archive = archive
        self._scale = int(getattr(archive, "scale", 1) or 1)
        self._cams = cameras(archive, norm.lr_flat_field, norm.hr_flat_field)
        lr_cam, hr_cam = self._cams["lr"], self._cams["hr"]
        self.lr_dark, self.lr_gain = lr_cam.dark, lr_cam.gain
        self.hr_dark, self.hr_gain = hr_cam.dark, hr_cam.gain
        span = norm.hi - norm.lo
        # model_lr = (a * flat_lr + b - lo) / span = flat_lr * s + o
        self._lr_s = np.float32(norm.a / span)
        self._lr_o = np.float32((norm.b - norm.lo) / span)
        self._hr_s = np.float32(1.0 / span)
        self._hr_o = np.float32(-norm.lo / span)
        self._span = np.float32(span)
        self._lo = np.float32(norm.lo)
        self._key_lr: dict[int, np.ndarray] = {}  # key number -> model-space key binned to the LR grid

    @property
    def masks(self) -> dict[str, "CameraFlat"]:
        """Per camera (``"lr"``, ``"hr"``): clip level, defective pixels and pixels without a usable flat."""
        return self._cams

    def lr_to_model(self, lr: np.ndarray, frames=None, keys=None, bracket=None, repair: bool = True) -> np.ndarray:
        """Raw LR frames ``(n, h, w)`` to model space.

        Readings the camera did not make (clipped, defective, without a usable flat; see
        :mod:`xvr_batch.pixelmask`) are repaired. With ``frames`` (the frame numbers of ``lr``) a clipped one
        takes the time blend of the bracketing key frames among ``keys`` (key numbers; default all), never
        less than the clipped reading says; without ``frames`` it takes its neighbours' mean. Defective
        pixels take their neighbours' mean. ``bracket`` ``(t0, key0, t1, key1)`` (model-space HR images) gives
        the two keys to blend instead; ``repair=False`` skips all of this (the classical baseline)."""
        x = lr.astype(np.float32, copy=True)
        if self.lr_dark is not None:
            x -= self.lr_dark
            x *= self.lr_gain
        x *= self._lr_s
        x += self._lr_o
        cam = self._cams["lr"]
        if repair and (cam.level is not None or cam.static_bad is not None):
            self._repair_lr(np.asarray(lr), x, frames, keys, bracket)
        return x

    def lr_measured(self, raw: np.ndarray, inside: np.ndarray | None = None) -> np.ndarray:
        """Raw LR frames ``(..., h, w)`` -> a boolean map, True where the camera measured the pixel: not clipped,
        not defective, with a usable flat (the pixels :meth:`lr_to_model` leaves as read), and inside the LR
        field where ``inside`` (an (h, w) mask, e.g. a registered archive's ``lr_inside``) is given."""
        raw = np.asarray(raw)
        cam = self._cams["lr"]
        ok = raw < cam.level if cam.level is not None else np.ones(raw.shape, bool)
        bad = cam.static_bad
        if bad is not None:
            ok &= ~bad
        return ok if inside is None else ok & np.asarray(inside, bool)

    @property
    def transmission(self) -> tuple[float, float]:
        """``(lo, span)``: model space ``y`` is the flat-fielded intensity ``lo + span * y``."""
        return float(self.norm.lo), float(self.norm.hi - self.norm.lo)

    def _repair_lr(self, raw: np.ndarray, x: np.ndarray, frames, keys, bracket) -> None:
        cam = self._cams["lr"]
        raw3, x3 = (raw[None], x[None]) if x.ndim == 2 else (raw, x)
        none = np.zeros(x3.shape[1:], bool)
        noflat = cam.noflat if cam.noflat is not None else none
        dead = cam.defect if cam.defect is not None else none
        for i in range(x3.shape[0]):
            clipped = raw3[i] >= cam.level if cam.level is not None else none
            fill = (clipped | noflat) & ~dead
            if fill.any():
                if frames is not None:
                    est = self._blend_lr(int(frames[i]), keys, bracket)
                else:
                    est = inpaint(x3[i].copy(), fill | dead)
                lower = np.where(clipped & ~noflat, x3[i], -np.inf)  # the truth is at least this bright
                x3[i][fill] = np.maximum(est[fill], lower[fill])
            if cam.defect is not None:
                inpaint(x3[i], dead)

    def _blend_lr(self, t: int, keys, bracket=None) -> np.ndarray:
        """The time blend of the two key frames around frame ``t`` (among ``keys``, or ``bracket``), binned to
        the LR grid."""
        if bracket is not None:
            t0, h0, t1, h1 = bracket
            w = time_weight(t, t0, t1)
            return ((1.0 - w) * bin_mean(h0, self._scale) + w * bin_mean(h1, self._scale)).astype(np.float32)
        idx = np.asarray(self._archive.hr_index)
        allowed = list(range(len(idx))) if keys is None else sorted(int(k) for k in keys)
        times = idx[allowed]
        j = int(np.searchsorted(times, t, side="right"))
        k0, k1 = allowed[max(j - 1, 0)], allowed[min(j, len(allowed) - 1)]
        t0, t1 = int(idx[k0]), int(idx[k1])
        w = time_weight(t, t0, t1)
        a, b = self._key_model_lr(k0), self._key_model_lr(k1)
        return ((1.0 - w) * a + w * b).astype(np.float32)

    def _key_model_lr(self, k: int) -> np.ndarray:
        img = self._key_lr.get(k)
        if img is None:
            if len(self._key_lr) >= 8:
                self._key_lr.pop(next(iter(self._key_lr)))
            img = self._key_lr[k] = bin_mean(self.hr_to_model(self._archive.read_hr(k)), self._scale)
        return img

    def hr_to_model(self, hr: np.ndarray) -> np.ndarray:
        """Raw HR frames to model space; defective pixels take their neighbours' mean (the way back,
        :meth:`model_to_hr`, maps them onto their dark again)."""
        x = hr.astype(np.float32, copy=True)
        if self.hr_dark is not None:
            x -= self.hr_dark
            x *= self.hr_gain
        x *= self._hr_s
        x += self._hr_o
        dead = self._cams["hr"].defect
        if dead is not None:
            for img in (x[None] if x.ndim == 2 else x):
                inpaint(img, dead)
        return x

    def model_to_hr(self, y: np.ndarray, camera_range: bool = False) -> np.ndarray:
        """Model-space frames to HR counts (float32, a new array). ``camera_range``: limited to what the HR
        camera can record (:attr:`hr_range`), as its own frames and a dense truth of them are."""
        x = y.astype(np.float32, copy=True)
        x *= self._span
        x += self._lo
        if self.hr_dark is not None:
            x /= self.hr_gain
            x += self.hr_dark
        if camera_range:
            lo, hi = self.hr_range
            if lo is not None or hi is not None:
                np.clip(x, lo, hi, out=x)
        return x

    @property
    def hr_range(self) -> tuple[float | None, float | None]:
        """``(lowest, highest)`` reading the HR camera can make, None where unbounded: an integer camera reads
        at least 0, and at most its clip level (its dtype's maximum, or a lower plateau of its flats)."""
        dtype = np.dtype(getattr(self._archive, "hr_dtype", np.float32))
        return (0.0 if dtype.kind in "ui" else None), self._cams["hr"].level


@dataclass
class CameraFlat:
    """One camera's averaged dark and flat-field gain (None without darks/flats), its clip level (None: it
    does not clip), and boolean maps (None when empty) of defective pixels and of pixels whose flat clipped
    and could not be estimated (``noflat``)."""
    dark: np.ndarray | None
    gain: np.ndarray | None
    level: float | None
    defect: np.ndarray | None
    noflat: np.ndarray | None

    @property
    def static_bad(self) -> np.ndarray | None:
        if self.defect is None:
            return self.noflat
        return self.defect if self.noflat is None else self.defect | self.noflat


def _nonempty(mask: np.ndarray) -> np.ndarray | None:
    return mask if mask.any() else None


def cameras(archive, lr_ff: bool, hr_ff: bool) -> dict[str, CameraFlat]:
    """Both cameras' :class:`CameraFlat` (see :mod:`xvr_batch.pixelmask`). An LR flat that clipped is
    estimated from the HR flat, binned, times the median LR/HR flat ratio where neither clipped."""
    out: dict[str, CameraFlat] = {}
    spans: dict[str, np.ndarray] = {}
    clipflat: dict[str, np.ndarray] = {}
    for cam, ff in (("lr", lr_ff), ("hr", hr_ff)):
        dtype = getattr(archive, f"{cam}_dtype", np.dtype(np.float32))
        if not ff:
            sample = archive.read_lr_at([0])[0] if cam == "lr" else archive.read_hr(0)
            out[cam] = CameraFlat(None, None, clip_level(dtype, [np.asarray(sample)]), None, None)
            continue
        dark = archive.calibration(f"dark_{cam}").astype(np.float32)
        white = archive.calibration(f"white_{cam}").astype(np.float32)
        level = clip_level(dtype, [white])
        defect = flat_defects(dark, white)
        clipflat[cam] = near_clip(white, dark, level) & ~defect
        spans[cam] = white - dark
        out[cam] = CameraFlat(dark, None, level, _nonempty(defect), None)
    if "hr" in spans:
        out["hr"].noflat = _nonempty(clipflat["hr"])  # not estimated: only the fit leaves these out
        out["hr"].gain = (1.0 / np.maximum(spans["hr"], np.float32(EPS))).astype(np.float32)
    if "lr" in spans:
        span = spans["lr"].copy()
        lost = clipflat["lr"]
        if lost.any() and "hr" in spans:
            s = int(archive.scale)
            hr_bad = clipflat["hr"] if out["hr"].defect is None else clipflat["hr"] | out["hr"].defect
            span_b = bin_mean(spans["hr"], s)
            ok_b = ~bin_any(hr_bad, s) & (span_b > 0)
            lr_defect = out["lr"].defect if out["lr"].defect is not None else np.zeros(span.shape, bool)
            good = ~lost & ~lr_defect & ok_b & (span > 0)
            if np.count_nonzero(good) >= 16:
                ratio = float(np.median(span[good] / span_b[good]))
                est = lost & ok_b
                span[est] = ratio * span_b[est]
                lost = lost & ~est
        if lost.any():
            span, lost = _flat_from_keys(archive, out, span, lost)
        out["lr"].noflat = _nonempty(lost)
        out["lr"].gain = (1.0 / np.maximum(span, np.float32(EPS))).astype(np.float32)
    return out


def _flat_from_keys(archive, cams: dict[str, CameraFlat], span: np.ndarray, lost: np.ndarray,
                    n_keys: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """LR flats (``span`` = flat - dark) for the pixels ``lost`` (flat clipped, no HR flat to estimate it
    from), calibrated on up to ``n_keys`` key frames: ``sum(LR - dark) / sum(HR transmission binned)`` over
    the keys where neither camera clipped there. Pixels no key calibrates stay lost."""
    lr_cam, hr_cam = cams["lr"], cams["hr"]
    s = int(archive.scale)
    k_all = len(archive.hr_index)
    num = np.zeros(span.shape, np.float64)
    den = np.zeros(span.shape, np.float64)
    for k in sorted({int(round(i)) for i in np.linspace(0, k_all - 1, min(k_all, n_keys))}):
        hr_raw = archive.read_hr(k)
        lr_raw = archive.read_lr_at([int(archive.hr_index[k])])[0]
        hr = hr_raw.astype(np.float64)
        if hr_cam.dark is not None:
            hr = (hr - hr_cam.dark) * hr_cam.gain
        ok = lost & (lr_raw < lr_cam.level) if lr_cam.level is not None else lost.copy()
        # HR pixels whose flat clipped are kept: the LR pixel is calibrated onto the HR transmission the
        # model is given (and that the output is mapped back from), biased or not
        hr_bad = hr_raw >= hr_cam.level if hr_cam.level is not None else np.zeros(hr_raw.shape, bool)
        if hr_cam.defect is not None:
            hr_bad = hr_bad | hr_cam.defect
        ok &= ~bin_any(hr_bad, s)
        ok &= np.isfinite(lr_raw)
        num[ok] += (lr_raw.astype(np.float64) - lr_cam.dark)[ok]
        den[ok] += bin_mean(hr, s).astype(np.float64)[ok]
    good = lost & (den > 0) & (num > 0)
    span = span.copy()
    span[good] = (num[good] / den[good]).astype(np.float32)
    return span, lost & ~good


def _unmeasured(cam: CameraFlat, raw: np.ndarray) -> np.ndarray | None:
    """Pixels of one raw frame the camera did not measure (clipped, defective, without a usable flat)."""
    bad = cam.static_bad
    if cam.level is not None:
        clipped = raw >= cam.level
        if clipped.any():
            bad = clipped if bad is None else bad | clipped
    return bad


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def fit_normalisation(archive) -> Normalisation:
    """Fit the mapping on (up to MAX_FIT_KEYS evenly spaced) key frames of ``archive``."""
    has = {c: archive.calibration(c) is not None for c in ("dark_lr", "white_lr", "dark_hr", "white_hr")}
    lr_ff, hr_ff = has["dark_lr"] and has["white_lr"], has["dark_hr"] and has["white_hr"]
    k_all = len(archive.hr_index)
    picks = sorted({int(round(i)) for i in np.linspace(0, k_all - 1, min(k_all, MAX_FIT_KEYS))})
    xs, ys, hr_vals = [], [], []
    cams = cameras(archive, lr_ff, hr_ff)
    lr_dark, lr_gain, hr_dark, hr_gain = cams["lr"].dark, cams["lr"].gain, cams["hr"].dark, cams["hr"].gain
    s = archive.scale
    xs_all, ys_all = [], []
    for k in picks:
        hr_raw = archive.read_hr(k)
        lr_raw = archive.read_lr_at([int(archive.hr_index[k])])[0]
        hr, lr = hr_raw.astype(np.float64), lr_raw.astype(np.float64)
        if hr_ff:
            hr = (hr - hr_dark) * hr_gain
        if lr_ff:
            lr = (lr - lr_dark) * lr_gain
        hr_vals.append(hr.ravel()[:: max(1, hr.size // 200_000)])
        hr_lr = _block_mean(hr, s)
        f = max(1, min(FIT_BLOCK, min(lr.shape) // 2))
        xb, yb = _block_mean(lr, f).ravel(), _block_mean(hr_lr, f).ravel()
        xs_all.append(xb)
        ys_all.append(yb)
        bad = _unmeasured(cams["lr"], lr_raw)
        hr_bad = _unmeasured(cams["hr"], hr_raw)
        if hr_bad is not None:
            hr_bad = bin_any(hr_bad, s)
            bad = hr_bad if bad is None else bad | hr_bad
        if bad is not None:  # leave out the blocks with clipped or defective pixels in either camera
            keep = ~bin_any(bad[: (bad.shape[0] // f) * f, : (bad.shape[1] // f) * f], f).ravel()
            xb, yb = xb[keep], yb[keep]
        xs.append(xb)
        ys.append(yb)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.size < 8:  # (nearly) every block holds a bad pixel: fit on all of them rather than on none
        x, y = np.concatenate(xs_all), np.concatenate(ys_all)
    vx = float(np.var(x))
    if vx > 1e-12 * max(1.0, float(np.mean(x)) ** 2):
        a = float(np.cov(x, y, bias=True)[0, 1] / vx)
        b = float(np.mean(y) - a * np.mean(x))
    else:  # flat scene: match the means
        a = float(np.mean(y) / np.mean(x)) if abs(np.mean(x)) > 1e-12 else 1.0
        b = 0.0
    allhr = np.concatenate(hr_vals)
    lo, hi = (float(v) for v in np.percentile(allhr, [0.1, 99.9]))
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    norm = Normalisation(a=a, b=b, lo=lo, hi=hi, lr_flat_field=lr_ff, hr_flat_field=hr_ff, n_fit_keys=len(picks))
    problem = norm.problem() if all(math.isfinite(v) for v in (a, b, lo, hi)) else f"non-finite fit {norm}"
    if problem:
        raise UserError(f"{getattr(archive, 'path', 'archive')}: cannot fit the LR->HR intensity mapping on the key "
                        f"frames ({problem}); check the key frames, darks and flats")
    return norm
