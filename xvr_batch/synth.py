"""Synthetic high-speed x-ray imaging archives.

:func:`generate` renders a two-camera recording of a moving sample the way a synchrotron
high-speed radiography experiment sees it; :func:`write_archive` stores it in the archive layout
of README.md ("Input archive"); :func:`synthesize` does both and returns a short summary.

Physics model
-------------
All geometry lives on the HR pixel grid: lengths are in HR pixels, and pixel ``(i, j)`` covers
``[i, i+1) x [j, j+1)`` (its centre is at ``(i + 0.5, j + 0.5)``). Time is the LR frame index.

1. **Scene.** The sample is described by its projected attenuation
   ``A(x, y, t) = integral of mu dz`` (Beer-Lambert exponent, dimensionless), the sum of a static
   textured background and one or more moving *families* (see below). Every component is
   rendered analytically with sub-pixel positions and area-integrated (anti-aliased) edges:
   spheres and cylinders use the exact pixel integral of their chord ``2*sqrt(r^2 - u^2)`` along
   x (and sub-rows along y), hard edges use the exact 1-D pixel coverage of their signed
   distance. Voids (cavities, pores, cracks) remove attenuation of the substrate and are masked
   to where the substrate is.
2. **Absorption and phase contrast.** The exit intensity of a unit beam is
   ``I = exp(-A) * (1 + c * laplacian(A))``. This is the near-field transport-of-intensity
   result ``I_z = I_0 * (1 - (z/k) * laplacian(phi))`` with the phase ``phi = -k * delta * T``
   proportional to the projected thickness (homogeneous-object assumption: ``delta/beta`` is
   the same for every material, so ``z * delta * T`` is ``c * A`` for one per-archive ``c``).
   Subtracting the Laplacian of the phase puts a bright fringe on the outer (thin) side of every
   edge and a dark fringe on the inner side, as propagation-based phase contrast does. The
   factor is clipped to ``[0.3, 2]`` to stay in the regime where the linear TIE is sensible.
3. **Beam.** The illumination is a broad 2-D Gaussian (wider horizontally, as a synchrotron beam
   is) times a few weak horizontal bands (monochromator/mirror stripes). Its centre, its
   intensity (ring current, mono vibration) and the band phases drift slowly over time.
4. **Cameras.** Both cameras see the same scene at the same instants (short exposures, no
   motion blur) and are registered to each other.

   * HR camera, only at the key-frame times ``hr_index``: expected photons per HR pixel
     ``hr_dose * beam * I * P_hr`` (``P`` is the camera's fixed gain pattern: pixel response
     non-uniformity, scintillator blemishes, vignetting), Poisson noise, scintillator blur
     (Gaussian PSF), conversion gain ``gain_hr`` ADU/photon, a per-pixel dark map (offset,
     column pattern, hot pixels) and Gaussian read noise.
   * LR camera, at every step: the same exit intensity area-integrated over ``scale x scale``
     blocks (mean of the HR pixels of each LR pixel), at a *low* dose ``lr_dose`` photons per LR
     pixel (1000-8000: per unit of area 6-250x below the HR camera, an SNR of about 30-90 in the
     open beam), Poisson noise, its own PSF, gain, dark map and read noise.
   * Darks (dark map + read noise) and flats (beam without the sample, recorded just before the
     sequence, so the beam has drifted a little by the end) for both cameras.

   ``hr_dose`` and ``lr_dose`` are the photons per pixel of the open beam at its peak.
5. **Ground truth.** ``/exchange/data_gt`` is the *noise-free expected* HR camera signal at
   every step: ``gain_hr * PSF(hr_dose * beam * I * P_hr) + dark_map_hr``, i.e. the mean of
   what the HR camera would have recorded (dark offset, fixed pattern and beam included), so
   ``data_hr[k]`` equals ``data_gt[hr_index[k]]`` up to photon and read noise and quantisation.
   It is always float32 (expected values are not integers), in the units of ``data_hr``.

Units and dtypes
----------------
Signals are computed in 16-bit ADU. ``dtype="uint16"`` stores them rounded and clipped to
``[0, 65535]``; ``"uint8"`` divides by 257 (so 65535 ADU -> 255), rounds and clips; ``"float32"``
divides by 65535 and clips to ``[0, 1]`` without rounding. ``data_gt`` is scaled the same way
but never rounded. Gains are drawn so that the open beam fills 40-70 % (HR) and 25-55 % (LR) of
the 16-bit range, so bright phase fringes rarely saturate.

Families
--------
``static``
    Always present: a metal substrate (plate along the beam) whose top surface is a slightly
    rough, tilted line across the field, with grain/density texture made from filtered noise,
    a layer of powder grains resting on the surface (powder bed), and the weakly textured
    windows of the sample holder. ``families=["static"]`` gives a scene without motion.
``particles``
    Spatter / droplets / tracer particles: tens of small dense spheres (radius 1.2-5 HR px)
    moving along a common direction with spread in speed and direction and a weak gravity-like
    acceleration, re-entering from the opposite side after leaving the field.
``cavity``
    A keyhole in a melt pool: a narrow vapour cavity below the surface whose depth oscillates,
    whose walls carry protrusions travelling downwards, which drifts sideways, inside a slightly
    less dense melt pool, and which sheds pores that are carried away by the flow and trapped.
``rotor``
    A rigid toothed disc with a hub, a shaft and rings of holes (plus one marker hole),
    rotating in the image plane.
``crack``
    One to three cracks (with branches) nucleating at staggered times on the surface or the side
    of the substrate, running along a persistent random path; the opening behind the tip grows
    like the square root of the distance to the tip and widens slowly over time.

More families (opt-in by name, :data:`EXTRA_FAMILIES`)
-----------------------------------------------------
``families=None`` draws only from :data:`MOVING_FAMILIES`, so these appear only when named.

``meltpool``
    A liquid region below the surface, less dense than the solid, whose boundary deforms (waves
    travelling along it at about ``speed``, plus breathing), which travels along the surface (a
    scan, bouncing between 10 % and 90 % of the width) and whose interior carries a density texture
    swirled by a differential rotation (fluid-like shear).
``spatter``
    Small (radius 0.7-2.5 HR px), fast (2-5x ``speed``) particles ejected ballistically from a spot
    on the surface at random times, under gravity; they leave the field or fall back and are gone.
``collide``
    4-9 spheres with two through-holes (so their spin shows) moving in the field, colliding
    elastically with each other (friction exchanges spin) and bouncing off the border.
``debris``
    2-4 lumpy, spinning bodies that enter the field from a border at staggered times, cross it
    along straight lines and leave it (objects entering and leaving the field).
``occluder``
    Occlusion: a nearly opaque plate (attenuation 2.5-4.5) whose straight edge sweeps back and forth
    over part of the field, and a thin dense wire crossing it.

Domain randomisation (opt-in: ``effects=``)
-------------------------------------------
Each effect draws its parameters from :data:`EFFECT_RANGES` with its own random stream, so
enabling one never changes another's draws (the per-frame photon noise still follows the signal).
``effects=None`` (default) gives exactly the plain archive, byte for byte. The names, in the order
they are applied, are :data:`EFFECTS`:

``texture``
    Multiscale substrate texture (3-5 octaves of filtered noise with a falloff), dense inclusions
    and pores.
``dose``
    Doses over a wide range (LR 150-20000, HR 1000-50000 photons per pixel, log-uniform), where
    ``lr_dose`` / ``hr_dose`` are not given. (The factor between the cameras is ``scale``.)
``saturation``
    Gains that put the open beam at 80-160 % (LR) / 70-130 % (HR) of the 16-bit range, so bright
    regions and fringes clip.
``psf``
    Scintillator blur per camera over a wide range (HR sigma 0.4-2 px, LR 0.25-1.2 px) with a wide
    halo (0-15 % of the light in a Gaussian of 2-8 / 1-3 px).
``read``
    Read noise beside Poisson over a wide range (0.5-20 / 0.5-10 photon equivalents) plus per-frame
    row offsets (0-50 % of it, the banding of CMOS read-out).
``fpn``
    Stronger gain non-uniformity and fixed-pattern noise: pixel response 0.5-4 %, column and row gain
    stripes, column offsets 2-30 ADU.
``defects``
    Hot pixels that saturate (always at the same positions) and dead pixels that read 0, on both
    cameras (fractions log-uniform in 5e-5-1e-3 and 5e-5-5e-4; at least one of each).
``flicker``
    A beam that flickers and drifts: per-frame intensity jitter (0.5-4 %), a ramp (-10..+5 % over
    the sequence), short dips (top-up / mono glitches) and a drift of the beam centre (up to 5 % of
    the field). The flats see the flicker of their own instants.
``misreg``
    Residual misregistration after registration: the LR camera sees the field through a small
    affine (shift up to 0.35 LR px per axis, rotation within 0.3 degrees, scale within 0.3 %),
    sampled like :func:`two_cameras` does it, so the LR is no longer an exact bin of the truth.

The effects and their drawn parameters are stored in the archive's ``/synth`` metadata
(``effects`` and ``effect_params``; ``params_json`` has both); the ``/exchange`` layout is the same.

Speed
-----
``speed`` is the characteristic image velocity in LR pixels per frame of the moving families:
particle speed, rim speed of the rotor, crack tip speed, speed of the keyhole wall protrusions
(and the rate of depth oscillation). ``None`` draws one value per family, log-uniformly in
``[0.1, 4]``.

Determinism
-----------
All randomness comes from :class:`numpy.random.Generator` objects seeded from ``seed`` only
(one independent stream per component, family and effect), so the same arguments give identical
arrays.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["FAMILIES", "MOVING_FAMILIES", "EXTRA_FAMILIES", "ALL_FAMILIES", "ALL_MOVING_FAMILIES", "EFFECTS",
           "EFFECT_RANGES", "resolve_effects", "generate", "write_archive", "synthesize"]

#: Names of the scene families. ``static`` (the textured background) is always present.
FAMILIES: tuple[str, ...] = ("static", "particles", "cavity", "rotor", "crack")

#: The families that move; ``families=None`` draws 1-3 of these.
MOVING_FAMILIES: tuple[str, ...] = FAMILIES[1:]

#: More moving families (opt-in by name: ``families=None`` never draws them, so archives made
#: without naming them are unchanged). See "More families" in the module docstring.
EXTRA_FAMILIES: tuple[str, ...] = ("meltpool", "spatter", "collide", "debris", "occluder")
ALL_FAMILIES: tuple[str, ...] = FAMILIES + EXTRA_FAMILIES
ALL_MOVING_FAMILIES: tuple[str, ...] = ALL_FAMILIES[1:]

#: Opt-in domain-randomisation effects (``effects=``), in the order they are applied and recorded.
EFFECTS: tuple[str, ...] = ("texture", "dose", "saturation", "psf", "read", "fpn", "defects", "flicker",
                            "misreg")

#: The ranges each effect draws its parameters from (uniform unless marked log-uniform). Camera
#: parameters are drawn per camera (``_lr`` / ``_hr``). Read noise is in photon equivalents.
EFFECT_RANGES: dict[str, dict[str, Any]] = {
    "texture": {"octaves": (3, 5), "amplitude": (0.03, 0.1), "falloff": (0.5, 1.0),
                "inclusions_per_kpx": (0.05, 0.5), "pores_per_kpx": (0.02, 0.3)},
    "dose": {"lr_dose_log": (150.0, 20000.0), "hr_dose_log": (1000.0, 50000.0)},
    "saturation": {"fill_lr": (0.8, 1.6), "fill_hr": (0.7, 1.3)},
    "psf": {"sigma_hr": (0.4, 2.0), "sigma_lr": (0.25, 1.2), "halo_fraction": (0.0, 0.15),
            "halo_sigma_hr": (2.0, 8.0), "halo_sigma_lr": (1.0, 3.0)},
    "read": {"read_photons_lr": (0.5, 20.0), "read_photons_hr": (0.5, 10.0), "row_fraction": (0.0, 0.5)},
    "fpn": {"prnu": (0.005, 0.04), "column_gain": (0.002, 0.02), "row_gain": (0.0, 0.01),
            "column_offset_adu": (2.0, 30.0)},
    "defects": {"hot_fraction_log": (5e-5, 1e-3), "dead_fraction_log": (5e-5, 5e-4)},
    "flicker": {"jitter": (0.005, 0.04), "ramp": (-0.1, 0.05), "dip_rate": (0.0, 0.02),
                "dip_depth": (0.05, 0.3), "centre_drift": (-0.05, 0.05)},
    "misreg": {"shift_lr_px": (-0.35, 0.35), "rotation_deg": (-0.3, 0.3), "scale": (0.997, 1.003)},
}

#: Range of the per-family speed (LR px/frame) drawn when ``speed`` is None (log-uniform).
SPEED_RANGE: tuple[float, float] = (0.1, 4.0)
#: Range of the LR dose (photons per LR pixel, open beam) drawn when ``lr_dose`` is None.
LR_DOSE_RANGE: tuple[float, float] = (1000.0, 8000.0)
#: Range of the HR dose (photons per HR pixel, open beam) drawn when ``hr_dose`` is None.
HR_DOSE_RANGE: tuple[float, float] = (3000.0, 15000.0)

_ADU_MAX = 65535.0
_DTYPES = ("uint16", "uint8", "float32")
_FORMAT = "xvr_batch.synth/1"

# Independent random streams (SeedSequence spawn keys).
_STREAM_CHOICE, _STREAM_BACKGROUND, _STREAM_BEAM, _STREAM_CAMERA, _STREAM_NOISE = 0, 1, 2, 3, 4
_STREAM_FAMILY0 = 10
_STREAM_EXTRA_FAMILY0 = 30  # + index in EXTRA_FAMILIES
_STREAM_EFFECT_CHOICE = 39  # effects="random"
_STREAM_EFFECT0 = 40  # + index in EFFECTS: each effect's parameter draws
_STREAM_ROW_NOISE = 60  # + 0 (LR) / 1 (HR): per-frame row noise of the "read" effect


def _family_stream(name: str) -> int:
    if name in FAMILIES:
        return _STREAM_FAMILY0 + FAMILIES.index(name)
    return _STREAM_EXTRA_FAMILY0 + EXTRA_FAMILIES.index(name)


# ----------------------------------------------------------------------------------------------
# small numerical helpers
# ----------------------------------------------------------------------------------------------
def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def _loguniform(rng: np.random.Generator, lo: float, hi: float, size: Any = None) -> Any:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _gauss_kernel(sigma: float, truncate: float = 3.0) -> np.ndarray:
    r = max(1, int(math.ceil(truncate * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (symmetric boundary), float32."""
    img = np.asarray(img, dtype=np.float32)
    if sigma <= 0:
        return img.copy()
    k = _gauss_kernel(sigma)
    r = len(k) // 2
    lead = [(0, 0)] * (img.ndim - 2)
    h, w = img.shape[-2:]
    p = np.pad(img, lead + [(r, r), (0, 0)], mode="symmetric")
    tmp = k[0] * p[..., 0:h, :]
    for i in range(1, len(k)):
        tmp += k[i] * p[..., i : i + h, :]
    p = np.pad(tmp, lead + [(0, 0), (r, r)], mode="symmetric")
    out = k[0] * p[..., :, 0:w]
    for i in range(1, len(k)):
        out += k[i] * p[..., :, i : i + w]
    return out


