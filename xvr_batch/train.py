"""Training and fine-tuning of SWIN-XVR on archives with dense ground truth.

Usage
-----
From Python::

    from xvr_batch.train import TrainOptions, run_training
    run_training(TrainOptions(archives=["a.h5", "b.h5"], out="lite.pt", val_archives=["v.h5"]))

From the shell (one process, or one process per GPU under ``torchrun`` / ``srun``)::

    python -m xvr_batch.train --json opts.json              # options from a JSON object
    python -m xvr_batch.train --archives a.h5 b.h5 --out lite.pt --steps 3000
    torchrun --standalone --nproc-per-node 4 -m xvr_batch.train --json opts.json

Every field of :class:`TrainOptions` is also a flag (``--key-jitter/--no-key-jitter`` for booleans);
flags override the JSON file.

Data
----
Training archives must hold ``/exchange/data_gt``, the dense HR truth. Intensities go through exactly
the mapping the inference pipeline uses (:mod:`xvr_batch.normalise`, fitted once per archive on its
key frames): LR input ``calib.lr_to_model(raw LR)``, HR key input ``calib.hr_to_model(raw HR)``, target
``calib.hr_to_model(raw GT)``.

A sample is drawn as follows (all from one random stream per sample, see *Determinism*):

1. An archive, with probability proportional to its number of frames, and a target time ``t``.
2. The LR window of NL frames. Head ``"all"``: NL consecutive frames starting at a random position such
   that ``t`` is inside; the targets are the GT of all NL frames. Head ``"centre"``: the frames centred on
   ``t`` (reflected at the archive ends, as the inference plan does); the target is the GT at ``t``.
3. The two key frames. With probability ``1 - p_jitter`` (or always when ``key_jitter`` is off): the
   archive's real key frames (``/exchange/data_hr``) that bracket the window, the largest key time
   ``<= window start`` and the smallest ``>= window end`` (the first / last key frame where none exists;
   head ``"centre"`` uses the bracket of ``t``, exactly as inference). With probability ``p_jitter``
   (default 0.5): since the truth is dense, key frames are taken from ``data_gt`` at random distances
   1..S before the window start and 1..S after the window end (S = the archive's median key spacing,
   clipped to the archive), as in the authors' recipe ("key frames 1-20 frames before and after the
   target"). These are noise-free; no HR noise is added.
   Each sample also carries ``times``: each LR frame's time weight between the two key frames it is given
   (:func:`~xvr_batch.normalise.time_weight`), which a ``time_cond`` model reads.
4. An aligned random crop: ``crop x crop`` LR pixels and ``4 crop x 4 crop`` HR pixels.
5. With ``flips``: random vertical flip, horizontal flip and transpose, the same on LR, keys and target.
6. With probability ``p_noise`` (default 0.5): Poisson noise on the LR frames only, in model space,
   ``x -> Poisson(max(x, 0) * b0) / b0`` with dose ``b0 = 10 ** U(dose_range)`` (default ``U(1, 7)``).

Frames are read lazily per sample (whole frames via :class:`~xvr_batch.io.archive.Archive`, then
cropped); each process opens each archive and builds its :class:`~xvr_batch.normalise.Calibration`
once. A :class:`torch.utils.data.DataLoader` (``num_workers`` worker processes, default 0 = in process)
feeds the loop.

Recipe
------
L1 loss (or, with ``loss="psnr"``, the mean log of each output frame's MSE: :func:`frame_psnr_loss`);
Adam(``lr``, ``betas``); :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` from ``lr`` to
``eta_min`` over ``steps``; an exponential moving average of the weights kept as ``params_ema`` with
decay ``min(ema, (1 + n) / (10 + n))`` after ``n`` updates (a warm-up, so that short runs do not keep a
trace of the random initialisation; it reaches 0.999 after ~9000 steps); stochastic depth from the
preset (``drop_path`` overrides it; the paper uses 0.2); bf16 autocast on CUDA (``bf16``), float32 on
CPU. Validation (every ``val_every`` steps and at the end) runs the EMA weights on fixed windows of the
validation archives, exactly the windows and key frames the inference plan uses, on a central crop of at
most ``val_crop`` LR pixels a side (``0`` = full frames), and reports PSNR in model space with data range
1.0 on the output frames that are not key frames: per archive (mean over frames) and the mean over
archives.

Distributed
-----------
One process per GPU under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or ``srun``
(``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` or ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR``
defaults to 127.0.0.1 and ``MASTER_PORT`` to 29500, so set ``MASTER_ADDR`` for multi-node jobs). The
process group (NCCL on CUDA, gloo on CPU) is only created when the world size is above 1, and the model
is wrapped in DistributedDataParallel. ``batch`` is the **global** batch: each rank draws
``batch / world_size`` samples per step (``batch`` must be divisible by the world size), so the
recipe does not change with the number of GPUs. Each rank samples from its own seed, ``(seed, rank)``.
Only rank 0 logs, validates and writes checkpoints.

Checkpoints
-----------
Our format (:func:`~xvr_batch.model.checkpoint.save_checkpoint`), loadable with
``torch.load(weights_only=True)``: ``config``, ``params``, ``params_ema``, ``meta`` (data names and
fingerprints, steps, wall time, hardware, validation PSNR, loss log, options) and the training state:
``optimizer``, ``scheduler``, ``step``, ``rng`` (torch, CUDA, numpy and python RNG states of every rank,
as plain tensors and lists) and ``train_options``. Every ``ckpt_every`` steps ``<out>.last.pt`` (see
:func:`last_checkpoint_path`) is overwritten atomically; at the end ``<out>`` is written and the
intermediate file removed. ``slim=True`` leaves the training state out of the final file (inference
weights only, as shipped in the package).

Resume and fine-tune
--------------------
``resume=CKPT`` continues a training checkpoint exactly: weights, EMA, optimizer, scheduler, step and
RNG states are restored and the data stream is a pure function of ``(seed, rank, sample number)``, so
N steps in one go and N/2 + resume + N/2 give the same weights (same options and world size; on CPU,
bit for bit). ``steps`` must equal the checkpoint's. ``stop_at`` ends a run early (writing
``<out>.last.pt``), as a preemption would. ``init=CKPT`` starts a new schedule from trained weights:
our checkpoint (its ``params_ema`` when present) or an XFusion ``.pth`` together with
``xfusion_network_g`` (the reference's ``network_g`` block: a dict, or a YAML/JSON file holding it or a
full options file with a ``network_g`` key). The architecture then comes from the init weights;
``head``, ``drop_path`` and ``num_lr`` may override it (a different ``num_lr`` only fits when the
temporal window is explicit).

Stopping and requeue
--------------------
SIGUSR2 or SIGTERM (a Slurm time-limit warning, a preemption) asks the run to stop: every rank finishes
its current step, the ranks agree on the step (an ``all_reduce`` of the request after each step), the
exact-resume checkpoint ``<out>.last.pt`` is written (temporary name, fsync, rename) and
:class:`TrainingStopped` is raised (``xvr-batch train`` exits with status 75). When ``<out>.last.pt``
exists and ``resume`` is not given, a run resumes from it automatically, provided it was written by a
run with the same options; otherwise it refuses and says how to start over.

Determinism
-----------
Sample ``i`` of step ``s`` on rank ``r`` is drawn from ``numpy.random.default_rng([seed, r, s * B + i])``
(B = per-rank batch), independent of worker processes; the weights are initialised from
``torch.manual_seed(seed)`` and stochastic depth draws from the torch RNG seeded with ``(seed, rank)``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from xvr_batch import __version__
from xvr_batch.durable import sha256_file
from xvr_batch.errors import EXIT_STOPPED, UserError
from xvr_batch.io.archive import Archive
from xvr_batch.model.checkpoint import (
    FORMAT, from_xfusion, load_checkpoint, load_state_dict_strict, read_untrusted, save_checkpoint,
)
from xvr_batch.model.config import ModelConfig, preset
from xvr_batch.model.swin_xvr import TIME_PARAMS, SwinXVR, with_time_cond
from xvr_batch.normalise import Calibration, Normalisation, fit_normalisation, time_weight
from xvr_batch.plan import plan_windows, reflect

__all__ = ["TrainOptions", "TrainingStopped", "run_training", "options_from_dict", "last_checkpoint_path", "DistEnv",
           "detect_dist_env", "TrainSamples", "main"]

#: Environment variable that turns on the per-rank debug report (same as ``TrainOptions.debug_report``).
DEBUG_ENV = "XVR_TRAIN_DEBUG"


@dataclass
class TrainOptions:
    """Everything a training run needs. JSON-serialisable through :meth:`to_dict`."""

    archives: list[str]
    """Training archives; each must hold ``/exchange/data_gt``."""
    out: str
    """Final checkpoint path (our format). ``<out>.last.pt`` (intermediate) is written next to it."""
    val_archives: list[str] = field(default_factory=list)
    """Validation archives (with ``data_gt``): PSNR of the EMA weights, model space, non-key frames."""
    # ---- model
    preset: str = "lite"
    head: str = "all"
    num_lr: int | None = None
    """NL; ``None`` keeps the preset's (or the init weights') value."""
    time_cond: bool | None = None
    """Tell the network each LR frame's time between its keys (``ModelConfig.time_cond``); ``None`` keeps the
    preset's (or the init weights') value. Turned on over init weights without it, the new parameters start at
    zero, so training starts from exactly those weights' network."""
    init: str | None = None
    """Fine-tune start: our checkpoint, or an XFusion ``.pth`` (then ``xfusion_network_g`` is required)."""
    xfusion_network_g: str | dict | None = None
    resume: str | None = None
    """A training checkpoint to continue exactly (takes precedence over ``init``)."""
    # ---- recipe
    steps: int = 20000
    batch: int = 10
    """Global batch: split evenly across the ranks of a distributed run."""
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eta_min: float = 1e-7
    loss: str = "l1"
    """``"l1"``: the mean absolute error over all output pixels. ``"psnr"``: the mean over samples and output
    frames of ``log(mse + PSNR_LOSS_EPS)``, each frame's own mean squared error (see :func:`frame_psnr_loss`);
    it weighs frames the way the reported score does, so frames the key frames nearly explain still count."""
    time_lr_mult: float = 30.0
    """Learning rate of the time-conditioning parameters (``time_cond``) as a multiple of ``lr``: Adam moves a
    parameter by about ``lr`` per step, and these start at zero with a useful range of about 1."""
    ema: float = 0.999
    drop_path: float | None = None
    """``None``: the preset's value (the paper's recipe is 0.2)."""
    crop: int = 24
    """LR crop side; the HR crop is ``4 * crop``."""
    key_jitter: bool = True
    p_jitter: float = 0.5
    """Probability of GT key frames at random distances (when ``key_jitter``) instead of the real bracket."""
    dose_range: tuple[float, float] = (1.0, 7.0)
    p_noise: float = 0.5
    """Probability of Poisson noise on the LR frames of a sample, dose ``10 ** U(dose_range)``."""
    flips: bool = True
    p_motion: float = 0.0
    """Probability that a sample is the most moving of ``motion_tries`` random crops (largest mean
    |truth - key mean|): static crops, where the key frames are already right, then weigh less."""
    motion_tries: int = 4
    seed: int = 0
    # ---- machine
    device: str = "auto"
    bf16: bool = True
    num_workers: int = 0
    # ---- bookkeeping
    log_every: int = 50
    val_every: int = 500
    """0: validate only at the end."""
    val_crop: int = 64
    """Central LR crop side for validation (0 = full frames)."""
    val_windows: int = 8
    """Windows per validation archive, evenly spaced in time."""
    ckpt_every: int = 1000
    """0: no intermediate checkpoints."""
    stop_at: int | None = None
    """Stop after this global step (writing ``<out>.last.pt``), as a preemption would."""
    slim: bool = False
    """Leave optimizer/scheduler/RNG state out of the final checkpoint (inference weights only)."""
    progress: bool = True
    debug_report: bool = False
    """Each rank writes ``<out>.rank{R}.json`` (parameter hashes, checkpoints written); also ``XVR_TRAIN_DEBUG=1``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


_TUPLE_FIELDS = {"betas": 2, "dose_range": 2}


def options_from_dict(d: Mapping[str, Any]) -> TrainOptions:
    """Build :class:`TrainOptions` from a mapping (e.g. a JSON file); unknown keys are a UserError."""
    if not isinstance(d, Mapping):
        raise UserError(f"training options must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(TrainOptions)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"unknown training options {unknown}; known options are {sorted(known)}")
    missing = [k for k in ("archives", "out") if k not in d]
    if missing:
        raise UserError(f"training options need {', '.join(missing)}")
    kw = dict(d)
    for k, n in _TUPLE_FIELDS.items():
        if k in kw:
            v = kw[k]
            if not isinstance(v, (list, tuple)) or len(v) != n:
                raise UserError(f"training option {k} must be a list of {n} numbers, got {v!r}")
            kw[k] = tuple(float(x) for x in v)
    for k in ("archives", "val_archives"):
        if k in kw:
            v = kw[k]
            if isinstance(v, (str, os.PathLike)):
                v = [v]
            kw[k] = [os.fspath(x) for x in (v or [])]
    return TrainOptions(**kw)


def last_checkpoint_path(out: str | os.PathLike) -> str:
    """The intermediate checkpoint next to ``out``: ``lite.pt`` -> ``lite.last.pt``, ``w`` -> ``w.last.pt``."""
    out = os.fspath(out)
    base = out[:-3] if out.endswith(".pt") else out
    return base + ".last.pt"


class TrainingStopped(Exception):
    """Training stopped cleanly on SIGUSR2/SIGTERM; ``path`` holds the exact-resume checkpoint.

    ``xvr-batch train`` maps it to exit status :data:`xvr_batch.errors.EXIT_STOPPED` (75). Running the
    same command again continues from ``path`` (see :func:`run_training`).
    """

    exit_code = EXIT_STOPPED

    def __init__(self, step: int, steps: int, path: str):
        self.step, self.steps, self.path = step, steps, path
        super().__init__(f"training stopped on request at step {step}/{steps}; the checkpoint {path} holds "
                         "everything to continue: run the same command again")


#: What makes a run the same run: the trajectory options, the schedule and the model.
_RUN_IDENTITY = ("steps", "preset", "head", "num_lr", "init", "drop_path")


def _run_identity(options: Mapping[str, Any]) -> dict[str, Any]:
    keys = _TRAJECTORY_OPTIONS + _RUN_IDENTITY
    # an option a run recorded before it existed (loss, time_lr_mult) ran as its default
    defaults = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.default is not dataclasses.MISSING}
    ident = {k: options.get(k, defaults.get(k)) for k in keys}
    for k in ("betas", "dose_range"):
        if ident[k] is not None:
            ident[k] = [float(x) for x in ident[k]]
    ident["archives"] = [os.path.abspath(os.fspath(a)) for a in options.get("archives") or []]
    return ident


def _auto_resume(opts: TrainOptions, log: Callable[[str], None]) -> TrainOptions:
    """``opts`` resuming from ``<out>.last.pt`` when that exists and ``resume`` is not given.

    The checkpoint must come from a run with the same options (:data:`_RUN_IDENTITY` and the
    trajectory options, and the same archives); otherwise a :class:`UserError` says how to start over.
    """
    last = last_checkpoint_path(opts.out)
    if opts.resume or not os.path.isfile(last):
        return opts
    ckpt = read_untrusted(last)
    recorded = ckpt.get("train_options") if isinstance(ckpt, dict) else None
    if not isinstance(recorded, dict) or "step" not in ckpt or "optimizer" not in ckpt:
        raise UserError(f"{last}: is not a training checkpoint of this run; delete it (or choose another --out) "
                        "to start over")
    before, now = _run_identity(recorded), _run_identity(opts.to_dict())
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in before if before[k] != now[k]]
    if changed:
        raise UserError(f"{last}: a stopped run with other options is waiting here ({'; '.join(changed[:3])}); "
                        f"run it with its own options to continue it, or delete {last} to start over")
    log(f"resume: continuing the stopped run from {last} (step {int(ckpt['step'])}/{opts.steps}); "
        f"delete it to start over")
    return dataclasses.replace(opts, resume=last)


class _StopSignals:
    """SIGUSR2/SIGTERM set :attr:`flag` while training runs; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __enter__(self) -> "_StopSignals":
        from xvr_batch.backends.base import StopFlag

        self.flag = StopFlag()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            self.flag.install(self.SIGNALS)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


