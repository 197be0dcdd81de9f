"""Plan, run units, finalise: the reconstruction pipeline that every backend shares.

``prepare()`` opens and validates the archive, fits the normalisation once, plans windows and units and
creates (or checks, to resume) the work directory. It returns a :class:`Job`: plain, picklable data that
any process can turn back into a :class:`UnitRunner`. ``UnitRunner.run_unit()`` computes one unit and
writes its part; it is the same code for every backend. ``finalise()`` stitches the verified parts into
the output under a temporary name and renames it.
"""

from __future__ import annotations

import errno
from contextlib import nullcontext
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from xvr_batch import __version__
from xvr_batch.errors import UserError
from xvr_batch.io.archive import Archive, ArchivePaths
from xvr_batch.io.output import stitch_output
from xvr_batch.io.parts import StreamingPart, verify_part
from xvr_batch.model.tiling import tiled_run
from xvr_batch.normalise import Calibration, Normalisation, fit_normalisation
from xvr_batch.plan import Plan, Unit, batch_windows, make_plan
from xvr_batch.weights import ResolvedWeights, resolve_weights
from xvr_batch.workdir import WorkDir

__all__ = ["Options", "Job", "prepare", "UnitRunner", "finalise", "pending_units", "output_affecting"]

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
    compression: str = "zstd"
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

    def archive_paths(self) -> ArchivePaths:
        base = ArchivePaths()
        return ArchivePaths(lr=self.lr or base.lr, hr=self.hr or base.hr, hr_index=self.hr_index or base.hr_index)

    def resolved_workdir(self) -> Path:
        return Path(self.workdir) if self.workdir else Path(str(self.output) + ".xvr")


def output_affecting(opts: Options, device_type: str, precision: str) -> dict:
    """The settings that change output bytes; their hash guards resume against a mix of settings."""
    return {"batch": opts.batch, "tile": opts.tile, "tile_overlap": opts.tile_overlap, "dtype": opts.dtype,
            "device_type": device_type, "precision": precision, "unit_frames": opts.unit_frames}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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

    def open_archive(self) -> Archive:
        return Archive(self.archive, ArchivePaths.from_dict(self.paths), self.hr_stride, self.hr_offset)

    def plan(self) -> Plan:
        return make_plan(**self.plan_args)

    def workdir_obj(self) -> WorkDir:
        return WorkDir(self.workdir)

    def to_dict(self) -> dict:
        return asdict(self)


def pending_units(job: Job) -> list[Unit]:
    """Units that have no verified part yet (missing or corrupt parts are redone)."""
    done = job.workdir_obj().completed_units(verify=True)
    return [u for u in job.plan().units if u.id not in done]


def _check_output_target(opts: Options) -> None:
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


