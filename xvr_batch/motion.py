"""Motion-compensated key frames: step ``motion`` of ``--refine lr`` (:mod:`xvr_batch.refine`).

The network builds each frame from its window's two key frames and follows the LR frames where it can. Where an
object moved more than the network's reach since a key frame (an occluder's edge, a particle, debris; a few LR
pixels), its output keeps a ghost of the key frames there, and the LR frame, binned ``s x s`` (s = 4), cannot
give back the detail. The key frames still hold that detail, displaced. This step finds the displacement, moves
the key frames, and takes from them where they explain the frame's LR frame better than the network's output.

For output frame ``y`` (s h x s w), its LR frame ``x`` (h x w) and each key frame ``K`` (k = 0, 1), in
flat-fielded intensity (the model's units undone)::

    C_k(d)  = mean over a W x W LR window (measured pixels) of (x - bin_s(K_k shifted by d)) ** 2
    d_k     = argmin_d C_k(d) + MU sigma**2 |d|**2 / R**2   d in whole HR pixels, |d_y|, |d_x| <= R = RADIUS * s
    keep d_k only where  C_k(0) - C_k(d_k) > TAU sigma**2          the move explains the frame better
                    and  C_k(0) - C_own,k > TAU sigma**2           the frame changed since the key
                    and  the whole window was measured in the frame and at the key's time
    M       = a W0 + (1 - a) W1,  W_k = K_k sampled at p + d_k(p)    (bilinear field, bicubic sampling)
    a       = ((1 - w) / (C_0 + 0.1 sigma**2)) / ((1 - w) / (C_0 + ...) + w / (C_1 + ...))
    g       = E_y / (E_y + E_M)      E_z = the window mean of (x - bin_s(z)) ** 2 (0 where x was not measured)
    y'      = y + up(g) (M - y)

``C_own,k`` is the cost the key's own LR frame (the LR frame at the key's time) leaves against the key: what the
two cameras always disagree on (a residual misregistration, their PSFs, fixed-pattern noise) is not taken for
motion. ``sigma`` is the archive's consistency baseline (:mod:`xvr_batch.consistency`), ``w`` the frame's time
weight. Before matching, the LR frame is divided by its median ratio to the binned key blend, and each key's LR
frame by its own ratio to its key (:func:`xvr_batch.refine.beam_ratio`), so that a beam that flickers is not
taken for motion either; ``M`` is then scaled by the beam's change since the key frames, which the output and the
LR frame carry. Windows with a pixel that was clipped or defective in either LR frame move nothing (a half-clipped
window pulled a static edge by 1-2 HR pixels).

With step ``psf`` of ``--refine lr``, ``bin_s`` above is followed by the LR camera's transfer kernel
(:mod:`xvr_batch.lrpsf`: a blurring scintillator otherwise leaves a residual at every edge, which the step read as
motion or as a bad fit) and ``sigma`` is the residual the kernel leaves (not below half the plain one). On the
held-out split of issue 13 this raised the mean margin from +4.75 to +5.02 dB, an archive with a blurred LR camera
and a moving rod from +0.45 to +3.45 dB; on the validation archives from +2.53 to +2.98 dB.

The gate ``g`` is a ratio of how well each candidate explains the LR frame: where both fit (a static region) the
output becomes about the mean of the network's output and the key blend; where the network kept a ghost that the
moved keys do not, ``M`` takes over. Everything is per frame, in a fixed order (no reduction across the batch), so
outputs stay byte-identical across unit sizes and backends.

Measured on the held-out split (20 archives, shipped lite weights, ``examples/heldout_check.sh``): the mean
margin rose from +3.61 to +4.60 dB, the occluder archives by +3.2 to +4.1 dB, 17 of 20 archives gained; on the
12 validation archives from +1.45 to +2.52 dB (``docs/MODEL_CARD.md``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from xvr_batch.lrpsf import apply_kernel

__all__ = ["RADIUS", "WINDOW", "TAU", "MU", "motion_fuse"]

#: Largest displacement searched, LR pixels each way (in whole HR pixels: (2 RADIUS s + 1) ** 2 candidates).
RADIUS = 2
#: Side of the LR window over which a displacement is matched and the gate measured.
WINDOW = 5
#: A displacement must lower the window's mean squared residual by more than TAU sigma**2.
TAU = 1.0
#: Penalty that prefers the smaller of two displacements that fit about equally well.
MU = 0.25


def _box_sum(v: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> the sum over each WINDOW x WINDOW neighbourhood, the frame zero-padded (sums of shifted slices,
    rows then columns: several times faster on the CPU than ``avg_pool2d``, and in a fixed order)."""
    k, (h, w) = WINDOW // 2, v.shape[-2:]
    p = F.pad(v, (k, k, k, k))
    rows = sum(p[:, i:i + h] for i in range(1, WINDOW)) + p[:, 0:h]
    return sum(rows[:, :, j:j + w] for j in range(1, WINDOW)) + rows[:, :, 0:w]