#: The training losses (:attr:`TrainOptions.loss`) and how a checkpoint's recipe names them.
LOSSES = ("l1", "psnr")
LOSS_NAMES = {"l1": "L1", "psnr": "mean log frame MSE"}
#: Floor added to each frame's MSE in the ``"psnr"`` loss (model units, data range about 1): a frame already
#: better than 60 dB gains nothing from being fitted further, and an exact frame gives a finite loss.
PSNR_LOSS_EPS = 1e-6


def frame_psnr_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = PSNR_LOSS_EPS) -> torch.Tensor:
    """Mean over samples and frames of ``log(mse + eps)``; ``pred``, ``target``: (B, n, H, W).

    Equal to ``-ln(10) / 10`` times the mean per-frame PSNR (data range 1) plus a constant when ``eps`` is
    negligible, so minimising it maximises the mean of per-frame PSNR, the score :mod:`xvr_batch.evaluate`
    reports. Its gradient on a frame is ``2 (pred - target) / (H W (mse + eps))``: a frame with a small error
    weighs as much as one with a large error, where an L1 loss over all pixels hardly sees it."""
    mse = (pred - target).square().mean(dim=(-2, -1))  # (B, n)
    return torch.log(mse + eps).mean()


def _check_options(o: TrainOptions) -> None:
    """Validate the scalar options; every problem is one UserError."""
    problems = []
    if not o.archives:
        problems.append("no training archives given")
    if not o.out:
        problems.append("no output path given")
    if not (isinstance(o.steps, int) and o.steps >= 1):
        problems.append(f"steps must be an integer >= 1, got {o.steps!r}")
    if not (isinstance(o.batch, int) and o.batch >= 1):
        problems.append(f"batch must be an integer >= 1, got {o.batch!r}")
    if not (isinstance(o.crop, int) and o.crop >= 1):
        problems.append(f"crop must be an integer >= 1, got {o.crop!r}")
    if not (o.lr >= 0 and math.isfinite(o.lr)):
        problems.append(f"lr must be >= 0, got {o.lr}")
    if not (o.eta_min >= 0):
        problems.append(f"eta_min must be >= 0, got {o.eta_min}")
    if o.loss not in LOSSES:
        problems.append(f"loss must be one of {', '.join(LOSSES)}, got {o.loss!r}")
    if not (o.time_lr_mult > 0 and math.isfinite(o.time_lr_mult)):
        problems.append(f"time_lr_mult must be > 0, got {o.time_lr_mult}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        problems.append(f"betas must be two numbers in [0, 1), got {o.betas}")
    if not 0 <= o.ema < 1:
        problems.append(f"ema must be in [0, 1), got {o.ema}")
    for name in ("p_jitter", "p_noise", "p_motion"):
        if not 0 <= getattr(o, name) <= 1:
            problems.append(f"{name} must be in [0, 1], got {getattr(o, name)}")
    if len(o.dose_range) != 2 or not o.dose_range[0] <= o.dose_range[1]:
        problems.append(f"dose_range must be (lo, hi) with lo <= hi, got {o.dose_range}")
    for name in ("log_every",):
        if getattr(o, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(o, name)}")
    for name in ("val_every", "ckpt_every", "num_workers", "val_crop"):
        if getattr(o, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(o, name)}")
    if o.val_windows < 1:
        problems.append(f"val_windows must be >= 1, got {o.val_windows}")
    if o.motion_tries < 1:
        problems.append(f"motion_tries must be >= 1, got {o.motion_tries}")
    if o.stop_at is not None and not 1 <= o.stop_at:
        problems.append(f"stop_at must be >= 1, got {o.stop_at}")
    if o.num_lr is not None and o.num_lr < 1:
        problems.append(f"num_lr must be >= 1, got {o.num_lr}")
    if o.xfusion_network_g is not None and not o.init:
        problems.append("xfusion_network_g is given without init (the XFusion .pth file)")
    if problems:
        raise UserError("invalid training options: " + "; ".join(problems))
    for name in ("resume", "init"):
        path = getattr(o, name)
        if path and not os.path.isfile(path):
            what = "is a directory, not a checkpoint file" if os.path.isdir(path) else "not found"
            raise UserError(f"{path}: {name} checkpoint {what}; check the {name} path")
    if o.device not in ("auto", "cpu") and not o.device.startswith("cuda"):
        raise UserError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {o.device!r}")


# ============================================================================ distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a distributed run (``world_size == 1``: a plain run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "none", "torchrun" or "srun"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; srun sets SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID.

    Inside an sbatch script but outside srun only SLURM_NTASKS is set (without a job step): that is a
    plain run, not rank 0 of a group that will never assemble.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env:
        ntasks = env.get("SLURM_STEP_NUM_TASKS")
        if ntasks is None and "SLURM_STEP_ID" in env:
            ntasks = env.get("SLURM_NTASKS")
        if ntasks is not None and int(ntasks) > 1:
            return DistEnv(int(env["SLURM_PROCID"]), int(ntasks), int(env.get("SLURM_LOCALID", 0)), "srun")
    return DistEnv()


def _init_process_group(dist_env: DistEnv, device: torch.device) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend, init_method="env://", rank=dist_env.rank,
                            world_size=dist_env.world_size, **kwargs)


