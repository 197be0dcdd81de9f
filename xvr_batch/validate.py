"""Key-frame self-validation: how well do the weights do on an archive that has no dense truth?

``xvr-batch validate ARCHIVE`` (a thin CLI over :func:`validate_archive`, :func:`format_table` and
:func:`plot`) hides each interior key frame ``k`` in turn and reconstructs it, then scores the result
against the real HR key frame.

How one key is reconstructed
----------------------------
Key ``k`` sits at LR time ``t = hr_index[k]``. It needs keys ``k - 1`` and ``k + 1``, so only interior
keys are scored. The model gets:

- one window of NL LR frames that holds ``t``. Head ``all``: the window starts at ``t - NL // 2``, moved
  inside the archive when needed, and the output slot at ``t`` is scored. Head ``centre``: the frames
  centred on ``t``, reflected at the archive ends, as the inference plan does;
- the keys ``(k - 1, k + 1)`` as its bracket.

This costs one extra model call per key. Everything else is what ``reconstruct`` does:

- the same registration (``--registration``, :func:`xvr_batch.registration.resolve` / ``registered``);
- the same intensity mapping, fitted on the registered archive as ``prepare`` fits it;
- the same key features and key-mean residual base (as ``UnitRunner._compute_dev`` builds them);
- on registered archives, the same frame: the model works in the LR camera's frame, where the HR key
  frames are resampled (``RegisteredArchive``); the hidden key is scored there too, resampled the same way,
  on the largest rectangle of that frame which the HR camera sees (:func:`seen_rectangle`).

How it is scored
----------------
In HR camera counts, with :mod:`xvr_batch.evaluate`'s helpers (data range of each frame = the truth
key's ``max - min``). The baselines are the ones ``evaluate`` uses, at time ``t``: ``key_blend`` (the
time-weighted blend of keys ``k - 1`` and ``k + 1``) and ``lr_bicubic`` (the LR frame at ``t``,
normalised and bicubic-upsampled). ``best_baseline`` is the better of the two per key, by PSNR.

How far to trust it
-------------------
A validate score measures something harder than ``reconstruct`` does. Its brackets are twice as wide
(``2 S`` instead of ``S``), the hidden frame always sits in the middle, and the "truth" is a noisy HR
camera frame. Expect lower absolute PSNR than a dense evaluation. The useful number is the *margin*
over the best baseline, and how it compares between two weights on the same archive.
``examples/validate_trust.py`` measures how validate margins track dense-truth margins on synthetic
archives.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from xvr_batch.errors import UserError
from xvr_batch.evaluate import (
    BEST_BASELINE, DATA_RANGE, METHOD, _Baselines, _diff, _fmt, _frame_range, _jsonable, _mean, _psnr,
    _ssim, _upsample, as_float, image_row, save_plot,
)
from xvr_batch.io.archive import Archive, ArchivePaths
from xvr_batch.normalise import Calibration, fit_normalisation, time_weight
from xvr_batch.plan import reflect

__all__ = ["validate_archive", "ValidationContext", "KeySubset", "KeyInputs", "seen_rectangle", "interior_keys",
           "key_window", "format_table", "plot", "METHODS"]

#: Methods in the result, in table order.
METHODS: tuple[str, ...] = (METHOD, "key_blend", "lr_bicubic", BEST_BASELINE)
MIN_KEYS = 3

class KeySubset:
    """A view of an archive (or a registered one) that only has the key frames ``keep`` (key numbers,
    ascending); ``read_hr(i)`` reads the ``i``-th kept key. Everything else is the archive's.

    It is how a key is hidden: the baselines of this view never see the keys left out."""

    def __init__(self, archive, keep: Sequence[int]):
        self._archive = archive
        self._keep = [int(k) for k in keep]
        self.hr_index = np.asarray(archive.hr_index)[self._keep]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_archive"], name)

    def read_hr(self, i: int) -> np.ndarray:
        return self._archive.read_hr(self._keep[int(i)])

def interior_keys(n_keys: int) -> list[int]:
    """Key numbers that have a key on both sides."""
    return list(range(1, n_keys - 1))

def key_window(hr_index: Sequence[int], k: int, num_lr: int, n_frames: int, head: str,
               start: int | None = None) -> tuple[tuple[int, ...], int]:
    """``(LR frames, output slot)`` of the window that reconstructs key ``k`` (see the module docstring).

    ``start`` (head ``all``) picks another first frame; the window must still hold the key's time."""
    t = int(hr_index[k])
    if head == "centre":
        return tuple(reflect(t - num_lr // 2 + j, n_frames) for j in range(num_lr)), 0
    if start is None:
        start = t - num_lr // 2
    start = max(0, min(int(start), n_frames - num_lr))
    if not start <= t < start + num_lr:
        raise ValueError(f"window starting at {start} does not hold frame {t}")
    return tuple(range(start, start + num_lr)), t - start

@dataclass
class KeyInputs:
    """Model-space inputs of one hidden key: ``lr`` (NL, h, w), ``keys`` (2, H, W); the output ``slot``."""

    key: int
    frame: int
    bracket: tuple[int, int]  # key numbers
    lr: np.ndarray
    keys: np.ndarray
    slot: int
    frames: tuple[int, ...] = ()  # the LR frame numbers of ``lr``
    times: tuple[int, int] = (0, 0)  # the frame numbers of the two bracket keys
    #: for the beam step of the refinement (:func:`xvr_batch.refine.beam_gains`): where ``lr`` was measured
    #: (NL, h, w), the model-space LR frames at the two bracket keys' times and where they were (2, h, w)
    measured: np.ndarray | None = None
    key_lr: np.ndarray | None = None
    key_measured: np.ndarray | None = None

def seen_rectangle(inside: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns of a large rectangle that lies wholly in the boolean mask ``inside`` (greedy:
    drop the edge row or column with the most pixels outside until none is left)."""
    m = np.asarray(inside, bool)
    r0, r1, c0, c1 = 0, m.shape[0], 0, m.shape[1]
    while r1 - r0 > 1 and c1 - c0 > 1:
        sub = m[r0:r1, c0:c1]
        if sub.all():
            break
        bad = [(~sub[0]).sum(), (~sub[-1]).sum(), (~sub[:, 0]).sum(), (~sub[:, -1]).sum()]
        side = int(np.argmax(bad))
        if side == 0:
            r0 += 1
        elif side == 1:
            r1 -= 1
        elif side == 2:
            c0 += 1
        else:
            c1 -= 1
    return slice(r0, r1), slice(c0, c1)


class ValidationContext:
    """An open archive with the registration, normalisation and calibration ``reconstruct`` would use.

    ``registration`` is ``auto``, ``none`` or a JSON file (as ``reconstruct --registration``). The archive
    is opened read-only; :meth:`close` closes it."""

    def __init__(self, archive_path: str | os.PathLike[str], registration: str = "auto",
                 paths: ArchivePaths | None = None, hr_stride: int | None = None, hr_offset: int = 0,
                 log: Callable[[str], None] = lambda s: None, min_keys: int = MIN_KEYS,
                 purpose: str = "key-frame validation (one interior key with a key on both sides)",
                 settings: Mapping[str, Any] | None = None, norm: Mapping[str, Any] | None = None):
        """``settings`` (``{"registration": record}`` or ``{}``) and ``norm`` (a normalisation dict), when
        given, are used as they are instead of resolving the registration and fitting the mapping again (a
        worker process rebuilding the context of its parent)."""
        from xvr_batch.normalise import Normalisation
        from xvr_batch.registration import registered, resolve

        self.path = os.fspath(archive_path)
        if not os.path.exists(self.path):
            raise UserError(f"{self.path}: archive not found; check the path")
        self.raw = Archive(self.path, paths or ArchivePaths(), hr_stride, hr_offset)
        try:
            k = len(self.raw.hr_index)
            if k < min_keys:
                raise UserError(f"{self.path}: has {k} key frame(s); {purpose.split(' (')[0]} needs at least "
                                f"{min_keys} key frames{' (' + purpose.split(' (', 1)[1] if ' (' in purpose else ''}; "
                                "use an archive with more key frames")
            if settings is None:
                reg = resolve(self.raw, registration, log)
                settings = {} if reg is None else {"registration": reg.settings_record()}
            self.settings: dict[str, Any] = dict(settings)
            self.registration = self.settings.get("registration")
            self.archive = registered(self.raw, self.settings)
            self.norm = fit_normalisation(self.archive) if norm is None else Normalisation.from_dict(dict(norm))
            self.calib = Calibration(self.archive, self.norm)
            self.fingerprint = self.raw.fingerprint()
            to_model = getattr(self.archive, "to_model", None)
            #: where keys are scored: the whole frame, or the part of the LR frame the HR camera sees
            self.crop = (slice(None), slice(None)) if to_model is None else seen_rectangle(to_model.inside)
            from xvr_batch.consistency import fit_baseline
            #: the archive's consistency sigma, which the LR refinement uses as ``reconstruct`` does (a noise
            #: level fitted over the key frames: no key's content reaches the model through it)
            fitted = fit_baseline(self.archive, self.calib)
            self.sigma = float(fitted["sigma"])
            #: the LR camera's transfer kernel and the residual it leaves (:mod:`xvr_batch.lrpsf`; None when it
            #: cannot be fitted): the motion step's step "psf". Fitted over all key frames like sigma: 25 numbers
            #: that describe the cameras, not any key's content.
            self.psf = (None if fitted.get("kernel") is None else
                        (np.asarray(fitted["kernel"], np.float32), float(fitted["sigma_kernel"])))
        except BaseException:
            self.raw.close()
            raise
        self._hr: dict[int, np.ndarray] = {}

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> "ValidationContext":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def hr_index(self) -> np.ndarray:
        return np.asarray(self.raw.hr_index)

    @property
    def n_keys(self) -> int:
        return len(self.raw.hr_index)

    def hr_model(self, k: int) -> np.ndarray:
        """Key ``k`` in model space (cached; a small archive's keys fit, large ones are evicted)."""
        img = self._hr.get(k)
        if img is None:
            if len(self._hr) >= 64:
                self._hr.pop(next(iter(self._hr)))
            img = self._hr[k] = self.calib.hr_to_model(self.archive.read_hr(k))
        return img

    def hiding(self, hidden: Sequence[int]) -> KeySubset:
        """A view without the keys ``hidden``."""
        drop = {int(h) for h in hidden}
        return KeySubset(self.archive, [k for k in range(self.n_keys) if k not in drop])

    def inputs(self, k: int, num_lr: int, head: str, bracket: tuple[int, int] | None = None,
               start: int | None = None) -> KeyInputs:
        """The model inputs that reconstruct key ``k`` from ``bracket`` (default ``(k - 1, k + 1)``): LR frames
        and the two bracket keys only, so no other key reaches the model. LR frames are model space as recorded
        (a registered run works in the LR camera's frame), clipped readings repaired from the bracket keys only,
        so a hidden key never leaks in; the masks and the LR frames at the bracket keys' times are for the beam
        step."""
        kp, kn = bracket or (k - 1, k + 1)
        frames, slot = key_window(self.hr_index, k, num_lr, self.raw.n_frames, head, start)
        times = (int(self.hr_index[kp]), int(self.hr_index[kn]))
        raw = self.archive.read_lr_at(list(frames))
        lr = self.calib.lr_to_model(raw, frames=list(frames), keys=(kp, kn))
        raw_keys = self.archive.read_lr_at(list(times))
        key_lr = self.calib.lr_to_model(raw_keys, frames=list(times), keys=(kp, kn))
        keys = np.stack([self.hr_model(kp), self.hr_model(kn)])
        inside = getattr(self.archive, "lr_inside", None)
        return KeyInputs(int(k), int(self.hr_index[k]), (int(kp), int(kn)), lr, keys, slot,
                         tuple(int(f) for f in frames), times, self.calib.lr_measured(raw, inside), key_lr,
                         self.calib.lr_measured(raw_keys, inside))

def _resolve_model(weights: Any) -> tuple[Any, dict]:
    """``(model, record)`` from None / a name / a path (:func:`~xvr_batch.weights.resolve_weights`), a
    :class:`~xvr_batch.weights.ResolvedWeights`, or an already-loaded :class:`SwinXVR`."""
    from xvr_batch.model.swin_xvr import SwinXVR
    from xvr_batch.weights import ResolvedWeights, resolve_weights

    if isinstance(weights, SwinXVR):
        return weights, {"source": "<in-memory model>", "sha256": None}
    if not isinstance(weights, ResolvedWeights):
        if weights is not None and not isinstance(weights, str):
            weights = os.fspath(weights)
        if weights is not None and (os.sep in weights or weights.endswith(".pt")) and not os.path.exists(weights):
            raise UserError(f"{weights}: weights file not found; give a checkpoint path or a shipped name (lite)")
        weights = resolve_weights(weights)
    return weights.load(), {"source": weights.source, "sha256": weights.sha256, "trained": weights.trained}

@torch.no_grad()
def run_model(model, items: Sequence[KeyInputs], device: str | torch.device = "cpu", batch: int = 4,
              sigma: float | None = None, transmission: tuple[float, float] | None = None,
              psf: tuple[np.ndarray, float] | None = None) -> list[np.ndarray]:
    """Model-space output frame (H, W) at each item's slot, as ``UnitRunner._compute_dev`` computes it; with the
    archive's consistency ``sigma``, with the LR denoising and refinement of ``reconstruct --refine lr``
    (:mod:`xvr_batch.refine`), and with ``transmission`` (``Calibration.transmission``) and items that carry their
    masks, its beam step; ``psf`` ``(kernel, sigma_kernel)`` (``ValidationContext.psf``): the motion step's
    comparison through the LR camera's transfer kernel, as ``reconstruct`` does."""
    from xvr_batch.refine import REFINE_STEPS, lr_denoise, lr_refine
    device = torch.device(device)
    was_training = model.training
    model.eval()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    outs: list[np.ndarray] = []
    try:
        for b0 in range(0, len(items), max(1, batch)):
            chunk = items[b0:b0 + batch]
            measured = torch.from_numpy(np.stack([c.lr for c in chunk])).to(device)  # B, NL, h, w
            lr = measured[:, :, None]  # B, NL, 1, h, w
            s = model.cfg.scale
            if sigma is not None:
                blend = torch.empty_like(measured)
                for i, c in enumerate(chunk):
                    (t0, t1), frames = c.times, c.frames or (c.frame,) * measured.shape[1]
                    a, b = (torch.nn.functional.avg_pool2d(torch.from_numpy(np.ascontiguousarray(img)).to(device)[None, None],
                                                           s)[0, 0] for img in c.keys)
                    for j, t in enumerate(frames):
                        wt = time_weight(t, t0, t1)
                        blend[i, j] = a * (1.0 - wt) + b * wt
                lr = lr_denoise(measured, blend, sigma)[:, :, None]
            with autocast:
                feats = torch.stack([torch.stack([
                    model.encode_keys(torch.from_numpy(np.ascontiguousarray(img)).to(device)[None, None, None])[0, 0]
                    for img in c.keys]) for c in chunk])  # B, 2, E, h, w
                base = None
                if model.cfg.residual == "key_mean":
                    base = torch.stack([model.key_base(torch.from_numpy(c.keys).to(device)[None, :, None])[0]
                                        for c in chunk])  # B, 1, 1, H, W
                times = delta = None
                if model.cfg.time_cond:
                    times = torch.tensor([[time_weight(t, *c.times) for t in (c.frames or (c.frame,) * lr.shape[1])]
                                          for c in chunk], dtype=torch.float32, device=device)  # B, NL
                    if model.cfg.residual == "key_mean":
                        delta = torch.stack([model.key_delta(torch.from_numpy(c.keys).to(device)[None, :, None])[0]
                                             for c in chunk])  # B, 1, 1, H, W
                y = model.forward_features(lr, feats, base, times=times, delta=delta)
                y = y.float()[:, :, 0]  # B, n_out, H, W
            if sigma is not None:
                slots = list(range(model.cfg.num_lr)) if model.cfg.head == "all" else [model.cfg.num_lr // 2]
                masks = transmission is not None and all(c.measured is not None for c in chunk)
                if masks and "motion" in REFINE_STEPS:
                    y = _motion(y, measured, chunk, slots, s, transmission, sigma,
                                psf if "psf" in REFINE_STEPS else None)
                y = lr_refine(y, measured, sigma, slots, s)
                if masks:
                    y = _beam(y, measured, chunk, slots, s, transmission)
            for i, c in enumerate(chunk):
                outs.append(y[i, c.slot if model.cfg.head == "all" else 0].cpu().numpy())
    finally:
        model.train(was_training)
    return outs


class _OwnSlots(NamedTuple):
    """Each item's own output slot and what the motion and beam steps read for it (B rows, on the device)."""
    rows: torch.Tensor  # 0 .. B-1
    js: list[int]  # the item's output slot
    lrs: list[int]  # and its LR frame
    lr: torch.Tensor  # B, h, w: the measured LR frame
    ok: torch.Tensor  # B, h, w: where it was measured
    keys: torch.Tensor  # B, 2, H, W
    key_lr: torch.Tensor  # B, 2, h, w: the LR frames at the keys' times
    key_ok: torch.Tensor  # B, 2, h, w: where those were measured
    weights: torch.Tensor  # B, float64: the time weight between the keys


def _own_slots(y: torch.Tensor, measured: torch.Tensor, chunk: Sequence[KeyInputs],
               slots: Sequence[int]) -> _OwnSlots:
    """The :class:`_OwnSlots` of a chunk: ``y`` (B, n_out, H, W) the network's outputs, ``measured`` (B, NL, h, w)
    the measured LR frames, ``slots`` the LR frame of each output slot."""
    dev = y.device
    js = [c.slot if len(slots) > 1 else 0 for c in chunk]
    lrs = [slots[j] for j in js]
    rows = torch.arange(len(chunk), device=dev)
    stack = lambda arrays: torch.from_numpy(np.stack(arrays)).to(dev)  # noqa: E731
    return _OwnSlots(rows, js, lrs, measured[rows, lrs], stack([c.measured[j] for c, j in zip(chunk, lrs)]),
                     stack([c.keys for c in chunk]), stack([c.key_lr for c in chunk]),
                     stack([c.key_measured for c in chunk]),
                     torch.tensor([time_weight(c.frames[j], *c.times) for c, j in zip(chunk, lrs)],
                                  dtype=torch.float64, device=dev))


def _motion(y: torch.Tensor, measured: torch.Tensor, chunk: Sequence[KeyInputs], slots: Sequence[int], s: int,
            transmission: tuple[float, float], sigma: float, psf: tuple[np.ndarray, float] | None = None
            ) -> torch.Tensor:
    """The motion step of ``reconstruct --refine lr`` (:func:`xvr_batch.motion.motion_fuse`) on each item's own
    output slot; the other slots are left as they are (they are not read)."""
    from xvr_batch.lrpsf import kernel_sigma
    from xvr_batch.motion import motion_fuse

    o = _own_slots(y, measured, chunk, slots)
    y = y.clone()
    kernel = None if psf is None else torch.from_numpy(np.asarray(psf[0], np.float32)).to(y.device)
    y[o.rows, o.js] = motion_fuse(y[o.rows, o.js], o.lr, o.ok, o.keys, o.key_lr, o.key_ok, o.weights,
                                  sigma if psf is None else kernel_sigma(sigma, psf[1]), s, *transmission,
                                  kernel=kernel)
    return y


def _beam(y: torch.Tensor, measured: torch.Tensor, chunk: Sequence[KeyInputs], slots: Sequence[int], s: int,
          transmission: tuple[float, float]) -> torch.Tensor:
    """The beam step of ``reconstruct --refine lr`` (:func:`xvr_batch.refine.beam_gains`) on each item's own output
    slot; the other slots keep gain 1 (they are not read)."""
    from xvr_batch.refine import REFINE_STEPS, apply_gains, beam_gains

    lo, span = transmission
    dev = y.device
    o = _own_slots(y, measured, chunk, slots)
    rows, js, ok = o.rows, o.js, o.ok
    out_t = torch.nn.functional.avg_pool2d(y[rows, js][:, None], s)[:, 0]  # B, h, w
    key_t = torch.nn.functional.avg_pool2d(o.keys, s)
    args = (out_t * span + lo, o.lr * span + lo, ok, key_t * span + lo, o.key_lr * span + lo, o.key_ok, o.weights)
    blind_step = "blind" in REFINE_STEPS
    g, gb = beam_gains(*args, blind=True) if blind_step else (beam_gains(*args), None)
    gains = torch.ones(y.shape[:2], dtype=torch.float64, device=dev)
    gains[rows, js] = g
    if not blind_step:
        return apply_gains(y, gains, lo, span)
    blind = torch.ones_like(gains)
    blind[rows, js] = gb
    mask = torch.zeros((*y.shape[:2], *ok.shape[-2:]), dtype=torch.bool, device=dev)
    mask[rows, js] = ~ok
    return apply_gains(y, gains, lo, span, blind, mask)


def score_keys(ctx: ValidationContext, model, keys: Sequence[int], device: str | torch.device = "cpu",
               batch: int = 4, progress: bool = False, keep_images: bool = False,
               prepared: Sequence[KeyInputs] | None = None, refine: str = "lr") -> dict[str, Any]:
    """Per-key and mean scores of ``model`` on the hidden ``keys`` of ``ctx`` (see :func:`validate_archive`);
    ``refine`` as ``reconstruct --refine`` (``lr``: the LR denoising and refinement of :mod:`xvr_batch.refine`)."""
    cfg = model.cfg
    items = list(prepared) if prepared is not None else [ctx.inputs(k, cfg.num_lr, cfg.head) for k in keys]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), unit="key", desc="validate", leave=False)
    rows, images = [], {}
    scores: dict[str, dict[str, list[float]]] = {m: {"psnr": [], "ssim": []} for m in METHODS}
    try:
        for b0 in range(0, len(items), max(1, batch)):
            chunk = items[b0:b0 + batch]
            outs = run_model(model, chunk, device, batch, sigma=ctx.sigma if refine == "lr" else None,
                             transmission=ctx.calib.transmission if refine == "lr" else None,
                             psf=ctx.psf if refine == "lr" else None)
            for item, out in zip(chunk, outs):
                k, t = item.key, item.frame
                truth = ctx.archive.read_hr(k)[ctx.crop]
                rng = _frame_range(truth)
                base = _Baselines(ctx.hiding([k]), ctx.norm)
                lr_t = item.lr[item.slot] if cfg.head == "all" else item.lr[cfg.num_lr // 2]
                imgs = {METHOD: ctx.calib.model_to_hr(out, camera_range=True), "key_blend": base.key_blend(t),
                        "lr_bicubic": ctx.calib.model_to_hr(_upsample(lr_t, ctx.raw.scale))}
                imgs = {name: img[ctx.crop] for name, img in imgs.items()}
                row: dict[str, Any] = {"key": k, "frame": t,
                                       "bracket": [int(ctx.hr_index[item.bracket[0]]), int(ctx.hr_index[item.bracket[1]])]}
                for name, img in imgs.items():
                    p, s = _psnr(img, truth, rng), _ssim(img, truth, rng)
                    scores[name]["psnr"].append(p)
                    scores[name]["ssim"].append(s)
                    row[name] = {"psnr": _jsonable(p), "ssim": _jsonable(s)}
                pa, pb = scores["lr_bicubic"]["psnr"][-1], scores["key_blend"]["psnr"][-1]
                best = "key_blend" if (pb > pa or math.isnan(pa)) else "lr_bicubic"
                scores[BEST_BASELINE]["psnr"].append(scores[best]["psnr"][-1])
                scores[BEST_BASELINE]["ssim"].append(scores[best]["ssim"][-1])
                row[BEST_BASELINE] = {**row[best], "choice": best}
                rows.append(row)
                if keep_images:
                    images[k] = {**imgs, "truth": truth}
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result: dict[str, Any] = {"keys": rows}
    best_mean = _mean(scores[BEST_BASELINE]["psnr"])
    for name in METHODS:
        mp = _mean(scores[name]["psnr"])
        result[name] = {"psnr": _jsonable(mp), "ssim": _jsonable(_mean(scores[name]["ssim"])),
                        "margin_db": _jsonable(_diff(mp, best_mean))}
    result["margin_db"] = result[METHOD]["margin_db"]
    if keep_images:
        result["_images"] = images
    return result

def _check_keys(keys: Sequence[int] | None, n_keys: int, path: str) -> list[int]:
    inner = interior_keys(n_keys)
    if keys is None:
        return inner
    out = []
    for k in keys:
        if isinstance(k, bool) or int(k) != k:
            raise UserError(f"--keys {k!r}: key numbers are whole numbers (indices into /exchange/hr_index)")
        if int(k) not in inner:
            raise UserError(f"{path}: key {k} is not an interior key (it needs a key on both sides); choose from "
                            f"1..{n_keys - 2}")
        out.append(int(k))
    if not out:
        raise UserError(f"{path}: no keys to validate; give key numbers in 1..{n_keys - 2}")
    return sorted(set(out))

def parse_keys(text: str | None) -> list[int] | None:
    """``"1,3,5"`` or ``"2:8"`` (Python slice bounds, end excluded) or ``"1,4:6"`` -> key numbers."""
    if text is None or str(text).strip() == "":
        return None
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                out.extend(range(int(a), int(b)))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"--keys {text!r}: give key numbers like 1,3,5 or a range like 2:8") from None
    return out

def validate_archive(archive_path: str | os.PathLike[str], weights: Any = None, keys: Sequence[int] | None = None,
                     registration: str = "auto", device: str = "cpu", progress: bool = False, *,
                     batch: int = 4, paths: ArchivePaths | None = None, hr_stride: int | None = None,
                     hr_offset: int = 0, keep_images: bool = False, context: ValidationContext | None = None,
                     log: Callable[[str], None] = lambda s: None, refine: str = "lr") -> dict[str, Any]:
    """Reconstruct each of ``keys`` (default: every interior key) from its neighbours and score it, with the
    LR refinement ``refine`` (``lr`` or ``none``, as ``reconstruct --refine``).

    ``weights``: None (the default weights), a shipped name, a checkpoint path, a
    :class:`~xvr_batch.weights.ResolvedWeights` or an already-loaded model. ``context``: an open
    :class:`ValidationContext` to reuse (it is not closed). Returns a JSON-serialisable dict::

        {"swin_xvr": {"psnr": mean, "ssim": mean, "margin_db": x}, "key_blend": {...}, "lr_bicubic": {...},
         "best_baseline": {...}, "margin_db": x,
         "keys": [{"key": k, "frame": t, "bracket": [t_prev, t_next], "swin_xvr": {"psnr", "ssim"}, ...}],
         "weights": {"source", "sha256"}, "archive": path, "fingerprint": ..., "registration": {...} | None,
         "normalisation": {...}, "units": ..., "data_range": ...}

    ``keep_images`` adds ``"_images"`` {key: {method: image, "truth": image}} (not JSON; for :func:`plot`).
    """
    from xvr_batch.pipeline import resolve_device

    device = resolve_device(device)
    model, record = _resolve_model(weights)
    model = model.to(device)
    own = context is None
    ctx = context or ValidationContext(archive_path, registration, paths, hr_stride, hr_offset, log)
    try:
        if ctx.raw.scale != model.cfg.scale:
            raise UserError(f"{ctx.path}: HR/LR scale is {ctx.raw.scale}, but the model upsamples x{model.cfg.scale}")
        chosen = _check_keys(keys, ctx.n_keys, ctx.path)
        result = score_keys(ctx, model, chosen, device, batch, progress, keep_images, refine=refine)
        result.update({
            "archive": ctx.path, "fingerprint": ctx.fingerprint, "weights": record,
            "registration": ctx.registration, "normalisation": ctx.norm.to_dict(),
            "n_keys": ctx.n_keys, "units": "HR camera counts", "data_range": DATA_RANGE.replace(
                "ground-truth frame", "real HR key frame"),
            "method": "each key k reconstructed from keys k-1, k+1 and the LR frames around it",
        })
        return result
    finally:
        if own:
            ctx.close()

# ------------------------------------------------------------------------------------------ reporting

def format_table(result: Mapping[str, Any]) -> str:
    """Per key, PSNR of each method; then the means (PSNR, SSIM, margin over the best baseline)."""
    lines = [f"archive: {result.get('archive')}",
             f"weights: {(result.get('weights') or {}).get('source')}",
             f"keys:    {len(result['keys'])} interior key(s), each reconstructed from its two neighbours; "
             "HR counts, data range = key max - min", ""]
    head = f"{'key':>4} {'frame':>6} " + " ".join(f"{m:>13}" for m in (METHOD, "key_blend", "lr_bicubic"))
    lines += [head + "   PSNR [dB]", "-" * len(head)]
    for row in result["keys"]:
        lines.append(f"{row['key']:>4} {row['frame']:>6} " + " ".join(
            f"{_fmt(as_float(row[m]['psnr']), '.2f'):>13}" for m in (METHOD, "key_blend", "lr_bicubic")))
    lines.append("")
    header = f"{'method':<15} {'mean PSNR [dB]':>15} {'mean SSIM':>10} {'vs best baseline [dB]':>22}"
    lines += [header, "-" * len(header)]
    for name in METHODS:
        m = result[name]
        lines.append(f"{name:<15} {_fmt(as_float(m['psnr']), '.2f'):>15} {_fmt(as_float(m['ssim']), '.4f'):>10} "
                     f"{_fmt(as_float(m['margin_db']), '.2f', signed=True):>22}")
    return "\n".join(lines)

def plot(result: Mapping[str, Any], out_png: str | os.PathLike[str]) -> None:
    """A PNG: PSNR per key for the three methods, and key-blend | LR bicubic | reconstruction | real key for
    the key with the largest margin of the reconstruction over the key blend. ``result`` must come from
    ``validate_archive(..., keep_images=True)``."""
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="xvr-batch-mpl-")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = result.get("_images") or {}
    rows = result["keys"]
    fig = Figure(figsize=(14, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 4, height_ratios=[1.0, 1.25])
    ax = fig.add_subplot(grid[0, :])
    frames = [r["frame"] for r in rows]
    styles = {METHOD: dict(color="C3", lw=2.0, marker="o"), "key_blend": dict(color="C2", marker="."),
              "lr_bicubic": dict(color="C0", marker=".")}
    for name in (METHOD, "key_blend", "lr_bicubic"):
        y = [as_float(r[name]["psnr"]) for r in rows]
        ax.plot(frames, y, label=f"{name} (mean {_fmt(as_float(result[name]['psnr']), '.2f')} dB)", **styles[name])
    ax.set_xlabel("key frame time (LR index): each reconstructed from the two neighbouring keys")
    ax.set_ylabel("PSNR [dB]")
    ax.set_title("key-frame self-validation (HR counts, data range = key max - min)")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    if images and rows:
        show = max(rows, key=lambda r: _diff(as_float(r[METHOD]["psnr"]), as_float(r["key_blend"]["psnr"])))
        imgs = images[show["key"]]
        titled = []
        for name, title in (("key_blend", "key-frame blend"), ("lr_bicubic", "LR bicubic"),
                            (METHOD, "reconstruction"), ("truth", "real key frame")):
            if name != "truth":
                title += f"\nPSNR {_fmt(as_float(show[name]['psnr']), '.2f')} dB"
            else:
                title += f"\nkey {show['key']}, frame {show['frame']}"
            titled.append((title, imgs[name]))
        image_row(fig, grid[1, :], titled, imgs["truth"])
    save_plot(fig, out_png)

def public(result: Mapping[str, Any]) -> dict[str, Any]:
    """``result`` without the images (what ``--json`` prints)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
