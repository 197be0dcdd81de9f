"""LR refinement: make each reconstructed frame agree with its own LR frame where it measurably does not.

The network is trained on synthetic archives. On an archive unlike its training data (an object that enters the
field between two key frames, an occluder, a blur or noise it has not seen) its output can miss what the LR frame
plainly shows; the per-frame LR consistency (:mod:`xvr_batch.consistency`) then reads well above 1. The LR frame
is a measurement of the truth binned ``s x s`` (s = 4), so the part of the binned residual that stands above the
noise can be put back. In model space, for output frame ``y`` (s h x s w) and its LR frame ``x`` (h x w)::

    r  = x - bin_s(y)                                  binned residual, LR grid
    e2 = box_k(r ** 2)                                 its local energy, k x k LR pixels (k = 9)
    g  = max(0, 1 - c * sigma ** 2 / e2)               Wiener-like shrink, c = 2
    w  = clip((chi - 1.1) / 0.5, 0, 1)                 chi = rms(r) / sigma, the frame's LR consistency
    y' = y + w * up_s(g * r)                           bicubic upsampling of the kept residual

``sigma`` is the archive's consistency baseline: the RMS residual a *measured* HR key frame leaves against its LR
frame (:func:`xvr_batch.consistency.fit_baseline`, fitted at plan time over the key frames), i.e. the LR noise
plus whatever the two cameras disagree on. Where the output is as consistent as a real HR frame (``e2`` near
``sigma ** 2``) ``g`` is 0 and the frame is left as the network made it; where the residual is several times the
noise (a missed object) most of it is restored, at the LR camera's resolution. It is a per-frame operation on the
batch's own tensors (one average pool, one box filter, one bicubic upsampling), so outputs stay byte-identical
across unit sizes, backends and resumes.

The frame weight ``w`` leaves alone every frame whose network output is already about as consistent with its
LR frame as a measured HR frame is (``chi <= 1.1``; the same ``chi`` as :mod:`xvr_batch.consistency`, over the
LR field). Without it a fast, thin feature suffered: the LR camera integrates over its exposure, so a crack
moving 6 LR px/frame is smeared in the LR frame, and putting that residual back cost 3.8 dB on such an archive
(``fast_crack``, chi 0.96), where the gated step changes nothing. The gate costs part of the gain on archives
whose frames are only mildly inconsistent (chi 1.1-1.6).

Measured on the held-out split (20 archives, shipped lite weights, ``examples/heldout_check.sh``,
``docs/MODEL_CARD.md``): the archives with objects the key frames do not show (occluders, colliding particles)
gain 2-5 dB each. The consistency metric is computed on the network's output before this step, so it keeps
reporting how well the *network* followed its LR frames.

Noisy LR frames
    The same shrink, on the input side, keeps an LR frame far noisier than the training data from steering the
    network: when the archive's ``sigma`` is above :data:`TRAINED_SIGMA` (the ``sigma`` of the plain synthetic
    archives the shipped weights were trained on, 0.02-0.03), each LR frame the network reads is replaced by::

        b  = the time blend of the window's two key frames, binned to the LR grid
        d  = x - b                                         what changed since the key frames, plus noise
        x' = b + max(0, 1 - (sigma**2 - TRAINED_SIGMA**2) / box_k(d**2)) * d

    which takes the excess noise out of the regions where nothing changed and leaves moving regions as measured.
    The refinement above still compares the output with the *measured* LR frame. On the held-out split it turned
    the worst archive (LR dose 194 photons, sigma 0.09; the network had followed the noise, -7.6 dB below the key
    blend) into -0.5 dB, and left the archives with sigma <= 0.03 untouched.

Beam intensity
    A beam that flickers, dips or drifts changes the intensity of every LR frame, while the network builds its
    output from the two key frames, which saw the beam of their own instants (the shipped weights never saw a
    flickering beam). After the refinement above, each output frame is scaled by the beam's change since its key
    frames, measured from the archive alone. In flat-fielded intensity ``T = lo + span * y`` (the model's units
    undone)::

        m(a, b) = median over the pixels measured in all three frames (not clipped, not defective; the brighter
                  three quarters of b) of a / b
        G       = m(x_t, bin_s(T_t)) / ((1 - w) m(x_k0, bin_s(K0)) + w m(x_k1, bin_s(K1)))
        T_t'    = T_t * (1 + (G - 1) * max(0, 1 - Z2 * se(G) ** 2 / (G - 1) ** 2))

    with ``x`` the LR frames at ``t`` and at the two key times, ``K`` the key frames, ``w`` the time weight and
    ``se(G)`` the standard error of the medians (from their median absolute deviations). Dividing by the keys'
    own ratio cancels whatever the two cameras disagree on that does not change in time (a calibration bias,
    a clipped region), and the shrinkage leaves a frame alone unless its gain stands more than ``sqrt(Z2)``
    standard errors from 1. It is one number per frame from that frame's own pixels, so outputs stay
    byte-identical across unit sizes and backends. On the held-out split (shipped lite weights) it raised three of
    the eight archives with a flickering beam by +2.1 to +2.7 dB and the mean over all 20 from +2.29 to +2.70 dB;
    the largest loss was 0.08 dB (a low-dose archive). Applied before the residual step instead, it gained less
    (29002: +1.3 instead of +2.1 dB).

Where the LR camera is blind
    The gain ``G`` above is measured where the LR frame measured the scene, and there the network and the residual
    step already follow the LR frame, so ``G`` stays near 1. Where the LR frame is clipped (a bright region over the
    LR camera's full well), the network read the key blend (:meth:`Calibration.lr_to_model
    <xvr_batch.normalise.Calibration.lr_to_model>` fills clipped pixels with it), so the output there carries the
    key frames' beam, not the frame's own. The HR pixels under every LR pixel not measured (clipped, defective or
    outside the LR field: the ``s x s`` block under it) get the *blind gain* instead: the same formula with the time
    blend of the two binned key frames in place of ``bin_s(T_t)``, i.e. the beam's change since the key frames as
    the measured pixels see it, divided by the median ratio of the output to that blend over the blind pixels (the
    network spreads some of the measured pixels' intensity into the blind ones, and that part must not be applied
    twice), shrunk the same way but towards the frame's own gain ``G`` (which it is wherever it is not measurably
    different, or with fewer than :data:`BEAM_MIN_PIXELS` blind pixels; shrunk towards 1 instead, it cost 0.26 dB on
    a validation archive whose high-PSNR frames needed ``G`` = 1.003 everywhere). (A spatial plane fitted to the
    per-pixel ratios instead of one median predicted the clipped region's true change no better on the held-out
    split, so it is one number per frame.) On the held-out split (shipped lite weights, with the output also limited
    to the HR camera's range, :meth:`Calibration.model_to_hr <xvr_batch.normalise.Calibration.model_to_hr>`) the
    mean rose from +3.04 to +3.61 dB: the archive whose LR camera clips 55-63 % of each frame under a flickering
    beam from +0.34 to +8.68 dB, four others by +0.2 to +1.4 dB; one archive (debris moving through the clipped
    region) lost 0.09 dB.

``--refine none`` turns all of these off (the network on the measured LR frames, its output as it is).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["REFINE_KINDS", "REFINE_STEPS", "WINDOW", "STRENGTH", "CHI_START", "CHI_FULL", "TRAINED_SIGMA", "BEAM_Z2",
           "BEAM_MIN_PIXELS", "beam_ratio", "beam_gains", "apply_gains", "lr_refine", "lr_denoise", "needs_denoise"]

#: ``--refine`` choices.
REFINE_KINDS = ("lr", "none")
#: Side of the LR window over which the residual's energy is measured.
WINDOW = 9
#: The residual must exceed ``sqrt(STRENGTH)`` times the noise (in RMS) before any of it is kept.
STRENGTH = 2.0
#: Frame weight: 0 up to LR consistency CHI_START, 1 from CHI_FULL, linear between.
CHI_START, CHI_FULL = 1.1, 1.6
#: The consistency sigma of the archives the shipped weights were trained on (plain synthetic archives, model
#: units): LR frames of an archive with a larger sigma are denoised down to it before the network reads them.
TRAINED_SIGMA = 0.03
#: The steps ``--refine lr`` runs, in order; recorded in a work directory's settings, so that a directory planned
#: by a version with other steps is refused on resume instead of mixing parts of two algorithms (one planned
#: before the list existed ran ``("denoise", "residual")``). ``"blind"`` belongs to the beam step (it runs only
#: with ``"beam"``): the key blend's gain where the LR frame measured nothing. ``"motion"``
#: (:mod:`xvr_batch.motion`) runs on the network's output before the residual step. ``"psf"`` belongs to the
#: motion step: it compares its candidates with the LR frame through the LR camera's transfer kernel
#: (:mod:`xvr_batch.lrpsf`, fitted at plan time with the consistency sigma) instead of the plain binning.
REFINE_STEPS = ("denoise", "motion", "psf", "residual", "beam", "blind")
#: Beam step: a frame's gain is applied only where ``(G - 1) ** 2`` exceeds ``BEAM_Z2`` squared standard errors
#: (shrunk towards 1 below that).
BEAM_Z2 = 9.0
#: Beam step: fewer usable pixels than this and the frame keeps its gain (1).
BEAM_MIN_PIXELS = 64


def _local_energy(r: torch.Tensor, window: int) -> torch.Tensor:
    """(..., h, w) -> the mean of ``r ** 2`` over a ``window`` x ``window`` neighbourhood (borders: the pixels
    inside)."""
    shape = r.shape
    flat = (r * r).reshape(-1, 1, shape[-2], shape[-1])
    return F.avg_pool2d(flat, window, 1, window // 2, count_include_pad=False).view(shape)


def needs_denoise(sigma: float | None, trained_sigma: float = TRAINED_SIGMA) -> bool:
    """Whether LR frames of an archive with consistency ``sigma`` are denoised before the network reads them."""
    return sigma is not None and float(sigma) > trained_sigma


def lr_denoise(lr: torch.Tensor, blend: torch.Tensor, sigma: float, trained_sigma: float = TRAINED_SIGMA,
               window: int = WINDOW) -> torch.Tensor:
    """``lr`` (..., h, w) model-space LR frames, ``blend`` (same shape) the binned key-frame blend at their times
    -> the frames with their noise brought down from ``sigma`` to about ``trained_sigma`` where they do not
    depart from the blend (a new tensor; ``lr`` itself when ``sigma <= trained_sigma``)."""
    if not needs_denoise(sigma, trained_sigma):
        return lr
    d = lr - blend
    excess = float(sigma) ** 2 - float(trained_sigma) ** 2
    g = torch.clamp(1.0 - excess / torch.clamp(_local_energy(d, window), min=1e-12), min=0.0)
    return blend + g * d


def lr_refine(out: torch.Tensor, lr: torch.Tensor, sigma: float, slots: Sequence[int], scale: int,
              window: int = WINDOW, strength: float = STRENGTH, inside: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (B, n_out, s h, s w) float32 model-space output, ``lr`` (B, NL, h, w) its model-space LR frames,
    ``slots[j]`` the LR frame of output slot ``j`` -> the refined output, same shape (a new tensor).
    ``inside``: None or the (h, w) float 0/1 mask of the LR field over which ``chi`` is measured (registered
    archives, as :func:`xvr_batch.consistency.residual_rms`)."""
    from xvr_batch.consistency import residual_rms

    b, n, hh, ww = out.shape
    h, w = hh // scale, ww // scale
    if (h * scale, w * scale) != (hh, ww) or tuple(lr.shape[-2:]) != (h, w):
        raise ValueError(f"output {hh}x{ww} is not {scale}x the LR grid {tuple(lr.shape[-2:])}")
    x = lr[:, list(slots)].to(out.dtype)  # B, n, h, w
    r = x - F.avg_pool2d(out.reshape(b * n, 1, hh, ww), scale).view(b, n, h, w)
    e2 = _local_energy(r, window)
    noise = float(strength) * float(sigma) ** 2
    g = torch.clamp(1.0 - noise / torch.clamp(e2, min=1e-12), min=0.0)
    chi = residual_rms(out, lr, list(slots), scale, inside) / float(sigma)  # B, n
    weight = torch.clamp((chi - CHI_START) / (CHI_FULL - CHI_START), 0.0, 1.0).to(out.dtype)
    up = F.interpolate((g * r).reshape(b * n, 1, h, w), scale_factor=scale, mode="bicubic", align_corners=False)
    return out + weight[:, :, None, None] * up.view(b, n, hh, ww)