def _count(v: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (1, h, w): how many pixels of each WINDOW x WINDOW neighbourhood lie inside the frame."""
    return _box_sum(torch.ones((1, *v.shape[-2:]), dtype=v.dtype, device=v.device))


def _window_mean(v: torch.Tensor, weight: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> the mean of ``v`` over the ``weight`` pixels of each WINDOW x WINDOW neighbourhood, ``den`` their
    :func:`_coverage`."""
    return _box_sum(v * weight) / (den * _count(v))


def _coverage(weight: torch.Tensor) -> torch.Tensor:
    """(N, h, w) 0/1 -> the fraction of each WINDOW x WINDOW neighbourhood inside the frame that is 1 (>= 1e-6)."""
    return (_box_sum(weight) / _count(weight)).clamp_min(1e-6)


def _ratio(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Per row the median ratio of :func:`xvr_batch.refine.beam_ratio`; 1 where it cannot be measured."""
    from xvr_batch.refine import beam_ratio

    n = num.shape[0]
    m = beam_ratio(num.reshape(n, -1), den.reshape(n, -1), ok.reshape(n, -1))[0].to(num.dtype)
    return torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))


def motion_fuse(out: torch.Tensor, lr: torch.Tensor, ok: torch.Tensor, keys: torch.Tensor, key_lr: torch.Tensor,
                key_ok: torch.Tensor, weight: torch.Tensor, sigma: float, scale: int, lo: float = 0.0,
                span: float = 1.0, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` (N, s h, s w) model-space output frames, ``lr``/``ok`` (N, h, w) their model-space LR frames and
    where those were measured, ``keys`` (N, 2, s h, s w) each frame's two key frames, ``key_lr``/``key_ok``
    (N, 2, h, w) the LR frames at the keys' times and where those were measured, ``weight`` (N,) each frame's time
    weight between its keys, ``sigma`` the archive's consistency baseline (model units), ``(lo, span)`` the
    model's transmission units (``Calibration.transmission``) -> the fused frames, (N, s h, s w) model space.
    ``kernel`` (k, k), when given, is the LR camera's transfer kernel (:mod:`xvr_batch.lrpsf`): every binned
    candidate is convolved with it before it is compared with an LR frame, and ``sigma`` should then be the
    residual it leaves (``sigma_kernel``)."""
    n, hh, ww = out.shape
    h, w = hh // scale, ww // scale
    if (h * scale, w * scale) != (hh, ww) or tuple(lr.shape[-2:]) != (h, w):
        raise ValueError(f"output {hh}x{ww} is not {scale}x the LR grid {tuple(lr.shape[-2:])}")
    if not math.isfinite(float(sigma)) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, not {sigma}")
    s, r = scale, RADIUS * scale
    dt, dev = out.dtype, out.device
    y = out * span + lo  # flat-fielded intensity
    keys = keys.to(dt) * span + lo
    x = lr.to(dt) * span + lo
    key_lr = key_lr.to(dt) * span + lo
    wt = weight.to(device=dev, dtype=dt)
    kern = None if kernel is None else kernel.to(device=dev, dtype=dt)
    kb = apply_kernel(F.avg_pool2d(keys.reshape(n * 2, 1, hh, ww), s)[:, 0], kern).view(n, 2, h, w)
    blend = kb[:, 0] * (1 - wt)[:, None, None] + kb[:, 1] * wt[:, None, None]
    both = ok & key_ok[:, 0] & key_ok[:, 1]
    mt = _ratio(x, blend, both)
    mk = torch.stack([_ratio(key_lr[:, k], kb[:, k], both) for k in range(2)], 1)  # N, 2
    gain = mt / ((1 - wt) * mk[:, 0] + wt * mk[:, 1])  # the beam's change since the keys
    x = x / mt[:, None, None]  # in the keys' radiometry
    key_lr = key_lr / mk[:, :, None, None]
    s2 = max((float(sigma) * span) ** 2, 1e-12)  # a noise-free archive (sigma 0) must not divide 0 by 0

    # costs of every displacement against both keys; kept: the best, its displacement, and no displacement
    okk = (key_ok & ok[:, None]).to(dt).reshape(n * 2, h, w)
    cov = _coverage(okk)
    padded = F.pad(keys.reshape(n * 2, 1, hh, ww), (r, r, r, r), mode="replicate")
    box = F.avg_pool2d(padded, s, stride=1).view(n * 2, hh + 2 * r - s + 1, ww + 2 * r - s + 1)
    box = apply_kernel(box, kern, dilation=s)  # the LR camera's blur, taps one LR pixel (s HR pixels) apart
    xx = x[:, None].expand(n, 2, h, w).reshape(n * 2, h, w)
    best = torch.full((n * 2, h, w), float("inf"), dtype=dt, device=dev)
    pick = torch.zeros((n * 2, h, w), dtype=torch.int16, device=dev)  # the best's number, (dy + r) (2r + 1) + dx + r
    c0 = best
    # box at HR offset (r + dy, r + dx), every s-th pixel: phase ((r + dy) % s, (r + dx) % s), shifted by whole LR
    # pixels; the s * s phases are made contiguous once
    phases = [[box[:, a::s, b::s].contiguous() for b in range(s)] for a in range(s)]
    norm = cov * _count(okk)
    for i, (dy, dx) in enumerate((dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)):
        (qy, ay), (qx, ax) = divmod(r + dy, s), divmod(r + dx, s)
        binned = phases[ay][ax][:, qy:qy + h, qx:qx + w]
        c = _box_sum((xx - binned) ** 2 * okk) / norm
        if dy == 0 and dx == 0:
            c0 = c
        c = c + MU * s2 * (dy * dy + dx * dx) / (r * r)
        better = c < best
        best = torch.where(better, c, best)
        pick.masked_fill_(better, i)
    dy_best = (pick // (2 * r + 1) - r).to(dt)
    dx_best = (pick % (2 * r + 1) - r).to(dt)
    own = _window_mean((key_lr.reshape(n * 2, h, w) - kb.reshape(n * 2, h, w)) ** 2, okk, cov)
    moved = (c0 - best > TAU * s2) & (c0 - own > TAU * s2) & (cov > 0.999)
    zero = torch.zeros_like(best)
    flow = torch.stack([torch.where(moved, dx_best, zero), torch.where(moved, dy_best, zero)], 1)  # 2N, 2, h, w
    cost = torch.where(moved, best, c0).view(n, 2, h, w)

    # the keys moved (bilinear displacement field, bicubic sampling), blended by time and match quality
    field = F.interpolate(flow, size=(hh, ww), mode="bilinear", align_corners=False)
    gy, gx = torch.meshgrid(torch.arange(hh, dtype=dt, device=dev), torch.arange(ww, dtype=dt, device=dev),
                            indexing="ij")
    grid = torch.stack([(gx + field[:, 0]) / max(ww - 1, 1) * 2 - 1, (gy + field[:, 1]) / max(hh - 1, 1) * 2 - 1], -1)
    warped = F.grid_sample(keys.reshape(n * 2, 1, hh, ww), grid, mode="bicubic", padding_mode="border",
                           align_corners=True).view(n, 2, hh, ww)
    a0 = (1 - wt)[:, None, None] / (cost[:, 0] + 0.1 * s2)
    a1 = wt[:, None, None] / (cost[:, 1] + 0.1 * s2)
    a = F.interpolate((a0 / (a0 + a1).clamp_min(1e-30))[:, None], size=(hh, ww), mode="bilinear",
                      align_corners=False)[:, 0]
    m = (a * warped[:, 0] + (1 - a) * warped[:, 1]) * gain[:, None, None]  # the frame's beam

    # gate: how much better the moved keys explain the LR frame than the output does
    x = x * gain[:, None, None]
    okf = ok.to(dt)
    cov_t = _coverage(okf)
    e_y = _window_mean((x - apply_kernel(F.avg_pool2d(y[:, None], s)[:, 0], kern)) ** 2, okf, cov_t)
    e_m = _window_mean((x - apply_kernel(F.avg_pool2d(m[:, None], s)[:, 0], kern)) ** 2, okf, cov_t)
    g = e_y / (e_y + e_m).clamp_min(1e-30) * ((cov_t > 0.5) & ok).to(dt)
    gu = F.interpolate(g[:, None], size=(hh, ww), mode="bilinear", align_corners=False)[:, 0]
    return (y + gu * (m - y) - lo) / span
