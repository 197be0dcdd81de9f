"""The unit engine: plan, run one unit, finalise. Every backend shares it; it knows no backend.

``prepare()`` opens and validates the archive, fits the normalisation once, plans windows and units and
creates (or checks, to resume) the work directory. It returns a :class:`Job`: plain, picklable data that
any process can turn back into a :class:`UnitRunner`. ``UnitRunner.run_unit()`` computes one unit and
writes its part; it is the same code for every backend. ``finalise()`` stitches the verified parts into
the output under a temporary name and renames it. :mod:`xvr_batch.driver` puts them together.
"""

from __future__ import annotations


import os
import queue
import shutil
import sys
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from xvr_batch import __version__
from xvr_batch.errors import UserError
from xvr_batch.io.archive import Archive, ArchivePaths
from xvr_batch.io.output import stitch_output
from xvr_batch.io.parts import StreamingPart
from xvr_batch.model.tiling import tiled_run
from xvr_batch.normalise import Calibration, Normalisation, fit_normalisation, time_weight
from xvr_batch.plan import Plan, Unit, batch_windows, make_plan
from xvr_batch.weights import ResolvedWeights, resolve_weights
from xvr_batch.consistency import PART_DATASET as CONSISTENCY_DATASET, check_record as check_consistency_record
from xvr_batch.workdir import MANIFEST_VERSION, WorkDir

__all__ = ["Options", "Job", "prepare", "UnitRunner", "finalise", "pending_units", "output_affecting",
           "check_output_target", "disk_error"]

DTYPES = ("float32", "uint16")


@dataclass
class Options:
    """Everything ``xvr-batch reconstruct`` accepts (flags and config keys share these names)."""

    archive: str
    output: str
    weights: str | None = None
    unit_frames: int = 128
    workdir: str | None = None
    device: str = "auto"
    batch: int = 4
    tile: int | None = None
    tile_overlap: int | None = None
    dtype: str = "float32"
    compression: str = "bitshuffle"
    precision: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    force_replan: bool = False
    keep_workdir: bool = False
    lr: str | None = None
    hr: str | None = None
    hr_index: str | None = None
    hr_stride: int | None = None
    hr_offset: int = 0
    prefetch: int = 2
    wait_for_writer: float | None = None
    registration: str = "auto"  # auto | none | FILE.json (xvr_batch.registration)
    attention: str = "sdpa"  # sdpa | flex (xvr_batch.model.attention)
    compile: bool = False
    refine: str = "lr"  # lr | none (xvr_batch.refine)
    #: single | virtual (xvr_batch.io.vds): how finalise writes the output; not in output_affecting (the frames
    #: are the same), and `xvr-batch compact` turns a virtual output into the single file later
    layout: str = "single"

    def __post_init__(self) -> None:
        from xvr_batch.io.vds import check_layout
        check_layout(self.layout)

    def archive_paths(self) -> ArchivePaths:
        base = ArchivePaths()
        return ArchivePaths(lr=self.lr or base.lr, hr=self.hr or base.hr, hr_index=self.hr_index or base.hr_index)

    def resolved_workdir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.output) + ".xvr")

    @classmethod
    def from_record(cls, record: Any, where: str) -> "Options":
        """Options read back from a manifest (``resume``): every field type-checked, unknown keys ignored."""
        import typing

        if not isinstance(record, dict):
            raise UserError(f"{where}: the recorded options are not an object; re-run the original reconstruct "
                            "command")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in record:
                if f.default is MISSING:
                    raise UserError(f"{where}: the recorded options lack {f.name!r}; re-run the original "
                                    "reconstruct command")
                continue
            value, kinds = record[f.name], typing.get_args(hints[f.name]) or (hints[f.name],)
            ok = any(value is None if k is type(None) else
                     (isinstance(value, k) and not (k in (int, float) and isinstance(value, bool))
                      or (k is float and isinstance(value, int) and not isinstance(value, bool)))
                     for k in kinds)
            if not ok:
                raise UserError(f"{where}: recorded option {f.name!r} is {value!r:.60}, not "
                                f"{' or '.join(getattr(k, '__name__', str(k)) for k in kinds)}; the manifest was "
                                "edited or is corrupt")
            values[f.name] = value
        return cls(**values)

    def absolute(self) -> "Options":
        """A copy whose archive, output, work directory and weights file are absolute paths, so that the
        manifest means the same from any folder (``resume`` may run elsewhere)."""
        def abspath(p: str) -> str:
            return os.path.abspath(os.path.expanduser(p))

        weights = self.weights
        if weights and (os.sep in weights or Path(weights).exists()):  # a file, not a shipped name
            weights = abspath(weights)
        return replace(self, archive=abspath(self.archive), output=abspath(self.output),
                       workdir=abspath(str(self.resolved_workdir())), weights=weights)


def output_affecting(opts: Options, device_type: str, precision: str) -> dict:
    """The settings that change output bytes; their hash guards resume against a mix of settings."""
    from xvr_batch.refine import REFINE_STEPS

    return {"batch": opts.batch, "tile": opts.tile, "tile_overlap": opts.tile_overlap, "dtype": opts.dtype,
            "device_type": device_type, "precision": precision, "unit_frames": opts.unit_frames,
            "attention": opts.attention, "compile": bool(opts.compile), "refine": opts.refine,
            "refine_steps": list(REFINE_STEPS) if opts.refine == "lr" else []}


def _hash(obj: Any) -> str:
    from xvr_batch.durable import canonical_hash
    return canonical_hash(obj)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"--device {device!r}: choose cpu, cuda, cuda:N or auto")
    return device


def resolve_precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16", "tf32"):
        raise UserError(f"--precision {precision!r}: choose fp32, tf32, bf16 or auto")
    if precision in ("bf16", "tf32") and not device.startswith("cuda"):
        raise UserError(f"--precision {precision} needs a CUDA device; use fp32 on the CPU")
    return precision