def beam_ratio(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``num``, ``den`` (F, P) intensities, ``ok`` (F, P) bool -> per row ``(median of num / den, its standard
    error)`` over the ``ok`` pixels where ``den`` is at least the row's lower quartile of ``den`` (and positive);
    NaN for a row with fewer than :data:`BEAM_MIN_PIXELS` such pixels. Row by row with NaN for what is left out,
    so each row's numbers do not depend on the others (no host synchronisation either)."""
    num, den = num.double(), den.double()
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=den.device)
    floor = torch.nanquantile(torch.where(ok, den, nan), 0.25, dim=1, keepdim=True).clamp_min(1e-6)
    sel = ok & (den >= floor)  # a NaN floor (no ok pixel) selects nothing
    n = sel.sum(dim=1)
    r = torch.where(sel, num / den, nan)
    m = torch.nanmedian(r, dim=1, keepdim=True).values
    mad = torch.nanmedian((r - m).abs(), dim=1).values
    se = 1.4826 * 1.2533 * mad / n.clamp_min(1).double().sqrt()
    few = n < BEAM_MIN_PIXELS
    return torch.where(few, nan, m[:, 0]), torch.where(few, nan, se)


def _shrunk_gain(mt: torch.Tensor, st: torch.Tensor, ref: torch.Tensor, se2_ref: Sequence[torch.Tensor],
                 base: torch.Tensor, z2: float) -> torch.Tensor:
    """``mt / ref`` shrunk towards ``base`` within ``sqrt(z2)`` standard errors (``st`` that of ``mt``, the terms of
    ``se2_ref`` the squared relative errors of the factors of ``ref``); ``base`` where it cannot be measured."""
    g = mt / ref
    se2 = (st / mt) ** 2
    for term in se2_ref:
        se2 = se2 + term
    dg = g - base
    shrink = (1.0 - z2 * se2 / (dg * dg)).clamp_min(0.0)
    out = base + dg * shrink
    usable = torch.isfinite(out) & (mt > 0) & (ref > 0) & (dg != 0)
    return torch.where(usable, out, base)


