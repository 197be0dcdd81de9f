"""Score a reconstruction against dense ground truth, next to two simple baselines.

``xvr-batch evaluate RECON.h5 TRUTH.h5`` (a thin CLI over :func:`evaluate`, :func:`format_table`
and :func:`plot`) compares ``/exchange/data`` of a reconstruction (docs/ARCHITECTURE.md, "Output") with
``/exchange/data_gt`` of the archive it was made from (the archive layout of README.md).

What is scored
--------------
Everything is compared in the HR camera's counts, the units of the output file. PSNR and SSIM
come from :mod:`xvr_batch.metrics`, with the data range of each frame set to that truth frame's
``max - min`` (see :data:`DATA_RANGE`).

Frames (``frames=``)
    ``"between"``: frames strictly between key frames, i.e. ``t`` not a key time and
    ``k_0 < t < k_{K-1}``. ``"all"``: every frame that is not a key time (frames before the first
    or after the last key frame included). ``max_frames`` keeps that many, evenly spaced.

Methods
    ``swin_xvr``
        The reconstruction, ``/exchange/data[t]``.
    ``lr_bicubic``
        The LR frame at ``t`` put into HR counts with the run's normalisation (the one recorded
        in ``/process/xvr_batch``; refitted with :func:`~xvr_batch.normalise.fit_normalisation`
        on the truth archive only when the reconstruction has no usable record), bicubic
        upsampled by the scale. The upsampling happens on the normalised intensity, before the HR
        flat-field (a per-HR-pixel map) is undone; without HR darks/flats this equals upsampling
        the LR frame mapped into HR counts.
    ``key_blend``
        Linear blend in time of the two key frames that bracket ``t`` (``/exchange/data_hr``):
        ``(1 - w) * HR(k_i) + w * HR(k_{i+1})`` with ``w = (t - k_i) / (k_{i+1} - k_i)``. Frames
        outside the key range use the nearest key frame (the bracket rule of :mod:`xvr_batch.plan`).
    ``best_baseline``
        Per frame, whichever of ``lr_bicubic`` and ``key_blend`` has the higher PSNR; its SSIM is
        that same image's SSIM (``choice`` lists which one was taken per frame).

``margin_db`` is ``mean_psnr(swin_xvr) - mean_psnr(best_baseline)``. Means are plain averages of
the per-frame values (PSNR averaged in dB).

Infinite values and JSON
------------------------
A frame identical to its truth has an infinite PSNR, and any mean over it is infinite too. The
result dict must stay strict JSON (``json.dumps(result, allow_nan=False)`` works), so every float
in it that is ``+inf`` or ``-inf`` is written as the *string* ``"inf"`` or ``"-inf"``, and NaN as
``None``. :func:`as_float` turns such an entry back into a float. ``inf - inf`` margins (both
perfect) are reported as ``0.0``. PSNR and SSIM are undefined on a constant truth frame (data
range 0) unless the image equals it: those entries are None, left out of the means, and the
result's ``warnings`` says so.

Memory
------
Frames are streamed one at a time (reconstruction, truth, LR frame, and the two bracketing key
frames, which are cached while consecutive frames share them); no stack is ever loaded whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np

from xvr_batch import metrics
from xvr_batch.errors import UserError
from xvr_batch.io.archive import Archive, ArchivePaths, _open_h5
from xvr_batch.normalise import Calibration, Normalisation, fit_normalisation
from xvr_batch.plan import segments

__all__ = [
    "METHOD",
    "BASELINES",
    "BEST_BASELINE",
    "METHODS",
    "FRAME_SELECTIONS",
    "DATA_RANGE",
    "RECON_DATA",
    "evaluate",
    "select_frames",
    "baselines_for_archive",
    "format_table",
    "plot",
    "as_float",
]

#: Name of the reconstruction in the result.
METHOD = "swin_xvr"
#: The two simple baselines, in table order.
BASELINES: tuple[str, ...] = ("lr_bicubic", "key_blend")
#: Per-frame best of :data:`BASELINES`.
BEST_BASELINE = "best_baseline"
#: Every method in the result, in table order.
METHODS: tuple[str, ...] = (METHOD, *BASELINES, BEST_BASELINE)
#: Accepted values of ``frames=``.
FRAME_SELECTIONS: tuple[str, ...] = ("between", "all")
#: How the PSNR/SSIM data range is chosen (also written into the result).
DATA_RANGE = (
    "HR camera counts; data range of each frame = max - min of that ground-truth frame "
    "(xvr_batch.metrics)"
)
#: Dataset of the reconstruction that is scored.
RECON_DATA = "/exchange/data"
#: Group whose attributes (JSON strings) describe the run that wrote the reconstruction.
RECON_PROCESS = "/process/xvr_batch"

# Key frames kept in memory while scoring: the current bracket plus one spare.
_KEY_CACHE = 3


# --------------------------------------------------------------------------------------------
# JSON-safe floats


def _jsonable(x: float) -> float | str | None:
    """A float as strict JSON: ``inf`` -> ``"inf"``, ``-inf`` -> ``"-inf"``, NaN -> None."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def as_float(value: float | str | None) -> float:
    """Inverse of the result's JSON encoding: ``"inf"``/``"-inf"`` -> +-inf, None -> NaN."""
    if value is None:
        return math.nan
    return float(value)  # float("inf") and float("-inf") parse the strings