def _bin(img: np.ndarray, s: int) -> np.ndarray:
    """Area integration: mean over ``s x s`` blocks of the last two axes."""
    h, w = img.shape[-2] // s, img.shape[-1] // s
    return img.reshape(img.shape[:-2] + (h, s, w, s)).mean(axis=(-3, -1))


def _laplacian(a: np.ndarray) -> np.ndarray:
    """5-point Laplacian (per HR px^2) with replicated edges."""
    p = np.pad(a, 1, mode="edge")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * a


def _filtered_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise (correlation length ``sigma`` px)."""
    white = rng.standard_normal(shape)
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij")
    f2 = sum(g * g for g in grids)
    spec = np.fft.rfftn(white) * np.exp(-2.0 * (math.pi * sigma) ** 2 * f2)
    n = np.fft.irfftn(spec, s=shape, axes=tuple(range(len(shape))))
    n -= n.mean()
    sd = n.std()
    return (n / sd if sd > 0 else n).astype(np.float32)


def _chord_pixels(edges: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """Exact per-pixel mean of ``2*sqrt(rho^2 - u^2)_+`` between consecutive ``edges``.

    ``edges`` (..., n+1) are unit-spaced pixel boundaries relative to the circle centre and
    ``rho`` broadcasts against them; the result has shape (..., n). Integrating the chord of a
    circle over each pixel gives an anti-aliased, sub-pixel accurate projection of spheres and
    cylinders. The antiderivative is evaluated once per edge and differenced.
    """
    uc = np.clip(edges, -rho, rho)
    ratio = np.divide(uc, rho, out=np.zeros(uc.shape), where=rho > 0)
    prim = uc * np.sqrt(np.maximum(rho * rho - uc * uc, 0.0)) + rho * rho * np.arcsin(
        np.clip(ratio, -1.0, 1.0)
    )
    return np.diff(prim, axis=-1)


def _band_coverage(d: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Exact 1-D pixel coverage of a band of ``width`` centred ``d`` px from the pixel centre."""
    half = 0.5 * width
    return np.clip(np.minimum(0.5, d + half) - np.maximum(-0.5, d - half), 0.0, 1.0)


def _splat_spheres(
    shape: tuple[int, int],
    cy: np.ndarray,
    cx: np.ndarray,
    r: np.ndarray,
    amp: np.ndarray,
    sub_rows: int = 3,
) -> np.ndarray:
    """Sum of ``amp * chord`` of spheres (HR px), area-integrated per pixel, as (H, W) float32.

    Each sphere is rendered in a small patch around its centre: exact integration along x and
    ``sub_rows`` sub-samples along y. Spheres partly or fully outside the frame are clipped.
    """
    hh, ww = shape
    cy, cx, r, amp = (np.asarray(a, dtype=np.float64).ravel() for a in (cy, cx, r, amp))
    if r.size == 0:
        return np.zeros(shape, np.float32)
    half = int(math.ceil(r.max())) + 1
    off = np.arange(2 * half + 1)
    rows = np.floor(cy).astype(np.int64)[:, None] - half + off  # (P, ps)
    cols = np.floor(cx).astype(np.int64)[:, None] - half + off  # (P, ps)
    ysub = rows[:, :, None] + (np.arange(sub_rows) + 0.5) / sub_rows  # (P, ps, ss)
    dy = ysub - cy[:, None, None]
    rho = np.sqrt(np.maximum(r[:, None, None] ** 2 - dy * dy, 0.0))[..., None]  # (P, ps, ss, 1)
    edges = np.concatenate([cols, cols[:, -1:] + 1], axis=1) - cx[:, None]  # (P, ps+1)
    val = _chord_pixels(edges[:, None, None, :], rho).mean(axis=2)  # (P, ps, ps)
    val *= amp[:, None, None]
    valid = ((rows >= 0) & (rows < hh))[:, :, None] & ((cols >= 0) & (cols < ww))[:, None, :]
    idx = rows[:, :, None] * ww + cols[:, None, :]
    out = np.bincount(idx[valid], weights=val[valid], minlength=hh * ww)
    return out.reshape(shape).astype(np.float32)