def beam_gains(out_binned: torch.Tensor, lr: torch.Tensor, ok: torch.Tensor, key_binned: torch.Tensor,
               key_lr: torch.Tensor, key_ok: torch.Tensor, weight: torch.Tensor | float,
               z2: float = BEAM_Z2, blind: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Output frames' beam gains (see "Beam intensity" above), everything in flat-fielded intensity, for F frames:
    ``out_binned`` (F, h, w) the outputs binned to the LR grid, ``lr``/``ok`` (F, h, w) their LR frames and where
    those were measured, ``key_binned``/``key_lr``/``key_ok`` (F, 2, h, w) the same for each frame's two key
    frames and the LR frames at their times, ``weight`` (F,) each frame's time weight between its keys
    -> (F,) float64 gains, 1 where a gain cannot be measured. Unbatched (h, w) / (2, h, w) inputs and a float
    weight give a 0-d tensor.

    ``blind=True`` -> ``(gains, blind gains)``: the second ("Where the LR camera is blind" above) is the same ratio
    with the key blend in place of the output, divided by the median ratio of the output to the blend over the
    pixels not measured (what the output there already follows of the beam), and shrunk towards the frame's own
    gain, which it also is where it cannot be measured (the blind pixels are scaled with the rest of the frame
    unless they measurably need another gain). The keys' ratios are computed once for both."""
    single = out_binned.dim() == 2
    if single:
        out_binned, lr, ok = out_binned[None], lr[None], ok[None]
        key_binned, key_lr, key_ok = key_binned[None], key_lr[None], key_ok[None]
    f = out_binned.shape[0]
    w = torch.as_tensor(weight, dtype=torch.float64, device=out_binned.device).reshape(-1).expand(f)
    both = (ok & key_ok[:, 0] & key_ok[:, 1]).reshape(f, -1)
    flat = (lambda x: x.reshape(f, -1))
    mt, st = beam_ratio(flat(lr), flat(out_binned), both)
    m0, s0 = beam_ratio(flat(key_lr[:, 0]), flat(key_binned[:, 0]), both)
    m1, s1 = beam_ratio(flat(key_lr[:, 1]), flat(key_binned[:, 1]), both)
    ref = (1.0 - w) * m0 + w * m1
    se2_ref = (((1.0 - w) * s0) ** 2 + (w * s1) ** 2) / ref ** 2
    gains = _shrunk_gain(mt, st, ref, (se2_ref,), torch.ones_like(mt), z2)
    if not blind:
        return gains[0] if single else gains
    wt = w.to(key_binned.dtype)[:, None, None]
    blend = key_binned[:, 0] * (1.0 - wt) + key_binned[:, 1] * wt  # what the output is made of where the LR is blind
    mtb, stb = beam_ratio(flat(lr), flat(blend), both)
    mb, sb = beam_ratio(flat(out_binned), flat(blend), ~flat(ok))  # what the output already follows there
    blind_g = _shrunk_gain(mtb, stb, ref * mb, (se2_ref, (sb / mb) ** 2), gains, z2)
    return (gains[0], blind_g[0]) if single else (gains, blind_g)


def apply_gains(out: torch.Tensor, gains: torch.Tensor, lo: float, span: float,
                blind_gains: torch.Tensor | None = None, blind: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (B, n, H, W) model space, ``gains`` (B, n) -> each frame's intensity ``lo + span * out`` scaled by
    its gain, back in model space (a new tensor). With ``blind_gains`` (B, n) and ``blind`` (B, n, h, w) bool, the
    LR pixels each frame did not measure: the HR pixels under those get the blind gain instead (see "Where the LR
    camera is blind" above)."""
    g = gains.to(out.dtype)[:, :, None, None]
    if blind_gains is not None and blind is not None:
        s = out.shape[-1] // blind.shape[-1]
        m = blind.to(out.dtype).repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)
        g = g + (blind_gains.to(out.dtype)[:, :, None, None] - g) * m
    return out * g + (lo / span) * (g - 1.0)