def _mean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN (NaN if none); infinite if any value is."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan
    infinite = [v for v in kept if math.isinf(v)]
    if infinite:
        return float(sum(infinite))  # +inf, -inf, or NaN for a mix of both
    return math.fsum(kept) / len(kept)


def _diff(a: float, b: float) -> float:
    """``a - b``, with equal infinities giving 0 (both perfect) instead of NaN."""
    if math.isinf(a) and math.isinf(b) and a == b:
        return 0.0
    return a - b


# --------------------------------------------------------------------------------------------
# metrics (all in HR camera counts, data range from the truth frame)


def _frame_range(truth: np.ndarray) -> float:
    """Data range of a truth frame (``max - min``); 0 for a constant frame."""
    return float(truth.max()) - float(truth.min())


def _psnr(pred: np.ndarray, truth: np.ndarray, rng: float) -> float:
    """PSNR with the truth frame's range; NaN when undefined (constant truth, pred differs)."""
    if rng > 0:
        return float(metrics.psnr(pred, truth, data_range=rng))
    return math.inf if np.array_equal(pred, truth) else math.nan


def _ssim(pred: np.ndarray, truth: np.ndarray, rng: float) -> float:
    """SSIM with the truth frame's range; NaN when undefined (constant truth, pred differs)."""
    if rng > 0:
        return float(metrics.ssim(pred, truth, data_range=rng))
    return 1.0 if np.array_equal(pred, truth) else math.nan


