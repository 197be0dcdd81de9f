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

FIT_BLOCK = 4
MAX_FIT_KEYS = 32
EPS = 1e-6

__all__ = ["Normalisation", "NormalisationError", "Calibration", "fit_normalisation"]


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


class Calibration:
    """Per-pixel darks and flats of both cameras (averaged), and the fitted :class:`Normalisation`.

    Converts raw frames to model input and model output back to HR counts, in float32."""

    def __init__(self, archive, norm: Normalisation):
        self.norm = norm
        self.lr_dark, self.lr_gain = _flat(archive, "lr") if norm.lr_flat_field else (None, None)
        self.hr_dark, self.hr_gain = _flat(archive, "hr") if norm.hr_flat_field else (None, None)
        span = norm.hi - norm.lo
        # model_lr = (a * flat_lr + b - lo) / span = flat_lr * s + o
        self._lr_s = np.float32(norm.a / span)
        self._lr_o = np.float32((norm.b - norm.lo) / span)
        self._hr_s = np.float32(1.0 / span)
        self._hr_o = np.float32(-norm.lo / span)
        self._span = np.float32(span)
        self._lo = np.float32(norm.lo)

    def lr_to_model(self, lr: np.ndarray) -> np.ndarray:
        x = lr.astype(np.float32, copy=True)
        if self.lr_dark is not None:
            x -= self.lr_dark
            x *= self.lr_gain
        x *= self._lr_s
        x += self._lr_o
        return x

    def hr_to_model(self, hr: np.ndarray) -> np.ndarray:
        x = hr.astype(np.float32, copy=True)
        if self.hr_dark is not None:
            x -= self.hr_dark
            x *= self.hr_gain
        x *= self._hr_s
        x += self._hr_o
        return x

    def model_to_hr(self, y: np.ndarray) -> np.ndarray:
        x = y.astype(np.float32, copy=True)
        x *= self._span
        x += self._lo
        if self.hr_dark is not None:
            x /= self.hr_gain
            x += self.hr_dark
        return x


def _flat(archive, cam: str) -> tuple[np.ndarray, np.ndarray]:
    dark = archive.calibration(f"dark_{cam}").astype(np.float32)
    white = archive.calibration(f"white_{cam}").astype(np.float32)
    gain = 1.0 / np.maximum(white - dark, np.float32(EPS))
    return dark, gain.astype(np.float32)


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
    lr_dark = lr_gain = hr_dark = hr_gain = None
    if lr_ff:
        lr_dark, lr_gain = _flat(archive, "lr")
    if hr_ff:
        hr_dark, hr_gain = _flat(archive, "hr")
    s = archive.scale
    for k in picks:
        hr = archive.read_hr(k).astype(np.float64)
        lr = archive.read_lr_at([int(archive.hr_index[k])])[0].astype(np.float64)
        if hr_ff:
            hr = (hr - hr_dark) * hr_gain
        if lr_ff:
            lr = (lr - lr_dark) * lr_gain
        hr_vals.append(hr.ravel()[:: max(1, hr.size // 200_000)])
        hr_lr = _block_mean(hr, s)
        f = max(1, min(FIT_BLOCK, min(lr.shape) // 2))
        xs.append(_block_mean(lr, f).ravel())
        ys.append(_block_mean(hr_lr, f).ravel())
    x, y = np.concatenate(xs), np.concatenate(ys)
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