def _describe_change(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unknown"


def prepare(opts: Options, command: list[str] | None = None, config: dict | None = None,
            log: Callable[[str], None] = lambda s: None, locked: bool = False) -> Job:
    """Validate, fit, plan and create or check the work directory. Writes nothing but the workdir."""
    if opts.dtype not in DTYPES:
        raise UserError(f"--dtype {opts.dtype!r}: choose one of {', '.join(DTYPES)}")
    for name in ("unit_frames", "batch", "prefetch"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")
    from xvr_batch.io.output import check_compression
    check_compression(opts.compression)
    _check_output_target(opts)
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

    archive_path = str(Path(opts.archive).expanduser().resolve()) if Path(opts.archive).exists() else opts.archive
    with Archive(archive_path, opts.archive_paths(), opts.hr_stride, opts.hr_offset) as arc:
        if arc.scale != cfg.scale:
            raise UserError(f"{opts.archive}: HR/LR scale is {arc.scale}, but the model upsamples x{cfg.scale}")
        fingerprint = arc.fingerprint()
        wd = WorkDir(opts.resolved_workdir())
        settings = output_affecting(opts, device.split(":")[0], precision)
        config_hash = _hash({"settings": settings, "model": cfg.to_dict()})
        plan_args = dict(n_frames=arc.n_frames, hr_index=[int(k) for k in arc.hr_index], num_lr=cfg.num_lr,
                         head=cfg.head, unit_frames=opts.unit_frames, batch=opts.batch)
        resume = wd.exists() and not opts.force_replan
        if wd.exists() and opts.force_replan:
            log(f"--force-replan: discarding the earlier plan and parts in {wd.path}")
        if resume:
            man = wd.read_manifest()
            if man["fingerprint"] != fingerprint:
                raise UserError(f"{wd.path}: the input archive changed since this work directory was planned "
                                f"(fingerprint {man['fingerprint'][:12]} -> {fingerprint[:12]}); "
                                "pass --force-replan to start over")
            if man["weights_sha256"] != weights.sha256:
                raise UserError(f"{wd.path}: the weights changed since this work directory was planned "
                                f"({man['weights'].get('source')} sha256 {man['weights_sha256'][:12]} -> "
                                f"{weights.source} {weights.sha256[:12]}); pass --force-replan to start over")
            if man["config_hash"] != config_hash:
                raise UserError(f"{wd.path}: the settings changed since this work directory was planned "
                                f"({_describe_change(man.get('settings', {}), settings)}); "
                                "pass --force-replan to start over")
            norm = Normalisation.from_dict(man["normalisation"])
            log(f"resuming {wd.path}")
        else:
            log("checking the archive for NaN/Inf and fitting the intensity mapping ...")
            arc.check_finite()
            norm = fit_normalisation(arc)
    job = Job(
        archive=archive_path, paths=opts.archive_paths().to_dict(), hr_stride=opts.hr_stride,
        hr_offset=opts.hr_offset, output=str(Path(opts.output).resolve()), workdir=str(wd.path),
        weights=weights.to_dict(), normalisation=norm.to_dict(), plan_args=plan_args, settings=settings,
        compression=opts.compression, keep_workdir=opts.keep_workdir, command=list(command or sys.argv),
        config=dict(config or {}), fingerprint=fingerprint, threads=opts.threads, prefetch=opts.prefetch,
        device=device,
    )
    if not resume:
        plan = job.plan()
        manifest = {
            "version": 1, "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "archive": archive_path, "fingerprint": fingerprint, "paths": job.paths,
            "hr_stride": opts.hr_stride, "hr_offset": opts.hr_offset, "output": job.output,
            "config_hash": config_hash, "settings": settings, "model": cfg.to_dict(),
            "weights": weights.to_dict(), "weights_sha256": weights.sha256, "normalisation": norm.to_dict(),
            "plan": plan.to_dict(), "plan_args": plan_args, "job": job.to_dict(), "options": asdict(opts),
        }
        if locked:
            wd.create(manifest)
        else:
            with wd.lock():
                wd.create(manifest)
    return job


class UnitRunner:
    """Computes units of one job in one process: archive, calibration, model and key-frame cache."""

    def __init__(self, job: Job, device: str | None = None):
        self.job = job
        self.device = torch.device(device or job.device)
        if job.threads:
            torch.set_num_threads(job.threads)
        self.archive = job.open_archive()
        self.calib = Calibration(self.archive, Normalisation.from_dict(job.normalisation))
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
        self._keys: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._key_cap = max(8, 2 * self.batch + 2)

    def close(self) -> None:
        self.archive.close()

    # ---------------------------------------------------------------- reading (prefetch thread)
    def _read_batch(self, b: int, hr_cache: OrderedDict) -> tuple:
        wins = batch_windows(self.plan.windows, b, self.batch)
        frames = sorted({f for w in wins for f in w.frames})
        pos = {f: i for i, f in enumerate(frames)}
        lr_all = self.calib.lr_to_model(self.archive.read_lr_at(frames))
        lr = np.stack([lr_all[[pos[f] for f in w.frames]] for w in wins])  # B, NL, h, w
        hr = {}
        for k in sorted({k for w in wins for k in w.keys}):
            if k not in hr_cache:
                hr_cache[k] = self.calib.hr_to_model(self.archive.read_hr(k))
                while len(hr_cache) > self._key_cap:
                    hr_cache.popitem(last=False)
            hr[k] = hr_cache[k]
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
                    q.put(("ok", self._read_batch(b, cache)))
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

    def _key_base(self, keys: tuple[int, int], hr: dict) -> torch.Tensor:
        """(1, 1, H, W) mean of a window's two key frames, cached per key pair."""
        key = ("base", keys)
        base = self._keys.get(key)
        if base is None:
            pair = np.stack([hr[keys[0]], hr[keys[1]]])[:, None]  # 2, 1, H, W
            base = self.model.key_base(torch.from_numpy(pair).to(self.device)[None])[0]
            self._keys[key] = base
        else:
            self._keys.move_to_end(key)
        return base

    def _compute(self, wins, lr: np.ndarray, hr: dict) -> np.ndarray:
        """(B, NL, h, w) model-space LR -> (B, n_out, H, W) float32 model-space output."""
        lr_t = torch.from_numpy(lr).to(self.device)[:, :, None]  # B, NL, 1, h, w
        h, w = lr.shape[-2:]
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()
        with torch.inference_mode(), ctx:
            def run(tile=None) -> torch.Tensor:
                feats = torch.stack([
                    torch.stack([self._key_feature(w_.keys[0], hr[w_.keys[0]], tile),
                                 self._key_feature(w_.keys[1], hr[w_.keys[1]], tile)]) for w_ in wins])
                x = lr_t if tile is None else lr_t[..., tile.y0:tile.y1, tile.x0:tile.x1]
                base = None
                if self.cfg.residual == "key_mean":
                    s = self.cfg.scale
                    base = torch.stack([self._key_base(w_.keys, hr) for w_ in wins])  # B, 1, 1, H, W
                    if tile is not None:
                        base = base[..., tile.y0 * s:tile.y1 * s, tile.x0 * s:tile.x1 * s]
                return self.model.forward_features(x, feats, base).float()

            tile = self.settings.get("tile")
            if tile:
                overlap = self.settings.get("tile_overlap") or 2 * self.cfg.window
                out = tiled_run(run, h, w, self.cfg.scale, tile, overlap)
            else:
                out = run()
        return out[:, :, 0].cpu().numpy()

    # ---------------------------------------------------------------- one unit
    def run_unit(self, unit: Unit, on_frames: Callable[[int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict:
        """Compute ``unit``, write its part (temp name, then rename) and return the journal record."""
        wd = self.job.workdir_obj()
        path = wd.part_path(unit.id)
        hh, ww = self.archive.hr_shape
        try:
            part = StreamingPart(path, unit.start, unit.stop - unit.start, (hh, ww), self.dtype,
                                 attrs={"unit": unit.id, "fingerprint": self.job.fingerprint})
        except OSError as exc:
            raise disk_error(exc, path) from exc
        writer_q: queue.Queue = queue.Queue(maxsize=4 * self.batch)
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                while True:
                    item = writer_q.get()
                    if item is None:
                        return
                    t, frame = item
                    hr_units = self.calib.model_to_hr(frame)
                    if self.dtype == np.uint16:
                        hr_units = np.clip(np.rint(hr_units), 0, 65535).astype(np.uint16)
                    part.write(t - unit.start, hr_units)
                    if on_frames:
                        on_frames(1)
            except BaseException as exc:
                errors.append(exc)
                while writer_q.get() is not None:  # drain so the producer never blocks
                    pass

        wt = threading.Thread(target=writer, name="xvr-writer", daemon=True)
        wt.start()
        try:
            try:
                for b, wins, lr, hr in self._prefetch(*unit.batches):
                    if errors:
                        break
                    out = self._compute(wins, lr, hr)
                    real = len(self.plan.windows[b * self.batch:(b + 1) * self.batch])
                    for i, win in enumerate(wins[:real]):
                        for t, slot in win.emit:
                            if unit.start <= t < unit.stop:
                                writer_q.put((t, out[i, slot if self.cfg.head == "all" else 0]))
            finally:
                writer_q.put(None)
                wt.join()
            if errors:
                raise errors[0]
            sha = part.commit()
        except OSError as exc:
            part.abort()
            raise disk_error(exc, path) from exc
        except BaseException:
            part.abort()
            raise
        return {"unit": unit.id, "part": wd.part_relpath(unit.id), "sha256": sha, "frames": (unit.start, unit.stop)}


def disk_error(exc: OSError, path: Path | str) -> Exception:
    """A full disk becomes one clear UserError; other OS errors pass through unchanged."""
    text = str(exc)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text or "errno = 28" in text:
        return UserError(f"{path}: disk full while writing; free space and re-run the same command to resume")
    return exc


def finalise(job: Job, log: Callable[[str], None] = lambda s: None, progress: bool = False) -> str:
    """Stitch the verified parts into the output (temporary name, then rename). Returns the path."""
    wd = job.workdir_obj()
    plan = job.plan()
    done = wd.completed_units(verify=True)
    missing = [u.id for u in plan.units if u.id not in done]
    if missing:
        raise UserError(f"{wd.path}: {len(missing)} units are not finished (first: {missing[:5]}); "
                        f"run `xvr-batch resume {wd.path}`")
    parts = [(u, wd.resolve_part(done[u.id]["part"]), done[u.id]["sha256"]) for u in plan.units]
    for u, p, sha in parts:
        if not verify_part(p, sha):
            raise UserError(f"{p}: part changed after it was verified; run `xvr-batch resume {wd.path}`")
    manifest = wd.read_manifest()
    process = {
        "version": __version__, "command_line": job.command, "config": job.config,
        "settings": job.settings, "weights": job.weights, "weights_sha256": job.weights["sha256"],
        "input": {"path": job.archive, "fingerprint": job.fingerprint, "paths": job.paths,
                  "hr_stride": job.hr_stride, "hr_offset": job.hr_offset},
        "normalisation": job.normalisation, "plan": manifest.get("plan", {}),
        "edge_policy": manifest.get("plan", {}).get("edge_policy", ""),
    }
    with job.open_archive() as arc:
        hr_index = np.asarray(arc.hr_index)
        shape = (arc.n_frames, *arc.hr_shape)
    try:
        stitch_output(job.output, [p for _, p, _ in parts], shape, np.dtype(job.settings["dtype"]),
                      job.compression, hr_index, process, progress=progress)
    except OSError as exc:
        raise disk_error(exc, Path(job.output)) from exc
    log(f"wrote {job.output}")
    if not job.keep_workdir:
        shutil.rmtree(wd.path, ignore_errors=True)
    return job.output


def reconstruct(opts: Options, backend: Any = None, command: list[str] | None = None, config: dict | None = None,
                progress: bool = True, log: Callable[[str], None] = lambda s: None) -> str | None:
    """Plan (or resume), run the pending units on ``backend``, finalise. Returns the output path, or None
    when the backend stopped early on a signal (the work directory then holds everything done so far)."""
    from xvr_batch.backends.base import stop_flag

    from xvr_batch.backends import get_backend

    backend = backend or get_backend("local")
    _check_output_target(opts)
    wd_path = opts.resolved_workdir()
    created = not wd_path.exists()
    wd_path.mkdir(parents=True, exist_ok=True)
    try:
        with WorkDir(wd_path).lock():
            job = prepare(opts, command, config, log=log, locked=True)
            created = False  # the work directory now holds a valid plan
            pending = pending_units(job)
            done = len(job.plan().units) - len(pending)
            if done:
                log(f"{done} units already done; {len(pending)} to go")
            stop_flag.install()
            if not backend.execute(job, pending, progress=progress):
                log(f"stopped on request; {wd_path} holds the finished units; run the same command to resume")
                return None
            return finalise(job, log=log, progress=progress)
    finally:
        if created:
            shutil.rmtree(wd_path, ignore_errors=True)