def _resolve_device(opts: TrainOptions, dist_env: DistEnv) -> torch.device:
    name = opts.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device {opts.device!r} asked for, but CUDA is not available; use --device cpu")
        if dist_env.world_size > 1 or name == "cuda":
            dev = torch.device("cuda", dist_env.local_rank % max(1, torch.cuda.device_count()))
        else:
            dev = torch.device(name)
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


# ============================================================================ data


@dataclass(frozen=True)
class ArchiveInfo:
    """What sampling needs to know about one archive (plain values, cheap to send to workers)."""

    path: str
    name: str
    n_frames: int
    lr_shape: tuple[int, int]
    hr_shape: tuple[int, int]
    hr_index: tuple[int, ...]
    spacing: int  # median key-frame spacing S
    norm: dict
    fingerprint: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "fingerprint": self.fingerprint, "n_frames": self.n_frames,
                "lr_shape": list(self.lr_shape), "hr_shape": list(self.hr_shape), "key_spacing": self.spacing,
                "n_key_frames": len(self.hr_index)}


def _inspect_archive(path: str, role: str, scale: int) -> ArchiveInfo:
    """Open, check (ground truth, scale) and fit the normalisation of one archive."""
    path = os.fspath(path)
    with Archive(path) as arc:
        if not arc.has_gt:
            raise UserError(f"{path}: {role} archive has no usable ground truth /exchange/data_gt (N, H, W); "
                            "training needs dense HR truth (make training data with `xvr-batch synth`)")
        if arc.scale != scale:
            raise UserError(f"{path}: HR/LR scale is {arc.scale}, the model upsamples by {scale}")
        norm = fit_normalisation(arc)
        keys = tuple(int(k) for k in arc.hr_index)
        spacing = int(round(float(np.median(np.diff(keys))))) if len(keys) > 1 else arc.n_frames
        return ArchiveInfo(path=os.path.abspath(path), name=os.path.basename(path), n_frames=int(arc.n_frames),
                           lr_shape=tuple(int(x) for x in arc.lr_shape), hr_shape=tuple(int(x) for x in arc.hr_shape),
                           hr_index=keys, spacing=max(1, spacing), norm=norm.to_dict(), fingerprint=arc.fingerprint())


