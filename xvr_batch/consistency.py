"""Per-frame LR consistency: does each reconstructed frame, binned back to the LR grid, match its own LR frame?

Metric
    For output frame t, in model space (the normalised intensity the network works in):

        r_t   = bin_s(recon_t) - LR_t          bin_s = mean over s x s blocks (s = 4), ``avg_pool2d``
        rms_t = sqrt(mean(r_t ** 2))           over the grid pixels inside the LR field
        chi_t = rms_t / sigma                  stored, dimensionless

    ``LR_t`` is the LR frame exactly as the model saw it (flat-fielded, mapped by the fitted LR->HR gain; with a
    registration applied, the model works in the LR camera's frame, and only the LR pixels whose footprint the HR
    camera sees count: ``RegisteredArchive.lr_inside``; the reconstruction there is binned before it is resampled
    back onto the HR camera's pixels).

    ``sigma`` is fitted once per archive at plan time (:func:`fit_baseline`, kept in the manifest): the median,
    over up to 32 key frames, of the same RMS with the *measured* HR key frame in place of the reconstruction,
    ``rms(bin_s(HR_k) - LR_{t_k})``. It is what a perfect reconstruction would score against its LR frame on
    this archive: the LR camera's noise, the HR camera's binned noise and whatever the two cameras disagree on
    (point spread, registration, residual gain error). So ``chi ~ 1`` means "as consistent with its LR frame as
    a real HR frame is", whatever the dose, the contents or the intensity range of the archive, and ``chi = 3``
    means a residual three times that. (A per-frame noise estimate from the LR frame itself was rejected: an LR
    frame swamped by noise would then normalise its own residual away.)

    Beside ``sigma`` the record keeps the LR camera's transfer kernel (:mod:`xvr_batch.lrpsf`) and the residual
    it leaves, ``sigma_kernel`` (both None when no kernel pays); the motion step of ``--refine lr`` compares
    through it. ``chi`` keeps the plain binning.

Flags
    A frame is flagged when ``chi_t > threshold`` (:data:`DEFAULT_THRESHOLD` = 1.5: the binned reconstruction
    departs from its LR frame 50 % more, in RMS, than a measured HR frame does, i.e. the model's own binned error
    is above ~1.1 sigma). The rule is a fixed, per-frame one, so that a frame's flag never depends on the unit
    size, the other frames or where it is summarised (journal, ``status``, output file, ``evaluate`` all agree).
    The summaries also give the median and a robust spread (1.4826 MAD), so that a run that is inconsistent as a
    whole (median near or above the threshold, e.g. weights that do not fit the data) is visible too; a
    run-relative outlier rule (median + k MAD) was not used for the flags, because it would make a frame's flag
    depend on where it is summarised. Measured (synthetic HR 128x160, 60 frames, shipped lite weights): clean
    frames 0.91-0.99 (MAD 0.02); an LR frame with added noise 4.5; an LR frame shifted by 3 px 1.9.

    What it does not see: an LR frame that is wrong but plausible (another frame's LR in its place) is followed
    by the model, so the reconstruction is consistent with it (chi stays ~1). The metric checks the reconstruction
    against the input it was given, not the input against the world.

Key frames are reconstructed like every other frame and are scored the same way (not NaN); their LR frame is an
input like any other. On the device the metric costs one ``avg_pool2d`` and a few reductions per batch
(:func:`residual_rms`), computed from the batch's own tensors, so every value is as deterministic as the output
frames: byte-identical across unit sizes, backends and resumes.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["DATASET", "METRIC", "DEFAULT_THRESHOLD", "fit_baseline", "check_record", "residual_rms",
           "summarise", "merge_summaries", "describe", "read_output", "attrs_for"]

#: Dataset of the output (and of each part, as ``lr_consistency``).
DATASET = "/exchange/lr_consistency"
PART_DATASET = "lr_consistency"
METRIC = ("rms(bin4(recon) - LR) / sigma in model space over the LR field; sigma = median over key frames of "
          "rms(bin4(HR key) - LR) (the residual of a measured HR frame)")
UNITS = "1 (noise-normalised RMS residual; 1 = as consistent as a measured HR key frame)"
DEFAULT_THRESHOLD = 1.5
#: Key frames used to fit sigma (evenly spaced).
MAX_BASELINE_KEYS = 32
#: Floor of sigma in model units (the model maps the HR 0.1..99.9 percentiles to 0..1): a noiseless archive
#: must not turn rounding into huge ratios.
SIGMA_FLOOR = 1e-3
#: Flagged frames listed in a journal record / in the output's attributes.
MAX_LISTED_JOURNAL = 10
MAX_LISTED_OUTPUT = 1000


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w = (x.shape[0] // f) * f, (x.shape[1] // f) * f
    return x[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def fit_baseline(archive, calib, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """``{"sigma", "n_keys", "threshold", "scale", "kernel", "sigma_kernel"}``: the residual of measured HR key
    frames against their LR frames (see the module docstring), and the LR camera's transfer kernel fitted on the
    same pairs with the residual it leaves (:func:`xvr_batch.lrpsf.fit_kernel`; both None when it cannot be
    fitted). ``archive`` is the (registered) archive the units read."""
    from xvr_batch.lrpsf import fit_kernel, residual as kernel_residual

    inside = getattr(archive, "lr_inside", None)
    k_all = len(archive.hr_index)
    picks = sorted({int(round(i)) for i in np.linspace(0, k_all - 1, min(k_all, MAX_BASELINE_KEYS))})
    s = int(archive.scale)
    rms, pairs = [], []
    for k in picks:
        t = int(archive.hr_index[k])
        hr = calib.hr_to_model(archive.read_hr(k)).astype(np.float64)
        raw = archive.read_lr_at([t])
        lr = calib.lr_to_model(raw, frames=[t])[0].astype(np.float64)
        binned = _block_mean(hr, s)
        d = binned - lr
        measured = calib.lr_measured(raw[0], inside)
        pairs.append((binned, lr, measured))
        if inside is not None:
            d = d[np.asarray(inside)]
        if d.size:
            rms.append(float(np.sqrt(np.mean(d * d))))
    sigma = float(np.median(rms)) if rms else float("nan")
    if not math.isfinite(sigma) or sigma < SIGMA_FLOOR:
        sigma = SIGMA_FLOOR
    fit = fit_kernel(pairs)
    kernel = sigma_k = None
    if fit is not None:
        res = [v for v in (kernel_residual(*p, fit[0]) for p in pairs) if v is not None]
        if res and math.isfinite(float(np.median(res))):
            kernel, sigma_k = fit[0], max(float(np.median(res)), SIGMA_FLOOR)
    return {"sigma": sigma, "n_keys": len(rms), "threshold": float(threshold), "scale": s,
            "kernel": None if kernel is None else kernel.tolist(), "sigma_kernel": sigma_k}


def check_record(d: Any) -> dict | None:
    """A recorded baseline (manifest) if it is usable, else None (then it is fitted again)."""
    if not isinstance(d, dict):
        return None
    try:
        sigma, thr = d["sigma"], d["threshold"]
    except KeyError:
        return None
    for v in (sigma, thr):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            return None
    from xvr_batch.lrpsf import check_kernel

    kernel, sigma_k = check_kernel(d.get("kernel")), d.get("sigma_kernel")
    if (kernel is None or isinstance(sigma_k, bool) or not isinstance(sigma_k, (int, float))
            or not math.isfinite(sigma_k) or sigma_k <= 0):
        kernel = sigma_k = None  # recorded before the kernel existed, or unusable: the plain binning
    return {"sigma": float(sigma), "n_keys": int(d.get("n_keys", 0)) if isinstance(d.get("n_keys"), int) else 0,
            "threshold": float(thr), "scale": int(d.get("scale", 4)) if isinstance(d.get("scale"), int) else 4,
            "kernel": None if kernel is None else kernel.tolist(),
            "sigma_kernel": None if sigma_k is None else float(sigma_k)}


def residual_rms(out, lr, slots, scale: int, inside=None):
    """(B, n_out) RMS over the LR field of ``bin_scale(out) - lr[:, slots]`` (torch, on the batch's device).

    ``out``: (B, n_out, H, W) model-space output; ``lr``: (B, NL, h, w) model-space input; ``slots``: the LR
    slot of each output slot (a list); ``inside``: None or an (h, w) float 0/1 mask of the LR field."""
    import torch
    import torch.nn.functional as F

    b, n, hh, ww = out.shape
    binned = F.avg_pool2d(out.reshape(b * n, 1, hh, ww).float(), scale).reshape(b, n, hh // scale, ww // scale)
    ref = lr[:, slots] if list(slots) != list(range(lr.shape[1])) else lr
    d = binned - ref.float()
    if inside is None:
        return torch.sqrt(d.square().mean(dim=(-2, -1)))
    d = d * inside
    return torch.sqrt(d.square().sum(dim=(-2, -1)) / inside.sum())


def _finite(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.isfinite(v)


def summarise(values: Sequence[float] | np.ndarray, start: int, threshold: float,
              max_listed: int = MAX_LISTED_JOURNAL) -> dict:
    """JSON-safe summary of consecutive frames ``start, start+1, ...``: n, median, mean, mad (1.4826 MAD), max,
    worst_frame, n_flagged, flagged (the first ``max_listed`` frame numbers over ``threshold``). Non-finite values
    are left out (n counts the finite ones)."""
    v = np.asarray(values, dtype=np.float64)
    ok = _finite(v)
    good = v[ok]
    frames = np.arange(start, start + len(v))[ok]
    if good.size == 0:
        return {"n": 0, "threshold": float(threshold), "n_flagged": 0, "flagged": []}
    med = float(np.median(good))
    over = frames[good > threshold]
    i = int(np.argmax(good))
    return {"n": int(good.size), "median": round(med, 6), "mean": round(float(good.mean()), 6),
            "mad": round(float(1.4826 * np.median(np.abs(good - med))), 6), "max": round(float(good[i]), 6),
            "worst_frame": int(frames[i]), "threshold": float(threshold), "n_flagged": int(over.size),
            "flagged": [int(t) for t in over[:max_listed]]}


def _num(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _valid_unit_summary(s: Any) -> bool:
    if not isinstance(s, dict) or not isinstance(s.get("n"), int) or isinstance(s.get("n"), bool) or s["n"] < 0:
        return False
    if s["n"] == 0:
        return True
    if not all(_num(s.get(k)) for k in ("median", "max")):
        return False
    if not isinstance(s.get("worst_frame"), int) or not isinstance(s.get("n_flagged"), int):
        return False
    fl = s.get("flagged")
    return isinstance(fl, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in fl)


def merge_summaries(records: Iterable[Any], max_listed: int = MAX_LISTED_JOURNAL) -> dict | None:
    """Summary of a run from its units' journal summaries (``status``): frames scored, median of the unit
    medians, the worst frame, the number of flagged frames and the first few. Malformed entries (a tampered
    journal) are skipped. None if no unit has a summary."""
    units = [s for s in records if _valid_unit_summary(s)]
    scored = [s for s in units if s["n"] > 0]
    if not units:
        return None
    out: dict = {"units": len(units), "n": sum(s["n"] for s in units)}
    if scored:
        worst = max(scored, key=lambda s: s["max"])
        flagged = sorted({t for s in scored for t in s["flagged"]})
        out.update(median=round(float(np.median([s["median"] for s in scored])), 6), max=worst["max"],
                   worst_frame=worst["worst_frame"], n_flagged=sum(max(0, s["n_flagged"]) for s in scored),
                   flagged=flagged[:max_listed])
        thr = [s.get("threshold") for s in scored if _num(s.get("threshold"))]
        if thr:
            out["threshold"] = thr[0]
    return out


def describe(summary: Mapping[str, Any] | None, median_label: str = "median") -> str:
    """One line: ``median 1.02, worst 4.31 (frame 37); 2 frames over 3 (17, 37)``."""
    if not summary or not summary.get("n"):
        return "no frames scored"
    thr = summary.get("threshold", DEFAULT_THRESHOLD)
    n_fl = int(summary.get("n_flagged", 0))
    listed = list(summary.get("flagged", []))[:MAX_LISTED_JOURNAL]
    text = (f"{median_label} {summary['median']:.2f}, worst {summary['max']:.2f} (frame {summary['worst_frame']}); "
            f"{n_fl} frame{'s' if n_fl != 1 else ''} over {thr:g}")
    if listed:
        text += " (" + ", ".join(str(t) for t in listed) + (", ..." if n_fl > len(listed) else "") + ")"
    if _num(summary.get("median")) and summary["median"] > thr:
        text += "; the whole run is inconsistent with its LR frames"
    return text


def attrs_for(values: np.ndarray, baseline: Mapping[str, Any]) -> dict:
    """The attributes of the output dataset."""
    thr = float(baseline.get("threshold", DEFAULT_THRESHOLD))
    s = summarise(values, 0, thr, max_listed=MAX_LISTED_OUTPUT)
    return {
        "metric": METRIC, "units": UNITS, "threshold": thr, "flag_rule": "value > threshold",
        "sigma": float(baseline.get("sigma", float("nan"))), "sigma_units": "model intensity (HR 0.1..99.9 % -> 0..1)",
        "sigma_keys": int(baseline.get("n_keys", 0)), "scale": int(baseline.get("scale", 4)),
        "key_frames": "scored like every other frame", "n_flagged": s["n_flagged"],
        "flagged_frames": np.asarray(s["flagged"], dtype=np.int64),
        "flagged_frames_listed": f"the first {MAX_LISTED_OUTPUT}; all are data > threshold",
        "median": s.get("median", float("nan")), "max": s.get("max", float("nan")),
        "worst_frame": s.get("worst_frame", -1),
    }


def read_output(f) -> dict | None:
    """Summary of ``/exchange/lr_consistency`` of an open output file (None when absent): as :func:`summarise`,
    over every frame, with ``flagged`` listing them all, plus sigma and the metric."""
    import h5py

    ds = f.get(DATASET)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind != "f":
        return None
    values = np.asarray(ds[()], dtype=np.float64)
    thr, sigma = ds.attrs.get("threshold", DEFAULT_THRESHOLD), ds.attrs.get("sigma")
    try:
        thr = float(thr)
    except (TypeError, ValueError):
        thr = DEFAULT_THRESHOLD
    if not math.isfinite(thr):
        thr = DEFAULT_THRESHOLD
    try:
        sigma = float(sigma)
    except (TypeError, ValueError):
        sigma = None
    s = summarise(values, 0, thr, max_listed=len(values))
    s["sigma"] = sigma if sigma is not None and math.isfinite(sigma) else None
    s["metric"] = METRIC
    return s