@dataclass
class Job:
    """Plain, picklable description of a planned run: every worker rebuilds its state from it."""

    archive: str
    paths: dict
    hr_stride: int | None
    hr_offset: int
    output: str
    workdir: str
    weights: dict
    normalisation: dict
    plan_args: dict
    settings: dict
    compression: str
    keep_workdir: bool
    command: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    fingerprint: str = ""
    threads: int | None = None
    prefetch: int = 2
    device: str = "cpu"
    hr_shape: tuple[int, int] | list[int] = (0, 0)
    config_hash: str = ""
    #: The per-frame LR consistency baseline (sigma, threshold; :func:`xvr_batch.consistency.fit_baseline`),
    #: fitted at plan time and kept in the manifest, like the normalisation.
    consistency: dict = field(default_factory=dict)

    def open_archive(self) -> Archive:
        """A new read-only handle on the input archive (the caller closes it)."""
        return Archive(self.archive, ArchivePaths.from_dict(self.paths), self.hr_stride, self.hr_offset)

    def archive_handle(self) -> Archive:
        """This process's one handle on the input archive (the one :func:`prepare` validated, or a new one);
        :meth:`close` closes it."""
        arc = self.__dict__.get("_archive")
        if arc is None:
            arc = self.__dict__["_archive"] = self.open_archive()
        return arc

    def close(self) -> None:
        arc = self.__dict__.pop("_archive", None)
        if arc is not None:
            arc.close()

    def plan(self) -> Plan:
        """The plan, built once per process and job (it is a pure function of ``plan_args``)."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = self.__dict__["_plan"] = make_plan(**self.plan_args)
        return plan

    def workdir_obj(self) -> WorkDir:
        return WorkDir(self.workdir)

    def to_dict(self) -> dict:
        return asdict(self)


def pending_units(job: Job) -> list[Unit]:
    """Units that have no verified part yet (missing or corrupt parts are redone)."""
    done = job.workdir_obj().completed_units(verify=True)
    return [u for u in job.plan().units if u.id not in done]


def check_output_target(opts: Options) -> None:
    """Refuse an output that cannot be written (a folder, a missing or read-only folder, an existing file
    without ``--overwrite``, the input itself)."""
    out = Path(opts.output)
    parent = out.parent if str(out.parent) else Path(".")
    if out.exists() and out.is_dir():
        raise UserError(f"{out}: output path is a directory; give a file name such as {out / 'recon.h5'}")
    if not parent.exists():
        raise UserError(f"{out}: output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{out}: output folder {parent} is not writable; choose another -o")
    if out.exists() and not opts.overwrite:
        raise UserError(f"{out}: output already exists; pass --overwrite to replace it or choose another -o")
    if Path(opts.archive).resolve() == out.resolve():
        raise UserError(f"{out}: the output would overwrite the input archive; choose another -o")
    parts = Path(str(out) + ".parts")
    if getattr(opts, "layout", "single") == "virtual" and parts.exists() and not opts.overwrite:
        raise UserError(f"{parts}: the parts folder of an earlier virtual output is in the way; pass --overwrite "
                        "or choose another -o")


def _describe_change(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unknown"




def _manifest_job(wd: WorkDir, man: dict) -> dict:
    job = man.get("job")
    if not isinstance(job, dict):
        raise UserError(f"{wd.manifest_path}: no job record (written by another version of xvr_batch?); "
                        "pass --force-replan to start over")
    return job


def _check_resumable(wd: WorkDir, man: dict, job: Job, plan: Plan, weights_source: str) -> dict:
    """Refuse to resume a work directory planned for another input, weights, settings or plan; return the
    recorded job."""
    old = _manifest_job(wd, man)
    again = "pass --force-replan to start over"
    if old.get("fingerprint") != job.fingerprint:
        raise UserError(f"{wd.path}: the input archive changed since this work directory was planned "
                        f"(fingerprint {str(old.get('fingerprint'))[:12]} -> {job.fingerprint[:12]}); {again}")
    old_sha = (old.get("weights") or {}).get("sha256") if isinstance(old.get("weights"), dict) else None
    if old_sha != job.weights["sha256"]:
        old_src = old["weights"].get("source") if isinstance(old.get("weights"), dict) else None
        raise UserError(f"{wd.path}: the weights changed since this work directory was planned "
                        f"({old_src} sha256 {str(old_sha)[:12]} -> {weights_source} "
                        f"{job.weights['sha256'][:12]}); {again}")
    if old.get("config_hash") != job.config_hash:
        settings = old.get("settings") if isinstance(old.get("settings"), dict) else {}
        raise UserError(f"{wd.path}: the settings changed since this work directory was planned "
                        f"({_describe_change(settings, job.settings)}); {again}")
    if man.get("plan") != plan.to_dict() or old.get("plan_args") != job.plan_args:
        raise UserError(f"{wd.manifest_path}: the recorded plan differs from the plan of these settings "
                        f"(the manifest was edited or is corrupt); {again}")
    return old


def prepare(opts: Options, command: list[str] | None = None, config: dict | None = None,
            log: Callable[[str], None] = lambda s: None, locked: bool = False) -> Job:
    """Validate, fit, plan and create or check the work directory. Writes nothing but the workdir.

    The manifest it writes is ``{version, tool_version, created, job, plan, options}``: the :class:`Job`
    (everything a worker needs, input fingerprint, weights and settings hashes, normalisation), the plan
    (for ``status`` and as a check on resume) and the options as given (absolute paths, for ``resume``)."""
    opts = opts.absolute()
    if opts.dtype not in DTYPES:
        raise UserError(f"--dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")
    for name in ("unit_frames", "batch", "prefetch"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    from xvr_batch.io.output import check_compression
    check_compression(opts.compression)
    check_output_target(opts)
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    weights = resolve_weights(opts.weights)
    cfg = weights.config
    if opts.tile is not None:
        overlap = opts.tile_overlap if opts.tile_overlap is not None else 2 * cfg.window
        if overlap < cfg.window:
            raise UserError(f"--tile-overlap {overlap} is smaller than one window ({cfg.window}); raise it")
        if opts.tile <= overlap:
            raise UserError(f"--tile {opts.tile} must be larger than the overlap ({overlap})")

    wd = WorkDir(opts.resolved_workdir())
    settings = output_affecting(opts, device.split(":")[0], precision)
    from xvr_batch.model.attention import ATTENTION_KINDS, kernel_identity
    if opts.attention not in ATTENTION_KINDS:
        raise UserError(f"--attention {opts.attention!r}: choose one of {', '.join(ATTENTION_KINDS)}")
    from xvr_batch.refine import REFINE_KINDS
    if opts.refine not in REFINE_KINDS:
        raise UserError(f"--refine {opts.refine!r}: choose one of {', '.join(REFINE_KINDS)}")
    # the kernels that run (attention, compile mode, GPU model, torch/CUDA): a resume never mixes parts of two
    settings["kernels"] = kernel_identity(None, device, attention=opts.attention, compile=opts.compile)
    arc = Archive(opts.archive, opts.archive_paths(), opts.hr_stride, opts.hr_offset,
                  wait_for_writer=opts.wait_for_writer)
    try:
        from xvr_batch.registration import resolve as resolve_registration
        rec = (_recorded_fit(wd, arc, log) if opts.registration in (None, "", "auto") and wd.exists()
               and not opts.force_replan and arc.registration is None else _NOT_RECORDED)
        if rec is _NOT_RECORDED:
            reg = resolve_registration(arc, opts.registration, log)
            rec = None if reg is None else reg.settings_record()
        if rec is not None:  # only then: an aligned archive keeps its settings hash and its bytes
            settings = dict(settings, registration=rec)
        if arc.scale != cfg.scale:
            raise UserError(f"{opts.archive}: HR/LR scale is {arc.scale}, but the model upsamples x{cfg.scale}")
        job = Job(
            archive=opts.archive, paths=opts.archive_paths().to_dict(), hr_stride=opts.hr_stride,
            hr_offset=opts.hr_offset, output=opts.output, workdir=str(wd.path), weights=weights.to_dict(),
            normalisation={}, settings=settings, compression=opts.compression, keep_workdir=opts.keep_workdir,
            plan_args=dict(n_frames=arc.n_frames, hr_index=[int(k) for k in arc.hr_index], num_lr=cfg.num_lr,
                           head=cfg.head, unit_frames=opts.unit_frames, batch=opts.batch),
            command=list(command or sys.argv), config=dict(config or {}), fingerprint=arc.fingerprint(),
            threads=opts.threads, prefetch=opts.prefetch, device=device, hr_shape=tuple(arc.hr_shape),
            config_hash=_hash({"settings": settings, "model": cfg.to_dict()}),
        )
        plan = job.plan()
        resume = wd.exists() and not opts.force_replan
        if wd.exists() and opts.force_replan:
            log(f"--force-replan: discarding the earlier plan and parts in {wd.path}")
        if resume:
            old = _check_resumable(wd, wd.read_manifest(), job, plan, weights.source)
            job.normalisation = Normalisation.from_dict(old.get("normalisation"),
                                                        source=str(wd.manifest_path)).to_dict()
            job.consistency = check_consistency_record(old.get("consistency")) or _fit_consistency(arc, job)
            log(f"resuming {wd.path}")
        else:
            log("checking the archive for NaN/Inf and fitting the intensity mapping ...")
            arc.check_finite()
            from xvr_batch.registration import registered
            job.normalisation = fit_normalisation(registered(arc, job.settings)).to_dict()
            job.consistency = _fit_consistency(arc, job)
    except BaseException:
        arc.close()
        raise
    job.__dict__["_archive"] = arc  # the UnitRunner of this process reads through the same handle
    if not resume:
        manifest = {
            "version": MANIFEST_VERSION, "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job": job.to_dict(), "plan": plan.to_dict(),
            "options": asdict(opts),
        }
        if locked:
            wd.create(manifest)
        else:
            with wd.lock():
                wd.create(manifest)
    return job


_NOT_RECORDED = object()


def _recorded_fit(wd: WorkDir, arc: Archive, log: Callable[[str], None]):
    """On resume with ``--registration auto`` and no transform stored in the archive: the transform the plan
    fitted (its settings record, or None for "read as it is"), if the manifest was planned with ``auto`` on this
    very archive (same fingerprint). The fit is a pure function of the archive, so fitting it again (about a
    second per run) would give the same record; anything unexpected falls back to fitting it again."""
    try:
        man = wd.read_manifest()
        job, options = man["job"], man["options"]
        if options.get("registration") not in (None, "", "auto") or job.get("fingerprint") != arc.fingerprint():
            return _NOT_RECORDED
        rec = job["settings"].get("registration")
        if rec is None:
            return None
        from xvr_batch.registration import Registration
        reg = Registration(rec["matrix"], rec["lr_shape"], rec["grid_shape"], source=str(rec.get("source", "")))
        if tuple(reg.lr_shape) != tuple(arc.lr_shape) or reg.settings_record() != rec:
            return _NOT_RECORDED
    except Exception:  # noqa: BLE001 - a damaged manifest is reported by _check_resumable, not here
        return _NOT_RECORDED
    log(f"registration (fitted when this run was planned): {reg.summary()}")
    return rec


def _fit_consistency(arc: Archive, job: Job) -> dict:
    """The LR consistency baseline of ``job`` (a pure function of the archive, registration and normalisation)."""
    from xvr_batch.consistency import fit_baseline
    from xvr_batch.registration import registered

    view = registered(arc, job.settings)
    return fit_baseline(view, Calibration(view, Normalisation.from_dict(job.normalisation)))


class UnitRunner:
    """Computes units of one job in one process: archive, calibration, model and key-frame cache."""

    def __init__(self, job: Job, device: str | None = None):
        self.job = job
        self.device = torch.device(device or job.device)
        if job.threads:
            torch.set_num_threads(job.threads)
        from xvr_batch.registration import registered
        # registered: the model works in the LR camera's frame (HR keys resampled into it), and each output
        # frame is resampled back onto the HR camera's pixels on the device (xvr_batch.registration)
        self.archive = registered(job.archive_handle(), job.settings)
        self.calib = Calibration(self.archive, Normalisation.from_dict(job.normalisation))
        #: counts of the output frames, in the HR camera's frame (its own darks and flats)
        self.calib_out = (self.calib if self.archive is job.archive_handle() else
                          Calibration(job.archive_handle(), Normalisation.from_dict(job.normalisation)))
        self._to_hr = getattr(self.archive, "to_hr", None)
        self.plan = job.plan()
        self.weights = ResolvedWeights.from_dict(job.weights)
        self.model = self.weights.load().to(self.device).eval()
        self.cfg = self.model.cfg
        self.settings = job.settings
        self.batch = self.plan.batch
        self.dtype = np.dtype(self.settings["dtype"])
        precision = self.settings["precision"]
        self.autocast = precision == "bf16"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        from xvr_batch.model.attention import kernel_identity
        self.model.set_attention(self.settings.get("attention", "sdpa"))
        self._features = (self.model.compiled_features() if self.settings.get("compile")
                          else self.model.forward_features)
        want = self.settings.get("kernels")
        here = kernel_identity(self.model, self.device, attention=self.settings.get("attention", "sdpa"),
                               compile=bool(self.settings.get("compile")))
        if want is not None and here != want:
            raise UserError(f"this worker's kernels {here} differ from the job's {want}: run every worker on the "
                            "same GPU model with the same torch and CUDA, or plan a new work directory")
        self._keys: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._key_cap = max(8, 2 * self.batch + 2)
        #: Seconds per stage (read, h2d, compute, d2h, convert, compress, write, commit), summed over units;
        #: convert/compress are summed over the codec threads. On CUDA, compute is the launch time and the
        #: wait for the GPU shows up in d2h.
        self.stats: dict[str, float] = {}
        self._stats_lock = threading.Lock()
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._codec_pool = None  # ThreadPoolExecutor, made on first use
        # Per-frame LR consistency (xvr_batch.consistency): sigma from the job; the LR field's mask when a
        # registration is applied; the LR slot of each output slot.
        base = check_consistency_record(job.consistency) or {}
        self._cons_sigma = base.get("sigma")
        self._cons_threshold = base.get("threshold")
        inside = getattr(self.archive, "lr_inside", None)
        self._cons_inside = (None if inside is None or np.asarray(inside).all() else
                             torch.from_numpy(np.asarray(inside, np.float32)).to(self.device))
        # registered: HR pixels the LR field does not cover take the key-frame blend
        self._fill = (None if self._to_hr is None or self._to_hr.inside.all() else
                      torch.from_numpy(~self._to_hr.inside).to(self.device))
        self._hr_index = [int(v) for v in job.plan_args["hr_index"]]
        self._cons_slots = list(range(self.cfg.num_lr)) if self.cfg.head == "all" else [self.cfg.num_lr // 2]
        # LR refinement (xvr_batch.refine) needs the archive's consistency sigma; a work directory planned before
        # it existed records no "refine" and resumes without it
        self._refine = self.settings.get("refine", "none") == "lr" and self._cons_sigma is not None
        from xvr_batch.refine import needs_denoise
        steps = self.settings.get("refine_steps", ["denoise", "residual"]) if self._refine else []
        self._denoise = "denoise" in steps and needs_denoise(self._cons_sigma)
        self._residual = "residual" in steps
        #: beam step, and the LR field's mask it measures in (registered archives; the reader thread's numpy copy)
        self._beam = "beam" in steps
        self._blind = self._beam and "blind" in steps
        self._motion = "motion" in steps
        #: step "psf": the motion step compares through the LR camera's transfer kernel (xvr_batch.lrpsf) and uses
        #: the residual it leaves as its noise level (a work directory planned without the step does not)
        self._kernel = (torch.tensor(base["kernel"], dtype=torch.float32, device=self.device)
                        if "psf" in steps and base.get("kernel") is not None else None)
        from xvr_batch.lrpsf import kernel_sigma
        self._motion_sigma = (self._cons_sigma if self._kernel is None else
                              kernel_sigma(self._cons_sigma, base["sigma_kernel"]))
        self._masks = self._beam or self._motion  # both read where the LR frames were measured
        self._beam_inside = None if inside is None or np.asarray(inside).all() else np.asarray(inside, bool)

    def _add(self, stage: str, seconds: float) -> None:
        with self._stats_lock:
            self.stats[stage] = self.stats.get(stage, 0.0) + seconds

    def _codec_workers(self) -> int:
        return max(1, min(4, self.job.threads or (os.cpu_count() or 1)))

    def _pool(self):
        if self._codec_pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._codec_pool = ThreadPoolExecutor(max_workers=self._codec_workers(), thread_name_prefix="xvr-codec")
        return self._codec_pool

    def close(self) -> None:
        if self._codec_pool is not None:
            self._codec_pool.shutdown(wait=True)
            self._codec_pool = None
        self.job.close()

    # ---------------------------------------------------------------- reading (prefetch thread)
    def _read_batch(self, b: int, hr_cache: OrderedDict) -> tuple:
        wins = batch_windows(self.plan.windows, b, self.batch)
        frames = sorted({f for w in wins for f in w.frames})
        pos = {f: i for i, f in enumerate(frames)}
        raw = self.archive.read_lr_at(frames)
        lr_all = self.calib.lr_to_model(raw, frames=frames)
        lr = np.stack([lr_all[[pos[f] for f in w.frames]] for w in wins])  # B, NL, h, w
        hr = {}  # key number -> model-space key frame (in the model's frame); ("native", k) -> the HR camera's;
        # beam step: "measured" -> (B, NL, h, w) bool, ("key_lr", k) -> the LR frame at key k's time and its mask
        if self._masks:
            ok_all = self.calib.lr_measured(raw, self._beam_inside)
            hr["measured"] = np.stack([ok_all[[pos[f] for f in w.frames]] for w in wins])
        for k in sorted({k for w in wins for k in w.keys}):
            if k not in hr_cache:
                hr_cache[k] = self.calib.hr_to_model(self.archive.read_hr(k))
                if self._fill is not None:
                    hr_cache[("native", k)] = self.calib_out.hr_to_model(self.archive.read_hr_native(k))
                while len(hr_cache) > self._key_cap * ((1 if self._fill is None else 2) + self._masks):
                    hr_cache.popitem(last=False)
            hr[k] = hr_cache[k]
            if self._fill is not None:
                hr[("native", k)] = hr_cache[("native", k)]
            if self._masks:
                if ("key_lr", k) not in hr_cache:
                    t = self._hr_index[k]
                    raw_k = self.archive.read_lr_at([t])
                    hr_cache[("key_lr", k)] = (self.calib.lr_to_model(raw_k, frames=[t])[0],
                                               self.calib.lr_measured(raw_k, self._beam_inside)[0])
                hr[("key_lr", k)] = hr_cache[("key_lr", k)]
        return b, wins, lr, hr

    def _prefetch(self, b0: int, b1: int) -> Iterator[tuple]:
        q: queue.Queue = queue.Queue(maxsize=self.job.prefetch)
        stop = threading.Event()

        def reader() -> None:
            cache: OrderedDict = OrderedDict()
            try:
                for b in range(b0, b1):
                    if stop.is_set():
                        return
                    t0 = time.perf_counter()
                    item = self._read_batch(b, cache)
                    self._add("read", time.perf_counter() - t0)
                    q.put(("ok", item))
            except BaseException as exc:  # handed to the consumer
                q.put(("err", exc))
            q.put(("end", None))

        t = threading.Thread(target=reader, name="xvr-reader", daemon=True)
        t.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "err":
                    raise item
                if kind == "end":
                    return
                yield item
        finally:
            stop.set()
            while t.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)

    # ---------------------------------------------------------------- compute
    def _key_feature(self, k: int, hr: np.ndarray, tile=None) -> torch.Tensor:
        key = (k, tile)
        feat = self._keys.get(key)
        if feat is None:
            s = self.cfg.scale
            img = hr if tile is None else hr[tile.y0 * s:tile.y1 * s, tile.x0 * s:tile.x1 * s]
            x = torch.from_numpy(np.ascontiguousarray(img)).to(self.device)[None, None, None]
            feat = self.model.encode_keys(x)[0, 0]  # E, h, w
            self._keys[key] = feat
            while len(self._keys) > self._key_cap * (1 if tile is None else 64):
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
        return feat

    def _key_pair(self, kind: str, keys: tuple[int, int], hr: dict) -> torch.Tensor:
        """(1, 1, H, W) ``model.key_base`` (``kind`` "base": the mean) or ``model.key_delta`` ("delta": the later
        minus the earlier) of a window's two key frames, cached per key pair."""
        key = (kind, keys)
        img = self._keys.get(key)
        if img is None:
            pair = np.stack([hr[keys[0]], hr[keys[1]]])[:, None]  # 2, 1, H, W
            fn = self.model.key_base if kind == "base" else self.model.key_delta
            img = self._keys[key] = fn(torch.from_numpy(pair).to(self.device)[None])[0]
        else:
            self._keys.move_to_end(key)
        return img

    def _key_binned(self, k: int, hr: dict) -> torch.Tensor:
        """(h, w) key ``k`` binned to the LR grid, on the device (cached)."""
        key = ("binned", k)
        img = self._keys.get(key)
        if img is None:
            x = torch.from_numpy(np.ascontiguousarray(hr[k])).to(self.device)[None, None]
            img = self._keys[key] = torch.nn.functional.avg_pool2d(x, self.cfg.scale)[0, 0]
        else:
            self._keys.move_to_end(key)
        return img

    def _denoised_lr(self, wins, lr_in: torch.Tensor, hr: dict) -> torch.Tensor:
        """(B, NL, h, w) LR frames as the network reads them on a noisy archive (:func:`xvr_batch.refine.lr_denoise`:
        each frame against the time blend of its window's two key frames, binned)."""
        from xvr_batch.refine import lr_denoise

        blend = torch.empty_like(lr_in)
        for i, w_ in enumerate(wins):
            k0, k1 = w_.keys
            t0, t1 = self._hr_index[k0], self._hr_index[k1]
            a, b = self._key_binned(k0, hr), self._key_binned(k1, hr)
            for j, t in enumerate(w_.frames):
                wt = time_weight(t, t0, t1)
                blend[i, j] = a * (1.0 - wt) + b * wt
        return lr_denoise(lr_in, blend, self._cons_sigma)

    def _to_device(self, lr: np.ndarray) -> tuple:
        """``(tensor, ready_event)``: the batch's LR on the device. On CUDA the batch goes through pinned host
        memory and a non-blocking copy on a side stream (it overlaps the previous batch's compute); on the CPU
        it is the array itself (no copy, the bytes the model sees are the same)."""
        if not self._cuda:
            return torch.from_numpy(lr), None
        host = torch.from_numpy(lr).pin_memory()
        with torch.cuda.stream(self._copy_stream):
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        dev.record_stream(torch.cuda.current_stream(self.device))  # used by compute on the default stream
        return dev, ev

    def _to_host(self, out: torch.Tensor) -> tuple:
        """``(host tensor, done_event)``: start copying a result back (pinned memory, side stream, CUDA only)."""
        if not self._cuda:
            return out, None
        out = out.contiguous()
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(done)
            host.copy_(out, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._copy_stream)
        out.record_stream(self._copy_stream)
        return host, ev

    def _compute(self, wins, lr: np.ndarray, hr: dict) -> np.ndarray:
        """(B, NL, h, w) model-space LR -> (B, n_out, H, W) float32 model-space output."""
        host, ev = self._to_host(self._compute_dev(wins, self._to_device(lr), hr))
        if ev is not None:
            ev.synchronize()
        return host.numpy()

    def _compute_dev(self, wins, lr_dev: tuple, hr: dict) -> torch.Tensor:
        """The model on one staged batch, in the output's frame (see :meth:`_output_frame`)."""
        return self._output_frame(self._refine_dev(wins, lr_dev, self._model_dev(wins, lr_dev, hr), hr), wins, hr)

    def _refine_dev(self, wins, lr_dev: tuple, out: torch.Tensor, hr: dict) -> torch.Tensor:
        """The model-frame output after the LR refinement (:mod:`xvr_batch.refine`), or itself when it is off."""
        if not self._refine:
            return out
        from xvr_batch.refine import lr_refine

        with torch.inference_mode():
            if self._motion:
                out = self._motion_dev(wins, lr_dev[0], out, hr)
            if self._residual:
                out = lr_refine(out, lr_dev[0], self._cons_sigma, self._cons_slots, self.cfg.scale,
                                inside=self._cons_inside)
            if self._beam:
                out = self._beam_dev(wins, lr_dev[0], out, hr)
            return out

    def _slot_inputs(self, wins, lr: torch.Tensor, out: torch.Tensor, hr: dict, key_pair) -> tuple[torch.Tensor, ...]:
        """For each output slot of the batch (B * n rows, window by window): its LR frame and where that was measured
        (h, w), its window's two key frames as ``key_pair(k0, k1)`` gives them (2, ...), the LR frames at the keys'
        times and where they were measured (2, h, w) each, and its time weight between the keys (float64)."""
        s = self.cfg.scale
        b, n, hh, ww = out.shape
        dev = out.device
        slots = self._cons_slots  # the LR frame of each output slot
        lr_t = lr[:, slots].reshape(b * n, hh // s, ww // s)
        ok = torch.from_numpy(hr["measured"]).to(dev)[:, slots].reshape(b * n, hh // s, ww // s)
        keys, key_lr, key_ok, weights = [], [], [], []
        for w_ in wins:
            k0, k1 = w_.keys
            t0, t1 = self._hr_index[k0], self._hr_index[k1]
            pair = key_pair(k0, k1)
            lrs = torch.from_numpy(np.stack([hr[("key_lr", k0)][0], hr[("key_lr", k1)][0]])).to(dev)
            oks = torch.from_numpy(np.stack([hr[("key_lr", k0)][1], hr[("key_lr", k1)][1]])).to(dev)
            for slot in slots:
                weights.append(time_weight(w_.frames[slot], t0, t1))
                keys.append(pair)
                key_lr.append(lrs)
                key_ok.append(oks)
        return (lr_t, ok, torch.stack(keys), torch.stack(key_lr), torch.stack(key_ok),
                torch.tensor(weights, dtype=torch.float64, device=dev))

    def _motion_dev(self, wins, lr: torch.Tensor, out: torch.Tensor, hr: dict) -> torch.Tensor:
        """Each output frame fused with its key frames moved to its LR frame (:func:`xvr_batch.motion.motion_fuse`,
        all frames of the batch at once, on the device)."""
        from xvr_batch.motion import motion_fuse

        b, n, hh, ww = out.shape
        pair = lambda k0, k1: torch.from_numpy(np.stack([hr[k0], hr[k1]])).to(out.device)  # noqa: E731
        res = motion_fuse(out.reshape(b * n, hh, ww), *self._slot_inputs(wins, lr, out, hr, pair), self._motion_sigma,
                          self.cfg.scale, *self.calib.transmission, kernel=self._kernel)
        return res.view(b, n, hh, ww)

    def _beam_dev(self, wins, lr: torch.Tensor, out: torch.Tensor, hr: dict) -> torch.Tensor:
        """Each output frame scaled by the beam's change since its key frames (:func:`xvr_batch.refine.beam_gains`,
        all frames of the batch at once, on the device), and with step ``blind`` the HR blocks under its unmeasured
        LR pixels by the key blend's (``beam_gains(..., blind=True)``)."""
        from xvr_batch.refine import apply_gains, beam_gains

        lo, span = self.calib.transmission
        s = self.cfg.scale
        b, n, hh, ww = out.shape
        out_t = torch.nn.functional.avg_pool2d(out.reshape(b * n, 1, hh, ww), s).view(b * n, hh // s, ww // s)
        pair = lambda k0, k1: torch.stack([self._key_binned(k0, hr), self._key_binned(k1, hr)])  # noqa: E731
        lr_t, ok, key_t, key_lr, key_ok, weights = self._slot_inputs(wins, lr, out, hr, pair)
        args = (out_t * span + lo, lr_t.to(out.dtype) * span + lo, ok, key_t.to(out.dtype) * span + lo,
                key_lr.to(out.dtype) * span + lo, key_ok, weights)
        if not self._blind:
            return apply_gains(out, beam_gains(*args).view(b, n), lo, span)
        gains, blind = beam_gains(*args, blind=True)
        return apply_gains(out, gains.view(b, n), lo, span, blind.view(b, n), ~ok.view(b, n, hh // s, ww // s))

    def _output_frame(self, out: torch.Tensor, wins, hr: dict) -> torch.Tensor:
        """Model-frame output (B, n_out, s h, s w) -> the HR camera's frame (B, n_out, H, W): itself, or with a
        registration resampled (cubic B-spline) and, where the LR field does not reach, the time-weighted
        blend of the window's two key frames (model space, the HR camera's own frames)."""
        if self._to_hr is None:
            return out
        with torch.inference_mode():
            res = self._to_hr(out)
            if self._fill is None:
                return res
            fill = torch.zeros_like(res)
            for i, w_ in enumerate(wins):
                k0, k1 = w_.keys
                t0, t1 = self._hr_index[k0], self._hr_index[k1]
                a, b = self._key_native(k0, hr), self._key_native(k1, hr)
                for t, slot in w_.emit:
                    j = slot if self.cfg.head == "all" else 0
                    wt = time_weight(t, t0, t1)
                    fill[i, j] = a * (1.0 - wt) + b * wt
            return torch.where(self._fill, fill, res)

    def _key_native(self, k: int, hr: dict) -> torch.Tensor:
        """(H, W) key ``k`` in model space in the HR camera's frame, on the device (cached)."""
        key = ("native", k)
        img = self._keys.get(key)
        if img is None:
            img = self._keys[key] = torch.from_numpy(np.ascontiguousarray(hr[key])).to(self.device)
        else:
            self._keys.move_to_end(key)
        return img

    def _model_dev(self, wins, lr_dev: tuple, hr: dict) -> torch.Tensor:
        """The model on one staged batch (see :meth:`_to_device`) -> (B, n_out, s h, s w) float32 on the device,
        in the model's frame (the LR camera's, upsampled)."""
        lr_in, ready = lr_dev
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
        h, w = lr_in.shape[-2:]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with torch.inference_mode():
            lr_t = (self._denoised_lr(wins, lr_in, hr) if self._denoise else lr_in)[:, :, None]  # B, NL, 1, h, w
        with torch.inference_mode(), ctx:
            # once per batch, cut per tile below: the key-mean base, and a time_cond model's inputs
            base = delta = times = None
            if self.cfg.residual == "key_mean":
                base = torch.stack([self._key_pair("base", w_.keys, hr) for w_ in wins])  # B, 1, 1, H, W
                if self.cfg.time_cond:
                    delta = torch.stack([self._key_pair("delta", w_.keys, hr) for w_ in wins])  # B, 1, 1, H, W
            if self.cfg.time_cond:  # B, NL: each LR frame's time weight between its window's keys
                times = torch.tensor([[time_weight(t, self._hr_index[w_.keys[0]], self._hr_index[w_.keys[1]])
                                       for t in w_.frames] for w_ in wins], dtype=torch.float32, device=self.device)

            def run(tile=None) -> torch.Tensor:
                feats = torch.stack([
                    torch.stack([self._key_feature(w_.keys[0], hr[w_.keys[0]], tile),
                                 self._key_feature(w_.keys[1], hr[w_.keys[1]], tile)]) for w_ in wins])
                x = lr_t if tile is None else lr_t[..., tile.y0:tile.y1, tile.x0:tile.x1]

                def cut(v: torch.Tensor | None) -> torch.Tensor | None:  # an HR-grid input to this tile
                    s = self.cfg.scale
                    return v if v is None or tile is None else v[..., tile.y0 * s:tile.y1 * s, tile.x0 * s:tile.x1 * s]

                if not self.cfg.time_cond:
                    return self._features(x, feats, cut(base)).float()
                return self._features(x, feats, cut(base), times=times, delta=cut(delta)).float()

            tile = self.settings.get("tile")
            if tile:
                overlap = self.settings.get("tile_overlap") or 2 * self.cfg.window
                out = tiled_run(run, h, w, self.cfg.scale, tile, overlap)
            else:
                out = run()
        return out[:, :, 0]

    def _consistency_dev(self, lr_dev: tuple, out: torch.Tensor) -> torch.Tensor | None:
        """(B, n_out) float32 on the device: the LR consistency of each output slot of the batch (computed from
        the batch's own tensors, so each value is as deterministic as the frame); None without a baseline."""
        if self._cons_sigma is None:
            return None
        from xvr_batch.consistency import residual_rms

        with torch.inference_mode():
            rms = residual_rms(out, lr_dev[0], self._cons_slots, self.cfg.scale, self._cons_inside)
            return rms / self._cons_sigma

    # ---------------------------------------------------------------- one unit
    def _to_counts(self, frame: np.ndarray) -> np.ndarray:
        """A model-space output frame in HR camera counts, in the output dtype (codec threads)."""
        hr_units = self.calib_out.model_to_hr(frame, camera_range=True)  # a new float32 array
        if self.dtype == np.uint16:
            np.rint(hr_units, out=hr_units)
            np.clip(hr_units, 0, 65535, out=hr_units)
            hr_units = hr_units.astype(np.uint16)
        return hr_units

    def run_unit(self, unit: Unit, on_frames: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict:
        """Compute ``unit``, write its part (temp name, then rename) and return the journal record.

        Stages overlap: a reader thread prefetches batches; on CUDA, batch b+1 is copied to the device (pinned
        memory, side stream) and batch b's result back while the GPU computes; the results are handed to a
        writer thread, which has them converted to counts and compressed with the output's codec in a thread
        pool (outside HDF5's lock) and stores the chunks in order (``write_direct_chunk``)."""
        from xvr_batch.io.output import OrderedChunkWriter

        wd = self.job.workdir_obj()
        path = wd.part_path(unit.id)
        hh, ww = self.job.hr_shape
        t_unit = time.perf_counter()
        try:
            part = StreamingPart(path, unit.start, unit.stop - unit.start, (hh, ww), self.dtype,
                                 attrs={"unit": unit.id, "fingerprint": self.job.fingerprint},
                                 compression=self.job.compression)
        except OSError as exc:
            raise disk_error(exc, path) from exc
        writer_q: queue.Queue = queue.Queue(maxsize=4 * self.batch)
        errors: list[BaseException] = []
        cons = np.full(unit.stop - unit.start, np.nan, np.float32)  # per-frame LR consistency of the unit
        workers = self._codec_workers()
        chunks = OrderedChunkWriter(part.codec, part.write_chunk, self._pool() if workers > 1 else None,
                                    window=2 * workers + 2, prepare=self._to_counts, stats=self.stats,
                                    lock=self._stats_lock)

        def writer() -> None:
            try:
                while True:
                    item = writer_q.get()
                    if item is None:
                        break
                    t, frame = item
                    chunks.submit(t - unit.start, frame)
                    if on_frames:
                        on_frames(1)
                chunks.close()
            except BaseException as exc:
                errors.append(exc)
                chunks.cancel()
                while writer_q.get() is not None:  # drain so the producer never blocks
                    pass

        def emit(b: int, wins, host, ev, chost, cev) -> None:
            t0 = time.perf_counter()
            if ev is not None:
                ev.synchronize()
            if cev is not None:
                cev.synchronize()
            out = host.numpy()
            c = None if chost is None else chost.numpy()
            self._add("d2h", time.perf_counter() - t0)
            real = len(self.plan.windows[b * self.batch:(b + 1) * self.batch])
            for i, win in enumerate(wins[:real]):
                for t, slot in win.emit:
                    if unit.start <= t < unit.stop:
                        j = slot if self.cfg.head == "all" else 0
                        if c is not None:
                            cons[t - unit.start] = c[i, j]
                        writer_q.put((t, out[i, j]))

        # The stages hand the GIL to each other often: a 0.5 ms switch interval (instead of 5 ms) keeps the
        # writer from waiting behind CPU-bound threads (measured: write 1.66 s -> 0.08 s per 256 frames).
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, 0.0005))
        wt = threading.Thread(target=writer, name="xvr-writer", daemon=True)
        wt.start()
        try:
            batches = self._prefetch(*unit.batches)
            try:
                pending = None  # (b, wins, host, event) of the batch whose result is on its way back

                def stage():
                    t0 = time.perf_counter()
                    item = next(batches, None)
                    t1 = time.perf_counter()
                    self._add("read_wait", t1 - t0)
                    if item is None:
                        return None
                    b, wins, lr, hr = item
                    staged = (b, wins, self._to_device(lr), hr)
                    self._add("h2d", time.perf_counter() - t1)
                    return staged

                nxt = stage()
                while nxt is not None and not errors:
                    b, wins, lr_dev, hr = nxt
                    t0 = time.perf_counter()
                    out_m = self._model_dev(wins, lr_dev, hr)
                    host, ev = self._to_host(self._output_frame(self._refine_dev(wins, lr_dev, out_m, hr), wins, hr))
                    self._add("compute", time.perf_counter() - t0)
                    t1 = time.perf_counter()
                    c_dev = self._consistency_dev(lr_dev, out_m)
                    chost, cev = (None, None) if c_dev is None else self._to_host(c_dev)
                    self._add("consistency", time.perf_counter() - t1)
                    nxt = stage()  # on CUDA: the next batch's copy runs while this one computes
                    if pending is not None:
                        emit(*pending)
                    pending = (b, wins, host, ev, chost, cev)
                if pending is not None and not errors:
                    emit(*pending)
            finally:
                batches.close()  # stops the reader thread
                writer_q.put(None)
                wt.join()
            if errors:
                raise errors[0]
            t0 = time.perf_counter()
            summary = None
            if self._cons_sigma is not None:
                from xvr_batch.consistency import summarise
                part.write_vector(CONSISTENCY_DATASET, cons)
                summary = summarise(cons, unit.start, self._cons_threshold)
            sha = part.commit()
            self._add("commit", time.perf_counter() - t0)
        except OSError as exc:
            part.abort()
            raise disk_error(exc, path) from exc
        except BaseException:
            part.abort()
            raise
        finally:
            sys.setswitchinterval(switch)
        self._add("unit_wall", time.perf_counter() - t_unit)
        self._add("frames", unit.stop - unit.start)
        rec = {"unit": unit.id, "part": wd.part_relpath(unit.id), "sha256": sha, "frames": (unit.start, unit.stop)}
        if summary is not None:
            rec["consistency"] = summary
        return rec


def disk_error(exc: OSError, path: Path | str) -> Exception:
    """A full disk (or quota) becomes one clear UserError; other OS errors pass through unchanged."""
    from xvr_batch.durable import is_disk_full

    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or path
        return UserError(f"{where}: disk full while writing; free space and re-run the same command to resume")
    return exc


def finalise(job: Job, log: Callable[[str], None] = lambda s: None, progress: bool = False,
             overwrite: bool = False, layout: str | None = None) -> str:
    """Stitch the verified parts into the output (temporary name, then rename). Returns the path.

    The rename never replaces a file that appeared meanwhile unless ``overwrite``. ``layout`` (default: the
    run's ``--layout``, :func:`xvr_batch.io.vds.run_layout`): ``single`` stitches one file; ``virtual`` moves
    the parts to ``OUTPUT.parts/`` and writes a virtual dataset over them (:mod:`xvr_batch.io.vds`). The
    process record leaves ``--layout`` out in both, so ``xvr-batch compact`` gives the single file's bytes."""
    from xvr_batch.io.parts import known_sha256
    from xvr_batch.io.vds import record_without_layout, run_layout, write_virtual_output

    layout = run_layout(job, layout)
    wd = job.workdir_obj()
    plan = job.plan()
    # Journal and plan checks here; the sha256 of each part is checked by the stitch on the one read it does
    # of the part, unless this process committed or verified that very file (unchanged) already.
    done = wd.completed_units(verify=False)
    parts, shas, recorded, missing = [], [], [], []
    for u in plan.units:
        rec = done.get(u.id)
        path = wd.resolve_part(rec["part"]) if rec else None
        if path is None or not path.is_file() or path.is_symlink():
            missing.append(u.id)
            continue
        parts.append(path)
        shas.append(None if known_sha256(path) == rec["sha256"] else rec["sha256"])
        recorded.append(rec["sha256"])
    if missing:
        raise UserError(f"{wd.path}: {len(missing)} units are not finished (first: {missing[:5]}); "
                        f"run `xvr-batch resume {wd.path}`")
    plan_dict = plan.to_dict()
    command, config = record_without_layout(job.command, job.config)
    process = {
        "version": __version__, "command_line": command, "config": config,
        "settings": job.settings, "weights": job.weights, "weights_sha256": job.weights["sha256"],
        "input": {"path": job.archive, "fingerprint": job.fingerprint, "paths": job.paths,
                  "hr_stride": job.hr_stride, "hr_offset": job.hr_offset},
        "normalisation": job.normalisation, "plan": plan_dict, "edge_policy": plan_dict.get("edge_policy", ""),
    }
    baseline = check_consistency_record(job.consistency)
    if baseline is not None:
        process["lr_consistency"] = baseline
    shape = (plan.n_frames, *job.hr_shape)
    try:
        if layout == "virtual":
            write_virtual_output(job.output, parts, shape, np.dtype(job.settings["dtype"]), job.compression,
                                 np.asarray(job.plan_args["hr_index"]), process, baseline, overwrite,
                                 part_sha256=recorded, verified=[s is None for s in shas],
                                 keep_sources=job.keep_workdir)
        else:
            stitch_output(job.output, parts, shape, np.dtype(job.settings["dtype"]), job.compression,
                          np.asarray(job.plan_args["hr_index"]), process, progress=progress, overwrite=overwrite,
                          part_sha256=shas, consistency=baseline)
    except OSError as exc:
        raise disk_error(exc, Path(job.output)) from exc
    log(f"wrote {job.output}" + (f" (a virtual dataset over the parts in {job.output}.parts)"
                                 if layout == "virtual" else ""))
    if not job.keep_workdir:
        shutil.rmtree(wd.path, ignore_errors=True)
    return job.output