def _bracket_of_time(keys: Sequence[int], t: int) -> tuple[int, int]:
    """The inference plan's bracket of frame ``t`` (key-frame numbers), see :mod:`xvr_batch.plan`."""
    kk = len(keys)
    if kk == 1:
        return 0, 0
    i = int(np.searchsorted(keys, t, side="right")) - 1
    if i < 0:
        return 0, 0
    if i >= kk - 1:
        return (kk - 2, kk - 1) if t == keys[-1] else (kk - 1, kk - 1)
    return i, i + 1


def _bracket_of_window(keys: Sequence[int], first: int, last: int) -> tuple[int, int]:
    """Key numbers (prev, next): largest key time <= first, smallest >= last (first/last key if none)."""
    a = np.asarray(keys)
    le = np.flatnonzero(a <= first)
    ge = np.flatnonzero(a >= last)
    return (int(le[-1]) if le.size else 0), (int(ge[0]) if ge.size else len(keys) - 1)


@dataclass(frozen=True)
class SampleSpec:
    """Everything random about one sample; reading it from the archive is then deterministic."""

    archive: int
    frames: tuple[int, ...]  # LR times of the window
    targets: tuple[int, ...]  # GT times of the outputs
    keys: tuple[tuple[str, int], ...]  # ("hr", key number) or ("gt", time), previous then next
    y: int  # LR crop origin
    x: int
    flip_v: bool
    flip_h: bool
    transpose: bool
    dose: float | None  # Poisson dose on the LR frames, None = no added noise


class TrainSamples(Dataset):
    """Map-style dataset: index ``g`` (a global sample number of this rank) -> one training sample.

    The sample is a pure function of ``(seed, rank, g)``; archives are opened lazily in each process
    (and re-opened after a fork), with one :class:`Calibration` per archive.
    """

    def __init__(self, infos: Sequence[ArchiveInfo], num_lr: int, head: str, crop: int, scale: int, seed: int,
                 rank: int, key_jitter: bool, p_jitter: float, dose_range: tuple[float, float], p_noise: float,
                 flips: bool, length: int, p_motion: float = 0.0, motion_tries: int = 1):
        self.infos = list(infos)
        self.num_lr, self.head, self.crop, self.scale = num_lr, head, crop, scale
        self.seed, self.rank = int(seed), int(rank)
        self.key_jitter, self.p_jitter = key_jitter, float(p_jitter)
        self.dose_range, self.p_noise, self.flips = tuple(dose_range), float(p_noise), flips
        self.length = int(length)
        self.p_motion, self.motion_tries = float(p_motion), int(motion_tries)
        n = np.array([i.n_frames for i in self.infos], dtype=np.float64)
        self.weights = n / n.sum()
        self._open: dict[int, tuple[Archive, Calibration]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def close(self) -> None:
        for arc, _ in self._open.values():
            arc.close()
        self._open = {}

    def _archive(self, i: int) -> tuple[Archive, Calibration]:
        if self._pid != os.getpid():  # a forked worker: never share h5py handles across processes
            self._open, self._pid = {}, os.getpid()
        if i not in self._open:
            info = self.infos[i]
            arc = Archive(info.path)
            self._open[i] = (arc, Calibration(arc, Normalisation.from_dict(info.norm)))
        return self._open[i]

    def draw(self, g: int, candidate: int = 0) -> SampleSpec:
        """The random choices of sample ``g`` (``candidate`` > 0: the extra draws of motion sampling)."""
        rng = np.random.default_rng([self.seed, self.rank, int(g)] + ([1000 + candidate] if candidate else []))
        a = int(rng.choice(len(self.infos), p=self.weights))
        info = self.infos[a]
        n, nl = info.n_frames, self.num_lr
        t = int(rng.integers(n))
        if self.head == "all":
            w0 = int(rng.integers(max(0, t - nl + 1), min(t, n - nl) + 1))
            frames = tuple(range(w0, w0 + nl))
            targets = frames
            first, last = w0, w0 + nl - 1
        else:
            before = nl // 2
            frames = tuple(reflect(t - before + j, n) for j in range(nl))
            targets = (t,)
            first, last = max(0, t - before), min(n - 1, t - before + nl - 1)
        if self.key_jitter and rng.random() < self.p_jitter:
            d1, d2 = (int(d) for d in rng.integers(1, info.spacing + 1, size=2))
            keys: tuple[tuple[str, int], ...] = (("gt", max(0, first - d1)), ("gt", min(n - 1, last + d2)))
        else:
            kp, kn = (_bracket_of_time(info.hr_index, t) if self.head == "centre"
                      else _bracket_of_window(info.hr_index, first, last))
            keys = (("hr", kp), ("hr", kn))
        h, w = info.lr_shape
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        fv, fh, tr = (bool(b) for b in (rng.random(3) < 0.5)) if self.flips else (False, False, False)
        dose = float(10.0 ** rng.uniform(*self.dose_range)) if rng.random() < self.p_noise else None
        return SampleSpec(a, frames, targets, keys, y, x, fv, fh, tr, dose)

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        sample = self._load(self.draw(g), g)
        if self.p_motion > 0 and self.motion_tries > 1:
            rng = np.random.default_rng([self.seed, self.rank, int(g), 2])
            if rng.random() < self.p_motion:  # keep the candidate whose truth moves most from the key mean
                best = _motion_score(sample)
                for k in range(1, self.motion_tries):
                    other = self._load(self.draw(g, k), g)
                    score = _motion_score(other)
                    if score > best:
                        sample, best = other, score
        return sample

    def _load(self, spec: SampleSpec, g: int) -> dict[str, torch.Tensor]:
        arc, calib = self._archive(spec.archive)
        c, s = self.crop, self.scale
        ys, xs = slice(spec.y, spec.y + c), slice(spec.x, spec.x + c)
        hys, hxs = slice(spec.y * s, (spec.y + c) * s), slice(spec.x * s, (spec.x + c) * s)
        keys, bracket = [], []
        for kind, i in spec.keys:
            raw = arc.read_hr(i) if kind == "hr" else arc.read_gt(i, i + 1)[0]
            full = calib.hr_to_model(raw)
            bracket += [int(arc.hr_index[i]) if kind == "hr" else int(i), full]
            keys.append(full[hys, hxs])
        hr = np.stack(keys)
        # clipped LR readings are repaired from the keys this sample gives the model (jittered ones included)
        lr = calib.lr_to_model(arc.read_lr_at(list(spec.frames)), frames=list(spec.frames),
                               bracket=tuple(bracket) if len(bracket) == 4 else None)[:, ys, xs]
        t0 = spec.targets[0]
        if spec.targets == tuple(range(t0, t0 + len(spec.targets))):
            gt = arc.read_gt(t0, t0 + len(spec.targets))
        else:
            gt = np.stack([arc.read_gt(t, t + 1)[0] for t in spec.targets])
        target = calib.hr_to_model(gt)[:, hys, hxs]
        if spec.dose is not None:
            rng = np.random.default_rng([self.seed, self.rank, int(g), 1])
            lr = (rng.poisson(np.maximum(lr, 0.0).astype(np.float64) * spec.dose) / spec.dose).astype(np.float32)
        arrays = [lr, hr, target]
        if spec.flip_v:
            arrays = [a[:, ::-1, :] for a in arrays]
        if spec.flip_h:
            arrays = [a[:, :, ::-1] for a in arrays]
        if spec.transpose:
            arrays = [a.transpose(0, 2, 1) for a in arrays]
        lr, hr, target = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None] for a in arrays)
        t0, t1 = bracket[0], bracket[2]
        times = torch.tensor([time_weight(t, t0, t1) for t in spec.frames], dtype=torch.float32)
        return {"lr": lr, "hr": hr, "target": target, "times": times}