def _wrap(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return lo + np.mod(p - lo, hi - lo)


# ----------------------------------------------------------------------------------------------
# scene: static background and moving families
# ----------------------------------------------------------------------------------------------
class _Background:
    """Static textured background: substrate + powder layer + sample-holder windows."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int]):
        hh, ww = shape
        self.shape = shape
        self.x = np.arange(ww) + 0.5
        self.y = np.arange(hh) + 0.5
        self.y0 = float(rng.uniform(0.4, 0.65) * hh)
        rough = _filtered_noise(rng, (ww,), max(2.0, ww / 25.0)) * rng.uniform(0.5, 2.5)
        tilt = rng.uniform(-0.03, 0.03)
        self.y_surf = (self.y0 + rough + tilt * (self.x - ww / 2)).astype(np.float64)
        # area coverage of the substrate (1-px linear ramp == exact for a locally flat edge)
        self.sub_mask = np.clip(self.y[:, None] - self.y_surf[None, :] + 0.5, 0.0, 1.0).astype(
            np.float32
        )
        self.l_sub = max(20.0, float(rng.uniform(0.3, 0.7)) * max(hh, ww))  # along the beam, px
        a_tot = float(rng.uniform(0.7, 1.6))  # attenuation through the plate
        self.mu_sub = a_tot / self.l_sub
        micro = _filtered_noise(rng, shape, rng.uniform(1.5, 4.0))
        meso = _filtered_noise(rng, shape, max(hh, ww) / 10.0)
        texture = 1.0 + rng.uniform(0.01, 0.03) * micro + rng.uniform(0.01, 0.04) * meso
        a = a_tot * self.sub_mask * texture
        self.powder = bool(rng.random() < 0.8)
        if self.powder:
            h_p = rng.uniform(6.0, 18.0)
            r_mean = rng.uniform(1.8, 4.0)
            n = int(2.5 * ww * h_p / (math.pi * r_mean**2))
            r = np.clip(rng.normal(r_mean, 0.3 * r_mean, n), 1.0, 2.0 * r_mean)
            cx = rng.uniform(0.0, ww, n)
            cy = np.interp(cx, self.x, self.y_surf) - r * rng.uniform(0.2, 1.0, n)
            cy -= rng.uniform(0.0, max(h_p - 2 * r_mean, 0.5), n) * rng.random(n) ** 0.7
            a += _splat_spheres(shape, cy, cx, r, np.full(n, self.mu_sub))
        holder = rng.uniform(0.03, 0.15) * (
            1.0 + 0.05 * _filtered_noise(rng, shape, max(hh, ww) / 8.0)
        )
        self.attenuation = (a + holder).astype(np.float32)


class _Family:
    """A moving scene family: ``attenuation(t)`` is its (H, W) contribution to ``A`` at time t.

    Voids return negative values (removed substrate). ``v`` is the family's characteristic
    image speed in HR pixels per frame.
    """

    name = ""

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        self.bg = bg
        self.v = v  # HR px per frame
        self.n_frames = n_frames

    def attenuation(self, t: float) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class _Particles(_Family):
    """Spatter/droplets/tracers: small dense spheres in a common flow, wrapped periodically."""

    name = "particles"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        n = max(5, int(rng.integers(15, 60) * hh * ww / 65536.0))
        self.r = _loguniform(rng, 1.2, 5.0, n)
        self.mu = np.full(n, rng.uniform(0.02, 0.06))
        theta = rng.uniform(0.0, 2 * math.pi) + rng.normal(0.0, 0.3, n)
        speed = v * _loguniform(rng, 0.6, 1.5, n)
        self.vel = np.stack([speed * np.sin(theta), speed * np.cos(theta)])  # (2, n): vy, vx
        self.acc = np.array([rng.uniform(0.0, 0.5) * v / max(n_frames, 1), 0.0])[:, None]
        self.m = float(math.ceil(self.r.max()) + 2)
        self.p0 = np.stack(
            [rng.uniform(-self.m, hh + self.m, n), rng.uniform(-self.m, ww + self.m, n)]
        )

    def positions(self, t: float) -> np.ndarray:
        hh, ww = self.bg.shape
        p = self.p0 + self.vel * t + 0.5 * self.acc * t * t
        return np.stack(
            [_wrap(p[0], -self.m, hh + self.m), _wrap(p[1], -self.m, ww + self.m)]
        )

    def attenuation(self, t: float) -> np.ndarray:
        p = self.positions(t)
        return _splat_spheres(self.bg.shape, p[0], p[1], self.r, self.mu)


class _Cavity(_Family):
    """Keyhole (vapour cavity) in a melt pool, with oscillating depth, wall waves and pores."""

    name = "cavity"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        avail = max(hh - bg.y0 - 3.0, 4.0)
        self.d0 = rng.uniform(0.45, 0.85) * avail
        self.w0 = max(2.0, rng.uniform(0.03, 0.07) * ww)  # half-width, px
        self.x0 = rng.uniform(0.3, 0.7) * ww
        self.ax = rng.uniform(0.0, 0.08) * ww
        self.px = max(2 * math.pi * self.ax * 3.0 / max(v, 1e-6), 30.0)
        self.phx = rng.uniform(0, 2 * math.pi)
        self.tilt = rng.uniform(-0.3, 0.3)
        k = 3
        lam = np.maximum(rng.uniform(0.15, 0.5, k) * self.d0, 4.0)
        self.wave_k = 2 * math.pi / lam
        self.wave_w = self.wave_k * v  # protrusions travel down at speed v
        self.wave_a = rng.uniform(0.02, 0.08, k)
        self.wave_b = rng.uniform(0.05, 0.2, k) * self.w0
        self.wave_ph = rng.uniform(0, 2 * math.pi, (2, k))
        self.a_d = rng.uniform(0.08, 0.2)
        self.p_d = max(2 * math.pi * self.a_d * self.d0 / max(v, 1e-6), 6.0)
        self.ph_d = rng.uniform(0, 2 * math.pi, 2)
        # melt pool (ellipsoid, liquid slightly less dense than the solid)
        self.mp_a = rng.uniform(3.0, 6.0) * self.w0
        self.mp_b = rng.uniform(1.0, 1.3) * self.d0
        self.mp_c = min(self.mp_a, bg.l_sub / 2)
        self.mp_drho = rng.uniform(0.04, 0.1)
        self.mp_shift = rng.uniform(0.0, 0.5) * self.mp_a * math.copysign(1.0, self.tilt)
        # pores pinched off at the keyhole tip, carried by the flow, then trapped
        n_p = int(rng.poisson(rng.uniform(0.01, 0.05) * n_frames))
        self.pore_t = np.sort(rng.uniform(0, n_frames, n_p))
        self.pore_r = rng.uniform(1.2, min(4.0, max(1.3, 0.8 * self.w0)), n_p)
        ang = math.pi / 2 + rng.uniform(-1.2, 1.2, n_p)
        speed = v * rng.uniform(0.3, 1.0, n_p)
        self.pore_tau = rng.uniform(5.0, 40.0, n_p)
        self.pore_v = np.stack([speed * np.sin(ang), speed * np.cos(ang)])
        tip = np.array([self._tip(t) for t in self.pore_t]).reshape(n_p, 2).T
        self.pore_p0 = tip - np.array([[1.0], [0.0]]) * self.pore_r

    def _xk(self, t: float) -> float:
        return self.x0 + self.ax * math.sin(2 * math.pi * t / self.px + self.phx)

    def _depth(self, t: float) -> float:
        ph = 2 * math.pi * t / self.p_d
        return self.d0 * (
            1.0
            + self.a_d * math.sin(ph + self.ph_d[0])
            + 0.3 * self.a_d * math.sin(2.7 * ph + self.ph_d[1])
        )

    def _surface(self, x: float) -> float:
        return float(np.interp(x, self.bg.x, self.bg.y_surf))

    def _tip(self, t: float) -> tuple[float, float]:
        xk, d = self._xk(t), self._depth(t)
        return self._surface(xk) + d, xk + self.tilt * d

    def attenuation(self, t: float) -> np.ndarray:
        hh, ww = self.bg.shape
        out = np.zeros(self.bg.shape, np.float32)
        xk, d = self._xk(t), self._depth(t)
        ys = self._surface(xk)
        mu = self.bg.mu_sub
        # --- melt pool: ellipsoid chord scaled to its extent along the beam ---
        xm = xk + self.mp_shift
        r0, r1 = max(int(ys) - 2, 0), min(int(math.ceil(ys + self.mp_b)) + 1, hh)
        c0, c1 = max(int(xm - self.mp_a) - 1, 0), min(int(math.ceil(xm + self.mp_a)) + 1, ww)
        if r1 > r0 and c1 > c0:
            ss = 2
            ysub = (np.arange(r0, r1)[:, None] + (np.arange(ss) + 0.5) / ss).ravel()
            e = np.clip((ysub - ys) / self.mp_b, 0.0, 1.0)
            rho = (self.mp_a * np.sqrt(1.0 - e * e) * (ysub >= ys))[:, None]
            edges = (np.arange(c0, c1 + 1) - xm)[None, :]
            chord = _chord_pixels(edges, rho) * (self.mp_c / self.mp_a)
            chord = chord.reshape(r1 - r0, ss, c1 - c0).mean(axis=1)
            out[r0:r1, c0:c1] -= self.mp_drho * mu * chord
        # --- keyhole: cylinder of varying radius along a wavy, tilted axis ---
        y_tip = ys + d
        r0, r1 = max(int(ys) - 3, 0), min(int(math.ceil(y_tip)) + 1, hh)
        if r1 > r0:
            ss = 4
            ysub = (np.arange(r0, r1)[:, None] + (np.arange(ss) + 0.5) / ss).ravel()
            depth = np.maximum(ysub - ys, 0.0)
            arg = self.wave_k[None, :] * depth[:, None] - self.wave_w[None, :] * t
            hw = self.w0 * (1.0 + 0.5 * np.exp(-depth / (0.1 * self.d0)))
            hw = hw * (1.0 + (self.wave_a * np.sin(arg + self.wave_ph[0])).sum(axis=1))
            hw = hw * np.sqrt(np.clip((y_tip - ysub) / (2.0 * self.w0), 0.0, 1.0))
            hw = np.maximum(hw, 0.0)
            xc = xk + self.tilt * depth + (self.wave_b * np.sin(arg + self.wave_ph[1])).sum(axis=1)
            c0 = max(int(math.floor((xc - hw).min())) - 1, 0)
            c1 = min(int(math.ceil((xc + hw).max())) + 2, ww)
            if c1 > c0:
                edges = np.arange(c0, c1 + 1)[None, :] - xc[:, None]
                chord = _chord_pixels(edges, hw[:, None])
                chord = chord.reshape(r1 - r0, ss, c1 - c0).mean(axis=1)
                out[r0:r1, c0:c1] -= mu * chord
        # --- pores: decelerating with the flow, trapped at the end ---
        alive = self.pore_t <= t
        if alive.any():
            tau = self.pore_tau[alive]
            s = tau * (1.0 - np.exp(-(t - self.pore_t[alive]) / tau))
            p = self.pore_p0[:, alive] + self.pore_v[:, alive] * s
            r = self.pore_r[alive]
            py = np.clip(p[0], np.interp(p[1], self.bg.x, self.bg.y_surf) + r + 1, hh - r - 1)
            out -= _splat_spheres(self.bg.shape, py, p[1], r, np.full(r.size, mu))
        out *= self.bg.sub_mask
        return out


class _Rotor(_Family):
    """Rigid toothed disc with hub, shaft and holes, rotating in the image plane."""

    name = "rotor"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        self.r0 = rng.uniform(0.22, 0.4) * min(hh, ww)
        self.cy = rng.uniform(0.6 * self.r0, hh - 0.6 * self.r0)
        self.cx = rng.uniform(0.6 * self.r0, ww - 0.6 * self.r0)
        self.n_teeth = int(rng.integers(12, 40))
        self.h_teeth = rng.uniform(0.04, 0.08) * self.r0
        self.a_plate = rng.uniform(0.2, 0.6)
        self.r_hub = rng.uniform(0.15, 0.25) * self.r0
        self.a_hub = self.a_plate * rng.uniform(1.5, 2.5)
        self.r_shaft = 0.45 * self.r_hub
        self.a_shaft = rng.uniform(0.8, 1.5)
        self.rings = [  # (count, ring radius, hole radius, phase)
            (int(rng.integers(4, 11)), rng.uniform(0.6, 0.72) * self.r0,
             rng.uniform(0.08, 0.14) * self.r0, rng.uniform(0, 2 * math.pi)),
            (int(rng.integers(3, 9)), rng.uniform(0.36, 0.44) * self.r0,
             rng.uniform(0.05, 0.08) * self.r0, rng.uniform(0, 2 * math.pi)),
        ]
        self.marker = (rng.uniform(0.5, 0.55) * self.r0, 0.035 * self.r0 + 0.6,
                       rng.uniform(0, 2 * math.pi))
        r_rim = self.r0 + self.h_teeth
        self.omega = v / r_rim * (1.0 if rng.random() < 0.5 else -1.0)  # rad per frame
        self.phi0 = rng.uniform(0, 2 * math.pi)

    def attenuation(self, t: float) -> np.ndarray:
        hh, ww = self.bg.shape
        out = np.zeros(self.bg.shape, np.float32)
        rmax = self.r0 + self.h_teeth + 2.0
        r0, r1 = max(int(self.cy - rmax), 0), min(int(math.ceil(self.cy + rmax)), hh)
        c0, c1 = max(int(self.cx - rmax), 0), min(int(math.ceil(self.cx + rmax)), ww)
        if r1 <= r0 or c1 <= c0:
            return out
        yy = (np.arange(r0, r1) + 0.5 - self.cy).astype(np.float32)[:, None]
        xx = (np.arange(c0, c1) + 0.5 - self.cx).astype(np.float32)[None, :]
        rr = np.hypot(yy, xx)
        th = np.arctan2(yy, xx) - (self.phi0 + self.omega * t)
        rim = self.r0 + 0.5 * self.h_teeth * np.clip(1.6 * np.sin(self.n_teeth * th), -1, 1)
        plate = np.clip(0.5 + rim - rr, 0.0, 1.0)
        for n, rho, rad, ph in self.rings:
            per = 2 * math.pi / n
            dth = np.mod(th - ph + per / 2, per) - per / 2
            dist = np.sqrt(np.maximum(rr * rr + rho * rho - 2 * rr * rho * np.cos(dth), 0.0))
            plate *= 1.0 - np.clip(0.5 + rad - dist, 0.0, 1.0)
        rho, rad, ph = self.marker
        dist = np.sqrt(np.maximum(rr * rr + rho * rho - 2 * rr * rho * np.cos(th - ph), 0.0))
        plate *= 1.0 - np.clip(0.5 + rad - dist, 0.0, 1.0)
        hub = np.clip(0.5 + self.r_hub - rr, 0.0, 1.0)
        shaft = np.clip(0.5 + self.r_shaft - rr, 0.0, 1.0)
        a = self.a_plate * plate + (self.a_hub - self.a_plate) * hub
        a += (self.a_shaft - self.a_hub) * shaft
        out[r0:r1, c0:c1] = a
        return out


class _Crack(_Family):
    """Cracks running along persistent random paths, opening like sqrt(distance to the tip)."""

    name = "crack"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        self.cracks: list[dict[str, Any]] = []
        n = int(rng.integers(1, 4))
        for k in range(n):
            t0 = n_frames * (0.85 * k / n) + rng.uniform(0.0, 0.15 * n_frames / n)
            if rng.random() < 0.7:
                x = rng.uniform(0.1, 0.9) * ww
                y = float(np.interp(x, bg.x, bg.y_surf)) - 1.0
                heading = math.pi / 2 + rng.normal(0.0, 0.3)
            else:
                side = rng.random() < 0.5
                x = 0.0 if side else float(ww)
                y = rng.uniform(bg.y0 + 0.2 * (hh - bg.y0), hh - 3.0)
                heading = (0.0 if side else math.pi) + rng.normal(0.0, 0.2)
            length = rng.uniform(0.4, 1.0) * max(hh, ww)
            w_max = rng.uniform(1.0, 4.0)
            pts = self._walk(rng, x, y, heading, length)
            self._add(rng, pts, t0, w_max)
            if rng.random() < 0.5 and len(pts) > 20:
                i = int(rng.integers(len(pts) // 3, 2 * len(pts) // 3))
                seg = pts[i] - pts[i - 1]
                h0 = math.atan2(seg[1], seg[0]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.8)
                bpts = self._walk(rng, pts[i, 0], pts[i, 1], h0, 0.5 * length)
                self._add(rng, bpts, t0 + i / max(v, 1e-6), 0.6 * w_max)

    def _walk(self, rng: np.random.Generator, x: float, y: float, heading: float,
              length: float) -> np.ndarray:
        hh, ww = self.bg.shape
        n = max(int(length), 2)
        dth = rng.normal(0.0, 0.07, n)
        kinks = rng.random(n) < 0.03
        dth[kinks] += rng.normal(0.0, 0.5, int(kinks.sum()))
        pts = [(x, y)]
        th = heading
        for i in range(n):
            th += dth[i] + 0.03 * (heading - th)
            x, y = x + math.cos(th), y + math.sin(th)
            pts.append((x, y))
            if not (-1.0 <= x <= ww + 1 and y <= hh + 1):
                break
            if i > 3 and y < np.interp(x, self.bg.x, self.bg.y_surf) - 1.0:
                break
        return np.asarray(pts, dtype=np.float64)

    def _add(self, rng: np.random.Generator, pts: np.ndarray, t0: float, w_max: float) -> None:
        hh, ww = self.bg.shape
        if len(pts) < 2:
            return
        pad = 2.0 * w_max + 3.0
        r0 = max(int(pts[:, 1].min() - pad), 0)
        r1 = min(int(math.ceil(pts[:, 1].max() + pad)), hh)
        c0 = max(int(pts[:, 0].min() - pad), 0)
        c1 = min(int(math.ceil(pts[:, 0].max() + pad)), ww)
        if r1 <= r0 or c1 <= c0:
            return
        gy, gx = np.meshgrid(np.arange(r0, r1) + 0.5, np.arange(c0, c1) + 0.5, indexing="ij")
        px, py = gx.ravel(), gy.ravel()
        a, b = pts[:-1], pts[1:]
        seg = b - a
        seg_len = np.maximum(np.hypot(seg[:, 0], seg[:, 1]), 1e-9)
        s_cum = np.concatenate([[0.0], np.cumsum(seg_len)])
        best_d2 = np.full(px.size, np.inf)
        best_s = np.zeros(px.size)
        chunk = max(1, 2_000_000 // max(px.size, 1))
        for j0 in range(0, len(seg), chunk):
            sl = slice(j0, j0 + chunk)
            ax, ay = a[sl, 0][:, None], a[sl, 1][:, None]
            sx, sy = seg[sl, 0][:, None], seg[sl, 1][:, None]
            u = np.clip(((px - ax) * sx + (py - ay) * sy) / (seg_len[sl, None] ** 2), 0.0, 1.0)
            d2 = (px - ax - u * sx) ** 2 + (py - ay - u * sy) ** 2
            j = np.argmin(d2, axis=0)
            cols = np.arange(px.size)
            d2min = d2[j, cols]
            better = d2min < best_d2
            best_d2[better] = d2min[better]
            best_s[better] = (s_cum[j0 + j] + u[j, cols] * seg_len[j0 + j])[better]
        roughness = np.clip(1.0 + 0.25 * _filtered_noise(rng, (len(s_cum),), 6.0), 0.3, None)
        rough = np.interp(best_s, s_cum, roughness)
        widen = rng.uniform(0.2, 1.0)
        dist = np.sqrt(best_d2)
        # keep only the pixels the widest opening can reach (a thin band along the path)
        band = dist <= 0.5 * w_max * (1.0 + widen) * rough + 1.0
        flat = ((gy.ravel() - 0.5).astype(np.int64) * ww + (gx.ravel() - 0.5).astype(np.int64))
        self.cracks.append(
            dict(t0=t0, idx=flat[band], d=dist[band], s=best_s[band], rough=rough[band],
                 length=float(s_cum[-1]), w_max=w_max, ell=rng.uniform(20.0, 60.0), widen=widen,
                 a_depth=self.bg.mu_sub * rng.uniform(0.2, 0.6) * self.bg.l_sub)
        )

    def attenuation(self, t: float) -> np.ndarray:
        out = np.zeros(self.bg.shape, np.float32)
        flat = out.reshape(-1)
        for c in self.cracks:
            s_tip = min(self.v * (t - c["t0"]), c["length"])
            if s_tip <= 0:
                continue
            grow = 1.0 + c["widen"] * min(max((t - c["t0"]) / self.n_frames, 0.0), 1.0)
            ds = s_tip - c["s"]
            w = c["w_max"] * grow * c["rough"] * np.sqrt(np.clip(ds / c["ell"], 0.0, 1.0))
            flat[c["idx"]] -= c["a_depth"] * _band_coverage(c["d"], w)
        out *= self.bg.sub_mask
        return out


class _MeltPool(_Family):
    """A melt pool: a liquid region below the surface whose boundary deforms, that travels along the
    surface (scan), and whose interior carries a swirling (differentially rotating) density texture."""

    name = "meltpool"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        avail = max(hh - bg.y0 - 3.0, 6.0)
        self.r0 = rng.uniform(0.35, 0.8) * avail  # depth, px
        self.aspect = rng.uniform(1.0, 2.0)  # half-width / depth
        self.x0 = rng.uniform(0.25, 0.75) * ww
        self.vx = v * rng.uniform(0.1, 0.4) * (1.0 if rng.random() < 0.5 else -1.0)
        self.k = np.arange(2, 7, dtype=np.float64)
        self.amp = rng.uniform(0.02, 0.09, self.k.size) / np.sqrt(self.k - 1.0)
        self.ph = rng.uniform(0, 2 * math.pi, self.k.size)
        # boundary waves travel along the boundary at about v
        self.omega = v * self.k / self.r0 * rng.uniform(0.5, 1.5, self.k.size) * rng.choice([-1.0, 1.0], self.k.size)
        self.breath_a = rng.uniform(0.03, 0.12)
        self.breath_p = max(2 * math.pi * self.breath_a * self.r0 / max(v, 1e-6), 8.0)
        self.breath_ph = rng.uniform(0, 2 * math.pi)
        self.drho = rng.uniform(0.15, 0.35)  # density deficit of the liquid
        self.l_beam = min(self.aspect * self.r0, bg.l_sub / 2.0)
        self.tex = _filtered_noise(rng, bg.shape, rng.uniform(1.5, 4.0))
        self.tex_a = rng.uniform(0.2, 0.6)
        self.swirl = v / self.r0 * rng.uniform(0.3, 1.0) * (1.0 if rng.random() < 0.5 else -1.0)

    def centre_x(self, t: float) -> float:
        ww = self.bg.shape[1]
        lo, hi = 0.1 * ww, 0.9 * ww
        p = (self.x0 + self.vx * t - lo) % (2 * (hi - lo))  # bounce between lo and hi
        return lo + (p if p <= hi - lo else 2 * (hi - lo) - p)

    def attenuation(self, t: float) -> np.ndarray:
        from scipy import ndimage

        hh, ww = self.bg.shape
        out = np.zeros(self.bg.shape, np.float32)
        xc = self.centre_x(t)
        ys = float(np.interp(xc, self.bg.x, self.bg.y_surf))
        breath = 1.0 + self.breath_a * math.sin(2 * math.pi * t / self.breath_p + self.breath_ph)
        rmax = self.r0 * breath * (1.0 + self.amp.sum()) + 2.0
        r0, r1 = max(int(ys) - 3, 0), min(int(math.ceil(ys + rmax)) + 1, hh)
        c0 = max(int(xc - self.aspect * rmax) - 1, 0)
        c1 = min(int(math.ceil(xc + self.aspect * rmax)) + 1, ww)
        if r1 <= r0 or c1 <= c0:
            return out
        yy = (np.arange(r0, r1) + 0.5 - ys)[:, None]
        xx = ((np.arange(c0, c1) + 0.5 - xc) / self.aspect)[None, :]
        rho = np.hypot(yy, xx)
        th = np.arctan2(yy, xx)
        rb = self.r0 * breath * (1.0 + (self.amp[:, None, None] * np.cos(
            self.k[:, None, None] * th[None] + self.ph[:, None, None] + self.omega[:, None, None] * t)).sum(axis=0))
        inside = np.clip(0.5 + (rb - rho), 0.0, 1.0) * (yy > -1.0)
        prof = 0.4 + 0.6 * np.sqrt(np.clip(1.0 - (rho / np.maximum(rb, 1e-6)) ** 2, 0.0, 1.0))
        # swirl: rotate the texture by an angle that falls off from the centre to the boundary
        ang = -self.swirl * t * np.clip(1.0 - rho / np.maximum(rb, 1e-6), 0.0, 1.0)
        ca, sa = np.cos(ang), np.sin(ang)
        sx, sy = self.aspect * (xx * ca - yy * sa), xx * sa + yy * ca
        tex = ndimage.map_coordinates(self.tex, [ys + sy - 0.5, xc + sx - 0.5], order=1, mode="reflect")
        a = self.drho * self.bg.mu_sub * self.l_beam * prof * (1.0 + self.tex_a * tex) * inside
        out[r0:r1, c0:c1] = -a
        out *= self.bg.sub_mask
        return out


class _Spatter(_Family):
    """Spatter: small, fast particles ejected ballistically (with gravity) from a spot on the
    surface at random times; they fly out of the field or fall back, and never re-enter."""

    name = "spatter"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        n = max(4, int(rng.poisson(rng.uniform(2.0, 6.0) * max(n_frames, 2) * hh * ww / 65536.0)) + 3)
        self.te = rng.uniform(-0.5 * n_frames, n_frames, n)  # emission times
        xs = rng.uniform(0.2, 0.8) * ww
        x = xs + rng.normal(0.0, 3.0, n)
        y = np.interp(x, bg.x, bg.y_surf) - 1.0
        self.p0 = np.stack([y, x])
        ang = rng.normal(0.0, 0.6, n)  # from the vertical (upwards)
        speed = v * _loguniform(rng, 2.0, 5.0, n)
        self.vel = np.stack([-speed * np.cos(ang), speed * np.sin(ang)])
        self.g = float(rng.uniform(0.5, 2.0) * (v * 3.0) / max(n_frames, 1))  # px/frame^2, downwards
        self.r = _loguniform(rng, 0.7, 2.5, n)
        self.mu = np.full(n, rng.uniform(0.03, 0.08))

    def positions(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        hh, ww = self.bg.shape
        dt = t - self.te
        p = self.p0 + self.vel * dt
        p[0] += 0.5 * self.g * dt * dt
        m = self.r + 2.0
        alive = (dt >= 0) & (p[0] > -m) & (p[1] > -m) & (p[1] < ww + m)
        alive &= p[0] < np.interp(p[1], self.bg.x, self.bg.y_surf) + self.r  # fell back: absorbed
        return p, alive

    def attenuation(self, t: float) -> np.ndarray:
        p, alive = self.positions(t)
        return _splat_spheres(self.bg.shape, p[0, alive], p[1, alive], self.r[alive], self.mu[alive])


class _Collide(_Family):
    """Rotating, colliding particles: disks (spheres with two through-holes, so the spin shows) that
    move, collide elastically with each other and bounce off the field's border."""

    name = "collide"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        n_want = int(rng.integers(4, 10))
        r_lo = max(3.0, 0.04 * min(hh, ww))
        rs, ps = [], []
        for _ in range(200 * n_want):
            if len(rs) >= n_want:
                break
            r = rng.uniform(r_lo, max(r_lo + 1.0, 0.1 * min(hh, ww)))
            p = np.array([rng.uniform(r, hh - r), rng.uniform(r, ww - r)])
            if all(np.hypot(*(p - q)) > r + s + 1.0 for q, s in zip(ps, rs)):
                rs.append(r)
                ps.append(p)
        self.r = np.asarray(rs)
        n = self.r.size
        th = rng.uniform(0, 2 * math.pi, n)
        sp = v * _loguniform(rng, 0.5, 1.5, n)
        vel = np.stack([sp * np.sin(th), sp * np.cos(th)], axis=1)
        omega = v * rng.uniform(-1.0, 1.0, n) / self.r
        self.mu = rng.uniform(0.03, 0.08)
        self.hole_r = 0.25 * self.r
        self.hole_off = rng.uniform(0, 2 * math.pi, n)
        # simulate once; positions and angles at integer frames, interpolated in between
        pos = np.asarray(ps, np.float64).reshape(n, 2)
        ang = rng.uniform(0, 2 * math.pi, n)
        mass = self.r**3
        nt = max(int(n_frames), 1) + 1
        self.traj = np.empty((nt, n, 2))
        self.angs = np.empty((nt, n))
        self.n_collisions = 0
        sub = 4
        for k in range(nt):
            self.traj[k], self.angs[k] = pos, ang
            for _ in range(sub):
                pos = pos + vel / sub
                ang = ang + omega / sub
                for ax, lim in ((0, hh), (1, ww)):  # walls
                    lo, hi = pos[:, ax] < self.r, pos[:, ax] > lim - self.r
                    vel[lo, ax] = np.abs(vel[lo, ax])
                    vel[hi, ax] = -np.abs(vel[hi, ax])
                for i in range(n):
                    for j in range(i + 1, n):
                        d = pos[j] - pos[i]
                        dist = math.hypot(d[0], d[1])
                        if dist >= self.r[i] + self.r[j] or dist == 0:
                            continue
                        nrm = d / dist
                        rel = float(np.dot(vel[i] - vel[j], nrm))
                        if rel <= 0:
                            continue
                        self.n_collisions += 1
                        mi, mj = mass[i], mass[j]
                        vel[i] -= 2 * mj / (mi + mj) * rel * nrm
                        vel[j] += 2 * mi / (mi + mj) * rel * nrm
                        # friction at the contact exchanges spin
                        tang = np.array([-nrm[1], nrm[0]])
                        slip = float(np.dot(vel[i] - vel[j], tang)) + omega[i] * self.r[i] + omega[j] * self.r[j]
                        omega[i] -= 0.3 * slip / self.r[i]
                        omega[j] -= 0.3 * slip / self.r[j]

    def _state(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        nt = self.traj.shape[0]
        if t <= 0:
            return self.traj[0], self.angs[0]
        k = min(int(math.floor(t)), nt - 1)
        f = t - k
        if k + 1 >= nt or f == 0:
            return self.traj[k], self.angs[k]
        return (1 - f) * self.traj[k] + f * self.traj[k + 1], (1 - f) * self.angs[k] + f * self.angs[k + 1]

    def attenuation(self, t: float) -> np.ndarray:
        if self.r.size == 0:
            return np.zeros(self.bg.shape, np.float32)
        p, a = self._state(t)
        out = _splat_spheres(self.bg.shape, p[:, 0], p[:, 1], self.r, np.full(self.r.size, self.mu))
        hy, hx, hr = [], [], []
        for off in (0.0, 2.2):  # two holes at half radius, 126 degrees apart
            hy.append(p[:, 0] + 0.5 * self.r * np.sin(a + self.hole_off + off))
            hx.append(p[:, 1] + 0.5 * self.r * np.cos(a + self.hole_off + off))
            hr.append(self.hole_r * (1.0 if off == 0 else 0.7))
        out -= _splat_spheres(self.bg.shape, np.concatenate(hy), np.concatenate(hx), np.concatenate(hr),
                              np.full(2 * self.r.size, 0.8 * self.mu))
        return out


class _Debris(_Family):
    """Objects that enter and leave the field: lumpy, spinning bodies that fly in from a border at
    staggered times, cross the field along straight lines and leave it."""

    name = "debris"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        n = int(rng.integers(2, 5))
        self.bodies = []
        centre = np.array([hh / 2.0, ww / 2.0])
        for k in range(n):
            a = rng.uniform(0.06, 0.15) * min(hh, ww) + 1.5
            b = a * rng.uniform(0.45, 1.0)
            side = int(rng.integers(0, 4))  # 0 top, 1 bottom, 2 left, 3 right
            u = rng.uniform(0.15, 0.85)
            entry = [np.array([0.0, u * ww]), np.array([float(hh), u * ww]),
                     np.array([u * hh, 0.0]), np.array([u * hh, float(ww)])][side]
            target = centre + rng.uniform(-0.3, 0.3, 2) * np.array([hh, ww])
            d = target - entry
            d /= max(np.hypot(*d), 1e-9)
            speed = v * _loguniform(rng, 0.7, 1.6)
            t_enter = n_frames * 0.7 * k / n + rng.uniform(0.0, 0.3 * n_frames / n)
            start = entry - d * (a + 2.0)  # just outside the border at t_enter
            self.bodies.append(dict(
                a=a, b=b, amp=rng.uniform(0.25, 0.8), start=start, vel=d * speed, t_enter=t_enter,
                ang0=rng.uniform(0, 2 * math.pi), spin=v * rng.uniform(-0.7, 0.7) / a,
                lump=rng.uniform(0.0, 0.12, 3), lump_ph=rng.uniform(0, 2 * math.pi, 3), side=side))

    def centre(self, body: dict[str, Any], t: float) -> np.ndarray:
        return body["start"] + body["vel"] * (t - body["t_enter"])

    def attenuation(self, t: float) -> np.ndarray:
        hh, ww = self.bg.shape
        out = np.zeros(self.bg.shape, np.float32)
        for bd in self.bodies:
            c = self.centre(bd, t)
            ext = bd["a"] * (1.0 + bd["lump"].sum()) + 2.0
            r0, r1 = max(int(c[0] - ext), 0), min(int(math.ceil(c[0] + ext)), hh)
            c0, c1 = max(int(c[1] - ext), 0), min(int(math.ceil(c[1] + ext)), ww)
            if r1 <= r0 or c1 <= c0:
                continue
            ss = 2  # 2x2 supersampling for anti-aliased edges
            yy = (np.arange(r0 * ss, r1 * ss) + 0.5) / ss - c[0]
            xx = (np.arange(c0 * ss, c1 * ss) + 0.5) / ss - c[1]
            yy, xx = yy[:, None], xx[None, :]
            ang = bd["ang0"] + bd["spin"] * t
            u = xx * math.cos(ang) + yy * math.sin(ang)
            w = -xx * math.sin(ang) + yy * math.cos(ang)
            th = np.arctan2(w, u)
            rad = 1.0 + sum(l * np.cos((k + 2) * th + p) for k, (l, p) in enumerate(zip(bd["lump"], bd["lump_ph"])))
            d2 = ((u / bd["a"]) ** 2 + (w / bd["b"]) ** 2) / rad**2
            val = bd["amp"] * np.sqrt(np.clip(1.0 - d2, 0.0, 1.0))
            out[r0:r1, c0:c1] += val.reshape(r1 - r0, ss, c1 - c0, ss).mean(axis=(1, 3))
        return out


class _Occluder(_Family):
    """Occlusion: a thick, nearly opaque plate (a shield, a tool) whose straight edge sweeps back and
    forth over part of the field, and a thin dense wire crossing it, hiding the scene behind them."""

    name = "occluder"

    def __init__(self, rng: np.random.Generator, bg: _Background, v: float, n_frames: int):
        super().__init__(rng, bg, v, n_frames)
        hh, ww = bg.shape
        size = math.hypot(hh, ww)
        th = rng.uniform(0, 2 * math.pi)
        self.nrm = (math.sin(th), math.cos(th))  # (ny, nx): the plate is where n . (p - c) < edge
        self.c = (hh / 2.0, ww / 2.0)
        self.e0 = rng.uniform(-0.45, -0.1) * size / 2
        self.amp_e = rng.uniform(0.1, 0.25) * size
        self.per = max(2 * math.pi * self.amp_e / max(v, 1e-6), 10.0)
        self.ph = rng.uniform(0, 2 * math.pi)
        self.a_plate = rng.uniform(2.5, 4.5)
        self.ramp = rng.uniform(3.0, 10.0)
        tw = rng.uniform(0, 2 * math.pi)
        self.wn = (math.sin(tw), math.cos(tw))
        self.w_r = rng.uniform(1.0, 3.0)
        self.w_mu = rng.uniform(0.3, 0.8)
        self.w_v = v * rng.uniform(0.5, 1.5) * (1.0 if rng.random() < 0.5 else -1.0)
        self.w_d0 = rng.uniform(-0.5, 0.5) * size / 2

    def edge(self, t: float) -> float:
        return self.e0 + self.amp_e * math.sin(2 * math.pi * t / self.per + self.ph)

    def attenuation(self, t: float) -> np.ndarray:
        hh, ww = self.bg.shape
        y = (np.arange(hh) + 0.5 - self.c[0])[:, None]
        x = (np.arange(ww) + 0.5 - self.c[1])[None, :]
        d = self.nrm[0] * y + self.nrm[1] * x - self.edge(t)
        cover = np.clip(0.5 - d, 0.0, 1.0)
        plate = self.a_plate * cover * (0.3 + 0.7 * np.clip(-d / self.ramp, 0.0, 1.0))
        half = 0.5 * (hh + ww)
        dw = _wrap(self.wn[0] * y + self.wn[1] * x - (self.w_d0 + self.w_v * t), -half, half)
        wire = self.w_mu * 2.0 * np.sqrt(np.clip(self.w_r**2 - dw * dw, 0.0, None))
        return (plate + wire).astype(np.float32)


_FAMILY_CLASSES: dict[str, type[_Family]] = {
    cls.name: cls for cls in (_Particles, _Cavity, _Rotor, _Crack, _MeltPool, _Spatter, _Collide, _Debris,
                              _Occluder)
}


# ----------------------------------------------------------------------------------------------
# beam and cameras
# ----------------------------------------------------------------------------------------------
class _Beam:
    """Broad Gaussian beam with horizontal bands; centre, intensity and bands drift slowly."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], n_frames: int):
        hh, ww = shape
        self.y = np.arange(hh) + 0.5
        self.x = np.arange(ww) + 0.5
        self.sx = ww * rng.uniform(0.7, 1.6)
        self.sy = hh * rng.uniform(0.45, 0.9)
        self.cx0 = ww * (0.5 + rng.uniform(-0.15, 0.15))
        self.cy0 = hh * (0.5 + rng.uniform(-0.15, 0.15))
        amp = rng.uniform(0.5, 3.0) * max(hh, ww) / 256.0
        n = max(n_frames, 2)
        # (amplitude, period, phase) for the x and y drift of the centre and for the intensity
        self.drift = [
            (amp * rng.uniform(0.3, 1.0), rng.uniform(n / 2, 3 * n), rng.uniform(0, 2 * math.pi))
            for _ in range(2)
        ]
        self.flux = [
            (rng.uniform(0.005, 0.02), rng.uniform(n / 2, 2 * n), rng.uniform(0, 2 * math.pi)),
            (rng.uniform(0.002, 0.008), rng.uniform(5.0, 30.0), rng.uniform(0, 2 * math.pi)),
        ]
        nb = int(rng.integers(2, 5))
        self.band_k = 2 * math.pi / _loguniform(rng, 5.0, max(8.0, hh / 3.0), nb)
        self.band_a = rng.uniform(0.004, 0.025, nb)
        self.band_ph = rng.uniform(0, 2 * math.pi, nb)
        self.band_v = rng.uniform(-0.01, 0.01, nb)  # px per frame
        self.band_osc = (rng.uniform(0.0, 0.3), rng.uniform(10.0, 60.0))
        self.norm = 1.0
        self.norm = 1.0 / float(self(0.0).max())

    def __call__(self, t: float) -> np.ndarray:
        (ax, px, phx), (ay, py, phy) = self.drift
        cx = self.cx0 + ax * math.sin(2 * math.pi * t / px + phx)
        cy = self.cy0 + ay * math.sin(2 * math.pi * t / py + phy)
        flux = 1.0 + sum(a * math.sin(2 * math.pi * t / p + ph) for a, p, ph in self.flux)
        shift = self.band_v * t + self.band_osc[0] * math.sin(2 * math.pi * t / self.band_osc[1])
        bands = 1.0 + (
            self.band_a * np.sin(self.band_k * (self.y[:, None] - shift) + self.band_ph)
        ).sum(axis=1)
        gy = np.exp(-0.5 * ((self.y - cy) / self.sy) ** 2) * bands
        gx = np.exp(-0.5 * ((self.x - cx) / self.sx) ** 2)
        return (self.norm * flux * np.outer(gy, gx)).astype(np.float32)


class _Camera:
    """Gain map (scintillator + pixel response), dark map, PSF, gain and read noise."""

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int], dose: float,
                 fill: tuple[float, float], offset: tuple[float, float],
                 read: tuple[float, float], psf: tuple[float, float]):
        hh, ww = shape
        self.shape = shape
        self.dose = float(dose)
        self.gain = float(rng.uniform(*fill) * _ADU_MAX / self.dose)  # ADU per photon
        self.offset = float(rng.uniform(*offset))
        self.read = float(rng.uniform(*read))
        self.psf = float(rng.uniform(*psf))
        pattern = 1.0 + 0.008 * rng.standard_normal(shape)
        pattern += 0.02 * _filtered_noise(rng, shape, max(hh, ww) / 6.0)
        n_spots = int(rng.integers(2, 8))
        yy, xx = np.arange(hh) + 0.5, np.arange(ww) + 0.5
        for _ in range(n_spots):  # scintillator blemishes
            cy, cx = rng.uniform(0, hh), rng.uniform(0, ww)
            sig, depth = rng.uniform(0.7, 2.5), rng.uniform(0.03, 0.12)
            pattern -= depth * np.outer(np.exp(-0.5 * ((yy - cy) / sig) ** 2),
                                        np.exp(-0.5 * ((xx - cx) / sig) ** 2))
        self.pattern = pattern.astype(np.float32)
        dark = self.offset + rng.normal(0.0, rng.uniform(1.0, 5.0), (1, ww))  # column offsets
        dark = dark + rng.normal(0.0, rng.uniform(0.5, 2.0), shape)  # DSNU
        hot = rng.random(shape) < 2e-4
        dark[hot] += rng.uniform(50.0, 500.0, int(hot.sum()))
        self.dark = dark.astype(np.float32)
        # opt-in detector effects (see EFFECTS); the defaults leave the model above unchanged
        self.halo: tuple[float, float] | None = None  # (fraction, sigma) of a wide PSF halo
        self.dead: np.ndarray | None = None  # boolean mask of dead pixels (read ``dead_level``)
        self.dead_level = 0.0
        self.row_noise = 0.0  # per-frame row-offset noise (ADU), drawn from ``row_rng``
        self.row_rng: np.random.Generator | None = None

    def _psf(self, x: np.ndarray) -> np.ndarray:
        out = _blur(x, self.psf)
        if self.halo is not None:
            frac, sigma = self.halo
            out = (1.0 - frac) * out + frac * _blur(x, sigma)
        return out

    def _finish(self, sig: np.ndarray) -> np.ndarray:
        if self.row_noise > 0 and self.row_rng is not None:
            sig = sig + self.row_rng.normal(0.0, self.row_noise, (self.shape[0], 1)).astype(np.float32)
        if self.dead is not None:
            sig = np.where(self.dead, np.float32(self.dead_level), sig).astype(np.float32)
        return sig

    def expected(self, exit_intensity: np.ndarray) -> np.ndarray:
        """Noise-free mean signal (ADU) for an exit intensity (beam included) on this grid."""
        lam = self.dose * exit_intensity * self.pattern
        out = self.gain * self._psf(lam) + self.dark
        if self.dead is not None:
            out = np.where(self.dead, np.float32(self.dead_level), out).astype(np.float32)
        return out

    def record(self, exit_intensity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One noisy exposure (ADU): Poisson photons, PSF, gain, dark map, read noise."""
        lam = self.dose * exit_intensity * self.pattern
        photons = rng.poisson(np.maximum(lam, 0.0)).astype(np.float32)
        sig = self.gain * self._psf(photons) + self.dark
        return self._finish(sig + rng.normal(0.0, self.read, self.shape).astype(np.float32))

    def dark_frame(self, rng: np.random.Generator) -> np.ndarray:
        return self._finish(self.dark + rng.normal(0.0, self.read, self.shape).astype(np.float32))


def _to_dtype(adu: np.ndarray, dtype: str, integer: bool = True) -> np.ndarray:
    """Convert 16-bit ADU to the stored dtype (see module docstring)."""
    if dtype == "uint16":
        x, hi = adu, _ADU_MAX
    elif dtype == "uint8":
        x, hi = adu / 257.0, 255.0
    else:
        x, hi = adu / _ADU_MAX, 1.0
    if integer and dtype != "float32":
        return np.clip(np.rint(x), 0, hi).astype(dtype)
    return np.clip(x, 0, hi).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# opt-in domain randomisation (effects=...)
# ----------------------------------------------------------------------------------------------
def resolve_effects(effects: Any, seed: int = 0) -> list[str]:
    """Effect names from ``effects`` in :data:`EFFECTS` order.

    ``effects`` is None or empty (no effects: the archive is exactly the plain one), a sequence of
    names, or a string separated by ``,`` or ``+``. ``"all"`` enables every effect; ``"random"``
    enables each with probability 1/2, drawn from the seed's own stream; ``-name`` removes one
    (``"all,-flicker"``, ``"random,-defects"``). Unknown names raise ValueError.
    """
    if effects is None:
        return []
    if isinstance(effects, str):
        effects = [e for e in effects.replace("+", ",").split(",") if e.strip()]
    items = [str(e).strip().lower() for e in effects]
    chosen: set[str] = set()
    removed: set[str] = set()
    bad = []
    for e in items:
        if e in ("none", ""):
            continue
        if e == "all":
            chosen.update(EFFECTS)
        elif e in ("random", "randomise", "randomize"):
            rng = _rng(int(seed), _STREAM_EFFECT_CHOICE)
            chosen.update(name for name, u in zip(EFFECTS, rng.random(len(EFFECTS))) if u < 0.5)
        elif e.startswith("-") and e[1:] in EFFECTS:
            removed.add(e[1:])
        elif e in EFFECTS:
            chosen.add(e)
        else:
            bad.append(e)
    if bad:
        raise ValueError(f"unknown effects {bad}; choose from {', '.join(EFFECTS)} (or all, random, -NAME)")
    return [e for e in EFFECTS if e in chosen and e not in removed]


def _u(rng: np.random.Generator, rng_range: tuple[float, float]) -> float:
    return float(rng.uniform(*rng_range))


def _fx_texture(rng: np.random.Generator, bg: _Background) -> dict[str, Any]:
    """Multiscale substrate texture (octaves of filtered noise), dense inclusions and pores."""
    r = EFFECT_RANGES["texture"]
    hh, ww = bg.shape
    n_oct = int(rng.integers(r["octaves"][0], r["octaves"][1] + 1))
    amp, falloff = _u(rng, r["amplitude"]), _u(rng, r["falloff"])
    tex = np.zeros(bg.shape, np.float32)
    for k in range(n_oct):
        tex += (falloff**k) * _filtered_noise(rng, bg.shape, max(max(hh, ww) / 4.0 / 2**k, 0.7))
    a_tot = bg.mu_sub * bg.l_sub
    add = a_tot * amp * tex / max(float(tex.std()), 1e-6) * bg.sub_mask
    kpx = hh * ww / 1000.0
    n_inc = int(rng.poisson(_u(rng, r["inclusions_per_kpx"]) * kpx))
    n_pore = int(rng.poisson(_u(rng, r["pores_per_kpx"]) * kpx))
    for n, sign, lo, hi, rel in ((n_inc, 1.0, 0.7, 2.5, (2.0, 5.0)), (n_pore, -1.0, 0.8, 3.5, (1.0, 1.0))):
        if n == 0:
            continue
        cx = rng.uniform(0, ww, n)
        cy = rng.uniform(np.interp(cx, bg.x, bg.y_surf) + 2.0, hh)
        rad = rng.uniform(lo, hi, n)
        add += sign * _splat_spheres(bg.shape, cy, cx, rad, bg.mu_sub * rng.uniform(*rel, n)) * bg.sub_mask
    bg.attenuation = np.maximum(bg.attenuation + add, 0.0).astype(np.float32)
    return {"octaves": n_oct, "amplitude": amp, "falloff": falloff, "inclusions": n_inc, "pores": n_pore}


def _fx_camera(name: str, rng: np.random.Generator, cams: dict[str, _Camera], seed: int) -> dict[str, Any]:
    """Apply one detector effect to both cameras; returns its drawn parameters."""
    r = EFFECT_RANGES[name]
    out: dict[str, Any] = {}
    for tag, cam in cams.items():  # "lr", then "hr"
        if name == "saturation":
            fill = _u(rng, r[f"fill_{tag}"])
            cam.gain = float(fill * _ADU_MAX / cam.dose)
            out[f"fill_{tag}"], out[f"gain_{tag}"] = fill, cam.gain
        elif name == "psf":
            cam.psf = _u(rng, r[f"sigma_{tag}"])
            frac, sig = _u(rng, r["halo_fraction"]), _u(rng, r[f"halo_sigma_{tag}"])
            cam.halo = (frac, sig)
            out[f"sigma_{tag}"], out[f"halo_fraction_{tag}"], out[f"halo_sigma_{tag}"] = cam.psf, frac, sig
        elif name == "read":
            cam.read = float(_u(rng, r[f"read_photons_{tag}"]) * cam.gain)
            cam.row_noise = float(_u(rng, r["row_fraction"]) * cam.read)
            cam.row_rng = _rng(seed, _STREAM_ROW_NOISE + (0 if tag == "lr" else 1))
            out[f"read_noise_{tag}"], out[f"row_noise_{tag}"] = cam.read, cam.row_noise
        elif name == "fpn":
            hh, ww = cam.shape
            prnu, cg, rg, co = (_u(rng, r[k]) for k in ("prnu", "column_gain", "row_gain", "column_offset_adu"))
            g = (1.0 + prnu * rng.standard_normal(cam.shape)) * (1.0 + cg * rng.standard_normal((1, ww)))
            g = g * (1.0 + rg * rng.standard_normal((hh, 1)))
            cam.pattern = (cam.pattern * g).astype(np.float32)
            cam.dark = (cam.dark + co * rng.standard_normal((1, ww))).astype(np.float32)
            out.update({f"prnu_{tag}": prnu, f"column_gain_{tag}": cg, f"row_gain_{tag}": rg,
                        f"column_offset_{tag}": co})
        elif name == "defects":
            fh = float(_loguniform(rng, *r["hot_fraction_log"]))
            fd = float(_loguniform(rng, *r["dead_fraction_log"]))
            u = rng.random(cam.shape)
            hot, dead = u < fh, (u >= fh) & (u < fh + fd)
            if not hot.any():  # at least one of each, so the effect is always visible
                hot.flat[int(rng.integers(hot.size))] = True
            if not dead.any():
                dead.flat[int(rng.integers(dead.size))] = True
                dead &= ~hot
            cam.dark = np.where(hot, np.float32(2.0 * _ADU_MAX), cam.dark).astype(np.float32)  # saturated
            cam.dead = dead
            cam.dead_level = 0.0
            out.update({f"hot_fraction_{tag}": fh, f"dead_fraction_{tag}": fd, f"hot_pixels_{tag}": int(hot.sum()),
                        f"dead_pixels_{tag}": int(dead.sum())})
    return out


class _Flicker:
    """The beam times a per-frame intensity jitter, a ramp, short dips, and a drift of its centre."""

    def __init__(self, beam: _Beam, rng: np.random.Generator, n_frames: int, shape: tuple[int, int]):
        r = EFFECT_RANGES["flicker"]
        self.beam, self.n = beam, max(int(n_frames), 1)
        self.jitter, self.ramp = _u(rng, r["jitter"]), _u(rng, r["ramp"])
        self.dip_rate = _u(rng, r["dip_rate"])
        self.t0 = -256  # table covers the flats (negative times) and beyond the end
        length = self.n + 512
        table = 1.0 + self.jitter * rng.standard_normal(length)
        dips = np.flatnonzero(rng.random(length) < self.dip_rate)
        tt = np.arange(length, dtype=np.float64)
        for i in dips:
            depth, dur = _u(rng, r["dip_depth"]), float(rng.uniform(1.0, 5.0))
            table *= 1.0 - depth * np.exp(-(((tt - i) / dur) ** 2))
        self.table = table
        self.n_dips = int(dips.size)
        hh, ww = shape
        self.drift = (_u(rng, r["centre_drift"]) * hh, _u(rng, r["centre_drift"]) * ww)
        self.cx0, self.cy0 = beam.cx0, beam.cy0

    def factor(self, t: float) -> float:
        i = int(np.clip(round(t) - self.t0, 0, self.table.size - 1))
        return float(self.table[i] * (1.0 + self.ramp * t / self.n))

    def __call__(self, t: float) -> np.ndarray:
        self.beam.cy0 = self.cy0 + self.drift[0] * t / self.n
        self.beam.cx0 = self.cx0 + self.drift[1] * t / self.n
        try:
            out = self.beam(t)
        finally:
            self.beam.cy0, self.beam.cx0 = self.cy0, self.cx0
        return (out * np.float32(self.factor(t))).astype(np.float32)

    def params(self) -> dict[str, Any]:
        return {"jitter": self.jitter, "ramp": self.ramp, "dip_rate": self.dip_rate, "dips": self.n_dips,
                "centre_drift_px": list(self.drift)}


def _fx_misreg(rng: np.random.Generator, lr_shape: tuple[int, int]) -> tuple[np.ndarray, dict[str, Any]]:
    r = EFFECT_RANGES["misreg"]
    shift = (_u(rng, r["shift_lr_px"]), _u(rng, r["shift_lr_px"]))
    rot, sc = _u(rng, r["rotation_deg"]), _u(rng, r["scale"])
    m = _lr_view_matrix(lr_shape, rot, sc, shift, False)
    return m, {"shift_lr_px": list(shift), "rotation_deg": rot, "scale_factor": sc, "matrix": m.tolist()}


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------
def _resolve_families(families: Any, rng: np.random.Generator) -> list[str]:
    if families is None:
        k = int(rng.integers(1, 4))
        idx = sorted(rng.choice(len(MOVING_FAMILIES), size=k, replace=False).tolist())
        return [MOVING_FAMILIES[i] for i in idx]
    if isinstance(families, str):
        families = [f for f in families.replace("+", ",").split(",") if f.strip()]
    names = [str(f).strip().lower() for f in families]
    if not names:
        raise ValueError(f"families must name at least one of {FAMILIES}")
    bad = [f for f in names if f not in ALL_FAMILIES]
    if bad:
        raise ValueError(f"unknown scene families {bad}; choose from {ALL_FAMILIES}")
    moving = [f for f in ALL_MOVING_FAMILIES if f in names]  # canonical order, no duplicates
    return moving


def _generate(
    n_frames: int,
    hr_shape: tuple[int, int],
    scale: int,
    stride: int,
    offset: int,
    seed: int,
    families: Any,
    speed: float | None,
    lr_dose: float | None,
    hr_dose: float | None,
    dtype: Any,
    effects: Any = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    n_frames, scale, stride = int(n_frames), int(scale), int(stride)
    offset, seed = int(offset), int(seed)
    hh, ww = (int(v) for v in hr_shape)
    dt = np.dtype(dtype).name
    if dt not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if n_frames < 2:
        raise ValueError(f"n_frames must be >= 2, got {n_frames}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if hh < scale or ww < scale or hh % scale or ww % scale:
        raise ValueError(f"hr_shape {hr_shape} must be a positive multiple of scale={scale}")
    if stride < 1 or offset < 0:
        raise ValueError(f"need stride >= 1 and offset >= 0, got stride={stride} offset={offset}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    hr_index = np.arange(offset, n_frames, stride, dtype=np.int64)
    if hr_index.size < 2:
        raise ValueError(
            f"n_frames={n_frames}, stride={stride}, offset={offset} give {hr_index.size} key "
            "frame(s); at least 2 are needed"
        )
    if speed is not None and not (float(speed) >= 0 and math.isfinite(float(speed))):
        raise ValueError(f"speed must be a finite number >= 0, got {speed}")
    for name, dose in (("lr_dose", lr_dose), ("hr_dose", hr_dose)):
        if dose is not None and not (float(dose) > 0 and math.isfinite(float(dose))):
            raise ValueError(f"{name} must be a finite number > 0, got {dose}")
    fx = resolve_effects(effects, seed)
    fx_params: dict[str, Any] = {}

    def fx_rng(name: str) -> np.random.Generator:  # one independent stream per effect
        return _rng(seed, _STREAM_EFFECT0 + EFFECTS.index(name))

    lr_given, hr_given = lr_dose is not None, hr_dose is not None
    choice = _rng(seed, _STREAM_CHOICE)
    names = _resolve_families(families, choice)
    speeds = {
        f: float(speed) if speed is not None else float(_loguniform(choice, *SPEED_RANGE))
        for f in names
    }
    lr_dose = float(lr_dose) if lr_dose is not None else float(_loguniform(choice, *LR_DOSE_RANGE))
    hr_dose = float(hr_dose) if hr_dose is not None else float(_loguniform(choice, *HR_DOSE_RANGE))
    if "dose" in fx:  # a wider range of doses (only where the caller gave none)
        r, rr = fx_rng("dose"), EFFECT_RANGES["dose"]
        lr_d, hr_d = float(_loguniform(r, *rr["lr_dose_log"])), float(_loguniform(r, *rr["hr_dose_log"]))
        lr_dose, hr_dose = (lr_dose if lr_given else lr_d), (hr_dose if hr_given else hr_d)
        fx_params["dose"] = {"lr_dose": lr_dose, "hr_dose": hr_dose}

    h, w = hh // scale, ww // scale
    bg = _Background(_rng(seed, _STREAM_BACKGROUND), (hh, ww))
    if "texture" in fx:
        fx_params["texture"] = _fx_texture(fx_rng("texture"), bg)
    movers = [
        _FAMILY_CLASSES[f](_rng(seed, _family_stream(f)), bg, speeds[f] * scale, n_frames)
        for f in names
    ]
    beam = _Beam(_rng(seed, _STREAM_BEAM), (hh, ww), n_frames)
    cam_rng = _rng(seed, _STREAM_CAMERA)
    phase_c = float(cam_rng.uniform(0.15, 0.4))
    hr_cam = _Camera(cam_rng, (hh, ww), hr_dose, fill=(0.4, 0.7), offset=(80.0, 600.0),
                     read=(3.0, 12.0), psf=(0.5, 0.9))
    lr_cam = _Camera(cam_rng, (h, w), lr_dose, fill=(0.25, 0.55), offset=(300.0, 1500.0),
                     read=(5.0, 30.0), psf=(0.3, 0.6))
    n_dark_lr, n_white_lr, n_dark_hr, n_white_hr = (int(v) for v in cam_rng.integers(5, 11, 4))
    noise = _rng(seed, _STREAM_NOISE)
    for name in ("saturation", "psf", "read", "fpn", "defects"):
        if name in fx:
            fx_params[name] = _fx_camera(name, fx_rng(name), {"lr": lr_cam, "hr": hr_cam}, seed)
    if "flicker" in fx:
        beam = _Flicker(beam, fx_rng("flicker"), n_frames, (hh, ww))
        fx_params["flicker"] = beam.params()
    if "misreg" in fx:  # residual misregistration: the LR camera sees the field through a small affine
        m_view, fx_params["misreg"] = _fx_misreg(fx_rng("misreg"), (h, w))

        def lr_view(e: np.ndarray) -> np.ndarray:
            return _sample_view(e, m_view, (h, w), scale)
    else:
        def lr_view(e: np.ndarray) -> np.ndarray:
            return _bin(e, scale)

    key_slot = {int(t): k for k, t in enumerate(hr_index)}
    lr = np.empty((n_frames, h, w), np.float32)
    hr = np.empty((hr_index.size, hh, ww), np.float32)
    gt = np.empty((n_frames, hh, ww), np.float32)
    for t in range(n_frames):
        a = bg.attenuation.copy()
        for m in movers:
            a += m.attenuation(float(t))
        np.maximum(a, 0.0, out=a)
        trans = np.exp(-a) * np.clip(1.0 + phase_c * _laplacian(a), 0.3, 2.0)
        exit_hr = beam(float(t)) * trans
        gt[t] = hr_cam.expected(exit_hr)
        if t in key_slot:
            hr[key_slot[t]] = hr_cam.record(exit_hr, noise)
        lr[t] = lr_cam.record(lr_view(exit_hr), noise)

    def flats(cam: _Camera, n: int, view: Any) -> np.ndarray:
        # recorded just before the sequence (negative times), without the sample
        return np.stack([cam.record(view(beam(float(k - n - 5))), noise)
                         for k in range(n)])

    arrays = {
        "/exchange/data_lr": _to_dtype(lr, dt),
        "/exchange/data_hr": _to_dtype(hr, dt),
        "/exchange/hr_index": hr_index,
        "/exchange/data_dark_lr": _to_dtype(np.stack([lr_cam.dark_frame(noise)
                                                      for _ in range(n_dark_lr)]), dt),
        "/exchange/data_white_lr": _to_dtype(flats(lr_cam, n_white_lr, lr_view), dt),
        "/exchange/data_dark_hr": _to_dtype(np.stack([hr_cam.dark_frame(noise)
                                                      for _ in range(n_dark_hr)]), dt),
        "/exchange/data_white_hr": _to_dtype(flats(hr_cam, n_white_hr, lambda e: e), dt),
        "/exchange/data_gt": _to_dtype(gt, dt, integer=False),
    }
    params: dict[str, Any] = {
        "format": _FORMAT,
        "seed": seed,
        "n_frames": n_frames,
        "hr_shape": [hh, ww],
        "lr_shape": [h, w],
        "scale": scale,
        "stride": stride,
        "offset": offset,
        "families": ["static"] + names,
        "speeds": speeds,
        "speed_units": "LR pixels per frame",
        "lr_dose": lr_dose,
        "hr_dose": hr_dose,
        "dose_units": "photons per pixel of the open beam at its peak",
        "dtype": dt,
        "adu_scale": {"uint16": 1.0, "uint8": 1 / 257.0, "float32": 1 / _ADU_MAX}[dt],
        "gain_lr": lr_cam.gain,
        "gain_hr": hr_cam.gain,
        "gain_units": "16-bit ADU per photon",
        "dark_offset_lr": lr_cam.offset,
        "dark_offset_hr": hr_cam.offset,
        "read_noise_lr": lr_cam.read,
        "read_noise_hr": hr_cam.read,
        "psf_sigma_lr": lr_cam.psf,
        "psf_sigma_hr": hr_cam.psf,
        "phase_contrast": phase_c,
        "gt": "noise-free expected HR camera signal at every step, float32, units of data_hr",
    }
    if fx:  # only with effects: the plain archives keep their metadata byte for byte
        params["effects"] = fx
        params["effect_params"] = fx_params
    return arrays, params


def generate(
    n_frames: int = 200,
    hr_shape: tuple[int, int] = (256, 256),
    scale: int = 4,
    stride: int = 20,
    offset: int = 0,
    seed: int = 0,
    families: Sequence[str] | str | None = None,
    speed: float | None = None,
    lr_dose: float | None = None,
    hr_dose: float | None = None,
    dtype: str = "uint16",
    effects: Sequence[str] | str | None = None,
) -> dict[str, np.ndarray]:
    """Render a synthetic two-camera recording; returns arrays keyed by their HDF5 path.

    Parameters
    ----------
    n_frames:
        Number of time steps ``N`` (LR frames).
    hr_shape:
        ``(H, W)`` of the HR camera; both must be multiples of ``scale``.
    scale:
        Spatial factor between the cameras: LR pixels are ``scale x scale`` HR pixels.
    stride, offset:
        Key frames at ``offset, offset + stride, ... < n_frames`` (at least 2, else ValueError).
    seed:
        Seed of every random choice (non-negative int).
    families:
        Moving scene families from :data:`ALL_FAMILIES` (a sequence, or a string separated by ``,``
        or ``+``); ``static`` is always present. ``None`` draws 1-3 moving families from
        :data:`MOVING_FAMILIES` (never the opt-in :data:`EXTRA_FAMILIES`).
    speed:
        Characteristic image velocity, LR pixels per frame; ``None`` draws one per family.
    lr_dose, hr_dose:
        Photons per pixel of the open beam at its peak; ``None`` draws them from
        :data:`LR_DOSE_RANGE` and :data:`HR_DOSE_RANGE`.
    dtype:
        ``"uint16"`` (default), ``"uint8"`` or ``"float32"`` (see the module docstring).
    effects:
        Opt-in domain randomisation: names from :data:`EFFECTS` (a sequence or a string separated
        by ``,`` or ``+``), ``"all"``, ``"random"`` (each with p = 1/2, by seed) and ``-NAME`` to
        drop one; see :func:`resolve_effects` and "Domain randomisation" in the module docstring.
        ``None`` (default) gives exactly the plain archive.

    Returns
    -------
    dict
        ``/exchange/data_lr`` (N, h, w), ``/exchange/data_hr`` (K, H, W), ``/exchange/hr_index``
        (K,) int64, ``/exchange/data_{dark,white}_{lr,hr}`` (n, ., .), and ``/exchange/data_gt``
        (N, H, W) float32: the noise-free expected HR signal at every step.
    """
    arrays, _ = _generate(n_frames, hr_shape, scale, stride, offset, seed, families, speed,
                          lr_dose, hr_dose, dtype, effects)
    return arrays


def _attr_value(value: Any) -> Any:
    """Turn a parameter into something h5py stores as an attribute."""
    if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return value
    if isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        for v in value
    ):
        return np.asarray(value)
    return json.dumps(value, default=str)


def write_archive(
    path: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    *,
    compression: str | None = None,
) -> None:
    """Write ``arrays`` (keyed by HDF5 path) to an HDF5 archive, atomically.

    3-D datasets are chunked one frame per chunk, ``(1, h, w)``. ``attrs`` (the generator
    parameters) are stored as attributes of the ``/synth`` group, together with all of them as
    one JSON string in ``params_json``; values that HDF5 cannot hold directly (dicts, lists of
    strings, None) are stored as JSON. ``compression`` is passed to h5py (e.g. ``"gzip"``).
    The file is written under a temporary name in the same folder, fsynced and renamed at the end
    (:class:`xvr_batch.durable.AtomicH5File`), so ``path`` is either complete or untouched; a full
    disk raises :class:`xvr_batch.durable.DiskFullError` and leaves no temporary file.
    """
    from xvr_batch.durable import AtomicH5File

    with AtomicH5File(path, overwrite=True) as f:
        for key, value in arrays.items():
            arr = np.asarray(value)
            chunks = (1,) + arr.shape[1:] if arr.ndim == 3 and arr.shape[0] > 0 else None
            ds = f.create_dataset(key, data=arr, chunks=chunks, compression=compression)
            ds.flush()  # here a full disk raises; in the dataset's close it could only crash later
            del ds
        if attrs is not None:
            grp = f.require_group("/synth")
            for key, value in attrs.items():
                grp.attrs[key] = _attr_value(value)
            grp.attrs["params_json"] = json.dumps(dict(attrs), default=str, sort_keys=True)
        if "/exchange" in f:
            f["/exchange"].attrs["generator"] = _FORMAT


def synthesize(path: str | os.PathLike[str], **kwargs: Any) -> dict[str, Any]:
    """Generate an archive (keyword arguments of :func:`generate`) and write it to ``path``.

    Returns a summary: ``path``, ``seed``, ``families`` (with ``static``), ``speeds`` (LR px per
    frame, per moving family), ``lr_dose``, ``hr_dose``, ``dtype``, ``hr_index`` (list) and
    ``shapes`` (dataset path -> shape); with effects also ``effects`` and ``effect_params``.
    """
    sig = dict(n_frames=200, hr_shape=(256, 256), scale=4, stride=20, offset=0, seed=0,
               families=None, speed=None, lr_dose=None, hr_dose=None, dtype="uint16", effects=None)
    unknown = set(kwargs) - set(sig)
    if unknown:
        raise TypeError(f"synthesize() got unexpected keyword arguments {sorted(unknown)}")
    sig.update(kwargs)
    arrays, params = _generate(**sig)
    write_archive(path, arrays, params)
    extra = {k: params[k] for k in ("effects", "effect_params") if k in params}
    return {
        "path": os.fspath(path),
        "seed": params["seed"],
        "families": params["families"],
        "speeds": params["speeds"],
        "lr_dose": params["lr_dose"],
        "hr_dose": params["hr_dose"],
        "dtype": params["dtype"],
        "hr_index": arrays["/exchange/hr_index"].tolist(),
        "shapes": {k: tuple(v.shape) for k, v in arrays.items()},
        **extra,
    }


# ----------------------------------------------------------------------------------------------
# two cameras: two files, two clocks, two views
# ----------------------------------------------------------------------------------------------
_STREAM_NOISE_TWO = 5
_STREAM_CLOCKS = 6

#: Default misregistration of the LR camera: LR pixel (x, y) sees the HR/scale grid at M @ (x, y, 1).
TWO_CAMERA_DEFAULTS = dict(rotation_deg=1.5, scale_factor=1.02, shift=(1.5, -1.2), flip=False)


def _lr_view_matrix(lr_shape: tuple[int, int], rotation_deg: float, scale_factor: float,
                    shift: tuple[float, float], flip: bool) -> np.ndarray:
    """The 2x3 matrix (registration convention) of a view rotated/scaled about the field centre."""
    h, w = lr_shape
    th = math.radians(rotation_deg)
    a = scale_factor * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    if flip:
        a = a @ np.diag([-1.0, 1.0])
    c = np.array([(w - 1) / 2, (h - 1) / 2])
    t = c - a @ c + np.asarray(shift, dtype=np.float64)
    return np.c_[a, t]


def _sample_view(exit_hr: np.ndarray, m: np.ndarray, lr_shape: tuple[int, int], scale: int) -> np.ndarray:
    """What an LR pixel sees: the exit intensity averaged over its footprint at grid point M @ (x, y, 1)."""
    from scipy import ndimage

    box = ndimage.uniform_filter(exit_hr.astype(np.float64), size=scale, mode="nearest")
    off = (scale - 1) / 2 + (0.5 if scale % 2 == 0 else 0.0)
    h, w = lr_shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    u = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    v = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    out = ndimage.map_coordinates(box, [scale * v + off, scale * u + off], order=3, mode="nearest")
    return np.maximum(out, 0.0).astype(np.float32)


def two_cameras(
    outdir: str | os.PathLike[str],
    n_frames: int = 60,
    hr_shape: tuple[int, int] = (128, 160),
    scale: int = 4,
    stride: int = 10,
    offset: int = 3,
    seed: int = 0,
    families: Sequence[str] | str | None = None,
    speed: float | None = None,
    dtype: str = "uint16",
    rotation_deg: float = TWO_CAMERA_DEFAULTS["rotation_deg"],
    scale_factor: float = TWO_CAMERA_DEFAULTS["scale_factor"],
    shift: tuple[float, float] = TWO_CAMERA_DEFAULTS["shift"],
    flip: bool = False,
    lr_rate: float = 1.0e6,
    hr_delay: float = 2.5e-6,
    skew_ppm: float = 20.0,
    tiff: bool | None = None,
) -> dict[str, Any]:
    """Write a two-camera experiment into ``outdir`` and return a summary (also ``truth.json``).

    * ``lr.h5``: the LR camera, misregistered by ``rotation_deg``/``scale_factor``/``shift``/``flip``
      (about the field centre): ``/entry/data/data`` (N, h, w), ``/entry/data/time`` (N,) seconds on the
      LR clock, ``/entry/instrument/detector/dark`` and ``.../flat``.
    * the HR camera, its own clock (offset by ``hr_delay`` s, running ``skew_ppm`` fast), starting one key
      interval before the LR camera (that frame has no LR partner): ``hr/hr.tif`` (multi-page),
      ``hr/hr_time.csv`` (``frame,time``), ``hr/dark.tif``, ``hr/flat.tif`` when tifffile is installed
      (or ``tiff=True``), else ``hr.h5`` (``/hr/data``, ``/hr/time``, ``/hr/dark``, ``/hr/flat``).
    * ``truth.h5``: the aligned archive of the same scene (exactly what :func:`synthesize` writes with the
      same arguments, dense truth included) and ``truth.json``: the true transform (``matrix``, 2x3, LR
      pixel to HR/scale grid), the true ``hr_index`` and the ``hr_delay`` to pass to ``assemble``.
    """
    from xvr_batch.durable import AtomicH5File, atomic_path, atomic_write_bytes

    if int(offset) >= int(stride):
        raise ValueError(f"offset {offset} must be below stride {stride}: the HR camera starts one key interval "
                         "before the LR camera")
    out = os.fspath(outdir)
    os.makedirs(out, exist_ok=True)
    if tiff is None:
        try:
            import tifffile  # noqa: F401
            tiff = True
        except ImportError:
            tiff = False
    elif tiff:
        import tifffile  # noqa: F401  (ImportError: the caller asked for TIFF)
    arrays, params = _generate(n_frames, hr_shape, scale, stride, offset, seed, families, speed, None, None, dtype)
    write_archive(os.path.join(out, "truth.h5"), arrays, params)
    hr_index = arrays["/exchange/hr_index"]

    # the same scene, cameras and beam as _generate (same streams), seen by a misregistered LR camera
    hh, ww = (int(v) for v in hr_shape)
    h, w = hh // scale, ww // scale
    choice = _rng(seed, _STREAM_CHOICE)
    names = _resolve_families(families, choice)
    speeds = {f: float(speed) if speed is not None else float(_loguniform(choice, *SPEED_RANGE)) for f in names}
    lr_dose = float(_loguniform(choice, *LR_DOSE_RANGE))
    hr_dose = float(_loguniform(choice, *HR_DOSE_RANGE))
    bg = _Background(_rng(seed, _STREAM_BACKGROUND), (hh, ww))
    movers = [_FAMILY_CLASSES[f](_rng(seed, _family_stream(f)), bg, speeds[f] * scale, n_frames) for f in names]
    beam = _Beam(_rng(seed, _STREAM_BEAM), (hh, ww), n_frames)
    cam_rng = _rng(seed, _STREAM_CAMERA)
    phase_c = float(cam_rng.uniform(0.15, 0.4))
    hr_cam = _Camera(cam_rng, (hh, ww), hr_dose, fill=(0.4, 0.7), offset=(80.0, 600.0), read=(3.0, 12.0),
                     psf=(0.5, 0.9))
    lr_cam = _Camera(cam_rng, (h, w), lr_dose, fill=(0.25, 0.55), offset=(300.0, 1500.0), read=(5.0, 30.0),
                     psf=(0.3, 0.6))
    noise = _rng(seed, _STREAM_NOISE_TWO)
    m = _lr_view_matrix((h, w), rotation_deg, scale_factor, shift, flip)
    dt = np.dtype(dtype).name

    def exit_at(t: float) -> np.ndarray:
        a = bg.attenuation.copy()
        for mv in movers:
            a += mv.attenuation(float(t))
        np.maximum(a, 0.0, out=a)
        return beam(float(t)) * (np.exp(-a) * np.clip(1.0 + phase_c * _laplacian(a), 0.3, 2.0))

    lr = np.stack([lr_cam.record(_sample_view(exit_at(t), m, (h, w), scale), noise) for t in range(n_frames)])
    hr_times_lr = [int(offset) - int(stride)] + [int(t) for t in hr_index]  # one HR frame before the LR start
    hr = np.empty((len(hr_times_lr), hh, ww), np.float32)
    hr[1:] = arrays["/exchange/data_hr"].astype(np.float32)
    hr[0] = _to_dtype(hr_cam.record(exit_at(hr_times_lr[0]), noise), dt)
    lr_dark = np.stack([lr_cam.dark_frame(noise) for _ in range(6)])
    lr_flat = np.stack([lr_cam.record(_sample_view(beam(float(k - 11)), m, (h, w), scale), noise) for k in range(6)])

    clocks = _rng(seed, _STREAM_CLOCKS)
    period = 1.0 / float(lr_rate)
    lr_t0 = 1.0e-3
    lr_time = lr_t0 + np.arange(n_frames) * period + clocks.normal(0, 0.01 * period, n_frames)
    true_hr = lr_t0 + np.asarray(hr_times_lr, np.float64) * period
    hr_time = true_hr * (1 + skew_ppm * 1e-6) - hr_delay + clocks.normal(0, 0.01 * period, len(true_hr))

    with AtomicH5File(os.path.join(out, "lr.h5"), overwrite=True) as f:
        f.create_dataset("/entry/data/data", data=_to_dtype(lr, dt), chunks=(1, h, w))
        f["/entry/data/time"] = lr_time
        f["/entry/data/time"].attrs["units"] = "s"
        f["/entry/instrument/detector/dark"] = _to_dtype(lr_dark, dt)
        f["/entry/instrument/detector/flat"] = _to_dtype(lr_flat, dt)
    hr_dark = _to_dtype(np.stack([hr_cam.dark_frame(noise) for _ in range(4)]), dt)
    hr_flat = _to_dtype(np.stack([hr_cam.record(beam(float(k - 9)), noise) for k in range(4)]), dt)
    hr_stack = hr.astype(dt)
    times_csv = "frame,time\n" + "".join(f"{i},{t:.12e}\n" for i, t in enumerate(hr_time))
    if tiff:
        import tifffile

        os.makedirs(os.path.join(out, "hr"), exist_ok=True)
        for name, data in (("hr.tif", hr_stack), ("dark.tif", hr_dark), ("flat.tif", hr_flat)):
            with atomic_path(os.path.join(out, "hr", name)) as tmp:
                tifffile.imwrite(tmp, data, photometric="minisblack")
        atomic_write_bytes(os.path.join(out, "hr", "hr_time.csv"), times_csv.encode())
        hr_files = {"hr": "hr/hr.tif", "hr_time": "hr/hr_time.csv", "hr_dark": "hr/dark.tif",
                    "hr_flat": "hr/flat.tif"}
    else:
        with AtomicH5File(os.path.join(out, "hr.h5"), overwrite=True) as f:
            f.create_dataset("/hr/data", data=hr_stack, chunks=(1, hh, ww))
            f["/hr/time"] = hr_time
            f["/hr/dark"] = hr_dark
            f["/hr/flat"] = hr_flat
        hr_files = {"hr": "hr.h5:/hr/data", "hr_time": "hr.h5:/hr/time", "hr_dark": "hr.h5:/hr/dark",
                    "hr_flat": "hr.h5:/hr/flat"}
    truth = {
        "format": "xvr_batch.synth.two_cameras/1",
        "matrix": m.tolist(),
        "rotation_deg": float(rotation_deg), "scale_factor": float(scale_factor), "shift": list(map(float, shift)),
        "flip_x": bool(flip), "hr_index": [int(t) for t in hr_index], "hr_frames_without_lr": [0],
        "lr_rate": float(lr_rate), "hr_delay": float(hr_delay), "skew_ppm": float(skew_ppm),
        "lr_shape": [h, w], "hr_shape": [hh, ww], "scale": int(scale),
        "files": {"lr": "lr.h5:/entry/data/data", "lr_time": "lr.h5:/entry/data/time",
                  "lr_dark": "lr.h5:/entry/instrument/detector/dark",
                  "lr_flat": "lr.h5:/entry/instrument/detector/flat", **hr_files, "truth": "truth.h5"},
        "seed": int(seed), "families": params["families"],
    }
    atomic_write_bytes(os.path.join(out, "truth.json"), (json.dumps(truth, indent=2) + "\n").encode())
    return truth
