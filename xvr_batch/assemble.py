"""``xvr-batch assemble``: one standard archive from two detectors' files, two clocks and two views.

1. **Sources** (:mod:`xvr_batch.io.sources`): LR and HR frames, and optional darks/flats of each camera.
2. **Clocks** (:func:`match_clocks`): every HR frame is matched to the LR frame nearest in time. The LR
   camera's clock is the reference: HR times (``--hr-time`` or ``--hr-rate``) plus ``--hr-delay`` are LR-clock
   times. HR frames recorded before the first or after the last LR frame are left out (noted). Dropped LR
   frames, timestamps that do not increase, matches beyond the tolerance, clocks that drift and two HR frames
   on one LR frame are one-line errors naming the frame and the gap. The residuals (HR time minus matched LR
   time, seconds) are stored in ``/exchange/timing/match_residual``.
3. **Registration** (:mod:`xvr_batch.registration`): fitted on the key pairs and stored in
   ``/exchange/registration`` (2x3 float64, LR pixel (x, y, 1) -> HR/scale grid, attributes).
4. **Writing**: under a temporary name, then renamed (the archive is complete or absent). Data is copied,
   chunked one frame per chunk and gzip-compressed, or with ``link`` (HDF5 sources only) referenced: the whole
   dataset through an external link (relative path), a subset of frames through a virtual dataset (absolute).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import h5py
import numpy as np

from xvr_batch.errors import UserError
from xvr_batch.io.sources import FrameSource, open_source, read_times

__all__ = ["assemble", "match_clocks"]

#: Largest gap between consecutive LR frames, in LR periods, before frames count as dropped.
DROP_FACTOR = 1.5


def _check_increasing(t: np.ndarray, cam: str, src: str) -> None:
    bad = np.flatnonzero(np.diff(t) <= 0)
    if bad.size:
        i = int(bad[0])
        raise UserError(f"{src}: {cam} timestamps do not increase at frame {i + 1} (frame {i} at {t[i]:.9g} s, "
                        f"frame {i + 1} at {t[i + 1]:.9g} s); fix the timestamps")


def match_clocks(lr_t: np.ndarray, hr_t: np.ndarray, tolerance: float = 0.25, lr_src: str = "--lr-time",
                 hr_src: str = "--hr-time") -> dict[str, Any]:
    """Match each HR time to the nearest LR time (both on the LR clock, seconds).

    Returns ``{hr_frames, hr_index, residual, period, dropped_before, dropped_after}``: the HR frames used,
    the LR index of each, HR minus LR time. ``tolerance`` is in LR periods (< 0.5, so a match is unique).
    """
    lr_t, hr_t = np.asarray(lr_t, np.float64), np.asarray(hr_t, np.float64)
    if lr_t.size < 2:
        raise UserError(f"{lr_src}: at least 2 LR frames are needed, got {lr_t.size}")
    if not 0 < tolerance < 0.5:
        raise UserError(f"--time-tolerance {tolerance:g}: give a fraction of an LR period in (0, 0.5)")
    _check_increasing(lr_t, "LR", lr_src)
    _check_increasing(hr_t, "HR", hr_src)
    dl = np.diff(lr_t)
    period = float(np.median(dl))
    gaps = np.flatnonzero(dl > DROP_FACTOR * period)
    if gaps.size:
        i = int(gaps[0])
        raise UserError(f"{lr_src}: LR frames {i} and {i + 1} are {dl[i]:.6g} s apart, {dl[i] / period:.2f} LR periods "
                        f"({period:.6g} s): the LR camera dropped frames there ({gaps.size} gap(s) in all); "
                        "xvr_batch needs one LR frame per time step: split the recording at the gap")
    tol = tolerance * period
    before = hr_t < lr_t[0] - tol
    after = hr_t > lr_t[-1] + tol
    use = np.flatnonzero(~before & ~after)
    if use.size < 2:
        raise UserError(f"{hr_src}: only {use.size} HR frame(s) fall within the LR recording "
                        f"({lr_t[0]:.9g}..{lr_t[-1]:.9g} s on the LR clock; HR {hr_t[0]:.9g}..{hr_t[-1]:.9g} s); "
                        "check --hr-delay (HR clock to LR clock) and the rates or timestamps")
    t = hr_t[use]
    j = np.clip(np.searchsorted(lr_t, t), 1, lr_t.size - 1)
    nearest = np.where(np.abs(lr_t[j - 1] - t) <= np.abs(lr_t[j] - t), j - 1, j)
    res = t - lr_t[nearest]
    if use.size >= 3:
        slope, icpt = np.polyfit(t - t[0], res, 1)
        span = float(t[-1] - t[0])
        if abs(slope * span) > 0.5 * tol:
            k = int(np.argmax(np.abs(res - res[0]) > 0.5 * tol))
            raise UserError(f"{hr_src}: the clocks drift: the HR-LR offset goes from {res[0]:.4g} s (HR frame "
                            f"{int(use[0])}) to {res[k]:.4g} s (HR frame {int(use[k])}), {slope * 1e6:.1f} ppm; "
                            "give the exact --hr-rate, or per-frame --hr-time/--lr-time timestamps on one clock")
    bad = np.flatnonzero(np.abs(res) > tol)
    if bad.size:
        k = int(bad[0])
        raise UserError(f"{hr_src}: HR frame {int(use[k])} at {t[k]:.9g} s has no LR frame within {tol:.3g} s: the "
                        f"nearest, LR frame {int(nearest[k])}, is {res[k]:+.4g} s away ({res[k] / period:+.2f} LR "
                        f"periods; {bad.size} such frame(s)); check --hr-delay, the rates or the timestamps, or "
                        "raise --time-tolerance")
    dup = np.flatnonzero(np.diff(nearest) == 0)
    if dup.size:
        k = int(dup[0])
        raise UserError(f"{hr_src}: ambiguous match: HR frames {int(use[k])} and {int(use[k + 1])} both fall on LR "
                        f"frame {int(nearest[k])} ({t[k]:.9g} and {t[k + 1]:.9g} s); the HR camera cannot be faster "
                        "than the LR camera; check the rates or timestamps")
    return {"hr_frames": use.astype(np.int64), "hr_index": nearest.astype(np.int64), "residual": res,
            "period": period, "dropped_before": int(before.sum()), "dropped_after": int(after.sum()),
            "lr_time": lr_t, "hr_time": t}


def _times(src: str | None, rate: float | None, n: int, cam: str, flag: str) -> np.ndarray:
    if src is not None and rate is not None:
        raise UserError(f"give either --{cam}-time or --{cam}-rate, not both")
    if src is not None:
        t = read_times(src, f"--{cam}-time")
        if t.size != n:
            raise UserError(f"{src}: {t.size} timestamps but the {cam.upper()} source has {n} frames (--{cam}-time)")
        return t
    if rate is None:
        raise UserError(f"give --{cam}-time SRC (per-frame timestamps) or --{cam}-rate HZ for the {cam.upper()} camera")
    if not (rate > 0 and math.isfinite(rate)):
        raise UserError(f"--{cam}-rate must be a positive number of frames per second, got {rate:g}")
    return np.arange(n, dtype=np.float64) / float(rate)


def _check_output(output: str, overwrite: bool, inputs: list[str]) -> None:
    out = os.path.abspath(output)
    parent = os.path.dirname(out)
    if os.path.isdir(out):
        raise UserError(f"{output}: is a directory; give a file name such as {os.path.join(output, 'archive.h5')}")
    if not os.path.isdir(parent):
        raise UserError(f"{output}: output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{output}: output folder {parent} is not writable; choose another -o")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{output}: already exists; pass --overwrite to replace it or choose another -o")
    for src in inputs:
        f = src.split(".h5:")[0] + ".h5" if ".h5:" in src else src
        if os.path.exists(f) and os.path.abspath(f) == out:
            raise UserError(f"{output}: the output would overwrite the input {src}; choose another -o")


def _flat(x: np.ndarray, dark: np.ndarray | None, flat: np.ndarray | None) -> np.ndarray:
    from xvr_batch.registration import _flat as ff
    return ff(x, dark, flat)


def _copy(f: h5py.File, path: str, src: FrameSource, rows: np.ndarray | None = None) -> None:
    n = src.shape[0] if rows is None else len(rows)
    ds = f.create_dataset(path, shape=(n, *src.shape[1:]), dtype=src.dtype, chunks=(1, *src.shape[1:]),
                          compression="gzip", compression_opts=4, shuffle=True)
    if rows is None:
        for a in range(0, n, 16):
            b = min(n, a + 16)
            ds[a:b] = src.read(a, b)
    else:
        for i, r in enumerate(rows):
            ds[i] = src.read(int(r), int(r) + 1)[0]
    ds.flush()


def _link(f: h5py.File, path: str, src: FrameSource, output: str, rows: np.ndarray | None = None) -> None:
    fname, dsname = src.h5
    if rows is None or (len(rows) == src.shape[0] and np.array_equal(rows, np.arange(src.shape[0]))):
        rel = os.path.relpath(fname, os.path.dirname(os.path.abspath(output)))
        f[path] = h5py.ExternalLink(rel, dsname)
        return
    layout = h5py.VirtualLayout(shape=(len(rows), *src.shape[1:]), dtype=src.dtype)
    vsrc = h5py.VirtualSource(fname, dsname, shape=src.shape, dtype=src.dtype)
    for i, r in enumerate(rows):
        layout[i] = vsrc[int(r)]
    f.create_virtual_dataset(path, layout)


def assemble(output: str, lr: str, hr: str, lr_dark: str | None = None, lr_flat: str | None = None,
             hr_dark: str | None = None, hr_flat: str | None = None, lr_time: str | None = None,
             hr_time: str | None = None, lr_rate: float | None = None, hr_rate: float | None = None,
             hr_delay: float = 0.0, tolerance: float = 0.25, link: bool = False, overwrite: bool = False,
             register: bool = True, scale: int = 4, affine: bool = False,
             log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Build the archive ``output`` from the two cameras' sources; returns a summary (also printed by the CLI)."""
    from xvr_batch.durable import AtomicH5File
    from xvr_batch.registration import Registration, fit_pairs

    inputs = [s for s in (lr, hr, lr_dark, lr_flat, hr_dark, hr_flat, lr_time, hr_time) if s]
    _check_output(output, overwrite, inputs)
    if not math.isfinite(hr_delay):
        raise UserError(f"--hr-delay must be a finite number of seconds, got {hr_delay!r}")
    opened: list[FrameSource] = []
    try:
        src_lr = open_source(lr, "--lr")
        opened.append(src_lr)
        src_hr = open_source(hr, "--hr")
        opened.append(src_hr)
        (n, h, w), (k_all, hh, ww) = src_lr.shape, src_hr.shape
        if hh % scale or ww % scale:
            raise UserError(f"{hr}: HR frames are {hh}x{ww}, not a multiple of the scale {scale}; crop them")
        if (h, w) != (hh // scale, ww // scale):
            raise UserError(f"{lr}: LR frames are {h}x{w} but the HR/{scale} grid is {hh // scale}x{ww // scale}; "
                            f"crop or pad the LR frames to {hh // scale}x{ww // scale} (the registration then maps "
                            "them onto the grid)")
        cal: dict[str, FrameSource | None] = {}
        for name, src, shape in (("dark_lr", lr_dark, (h, w)), ("white_lr", lr_flat, (h, w)),
                                 ("dark_hr", hr_dark, (hh, ww)), ("white_hr", hr_flat, (hh, ww))):
            cal[name] = None
            if src:
                flag = f"--{name.split('_')[1]}-{'dark' if name.startswith('dark') else 'flat'}"
                s = open_source(src, flag)
                opened.append(s)
                if s.shape[1:] != shape:
                    raise UserError(f"{src}: frames are {s.shape[1]}x{s.shape[2]} but the camera's are "
                                    f"{shape[0]}x{shape[1]} ({flag})")
                cal[name] = s
        t_lr = _times(lr_time, lr_rate, n, "lr", "--lr-time")
        t_hr = _times(hr_time, hr_rate, k_all, "hr", "--hr-time") + float(hr_delay)
        m = match_clocks(t_lr, t_hr, tolerance, lr_time or "--lr-rate", hr_time or "--hr-rate")
        rows, idx = m["hr_frames"], m["hr_index"]
        if m["dropped_before"] or m["dropped_after"]:
            log(f"clocks: {m['dropped_before']} HR frame(s) before and {m['dropped_after']} after the LR recording "
                "have no LR partner and are left out")
        log(f"clocks: {len(rows)} key frames matched, residual max {np.abs(m['residual']).max():.3g} s "
            f"({np.abs(m['residual']).max() / m['period']:.3f} LR periods)")
        means = {k: (v.mean() if v is not None else None) for k, v in cal.items()}

        reg = None
        if register:
            picks = sorted({int(round(i)) for i in np.linspace(0, len(rows) - 1, min(len(rows), 12))})
            lrs = [_flat(src_lr.read(int(idx[p]), int(idx[p]) + 1)[0], means["dark_lr"], means["white_lr"])
                   for p in picks]
            hrs = [_flat(src_hr.read(int(rows[p]), int(rows[p]) + 1)[0], means["dark_hr"], means["white_hr"])
                   for p in picks]
            reg = fit_pairs(lrs, hrs, scale, affine=affine, log=log, where=output)
            log(f"registration: {reg.summary()}")
        linkable = {"lr": link and src_lr.h5 is not None, "hr": link and src_hr.h5 is not None}
        if link and not all(linkable.values()):
            log("--link: only HDF5 sources can be linked; the others are copied")
        with AtomicH5File(output, overwrite=overwrite) as f:
            for path, src, sel, key in (("/exchange/data_lr", src_lr, None, "lr"),
                                        ("/exchange/data_hr", src_hr, rows, "hr")):
                if linkable[key]:
                    _link(f, path, src, output, sel)
                else:
                    _copy(f, path, src, sel)
            f["/exchange/hr_index"] = idx
            for name, s in cal.items():
                if s is not None:
                    _copy(f, f"/exchange/data_{name}", s)
            g = f.require_group("/exchange/timing")
            g["lr_time"] = m["lr_time"]
            g["hr_time"] = m["hr_time"]
            g["match_residual"] = m["residual"]
            g["hr_source_frame"] = rows
            g.attrs["reference_clock"] = "LR camera; HR times + hr_delay"
            g.attrs["hr_delay_s"] = float(hr_delay)
            g.attrs["lr_period_s"] = m["period"]
            g.attrs["tolerance_lr_periods"] = float(tolerance)
            g.attrs["units"] = "s"
            if reg is not None:
                ds = f.create_dataset("/exchange/registration", data=reg.matrix)
                p = reg.params()
                for key, value in p.items():
                    ds.attrs[key] = value
                ds.attrs["convention"] = reg.to_dict()["convention"]
                ds.attrs["stats_json"] = json.dumps(reg.to_dict()["stats"], sort_keys=True)
                ds.attrs["reference"] = "HR camera (geometry), LR camera (time)"
            f["/exchange"].attrs["assembled_from"] = json.dumps(
                {"lr": lr, "hr": hr, "lr_dark": lr_dark, "lr_flat": lr_flat, "hr_dark": hr_dark, "hr_flat": hr_flat,
                 "lr_time": lr_time, "hr_time": hr_time, "lr_rate": lr_rate, "hr_rate": hr_rate,
                 "hr_delay": hr_delay, "link": link})
    finally:
        for s in opened:
            s.close()
    return {"output": os.path.abspath(output), "n_frames": int(n), "lr_shape": [int(h), int(w)],
            "hr_shape": [int(hh), int(ww)], "hr_index": [int(v) for v in idx],
            "hr_source_frames": [int(v) for v in rows],
            "max_abs_time_residual_s": float(np.abs(m["residual"]).max()),
            "registration": reg.to_dict() if reg is not None else None, "linked": linkable}