def _motion_score(sample: Mapping[str, torch.Tensor]) -> float:
    """Mean |truth - key-frame mean| of a sample: how much its crop changes between the key frames."""
    return float((sample["target"] - sample["hr"].mean(0, keepdim=True)).abs().mean())


class _StepBatches(Sampler):
    """Batches of sample numbers for steps ``[start, stop)``: step ``s`` gets ``s*B .. s*B + B - 1``."""

    def __init__(self, start: int, stop: int, per_rank: int):
        self.start, self.stop, self.per_rank = start, stop, per_rank

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start, self.stop):
            yield list(range(s * self.per_rank, (s + 1) * self.per_rank))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# ============================================================================ validation


class Validator:
    """Fixed validation windows (the inference plan's), central crops, PSNR of non-key output frames."""

    def __init__(self, infos: Sequence[ArchiveInfo], cfg: ModelConfig, crop: int, n_windows: int):
        self.cfg = cfg
        self.sets: list[tuple[str, torch.Tensor, torch.Tensor, list[tuple[int, int, torch.Tensor]]]] = []
        names: dict[str, int] = {}
        s = cfg.scale
        for info in infos:
            name = info.name if info.name not in names else f"{info.name}#{names[info.name] + 1}"
            names[info.name] = names.get(info.name, 0) + 1
            keyset = set(info.hr_index)
            wins = [w for w in plan_windows(info.n_frames, info.hr_index, cfg.num_lr, cfg.head)
                    if any(t not in keyset for t, _ in w.emit)]
            if not wins:
                continue
            pick = sorted({int(round(i)) for i in np.linspace(0, len(wins) - 1, min(n_windows, len(wins)))})
            h, w = info.lr_shape
            ch, cw = (min(h, crop), min(w, crop)) if crop else (h, w)
            y0, x0 = (h - ch) // 2, (w - cw) // 2
            ys, xs = slice(y0, y0 + ch), slice(x0, x0 + cw)
            hys, hxs = slice(y0 * s, (y0 + ch) * s), slice(x0 * s, (x0 + cw) * s)
            lrs, hrs, targets, times = [], [], [], []
            with Archive(info.path) as arc:
                calib = Calibration(arc, Normalisation.from_dict(info.norm))
                for j, wi in enumerate(pick):
                    win = wins[wi]
                    lrs.append(calib.lr_to_model(arc.read_lr_at(list(win.frames)), frames=list(win.frames))[:, ys, xs])
                    hrs.append(np.stack([calib.hr_to_model(arc.read_hr(k))[hys, hxs] for k in win.keys]))
                    t0, t1 = (int(info.hr_index[k]) for k in win.keys)
                    times.append([time_weight(t, t0, t1) for t in win.frames])
                    for t, slot in win.emit:
                        if t in keyset:
                            continue
                        gt = calib.hr_to_model(arc.read_gt(t, t + 1)[0])[hys, hxs]
                        targets.append((j, slot if cfg.head == "all" else 0, torch.from_numpy(gt)))
            lr = torch.from_numpy(np.stack(lrs))[:, :, None]
            hr = torch.from_numpy(np.stack(hrs))[:, :, None]
            self.sets.append((name, lr, hr, targets, torch.tensor(times, dtype=torch.float32)))

    def __bool__(self) -> bool:
        return bool(self.sets)

    @torch.no_grad()
    def evaluate(self, model: SwinXVR, device: torch.device, autocast: bool, batch: int) -> dict[str, Any]:
        """{"per_archive": {name: PSNR dB}, "mean": mean over archives} (model space, data range 1)."""
        was_training = model.training
        model.eval()
        per: dict[str, float] = {}
        try:
            for name, lr, hr, targets, times in self.sets:
                outs = []
                for b0 in range(0, lr.shape[0], max(1, batch)):
                    with _autocast(device, autocast):
                        y = model(lr[b0:b0 + batch].to(device), hr[b0:b0 + batch].to(device),
                                  times[b0:b0 + batch].to(device))
                    outs.append(y.float().cpu())
                out = torch.cat(outs)[:, :, 0]  # V, n_out, H, W
                psnrs = []
                for j, slot, gt in targets:
                    mse = float(torch.mean((out[j, slot] - gt) ** 2))
                    psnrs.append(10.0 * math.log10(1.0 / max(mse, 1e-12)))
                per[name] = float(np.mean(psnrs))
        finally:
            model.train(was_training)
        return {"per_archive": per, "mean": float(np.mean(list(per.values()))) if per else None}