def _upsample(img: np.ndarray, scale: int) -> np.ndarray:
    return np.asarray(metrics.bicubic_upsample(img, scale), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# frame selection and brackets


def select_frames(
    n_frames: int,
    hr_index: Sequence[int],
    frames: str = "between",
    max_frames: int | None = None,
) -> list[int]:
    """The frames to score, ascending (see the module docstring for ``frames``).

    ``max_frames`` keeps that many of them, evenly spaced (first and last included). Raises
    :class:`UserError` for an unknown selection, ``max_frames < 1`` or an empty selection.
    """
    if frames not in FRAME_SELECTIONS:
        raise UserError(f"--frames {frames!r}: choose one of {', '.join(FRAME_SELECTIONS)}")
    keys = [int(k) for k in hr_index]
    is_key = np.zeros(n_frames, dtype=bool)
    is_key[keys] = True
    candidates = np.flatnonzero(~is_key)
    if frames == "between":
        candidates = candidates[(candidates > keys[0]) & (candidates < keys[-1])]
    if len(candidates) == 0:
        where = "strictly between key frames" if frames == "between" else "outside the key frames"
        raise UserError(
            f"no frames to score: the archive has no frames {where} (key frames at "
            f"{keys[:6]}{' ...' if len(keys) > 6 else ''}); try --frames all"
        )
    if max_frames is not None:
        if isinstance(max_frames, bool) or int(max_frames) != max_frames or max_frames < 1:
            raise UserError(f"--max-frames must be a whole number >= 1, got {max_frames!r}")
        if len(candidates) > max_frames:
            picks = np.unique(np.linspace(0, len(candidates) - 1, int(max_frames)).round())
            candidates = candidates[picks.astype(np.int64)]
    return [int(t) for t in candidates]


def _brackets(n_frames: int, hr_index: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the key-frame numbers (not times) of its bracket, as :func:`plan.segments`."""
    prev = np.empty(n_frames, dtype=np.int64)
    nxt = np.empty(n_frames, dtype=np.int64)
    for seg in segments(n_frames, hr_index):
        prev[seg.start:seg.stop] = seg.key_prev
        nxt[seg.start:seg.stop] = seg.key_next
    return prev, nxt


# --------------------------------------------------------------------------------------------
# baselines


class _Baselines:
    """Baseline images of one archive, frame by frame, in HR camera counts (float32)."""

    def __init__(self, archive: Archive, norm: Normalisation) -> None:
        self.archive = archive
        self.calib = Calibration(archive, norm)
        self.key_prev, self.key_next = _brackets(archive.n_frames, archive.hr_index)
        self._keys: OrderedDict[int, np.ndarray] = OrderedDict()

    def _key(self, k: int) -> np.ndarray:
        if k in self._keys:
            self._keys.move_to_end(k)
            return self._keys[k]
        frame = self.archive.read_hr(k)
        self._keys[k] = frame
        while len(self._keys) > _KEY_CACHE:
            self._keys.popitem(last=False)
        return frame

    def lr_bicubic(self, t: int) -> np.ndarray:
        lr = self.archive.read_lr_at([t])[0]
        up = _upsample(self.calib.lr_to_model(lr, repair=False), self.archive.scale)  # the classical baseline
        return self.calib.model_to_hr(up)

    def key_blend(self, t: int) -> np.ndarray:
        kp, kn = int(self.key_prev[t]), int(self.key_next[t])
        tp, tn = int(self.archive.hr_index[kp]), int(self.archive.hr_index[kn])
        if tp == tn:
            return self._key(kp).copy()
        w = np.float32(min(1.0, max(0.0, (t - tp) / (tn - tp))))
        return (np.float32(1) - w) * self._key(kp) + w * self._key(kn)

    def frame(self, t: int) -> dict[str, np.ndarray]:
        return {"lr_bicubic": self.lr_bicubic(t), "key_blend": self.key_blend(t)}


def _normalisation(value: Normalisation | Mapping[str, Any]) -> Normalisation:
    return value if isinstance(value, Normalisation) else Normalisation.from_dict(dict(value))


def baselines_for_archive(
    truth: str | os.PathLike[str] | Archive,
    frames: Sequence[int],
    normalisation: Normalisation | Mapping[str, Any] | None = None,
    *,
    paths: ArchivePaths | Mapping[str, str] | None = None,
    hr_stride: int | None = None,
    hr_offset: int = 0,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(t, {"lr_bicubic": img, "key_blend": img})`` for each ``t`` in ``frames``.

    Images are float32 ``(H, W)`` in HR camera counts. ``truth`` is an archive path (opened
    with ``paths``/``hr_stride``/``hr_offset`` and closed when the generator ends) or an open
    :class:`Archive`. ``normalisation`` defaults to a fit on the archive.
    """
    own = not isinstance(truth, Archive)
    if own:
        archive_paths = paths if isinstance(paths, ArchivePaths) else ArchivePaths.from_dict(paths)
        archive = Archive(truth, archive_paths, hr_stride, hr_offset)  # type: ignore[arg-type]
    else:
        archive = truth  # type: ignore[assignment]
    try:
        norm = fit_normalisation(archive) if normalisation is None else _normalisation(normalisation)
        base = _Baselines(archive, norm)
        for t in frames:
            t = int(t)
            if not 0 <= t < archive.n_frames:
                raise IndexError(f"frame {t} outside [0, {archive.n_frames})")
            yield t, base.frame(t)
    finally:
        if own:
            archive.close()


# --------------------------------------------------------------------------------------------
# the reconstruction file


def _parse_attr(value: Any) -> Any:
    """A ``/process/xvr_batch`` attribute: JSON text (str or bytes) -> object; else as is."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class _Recon:
    """Read-only view of a reconstruction: ``/exchange/data`` frames and the run record."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: h5py.File | None = _open_h5(self.path)
        try:
            self._init()
        except BaseException:
            self.close()
            raise

    def _init(self) -> None:
        f = self._file
        assert f is not None
        obj = f.get(RECON_DATA)
        if obj is None:
            raise UserError(
                f"{self.path}: dataset {RECON_DATA} not found; pass a reconstruction written by "
                "xvr-batch reconstruct (first argument) and the archive with ground truth second"
            )
        if not isinstance(obj, h5py.Dataset) or obj.ndim != 3 or obj.dtype.kind not in "iuf":
            raise UserError(
                f"{self.path}: {RECON_DATA} must be a numeric (N, H, W) dataset, got "
                f"{'a group' if isinstance(obj, h5py.Group) else getattr(obj, 'shape', '?')}"
            )
        self.data: h5py.Dataset = obj
        self.shape: tuple[int, int, int] = tuple(int(s) for s in obj.shape)  # type: ignore[assignment]
        idx = f.get("/exchange/hr_index")
        self.hr_index: list[int] | None = None
        if isinstance(idx, h5py.Dataset) and idx.ndim == 1:
            self.hr_index = [int(v) for v in np.asarray(idx[()]).tolist()]
        self.record: dict[str, Any] = {}
        grp = f.get(RECON_PROCESS)
        if isinstance(grp, h5py.Group):
            self.record = {str(k): _parse_attr(v) for k, v in grp.attrs.items()}
        self.consistency: dict[str, Any] | None = None
        self.consistency_error: str | None = None
        try:
            from xvr_batch.consistency import read_output

            self.consistency = read_output(f)
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
            self.consistency_error = " ".join(str(err).split())[:200] or type(err).__name__

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def __enter__(self) -> "_Recon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def input(self) -> dict[str, Any]:
        value = self.record.get("input")
        return value if isinstance(value, dict) else {}

    def frame(self, t: int) -> np.ndarray:
        try:
            out = np.asarray(self.data[t], dtype=np.float32)
        except (OSError, RuntimeError, KeyError) as err:
            raise UserError(
                f"{self.path}: could not read frame {t} of {RECON_DATA} ({err}); the file may be "
                "corrupt or compressed with a filter that is not installed"
            ) from err
        if not np.isfinite(out).all():
            raise UserError(f"{self.path}: frame {t} of {RECON_DATA} contains NaN or Inf")
        return out


def _archive_options(
    recon: _Recon,
    paths: ArchivePaths | Mapping[str, str] | None,
    hr_stride: int | None,
    hr_offset: int | None,
) -> dict[str, Any]:
    """How to open the truth archive: explicit arguments, else the run's record, else defaults."""
    rec = recon.input
    if paths is None:
        recorded = rec.get("paths")
        paths = ArchivePaths.from_dict(recorded if isinstance(recorded, dict) else None)
    elif not isinstance(paths, ArchivePaths):
        paths = ArchivePaths.from_dict(paths)
    if hr_stride is None and hr_offset is None:
        hr_stride = rec.get("hr_stride")
        hr_offset = rec.get("hr_offset") if hr_stride is not None else 0
    return {"paths": paths, "hr_stride": hr_stride, "hr_offset": int(hr_offset or 0)}


def _choose_normalisation(
    recon: _Recon, archive: Archive, warnings: list[str]
) -> tuple[Normalisation, str]:
    """The run's recorded normalisation when usable with ``archive``, else a fresh fit."""
    recorded = recon.record.get("normalisation")
    if isinstance(recorded, dict):
        try:
            norm = Normalisation.from_dict(recorded)
            Calibration(archive, norm)  # needs the darks/flats the run used
            return norm, "recorded"
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            warnings.append(
                f"the recorded normalisation cannot be used with {archive.path} ({err!r}); "
                "refitted it on the truth archive"
            )
    else:
        warnings.append(
            f"{recon.path} records no normalisation ({RECON_PROCESS} attribute 'normalisation'); "
            "refitted it on the truth archive"
        )
    return fit_normalisation(archive), "refit"


def _check_pair(recon: _Recon, archive: Archive, warnings: list[str]) -> None:
    if not archive.has_gt:
        archive.read_gt(0, 1)  # raises the UserError that says why there is no usable truth
    expected = (archive.n_frames, *archive.hr_shape)
    if recon.shape != expected:
        raise UserError(
            f"{recon.path}: {RECON_DATA} has shape {recon.shape} but the ground truth of "
            f"{archive.path} is {expected} (N frames at HR size); pass the archive this "
            "reconstruction was made from"
        )
    if recon.hr_index is not None and recon.hr_index != [int(k) for k in archive.hr_index]:
        raise UserError(
            f"{recon.path}: its key frames (/exchange/hr_index) differ from those of "
            f"{archive.path}; pass the archive (and --hr-stride/--hr-offset) the reconstruction "
            "was made with"
        )
    recorded = recon.input.get("fingerprint")
    if isinstance(recorded, str) and recorded != archive.fingerprint():
        warnings.append(
            f"{archive.path} does not have the fingerprint recorded in {recon.path}; its "
            "LR/HR frames differ from the reconstructed input"
        )


# --------------------------------------------------------------------------------------------
# scoring


def _score(
    recon: _Recon,
    archive: Archive,
    base: _Baselines,
    frames: Sequence[int],
    progress: bool,
    constant: list[int] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], list[str]]:
    """Per-frame PSNR/SSIM of every method, and which baseline was best per frame.

    Frames whose truth is constant (data range 0) are appended to ``constant``.
    """
    scores: dict[str, dict[str, list[float]]] = {m: {"psnr": [], "ssim": []} for m in METHODS}
    choice: list[str] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(frames), unit="frame", desc="evaluate", leave=False)
    try:
        for t in frames:
            truth = archive.read_gt(t, t + 1)[0]
            rng = _frame_range(truth)
            if rng == 0 and constant is not None:
                constant.append(t)
            images = {METHOD: recon.frame(t), **base.frame(t)}
            for name, img in images.items():
                scores[name]["psnr"].append(_psnr(img, truth, rng))
                scores[name]["ssim"].append(_ssim(img, truth, rng))
            # the better baseline by PSNR (ties and NaN go to the first one that is not NaN)
            pa, pb = scores["lr_bicubic"]["psnr"][-1], scores["key_blend"]["psnr"][-1]
            best = "key_blend" if (pb > pa or math.isnan(pa)) else "lr_bicubic"
            choice.append(best)
            scores[BEST_BASELINE]["psnr"].append(scores[best]["psnr"][-1])
            scores[BEST_BASELINE]["ssim"].append(scores[best]["ssim"][-1])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return scores, choice


