"""Self-supervised fine-tuning on an archive's own key frames (no dense truth needed).

``xvr-batch finetune ARCHIVE -o W.pt`` adapts the weights to one archive: its scene, its cameras and its
registration. ``reconstruct --weights W.pt`` then uses them.

Samples
-------
The target is a real HR key frame ``k``. The inputs are the NL LR frames of a window that holds ``k``'s
time, at a random position in the window (head ``all``; loss only on that output slot), and the
bracketing keys ``k - j`` and ``k + j``, with ``1 <= j <= max_gap`` random where both exist. The samples
are read exactly as :mod:`xvr_batch.validate` reads them: the same registration (on a registered archive,
in the LR camera's frame, targets included, and crops only where the HR camera sees that frame) and
intensity mapping; no input uses key ``k`` or a held-out key. On top come train's
aligned random crops (``crop`` LR pixels), flips and transposes, and its motion sampling (``p_motion``:
the most moving of ``motion_tries`` crops). No extra noise is added: the archive carries its own.

Held-out keys
-------------
Every ``holdout``-th interior key (at least one) is held out: never a target, never an input key. ``validate`` on those keys runs before (base weights) and after (the fine-tuned EMA
weights), and both results go into the checkpoint's ``meta["finetune"]``.

Training
--------
It is :func:`xvr_batch.train.run_training` with this module's sample source and validator (its
``samples``/``validator``/``meta_extra`` hooks). So the recipe is train's: L1, Adam, cosine, EMA, bf16
autocast on CUDA, DDP under torchrun/srun, exact resume through ``OUT.last.pt`` (the same command
continues a stopped run), SIGTERM/SIGUSR2 stop with exit 75. Training starts from the base weights
(``init``). The output is a slim checkpoint of our format (EMA weights), with ``meta["finetune"]``
holding the base weights' source and sha256, the archive's path and fingerprint, the registration and
the normalisation, the held-out and training keys, and the before/after validate scores.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from xvr_batch.errors import UserError
from xvr_batch.normalise import time_weight
from xvr_batch.validate import ValidationContext, interior_keys, score_keys

__all__ = ["FinetuneOptions", "run_finetune", "holdout_keys", "training_targets", "KeySamples", "MIN_KEYS"]

#: Fewest key frames fine-tuning takes: one held-out interior key and one training key with a bracket
#: that avoids it.
MIN_KEYS = 5


@dataclass
class FinetuneOptions:
    archive: str
    out: str
    weights: str | None = None
    """Base weights: a checkpoint or a shipped name; None = the default weights."""
    steps: int = 400
    batch: int = 2
    lr: float = 1e-4
    crop: int = 24
    """LR crop side (clipped to the archive's LR frames)."""
    holdout: int = 4
    """Every N-th interior key is held out for validation (at least one)."""
    max_gap: int = 2
    """Brackets ``k - j, k + j`` with ``1 <= j <= max_gap``."""
    p_motion: float = 0.5
    motion_tries: int = 4
    ema: float = 0.999
    seed: int = 0
    device: str = "auto"
    registration: str = "auto"
    val_every: int = 100
    ckpt_every: int = 100
    stop_at: int | None = None
    num_workers: int = 0
    progress: bool = True


def holdout_keys(n_keys: int, every: int) -> list[int]:
    """Every ``every``-th interior key (positions ``every // 2, every // 2 + every, ...`` among the interior
    keys), and at least one."""
    inner = interior_keys(n_keys)
    if not inner:
        return []
    if every < 1:
        raise UserError(f"--holdout {every}: hold out every N-th interior key, N >= 1")
    held = [k for i, k in enumerate(inner) if i % every == every // 2]
    return held or [inner[len(inner) // 2]]


def training_targets(n_keys: int, held: Sequence[int], max_gap: int) -> dict[int, list[int]]:
    """Per training key ``k``: the gaps ``j`` whose bracket ``(k - j, k + j)`` exists and avoids ``held``."""
    held_set = set(held)
    out: dict[int, list[int]] = {}
    for k in range(1, n_keys - 1):
        if k in held_set:
            continue
        js = [j for j in range(1, max_gap + 1)
              if k - j >= 0 and k + j < n_keys and k - j not in held_set and k + j not in held_set]
        if js:
            out[k] = js
    return out


class KeySamples(Dataset):
    """Sample ``g`` (a pure function of ``(seed, rank, g)``): key ``k``'s window, bracket ``(k - j, k + j)``,
    crop and flips; ``{"lr": (NL, 1, c, c), "hr": (2, 1, sc, sc), "target": (1, 1, sc, sc), "slot": ()}``."""

    def __init__(self, path: str, settings: Mapping[str, Any], norm: Mapping[str, Any], paths: Any,
                 targets: Mapping[int, Sequence[int]], held: Sequence[int], num_lr: int, head: str, crop: int,
                 scale: int, seed: int, rank: int, length: int, flips: bool = True, p_motion: float = 0.0,
                 motion_tries: int = 1):
        self.path, self.settings, self.norm, self.paths = path, dict(settings), dict(norm), paths
        self.targets = {int(k): [int(j) for j in js] for k, js in targets.items()}
        self.keys = sorted(self.targets)
        self.held = [int(h) for h in held]
        self.num_lr, self.head, self.crop, self.scale = num_lr, head, crop, scale
        self.seed, self.rank, self.length = int(seed), int(rank), int(length)
        self.flips, self.p_motion, self.motion_tries = flips, float(p_motion), int(motion_tries)
        self._ctx: ValidationContext | None = None
        self._pid = os.getpid()
        self._lr: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ctx"], state["_lr"] = None, {}
        return state

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def _context(self) -> ValidationContext:
        if self._pid != os.getpid():  # a forked worker: never share h5py handles across processes
            self._ctx, self._lr, self._pid = None, {}, os.getpid()
        if self._ctx is None:
            self._ctx = ValidationContext(self.path, paths=self.paths, settings=self.settings, norm=self.norm)
        return self._ctx

    def _draw(self, rng: np.random.Generator) -> tuple[int, int, int | None]:
        k = self.keys[int(rng.integers(len(self.keys)))]
        js = self.targets[k]
        j = js[int(rng.integers(len(js)))]
        start = None
        if self.head == "all":
            ctx = self._context()
            t, n, nl = int(ctx.hr_index[k]), ctx.raw.n_frames, self.num_lr
            start = int(rng.integers(max(0, t - nl + 1), min(t, n - nl) + 1))
        return k, j, start

    def _load(self, k: int, j: int, start: int | None, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        ctx = self._context()
        key = (k, -1 if start is None else start)
        cached = self._lr.get(key)
        if cached is None:
            item = ctx.inputs(k, self.num_lr, self.head, bracket=(k - j, k + j), start=start)
            lr, slot, frames = item.lr, item.slot, item.frames
            if len(self._lr) > 512:
                self._lr.pop(next(iter(self._lr)))
            self._lr[key] = (lr, frames)
        else:
            (lr, frames), slot = cached, 0 if start is None else int(ctx.hr_index[k]) - start
        t0, t1 = int(ctx.hr_index[k - j]), int(ctx.hr_index[k + j])
        times = np.array([time_weight(t, t0, t1) for t in frames], dtype=np.float32)  # for a time_cond model
        keys = np.stack([ctx.hr_model(k - j), ctx.hr_model(k + j)])
        target = ctx.hr_model(k)[None]
        c, s = self.crop, self.scale
        (y0, y1), (x0, x1) = _seen_lr(ctx.crop, lr.shape[-2:], s, c)
        y, x = int(rng.integers(y0, y1 - c + 1)), int(rng.integers(x0, x1 - c + 1))
        fv, fh, tr = (bool(b) for b in (rng.random(3) < 0.5)) if self.flips else (False, False, False)
        arrays = [lr[:, y:y + c, x:x + c], keys[:, y * s:(y + c) * s, x * s:(x + c) * s],
                  target[:, y * s:(y + c) * s, x * s:(x + c) * s]]
        if fv:
            arrays = [a[:, ::-1, :] for a in arrays]
        if fh:
            arrays = [a[:, :, ::-1] for a in arrays]
        if tr:
            arrays = [a.transpose(0, 2, 1) for a in arrays]
        lr_t, hr_t, tg_t = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None] for a in arrays)
        return {"lr": lr_t, "hr": hr_t, "target": tg_t, "slot": torch.tensor(slot, dtype=torch.long),
                "times": torch.from_numpy(times)}

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, int(g)])
        sample = self._load(*self._draw(rng), rng)
        if self.p_motion > 0 and self.motion_tries > 1 and rng.random() < self.p_motion:
            best = _motion(sample)
            for _ in range(1, self.motion_tries):  # the most moving crop (static ones teach little)
                other = self._load(*self._draw(rng), rng)
                score = _motion(other)
                if score > best:
                    sample, best = other, score
        return sample


def _seen_lr(crop: tuple[slice, slice], lr_shape: Sequence[int], scale: int, c: int) -> tuple[tuple[int, int], ...]:
    """The LR rows and columns ``[lo, hi)`` where training crops may lie: those whose HR footprint is in the
    validation rectangle ``crop`` (on a registered archive the part of the model frame the HR camera sees;
    targets elsewhere would be the resampling's repeated edge), or every row/column where that leaves less
    than one crop of ``c``."""
    out = []
    for sl, n in zip(crop, lr_shape):
        lo = 0 if sl.start is None else -(-sl.start // scale)
        hi = n if sl.stop is None else min(n, sl.stop // scale)
        out.append((lo, hi) if hi - lo >= c else (0, int(n)))
    return tuple(out)


def _motion(sample: Mapping[str, torch.Tensor]) -> float:
    return float((sample["target"] - sample["hr"].mean(0, keepdim=True)).abs().mean())


class _Source:
    """train's ``samples`` hook: the archive's ArchiveInfo and the :class:`KeySamples` of each rank."""

    def __init__(self, info, ctx: ValidationContext, targets, held, crop: int, p_motion: float, motion_tries: int):
        self.infos = [info]
        self._args = dict(path=ctx.path, settings=ctx.settings, norm=ctx.norm.to_dict(), paths=ctx.raw.paths,
                          targets=targets, held=held)
        self.crop, self.p_motion, self.motion_tries = crop, p_motion, motion_tries

    def dataset(self, cfg, opts, rank: int, length: int) -> KeySamples:
        return KeySamples(num_lr=cfg.num_lr, head=cfg.head, crop=self.crop, scale=cfg.scale, seed=opts.seed,
                          rank=rank, length=length, flips=opts.flips, p_motion=self.p_motion,
                          motion_tries=self.motion_tries, **self._args)


class _HeldOutValidator:
    """train's ``validator`` hook: validate on the held-out keys; each result also goes into
    ``meta["finetune"]["validate_after"]`` (so the final checkpoint records the final one)."""

    def __init__(self, ctx: ValidationContext, held: Sequence[int], record: dict):
        self.ctx, self.held, self.record = ctx, list(held), record
        self._items = None

    def __bool__(self) -> bool:
        return bool(self.held)

    def evaluate(self, model, device, autocast: bool, batch: int) -> dict[str, Any]:  # noqa: ARG002
        if self._items is None:
            self._items = [self.ctx.inputs(k, model.cfg.num_lr, model.cfg.head) for k in self.held]
        res = score_keys(self.ctx, model, self.held, device, max(1, batch), prepared=self._items)
        summary = _summary(res)
        self.record["validate_after"] = summary
        return {"mean": float(res["swin_xvr"]["psnr"]), "label": "held-out keys validate PSNR (EMA, HR counts)",
                "per_archive": {"held-out": float(res["swin_xvr"]["psnr"]),
                                "key_blend": float(res["key_blend"]["psnr"])},
                "ssim": res["swin_xvr"]["ssim"], "margin_db": res["margin_db"]}


def _summary(res: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a validate result a checkpoint records (plain JSON types)."""
    return {"swin_xvr": dict(res["swin_xvr"]), "key_blend": dict(res["key_blend"]),
            "lr_bicubic": dict(res["lr_bicubic"]), "best_baseline": dict(res["best_baseline"]),
            "margin_db": res["margin_db"], "keys": [dict(r) for r in res["keys"]]}


def _base_weights(weights: str | None):
    """``(ResolvedWeights, path of its file)`` of the base weights."""
    from xvr_batch.weights import named_weights, resolve_weights

    if weights is not None and (os.sep in weights or weights.endswith(".pt")) and not os.path.exists(weights):
        raise UserError(f"{weights}: base weights file not found; give a checkpoint path or a shipped name (lite)")
    rw = resolve_weights(weights)
    if not rw.trained:
        raise UserError("no trained default weights are installed; pass --weights BASE.pt to fine-tune from")
    path = str(named_weights(rw.source.split(":", 1)[1])) if rw.source.startswith("builtin:") else rw.source
    return rw, path


def run_finetune(opts: FinetuneOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune as ``opts`` says (see the module docstring). Returns ``{"out", "before", "after",
    "holdout_keys", "train_keys", "steps"}``; ``after`` is None when the run stopped early (``stop_at``)."""
    from xvr_batch.pipeline import resolve_device
    from xvr_batch.train import ArchiveInfo, TrainOptions, detect_dist_env, run_training

    if not (isinstance(opts.steps, int) and opts.steps >= 1):
        raise UserError(f"--steps must be at least 1, got {opts.steps!r}")
    if not opts.max_gap >= 1:
        raise UserError(f"--max-gap must be at least 1, got {opts.max_gap}")
    out = os.fspath(opts.out)
    if os.path.abspath(out) == os.path.abspath(opts.archive):
        raise UserError(f"{out}: the output would overwrite the input archive; choose another -o")
    main = detect_dist_env().is_main
    quiet = log if main else (lambda _msg: None)
    rw, base_path = _base_weights(opts.weights)
    device = resolve_device(opts.device) if opts.device != "auto" else opts.device
    ctx = ValidationContext(opts.archive, opts.registration, log=quiet, min_keys=MIN_KEYS,
                            purpose="fine-tuning (a held-out interior key, and a training key whose bracket avoids "
                                    "it)")
    try:
        k_all = ctx.n_keys
        held = holdout_keys(k_all, opts.holdout)
        targets = training_targets(k_all, held, opts.max_gap)
        if not held or not targets:
            raise UserError(f"{ctx.path}: {k_all} key frames leave no held-out key and training key with a bracket "
                            f"that avoids it (--holdout {opts.holdout}, --max-gap {opts.max_gap}); fine-tuning needs "
                            f"at least {MIN_KEYS} key frames")
        cfg = rw.config
        if ctx.raw.scale != cfg.scale:
            raise UserError(f"{ctx.path}: HR/LR scale is {ctx.raw.scale}, but the model upsamples x{cfg.scale}")
        crop = int(min(opts.crop, *ctx.raw.lr_shape))
        if crop != opts.crop:
            quiet(f"crop {opts.crop} is larger than the LR frames {tuple(ctx.raw.lr_shape)}; using {crop}")
        record: dict[str, Any] = {
            "base_weights": {"source": rw.source, "sha256": rw.sha256, "path": os.path.abspath(base_path)},
            "archive": {"path": ctx.path, "fingerprint": ctx.fingerprint, "paths": ctx.raw.paths.to_dict()},
            "registration": ctx.registration, "normalisation": ctx.norm.to_dict(),
            "holdout_every": opts.holdout, "holdout_keys": held,
            "holdout_frames": [int(ctx.hr_index[k]) for k in held],
            "train_keys": sorted(targets), "max_gap": opts.max_gap,
            "samples": "target = HR key k; inputs = LR window holding k's time + keys (k-j, k+j)",
        }
        before = None
        if main:
            dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
            before = _summary(score_keys(ctx, rw.load().to(dev), held, dev))
            record["validate_before"] = before
            b = before["swin_xvr"]
            quiet(f"held-out keys {held}: validate with the base weights {float(b['psnr']):.3f} dB PSNR, SSIM "
                  f"{float(b['ssim']):.4f} (key blend {float(before['key_blend']['psnr']):.3f} dB)")
        keys = tuple(int(k) for k in ctx.hr_index)
        spacing = int(round(float(np.median(np.diff(keys)))))
        info = ArchiveInfo(path=ctx.path, name=os.path.basename(ctx.path), n_frames=int(ctx.raw.n_frames),
                           lr_shape=tuple(int(x) for x in ctx.raw.lr_shape),
                           hr_shape=tuple(int(x) for x in ctx.archive.hr_shape), hr_index=keys, spacing=max(1, spacing),
                           norm=ctx.norm.to_dict(), fingerprint=ctx.fingerprint)
        topts = TrainOptions(
            archives=[ctx.path], out=out, init=base_path, head=cfg.head, steps=opts.steps, batch=opts.batch,
            lr=opts.lr, crop=crop, seed=opts.seed, ema=opts.ema, key_jitter=False, p_jitter=0.0, p_noise=0.0,
            flips=True, p_motion=opts.p_motion, motion_tries=opts.motion_tries, device=opts.device,
            num_workers=opts.num_workers, log_every=max(1, min(50, opts.steps)), val_every=opts.val_every,
            ckpt_every=opts.ckpt_every, stop_at=opts.stop_at, slim=True, progress=opts.progress)
        source = _Source(info, ctx, targets, held, crop, opts.p_motion, opts.motion_tries)
        validator = _HeldOutValidator(ctx, held, record)
        result = run_training(topts, log=log, samples=source, validator=validator,
                              meta_extra={"kind": "finetune", "finetune": record})
        after = record.get("validate_after") if result == out else None
        if main and after is not None and before is not None:
            quiet(f"held-out keys {held}: validate {float(before['swin_xvr']['psnr']):.3f} -> "
                  f"{float(after['swin_xvr']['psnr']):.3f} dB PSNR, SSIM {float(before['swin_xvr']['ssim']):.4f} -> "
                  f"{float(after['swin_xvr']['ssim']):.4f}")
            if float(after["swin_xvr"]["psnr"]) < float(before["swin_xvr"]["psnr"]):
                quiet(f"warning: the fine-tuned weights validate worse than the base weights on the held-out keys; "
                      f"keep reconstructing with the base weights, not {result}")
        return {"out": result, "before": before, "after": after, "holdout_keys": held,
                "train_keys": sorted(targets), "steps": opts.steps}
    finally:
        ctx.close()


def options(**kw: Any) -> FinetuneOptions:
    """FinetuneOptions from keyword arguments, ignoring unknown ones (the CLI's)."""
    names = {f.name for f in dataclasses.fields(FinetuneOptions)}
    return FinetuneOptions(**{k: v for k, v in kw.items() if k in names})