# ============================================================================ helpers


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as plain containers and tensors (``weights_only``-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(pystate, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.random.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _params_sha(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _ema_update(ema: SwinXVR, model: SwinXVR, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _load_network_g(source: str | Mapping[str, Any]) -> dict[str, Any]:
    """The reference's ``network_g`` block from a dict, or a YAML/JSON file (block or full options file)."""
    if isinstance(source, Mapping):
        g = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise UserError(f"{path}: network_g file not found; pass the XFusion options YAML (or its "
                            "network_g block as YAML/JSON)")
        try:
            text = Path(path).read_text()
            if path.endswith(".json"):
                g = json.loads(text)
            else:
                import yaml

                g = yaml.safe_load(text)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
            raise UserError(f"{path}: cannot parse the network_g file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
        if not isinstance(g, Mapping):
            raise UserError(f"{path}: network_g must be a mapping of the reference's constructor arguments")
        g = dict(g)
    if "network_g" in g:
        g = g["network_g"]
        if not isinstance(g, Mapping):
            raise UserError("network_g must be a mapping of the reference's constructor arguments")
        g = dict(g)
    return g


def _build_model(opts: TrainOptions, log: Callable[[str], None]) -> tuple[SwinXVR, dict[str, Any] | None]:
    """The model to train: from a preset (seeded init), or from ``init`` weights. Returns (model, init info)."""
    overrides: dict[str, Any] = {"head": opts.head}
    if opts.num_lr is not None:
        overrides["num_lr"] = opts.num_lr
    if opts.drop_path is not None:
        overrides["drop_path"] = opts.drop_path
    if opts.time_cond is not None:
        overrides["time_cond"] = bool(opts.time_cond)
    torch.manual_seed(opts.seed)
    if not opts.init:
        return SwinXVR(preset(opts.preset, **overrides)), None
    path = os.fspath(opts.init)
    if opts.xfusion_network_g is not None:
        g = _load_network_g(opts.xfusion_network_g)
        src = from_xfusion(path, g, head=opts.head)
        kind = "xfusion"
    else:
        ckpt = read_untrusted(path)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            if isinstance(ckpt, dict) and ("params" in ckpt or "params_ema" in ckpt):
                raise UserError(f"{path}: looks like an XFusion checkpoint; pass its network_g too "
                                "(--xfusion-network-g OPTIONS.yml)")
            raise UserError(f"{path}: not an xvr_batch checkpoint; init needs our checkpoint or an XFusion "
                            ".pth with its network_g")
        src, _ = load_checkpoint(ckpt, ema=True)
        kind = "xvr_batch"
    cfg = src.cfg.replace(**overrides)
    if src.cfg.time_cond and not cfg.time_cond:
        raise UserError(f"{path}: these weights use time conditioning; leave time_cond unset or true")
    if cfg.time_cond:  # new terms start at zero: the init network unchanged
        src = with_time_cond(src)
    model = SwinXVR(cfg)
    load_state_dict_strict(model, src.state_dict(), f"{path} (init)")
    log(f"init: {kind} weights from {path} ({cfg.embed_dim}-wide, depths {list(cfg.depths)}, NL={cfg.num_lr}, "
        f"head {cfg.head})")
    return model, {"path": os.path.abspath(path), "kind": kind, "sha256": sha256_file(path)}


#: Options that change the trajectory of a run; a resume with other values is not the run it continues.
_TRAJECTORY_OPTIONS = ("batch", "crop", "seed", "loss", "lr", "betas", "eta_min", "time_lr_mult", "ema",
                       "key_jitter", "p_jitter", "dose_range", "p_noise", "flips", "p_motion", "motion_tries")


def _warn_resume_drift(ckpt: Mapping[str, Any], opts: TrainOptions, infos: Sequence[ArchiveInfo],
                       log: Callable[[str], None]) -> None:
    """Log what differs between the checkpoint's run and this one (the resume then is not exact)."""
    before = ckpt.get("train_options") or {}
    now = opts.to_dict()
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in _TRAJECTORY_OPTIONS if k in before and before[k] != now[k]]
    old_data = [d.get("fingerprint") for d in (ckpt.get("meta") or {}).get("data", [])]
    if old_data and old_data != [i.fingerprint for i in infos]:
        changed.append("the training archives (content or order)")
    if changed:
        log("resume: warning: changed since the checkpoint: " + "; ".join(changed)
            + "; training continues, but not exactly as the original run would have")


def _hardware(device: torch.device, world_size: int) -> dict[str, Any]:
    hw: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                          "python": platform.python_version(), "torch": str(torch.__version__), "device": str(device),
                          "world_size": int(world_size), "cpu_threads": int(torch.get_num_threads())}
    if device.type == "cuda":
        hw["device_name"] = torch.cuda.get_device_name(device)
    return hw


# ============================================================================ training


def run_training(opts: TrainOptions, log: Callable[[str], None] = print, *, samples: Any = None,
                 validator: Any = None, meta_extra: Mapping[str, Any] | None = None) -> str:
    """Train (or fine-tune, or resume) as ``opts`` says; return the path of the checkpoint written last
    (``opts.out``, or ``<out>.last.pt`` when ``stop_at`` ended the run early).

    Hooks for other sample sources (``xvr_batch.finetune``), all optional; without them nothing changes:

    ``samples``
        Replaces the dense-truth samples of ``opts.archives``. An object with ``infos`` (a list of
        :class:`ArchiveInfo`, for the checks, the resume drift check and ``meta["data"]``) and
        ``dataset(cfg, opts, rank, length)`` -> a map-style dataset with ``close()`` whose sample ``g`` is a
        pure function of ``(opts.seed, rank, g)`` (exact resume). A sample may carry ``"slot"`` (a long
        scalar): the loss then only reads that output slot, and ``"target"`` is ``(1, 1, H, W)``.
    ``validator``
        Replaces :class:`Validator` (rank 0 only): ``bool(validator)`` and
        ``evaluate(model, device, autocast, batch) -> {"mean": float, "per_archive": {...}, "label": str}``.
    ``meta_extra``
        Merged into every checkpoint's ``meta``.
    """
    _check_options(opts)
    dist_env = detect_dist_env()
    opts = _auto_resume(opts, log if dist_env.is_main else (lambda _msg: None))
    device = _resolve_device(opts, dist_env)
    distributed = dist_env.world_size > 1
    if opts.batch % dist_env.world_size:
        raise UserError(f"batch {opts.batch} is the global batch and must be divisible by the number of "
                        f"processes ({dist_env.world_size})")
    if distributed:
        _init_process_group(dist_env, device)
    try:
        with _StopSignals() as stop:
            return _train(opts, dist_env, device, log if dist_env.is_main else (lambda _msg: None), stop.flag,
                          samples=samples, validator_hook=validator, meta_extra=meta_extra)
    finally:
        if distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(opts: TrainOptions, dist_env: DistEnv, device: torch.device, log: Callable[[str], None],
           stop_flag: Callable[[], bool] = lambda: False, samples: Any = None, validator_hook: Any = None,
           meta_extra: Mapping[str, Any] | None = None) -> str:
    import torch.distributed as dist

    distributed = dist_env.world_size > 1
    t_start = time.time()
    log_outer = log
    out = os.fspath(opts.out)
    last_path = last_checkpoint_path(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    if dist_env.is_main:
        os.makedirs(out_dir, exist_ok=True)
    debug = opts.debug_report or os.environ.get(DEBUG_ENV, "") not in ("", "0")

    # ---------------------------------------------------------------- model, optimizer, resume state
    resume_ckpt: dict[str, Any] | None = None
    if opts.resume:
        resume_ckpt = read_untrusted(opts.resume)
        if not isinstance(resume_ckpt, dict) or resume_ckpt.get("format") != FORMAT:
            raise UserError(f"{opts.resume}: not an xvr_batch checkpoint")
        missing = [k for k in ("optimizer", "scheduler", "step", "params_ema", "rng") if k not in resume_ckpt]
        if missing:
            raise UserError(f"{opts.resume}: not a training checkpoint (no {', '.join(missing)}); "
                            "use init to fine-tune from plain weights")
        recorded = (resume_ckpt.get("train_options") or {}).get("steps")
        if recorded is not None and int(recorded) != opts.steps:
            raise UserError(f"{opts.resume}: was trained with steps={recorded}, not {opts.steps}; resume continues "
                            "the same schedule, so pass the same steps (or use init for a new schedule)")
        if opts.init:
            log(f"resume: ignoring init={opts.init} (the weights come from {opts.resume})")
        cfg = ModelConfig.from_dict(resume_ckpt["config"])
        model = SwinXVR(cfg)
        load_state_dict_strict(model, resume_ckpt["params"], f"{opts.resume} [params]")
        init_info = (resume_ckpt.get("meta") or {}).get("init")
    else:
        model, init_info = _build_model(opts, log)
        cfg = model.cfg
    ema_model = SwinXVR(cfg)
    ema_model.load_state_dict(model.state_dict())
    if resume_ckpt is not None:
        load_state_dict_strict(ema_model, resume_ckpt["params_ema"], f"{opts.resume} [params_ema]")
    model.to(device).train()
    ema_model.to(device).eval()
    for p in ema_model.parameters():
        p.requires_grad_(False)

    # ModelConfig.time_cond's parameters may start at zero, so a larger step
    groups = [{"params": [p for n, p in model.named_parameters() if n not in TIME_PARAMS]}]
    timed = [p for n, p in model.named_parameters() if n in TIME_PARAMS]
    if timed:
        groups.append({"params": timed, "lr": opts.lr * opts.time_lr_mult})
    optimizer = torch.optim.Adam(groups, lr=opts.lr, betas=tuple(opts.betas))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=opts.steps, eta_min=opts.eta_min)
    start_step = 0
    prev_meta: dict[str, Any] = {}
    if resume_ckpt is not None:
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        start_step = int(resume_ckpt["step"])
        prev_meta = dict(resume_ckpt.get("meta") or {})
        if start_step > opts.steps:
            raise UserError(f"{opts.resume}: is at step {start_step}, beyond steps={opts.steps}")
        log(f"resume: {opts.resume} at step {start_step}/{opts.steps}")

    # ---------------------------------------------------------------- data
    if samples is None:
        infos = [_inspect_archive(p, "training", cfg.scale) for p in opts.archives]
    else:  # another sample source (xvr_batch.finetune): it checked its own archives
        infos = list(samples.infos)
    val_infos = [_inspect_archive(p, "validation", cfg.scale) for p in opts.val_archives]
    small = [i for i in infos if min(i.lr_shape) < opts.crop]
    if small:
        i = small[0]
        raise UserError(f"{i.path}: crop {opts.crop} is larger than the LR frames {i.lr_shape[0]}x{i.lr_shape[1]}; "
                        "use a smaller crop")
    short = [i for i in infos if i.n_frames < cfg.num_lr]
    if short:
        raise UserError(f"{short[0].path}: has {short[0].n_frames} frames, fewer than the window of "
                        f"{cfg.num_lr} LR frames")
    if resume_ckpt is not None:
        _warn_resume_drift(resume_ckpt, opts, infos, log)
    per_rank = opts.batch // dist_env.world_size
    stop = opts.steps if opts.stop_at is None else min(opts.steps, opts.stop_at)
    if samples is None:
        dataset = TrainSamples(infos, cfg.num_lr, cfg.head, opts.crop, cfg.scale, opts.seed, dist_env.rank,
                               opts.key_jitter, opts.p_jitter, opts.dose_range, opts.p_noise, opts.flips,
                               length=opts.steps * per_rank, p_motion=opts.p_motion, motion_tries=opts.motion_tries)
    else:
        dataset = samples.dataset(cfg, opts, dist_env.rank, opts.steps * per_rank)
    loader = DataLoader(dataset, batch_sampler=_StepBatches(start_step, stop, per_rank),
                        num_workers=opts.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, generator=torch.Generator().manual_seed(opts.seed))
    validator = Validator(val_infos, cfg, opts.val_crop, opts.val_windows) if (val_infos and dist_env.is_main) else None
    if validator_hook is not None:
        validator = validator_hook if dist_env.is_main else None

    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {n_params / 1e6:.3f} M parameters ({cfg.embed_dim}-wide, depths {list(cfg.depths)}, "
        f"NL={cfg.num_lr}, head {cfg.head}, drop_path {cfg.drop_path}) on {device}"
        f"{f' x {dist_env.world_size} processes ({dist_env.launcher})' if distributed else ''}; "
        f"{len(infos)} training archives, {len(val_infos)} validation; batch {opts.batch}"
        f"{f' ({per_rank} per process)' if distributed else ''}, crop {opts.crop} LR / {opts.crop * cfg.scale} HR, "
        f"steps {start_step}->{stop} of {opts.steps}")

    train_model: torch.nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---------------------------------------------------------------- RNG for stochastic depth
    if resume_ckpt is not None:
        rng = resume_ckpt["rng"]
        if int(rng.get("world_size", 1)) == dist_env.world_size:
            _set_rng_state(rng["ranks"][dist_env.rank], device)
        else:
            log(f"resume: the checkpoint was written by {rng.get('world_size')} processes, this run has "
                f"{dist_env.world_size}; RNG states are re-seeded, so the continuation is not bit-exact")
            torch.manual_seed(_derived_seed(opts.seed, dist_env.rank, start_step))
    else:
        torch.manual_seed(_derived_seed(opts.seed, dist_env.rank))
        np.random.seed(_derived_seed(opts.seed, dist_env.rank, 1) % 2**32)
        random.seed(_derived_seed(opts.seed, dist_env.rank, 2))

    # ---------------------------------------------------------------- bookkeeping
    loss_log: list[list[float]] = [list(x) for x in prev_meta.get("loss_log", [])]
    val_log: list[list[Any]] = [list(x) for x in prev_meta.get("val_log", [])]
    resumed_from = list(prev_meta.get("resumed_from", []))
    if resume_ckpt is not None:
        resumed_from.append({"path": os.path.abspath(opts.resume), "step": start_step})
    wall_before = float(prev_meta.get("wall_time_s", 0.0))
    checkpoints_written = 0
    last_val: dict[str, Any] | None = prev_meta.get("last_val")
    use_bf16 = opts.bf16 and device.type == "cuda"

    def meta(step: int, final_val: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "kind": "training", "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "recipe": {"loss": LOSS_NAMES[opts.loss], "optimizer": "Adam", "lr": opts.lr, "betas": list(opts.betas),
                       "scheduler": "CosineAnnealingLR", "eta_min": opts.eta_min, "ema": opts.ema,
                       "ema_warmup": "decay_n = min(ema, (1 + n) / (10 + n))", "drop_path": cfg.drop_path,
                       "crop_lr": opts.crop, "batch": opts.batch, "key_jitter": opts.key_jitter,
                       "p_jitter": opts.p_jitter, "dose_range": list(opts.dose_range), "p_noise": opts.p_noise,
                       "p_motion": opts.p_motion, "motion_tries": opts.motion_tries,
                       "flips": opts.flips, "precision": "bf16" if use_bf16 else "fp32"},
            "data": [i.describe() for i in infos],
            "val_data": [i.describe() for i in val_infos],
            "normalisation": {i.name: dict(i.norm) for i in infos},
            "steps": opts.steps, "step": step, "samples_seen": step * opts.batch,
            "wall_time_s": wall_before + (time.time() - t_start),
            "hardware": _hardware(device, dist_env.world_size),
            "final_val_psnr": final_val,
            "last_val": last_val,
            "val_log": val_log, "loss_log": loss_log,
            "init": init_info, "resumed_from": resumed_from,
            "train_options": opts.to_dict(),
            **dict(meta_extra or {}),
        }

    def gather_rng() -> dict[str, Any]:
        mine = _rng_state(device)
        if not distributed:
            return {"world_size": 1, "ranks": [mine]}
        every: list[Any] = [None] * dist_env.world_size
        dist.all_gather_object(every, mine)
        return {"world_size": dist_env.world_size, "ranks": every}

    def write(path: str, step: int, final_val: dict[str, Any] | None, slim: bool = False) -> None:
        nonlocal checkpoints_written
        rng_all = None if slim else gather_rng()  # collective: every rank takes part
        if not dist_env.is_main:
            return
        extra: dict[str, Any] = {"train_options": opts.to_dict(), "step": step}
        if not slim:
            extra.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_all)
        save_checkpoint(path, model, params_ema=ema_model.state_dict(), meta=meta(step, final_val), extra=extra)
        checkpoints_written += 1

    def stop_requested() -> bool:
        """Whether any rank was asked to stop; a collective when distributed, so all agree on the step."""
        if not distributed:
            return stop_flag()
        flag = torch.tensor([1.0 if stop_flag() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def validate(step: int) -> dict[str, Any] | None:
        nonlocal last_val
        if validator is None or not validator:
            return None
        res = validator.evaluate(ema_model, device, use_bf16, per_rank)
        res["step"] = step
        last_val = res
        val_log.append([step, res["mean"]])
        per = ", ".join(f"{k} {v:.2f}" for k, v in res["per_archive"].items())
        label = res.get("label", "validation PSNR (EMA, model space)")
        log(f"step {step}: {label} {res['mean']:.3f} dB [{per}]")
        return res

    # ---------------------------------------------------------------- loop
    bar = None
    if opts.progress and dist_env.is_main and stop > start_step:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, disable=None)  # None: no bar when stderr is not a terminal
        if log is print:  # keep log lines and the progress bar from overwriting each other
            log = lambda msg: tqdm.write(msg, file=sys.stdout)  # noqa: E731
    interval_sum, interval_n = 0.0, 0
    t_interval = time.time()
    step = start_step
    stopped = False
    try:
        for batch in loader:
            step += 1
            lr_in = batch["lr"].to(device, non_blocking=True)
            hr_in = batch["hr"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            times = batch["times"].to(device, non_blocking=True) if "times" in batch else None
            with _autocast(device, use_bf16):
                pred = train_model(lr_in, hr_in, times)
            if "slot" in batch:  # one target slot per sample (a sample source such as xvr_batch.finetune)
                slot = batch["slot"].to(device).reshape(-1)
                pred = pred[torch.arange(pred.shape[0], device=device), slot][:, None]
            loss = frame_psnr_loss(pred.float(), target) if opts.loss == "psnr" else F.l1_loss(pred.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            _ema_update(ema_model, model, min(opts.ema, (1.0 + step) / (10.0 + step)))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise UserError(f"the loss became {value} at step {step}; lower the learning rate (lr={opts.lr})")
            interval_sum += value
            interval_n += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{interval_sum / interval_n:.4f}", refresh=False)
            if step % opts.log_every == 0 or step == stop:
                tot = torch.tensor([interval_sum, float(interval_n)], dtype=torch.float64)
                if distributed:
                    tot = tot.to(device)
                    dist.all_reduce(tot)
                    tot = tot.cpu()
                mean = float(tot[0] / tot[1])
                loss_log.append([step, mean])
                dt = (time.time() - t_interval) / max(1, interval_n)
                log(f"step {step}/{opts.steps}: loss {mean:.5f}, lr {scheduler.get_last_lr()[0]:.3e}, "
                    f"{dt:.3f} s/step")
                interval_sum, interval_n, t_interval = 0.0, 0, time.time()
            if opts.val_every and step % opts.val_every == 0 and step < opts.steps:
                validate(step)
            if opts.ckpt_every and step % opts.ckpt_every == 0 and step < stop:
                write(last_path, step, None)
            if step < stop and stop_requested():
                stopped = True
                break
    finally:
        if bar is not None:
            bar.close()
            log = log_outer
        dataset.close()

    # ---------------------------------------------------------------- the end
    if stopped:  # on request (SIGUSR2/SIGTERM): the exact-resume checkpoint, then a status-75 stop
        write(last_path, step, None)
        log(f"stopped on request at step {step}/{opts.steps}; wrote {last_path}; run the same command to continue")
        from xvr_batch.slurm.stopmark import record_stopped

        record_stopped()
        if distributed:
            dist.barrier()
        raise TrainingStopped(step, opts.steps, last_path)
    if step < opts.steps:  # stopped early: an intermediate checkpoint to resume from
        write(last_path, step, None)
        log(f"stopped at step {step}/{opts.steps}; resume with resume={last_path}")
        result = last_path
    else:
        final_val = validate(step)
        write(out, step, final_val, slim=opts.slim)
        if dist_env.is_main and os.path.exists(last_path):
            os.remove(last_path)
        msg = f" (validation PSNR {final_val['mean']:.3f} dB)" if final_val else ""
        log(f"wrote {out} after {step} steps, {wall_before + time.time() - t_start:.1f} s{msg}")
        result = out
    if debug:
        report = {"rank": dist_env.rank, "world_size": dist_env.world_size, "step": step,
                  "params_sha256": _params_sha(model.state_dict()),
                  "params_ema_sha256": _params_sha(ema_model.state_dict()),
                  "param_sum": float(sum(p.detach().double().sum() for p in model.parameters())),
                  "checkpoints_written": checkpoints_written}
        Path(f"{out}.rank{dist_env.rank}.json").write_text(json.dumps(report, indent=1))
    if distributed:
        dist.barrier()
    return result


# ============================================================================ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xvr_batch.train",
                                description="Train or fine-tune SWIN-XVR on archives with /exchange/data_gt. "
                                            "Options come from --json FILE, then from the flags.")
    p.add_argument("--json", metavar="FILE", help="a JSON object of TrainOptions fields")
    for f in dataclasses.fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        if f.name in ("archives", "val_archives"):
            p.add_argument(flag, nargs="+", default=None)
        elif f.name in _TUPLE_FIELDS:
            p.add_argument(flag, nargs=_TUPLE_FIELDS[f.name], type=float, default=None)
        elif ann in ("bool", "bool | None"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif ann.startswith("int"):
            p.add_argument(flag, type=int, default=None)
        elif ann.startswith("float"):
            p.add_argument(flag, type=float, default=None)
        else:
            p.add_argument(flag, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: returns the exit status (2 for a UserError, printed as one line)."""
    args = _parser().parse_args(argv)
    try:
        d: dict[str, Any] = {}
        if args.json:
            try:
                d = json.loads(Path(args.json).read_text())
            except FileNotFoundError:
                raise UserError(f"{args.json}: options file not found") from None
            except (OSError, ValueError) as exc:
                raise UserError(f"{args.json}: not a readable JSON file ({exc})") from None
            if not isinstance(d, dict):
                raise UserError(f"{args.json}: must hold a JSON object of training options")
        for f in dataclasses.fields(TrainOptions):
            v = getattr(args, f.name)
            if v is not None:
                d[f.name] = v
        run_training(options_from_dict(d))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return TrainingStopped.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