def evaluate(
    recon: str | os.PathLike[str],
    truth: str | os.PathLike[str],
    frames: str = "between",
    max_frames: int | None = None,
    progress: bool = False,
    *,
    paths: ArchivePaths | Mapping[str, str] | None = None,
    hr_stride: int | None = None,
    hr_offset: int | None = None,
) -> dict[str, Any]:
    """Score ``recon`` (``/exchange/data``) against ``truth`` (``/exchange/data_gt``).

    ``truth`` is opened as an :class:`Archive` with the dataset paths and key-frame stride the
    run recorded (``/process/xvr_batch`` attribute ``input``) unless ``paths``, ``hr_stride``
    or ``hr_offset`` are given. Raises :class:`UserError` when the truth has no usable
    ``data_gt``, the reconstruction lacks ``/exchange/data``, or their shapes or key frames
    differ.

    Returns a JSON-serialisable dict (infinities as ``"inf"`` strings, see the module docstring)::

        {"frames": [t, ...], "frame_selection": "between",
         "methods": {name: {"psnr": [...], "ssim": [...], "mean_psnr": x, "mean_ssim": x,
                            "margin_db": x}, ...},   # best_baseline also has "choice"
         "margin_db": mean_psnr(swin_xvr) - mean_psnr(best_baseline),
         "data_range": DATA_RANGE, "units": "HR camera counts",
         "recon": path, "truth": path, "n_frames": N, "n_candidates": n, "key_frames": [...],
         "scale": s, "normalisation": {...}, "normalisation_source": "recorded" | "refit",
         "archive": {"paths": {...}, "hr_stride": S | None, "hr_offset": O},
         "lr_consistency": {"n", "median", "mean", "mad", "max", "worst_frame", "threshold", "n_flagged",
                            "flagged": [every flagged frame], "sigma", "metric"} | None,
         "warnings": [...]}

    ``lr_consistency`` summarises the reconstruction's own ``/exchange/lr_consistency`` (every frame, key
    frames included; :mod:`xvr_batch.consistency`); None for an output written without it.

    ``methods[name]["margin_db"]`` is that method's mean PSNR minus the best baseline's.
    """
    recon_path, truth_path = os.fspath(recon), os.fspath(truth)
    if frames not in FRAME_SELECTIONS:
        raise UserError(f"--frames {frames!r}: choose one of {', '.join(FRAME_SELECTIONS)}")
    warnings: list[str] = []
    with _Recon(recon_path) as rec:
        opts = _archive_options(rec, paths, hr_stride, hr_offset)
        with Archive(truth_path, **opts) as archive:
            _check_pair(rec, archive, warnings)
            consistency = rec.consistency
            if rec.consistency_error:
                warnings.append(f"{recon_path}: /exchange/lr_consistency is unreadable ({rec.consistency_error})")
            selected = select_frames(archive.n_frames, archive.hr_index, frames, None)
            n_candidates = len(selected)
            selected = select_frames(archive.n_frames, archive.hr_index, frames, max_frames)
            norm, source = _choose_normalisation(rec, archive, warnings)
            base = _Baselines(archive, norm)
            constant: list[int] = []
            scores, choice = _score(rec, archive, base, selected, progress, constant)
            if constant:
                warnings.append(
                    f"{len(constant)} ground-truth frame(s) are constant (data range 0, e.g. frame "
                    f"{constant[0]}): PSNR/SSIM are undefined there unless the image is identical "
                    "(null in the result, left out of the means)"
                )
            key_frames = [int(k) for k in archive.hr_index]
            n_frames, scale = archive.n_frames, archive.scale
            archive_record = {
                "paths": opts["paths"].to_dict(),
                "hr_stride": archive.hr_stride,
                "hr_offset": archive.hr_offset,
            }

    best_mean = _mean(scores[BEST_BASELINE]["psnr"])
    methods: dict[str, dict[str, Any]] = {}
    for name in METHODS:
        psnr, ssim = scores[name]["psnr"], scores[name]["ssim"]
        mean_psnr = _mean(psnr)
        methods[name] = {
            "psnr": [_jsonable(v) for v in psnr],
            "ssim": [_jsonable(v) for v in ssim],
            "mean_psnr": _jsonable(mean_psnr),
            "mean_ssim": _jsonable(_mean(ssim)),
            "margin_db": _jsonable(_diff(mean_psnr, best_mean)),
        }
    methods[BEST_BASELINE]["choice"] = choice
    return {
        "frames": selected,
        "frame_selection": frames,
        "methods": methods,
        "margin_db": methods[METHOD]["margin_db"],
        "data_range": DATA_RANGE,
        "units": "HR camera counts",
        "recon": recon_path,
        "truth": truth_path,
        "n_frames": n_frames,
        "n_candidates": n_candidates,
        "key_frames": key_frames,
        "scale": scale,
        "normalisation": norm.to_dict(),
        "normalisation_source": source,
        "archive": archive_record,
        "lr_consistency": consistency,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------
# reporting


def _fmt(value: float, spec: str, signed: bool = False) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return ("+inf" if signed else "inf") if value > 0 else "-inf"
    return format(value, ("+" if signed else "") + spec)


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table: method, mean PSNR, mean SSIM, margin vs the best baseline."""
    frames = result["frames"]
    sel = result.get("frame_selection", "between")
    where = "strictly between key frames" if sel == "between" else "all non-key frames"
    lines = [
        f"reconstruction: {result['recon']}",
        f"ground truth:   {result['truth']}",
        f"frames scored:  {len(frames)} ({where}"
        + (
            f", {len(frames)} of {result['n_candidates']} sampled"
            if result.get("n_candidates", len(frames)) != len(frames)
            else ""
        )
        + f") of {result.get('n_frames', '?')}",
        f"units:          {result.get('data_range', DATA_RANGE)}",
        "",
    ]
    header = f"{'method':<15} {'mean PSNR [dB]':>15} {'mean SSIM':>10} {'vs best baseline [dB]':>22}"
    lines += [header, "-" * len(header)]
    for name in METHODS:
        m = result["methods"].get(name)
        if m is None:
            continue
        lines.append(
            f"{name:<15} {_fmt(as_float(m['mean_psnr']), '.2f'):>15} "
            f"{_fmt(as_float(m['mean_ssim']), '.4f'):>10} "
            f"{_fmt(as_float(m['margin_db']), '.2f', signed=True):>22}"
        )
    choice = result["methods"].get(BEST_BASELINE, {}).get("choice")
    if choice:
        counts = ", ".join(f"{b} {choice.count(b)}" for b in BASELINES)
        lines.append(f"best baseline per frame: {counts}")
    lines.append(f"normalisation: {result.get('normalisation_source', '?')}")
    cons = result.get("lr_consistency")
    if isinstance(cons, Mapping):
        from xvr_batch.consistency import describe

        lines.append(f"LR consistency ({cons.get('n', 0)} frames, bin4(recon) vs LR / key-frame residual): "
                     f"{describe(cons)}")
        flagged = list(cons.get("flagged") or [])
        if flagged:
            shown = ", ".join(str(t) for t in flagged[:50]) + (", ..." if len(flagged) > 50 else "")
            lines.append(f"flagged frames: {shown}")
    for w in result.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def _representative_frame(frames: Sequence[int], key_frames: Sequence[int]) -> int:
    """The scored frame farthest from any key frame; ties go to the one nearest the middle."""
    keys = np.asarray(key_frames, dtype=np.int64)
    mid = (frames[0] + frames[-1]) / 2
    return int(max(frames, key=lambda t: (int(np.abs(keys - t).min()), -abs(t - mid))))


def plot(
    result: Mapping[str, Any],
    recon: str | os.PathLike[str] | None = None,
    truth: str | os.PathLike[str] | None = None,
    out_png: str | os.PathLike[str] = "evaluate.png",
) -> None:
    """Write a PNG: PSNR over time of every method, and, for a representative scored frame
    (the one farthest from a key frame), LR bicubic | key-frame blend | reconstruction | truth.

    ``recon``/``truth`` default to the paths in ``result``; the archive options and the
    normalisation are taken from ``result``. Uses matplotlib's Agg canvas without touching
    pyplot's global state; ``MPLCONFIGDIR`` is pointed at a temporary directory when unset.
    """
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="xvr-batch-mpl-")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    recon_path = os.fspath(recon if recon is not None else result["recon"])
    truth_path = os.fspath(truth if truth is not None else result["truth"])
    frames = [int(t) for t in result["frames"]]
    keys = [int(k) for k in result["key_frames"]]
    t_show = _representative_frame(frames, keys)
    i_show = frames.index(t_show)

    arch = result.get("archive", {})
    with Archive(
        truth_path,
        ArchivePaths.from_dict(arch.get("paths")),
        arch.get("hr_stride"),
        int(arch.get("hr_offset") or 0),
    ) as archive:
        truth_img = archive.read_gt(t_show, t_show + 1)[0]
        (_, base_imgs), = baselines_for_archive(archive, [t_show], result["normalisation"])
    with _Recon(recon_path) as rec:
        recon_img = rec.frame(t_show)

    fig = Figure(figsize=(14, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 4, height_ratios=[1.0, 1.25])
    ax = fig.add_subplot(grid[0, :])
    styles = {
        METHOD: dict(color="C3", lw=2.0, marker="o", ms=3),
        "lr_bicubic": dict(color="C0", lw=1.0, marker=".", ms=3),
        "key_blend": dict(color="C2", lw=1.0, marker=".", ms=3),
        BEST_BASELINE: dict(color="0.3", lw=1.0, ls="--"),
    }
    series = {name: np.array([as_float(v) for v in result["methods"][name]["psnr"]]) for name in METHODS}
    finite = np.concatenate([s[np.isfinite(s)] for s in series.values()])
    top = float(finite.max()) + 5.0 if finite.size else 60.0
    any_inf = False
    for name in METHODS:
        y = series[name].copy()
        inf = np.isposinf(y)
        any_inf |= bool(inf.any())
        y[inf] = top  # identical frames: drawn on a line labelled "inf"
        mean = _fmt(as_float(result["methods"][name]["mean_psnr"]), ".2f")
        ax.plot(frames, y, label=f"{name} (mean {mean} dB)", **styles[name])
    if any_inf:
        ax.axhline(top, color="k", lw=0.5, ls=":")
        ax.annotate("inf", (1.0, top), xycoords=("axes fraction", "data"), ha="left", va="center")
    for k in keys:
        if frames[0] - 1 <= k <= frames[-1] + 1:
            ax.axvline(k, color="0.75", lw=0.8, ls=":", zorder=0)
    ax.axvline(t_show, color="C1", lw=1.0, alpha=0.6, zorder=0)
    ax.set_xlabel("frame (LR time index); dotted: key frames, orange: frame shown below")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("PSNR [dB]")
    ax.set_title(
        f"PSNR per frame ({len(frames)} frames, {result.get('frame_selection', 'between')}); "
        "HR counts, data range = truth max - min per frame"
    )
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)

    titled = []
    for name, title, img in (("lr_bicubic", "LR bicubic", base_imgs["lr_bicubic"]),
                             ("key_blend", "key-frame blend", base_imgs["key_blend"]),
                             (METHOD, "reconstruction", recon_img), (None, "ground truth", truth_img)):
        if name is not None:
            p = _fmt(as_float(result["methods"][name]["psnr"][i_show]), ".2f")
            s = _fmt(as_float(result["methods"][name]["ssim"][i_show]), ".3f")
            title += f"\nPSNR {p} dB, SSIM {s}"
        else:
            title += f"\nframe {t_show}"
        titled.append((title, img))
    image_row(fig, grid[1, :], titled, truth_img)
    save_plot(fig, out_png)


def image_row(fig, cells, panels: Sequence[tuple[str, np.ndarray]], reference: np.ndarray) -> None:
    """Draw ``panels`` ((title, image), ...) side by side in the gridspec row ``cells``, in grey on one scale:
    the range of ``reference`` (the truth), widened by ±0.5 when it is flat."""
    lo, hi = float(reference.min()), float(reference.max())
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    sub = cells.subgridspec(1, len(panels))
    for j, (title, img) in enumerate(panels):
        pax = fig.add_subplot(sub[0, j])
        pax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        pax.set_title(title, fontsize="medium")
        pax.set_axis_off()


def save_plot(fig, out_png: str | os.PathLike[str]) -> None:
    """Write ``fig`` as a PNG; an unwritable path is the user's one-line error."""
    try:
        fig.savefig(os.fspath(out_png), dpi=100)
    except OSError as err:
        raise UserError(f"{out_png}: cannot write the plot ({err})") from err
