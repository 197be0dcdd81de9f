"""The window plan and the work units: pure functions of the archive's geometry.

Brackets (which key frames a frame uses)
    Key frames sit at LR times k_0 < k_1 < ... < k_{K-1}. A frame t with k_i <= t < k_{i+1} uses the
    bracket (k_i, k_{i+1}); the last key time k_{K-1} belongs to the last bracket (k_{K-2}, k_{K-1}).
    Frames before k_0 use (k_0, k_0) and frames after k_{K-1} use (k_{K-1}, k_{K-1}): the nearest key frame
    on both sides. Consecutive frames that share a bracket form a *segment*.

Windows, head "all"
    Inside each segment of length L, non-overlapping windows of NL frames start at the segment start; the
    last one is shifted back so that it ends at the segment end. Each frame is emitted by the first window
    that covers it. A segment shorter than NL gets one window that starts at the segment start (or earlier,
    at the archive end) and reaches into its neighbours for LR context, with the segment's own key frames.

Windows, head "centre"
    One window per frame t: LR frames t - NL//2 ... t + (NL-1) - NL//2, reflected at the archive ends, with
    the bracket of t; it emits frame t.

Batches
    Windows are numbered in time order and grouped into fixed global batches of B. A unit runs every batch
    that holds a window emitting one of its frames. Each output frame is therefore always computed in the
    same batch tensor, at the same position, whatever the unit size or the backend: the stitched output is
    byte-identical to a single pass.

Units
    There are ceil(N/U) units. The nominal boundary u*U is moved to the nearest global-batch boundary (the first
    frame of a batch) when that keeps the units in order, so that no batch is run by two units (a unit shorter
    than a batch keeps its nominal boundary and shares a batch). Unit u owns output frames [start_u, start_{u+1}).
    It reads its own frames plus a halo: the LR frames and key frames that its batches need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence, overload

import numpy as np
import psutil

from xvr_batch.errors import UserError

__all__ = ["Window", "WindowTable", "Segment", "Unit", "segments", "plan_windows", "plan_units", "reflect",
           "Plan", "make_plan", "plan_memory_bytes", "MAX_UNITS",
           "unit_starts", "duplicate_batch_fraction", "UNIT_LAYOUT"]

EDGE_POLICY = ("frames before the first key frame use (k_0, k_0); frames after the last key frame use "
               "(k_{K-1}, k_{K-1}): the nearest key frame on both sides")

#: How units are cut (recorded in the plan): boundaries snapped to global-batch boundaries (see unit_starts).
UNIT_LAYOUT = "batch-aligned"

#: Most work units one plan may have: each is a part file, a journal entry and a manifest row.
MAX_UNITS = 100_000

# Peak bytes per window while planning (5 int64 columns kept, about as many temporaries), per key frame
# (the segment columns and the plan's list of key times) and per unit (its Unit object and tuples).
_BYTES_PER_WINDOW = 112
_BYTES_PER_KEY = 112
_BYTES_PER_UNIT = 1024


@dataclass(frozen=True)
class Segment:
    start: int
    stop: int  # exclusive
    key_prev: int  # key-frame number (0..K-1), not a time
    key_next: int


@dataclass(frozen=True)
class Window:
    index: int
    frames: tuple[int, ...]  # NL LR time indices (reflected into [0, N))
    keys: tuple[int, int]  # key-frame numbers
    emit: tuple[tuple[int, int], ...]  # (output frame t, output slot)


@dataclass(frozen=True)
class Unit:
    id: int
    start: int
    stop: int
    batches: tuple[int, int]  # [first, last) global batch numbers
    halo_lr: tuple[int, int]  # [lo, hi) LR frames read
    keys: tuple[int, ...]  # key-frame numbers read

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batches"], d["halo_lr"], d["keys"] = list(self.batches), list(self.halo_lr), list(self.keys)
        return d


def reflect(i: int, n: int) -> int:
    """Reflect an index into [0, n) without repeating the edge sample (… 2 1 | 0 1 2 … n-1 | n-2 …)."""
    if n == 1:
        return 0
    period = 2 * (n - 1)
    i = abs(i) % period
    return i if i < n else period - i


def _reflect_array(i: np.ndarray, n: int) -> np.ndarray:
    """:func:`reflect` applied to every element of an int64 array."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i < n, i, period - i)


def _segment_columns(n_frames: int, hr_index: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The segments as int64 columns (start, stop, key_prev, key_next), in time order."""
    keys = np.asarray(hr_index, dtype=np.int64).reshape(-1)
    kk = len(keys)
    if kk < 2:
        raise ValueError("need at least 2 key frames")
    start, stop = keys[:-1].copy(), keys[1:].copy()
    stop[-1] += 1  # the last key time belongs to the last bracket
    prev = np.arange(kk - 1, dtype=np.int64)
    nxt = prev + 1
    cols = [start, stop, prev, nxt]
    if keys[0] > 0:
        cols = [np.r_[v, c] for v, c in zip((0, keys[0], 0, 0), cols)]
    if keys[-1] + 1 < n_frames:
        cols = [np.r_[c, v] for c, v in zip(cols, (keys[-1] + 1, n_frames, kk - 1, kk - 1))]
    return tuple(cols)


def segments(n_frames: int, hr_index: Sequence[int]) -> list[Segment]:
    start, stop, prev, nxt = _segment_columns(n_frames, hr_index)
    return [Segment(int(a), int(b), int(p), int(q)) for a, b, p, q in zip(start, stop, prev, nxt)]


class WindowTable(Sequence[Window]):
    """Every window of an archive in time order, stored as int64 columns (about 40 bytes a window).

    Window ``i`` reads LR frames ``reflect(base[i] + j)`` for ``j < NL``, uses key frames
    ``(key_prev[i], key_next[i])`` and emits output frames ``emit_lo[i] <= t < emit_hi[i]`` from slot
    ``t - base[i]``. Indexing builds :class:`Window` objects on demand (a slice gives a list), so a plan of
    millions of frames stays small. Emit ranges are disjoint, in increasing order, and cover [0, N).
    """

    def __init__(self, n_frames: int, num_lr: int, base: np.ndarray, key_prev: np.ndarray,
                 key_next: np.ndarray, emit_lo: np.ndarray, emit_hi: np.ndarray) -> None:
        self.n_frames, self.num_lr = int(n_frames), int(num_lr)
        self.base, self.key_prev, self.key_next = base, key_prev, key_next
        self.emit_lo, self.emit_hi = emit_lo, emit_hi

    def __len__(self) -> int:
        return len(self.base)

    @overload
    def __getitem__(self, i: int) -> Window: ...

    @overload
    def __getitem__(self, i: slice) -> list[Window]: ...

    def __getitem__(self, i: int | slice) -> Window | list[Window]:
        if isinstance(i, slice):
            return [self._window(j) for j in range(*i.indices(len(self)))]
        j = int(i)
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(f"window {i} outside [0, {len(self)})")
        return self._window(j)

    def __iter__(self) -> Iterator[Window]:
        return (self._window(j) for j in range(len(self)))

    def _window(self, j: int) -> Window:
        b, n = int(self.base[j]), self.n_frames
        frames = tuple(reflect(b + k, n) for k in range(self.num_lr))
        emit = tuple((t, t - b) for t in range(int(self.emit_lo[j]), int(self.emit_hi[j])))
        return Window(j, frames, (int(self.key_prev[j]), int(self.key_next[j])), emit)

    def frame_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per window, the smallest and the largest LR frame it reads."""
        lo = hi = _reflect_array(self.base, self.n_frames)
        for k in range(1, self.num_lr):
            f = _reflect_array(self.base + k, self.n_frames)
            lo, hi = np.minimum(lo, f), np.maximum(hi, f)
        return lo, hi

    def emitters(self, t: np.ndarray) -> np.ndarray:
        """The number of the window that emits each output frame in ``t``."""
        return np.searchsorted(self.emit_hi, t, side="right")


def plan_windows(n_frames: int, hr_index: Sequence[int], num_lr: int, head: str) -> WindowTable:
    """Every window of the archive, in time order. Each frame is emitted exactly once."""
    start, stop, prev, nxt = _segment_columns(n_frames, hr_index)
    length = stop - start
    if head == "centre":
        per = np.maximum(length, 0)
        seg = np.repeat(np.arange(len(start)), per)
        t = start[seg] + np.arange(len(seg), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
        return WindowTable(n_frames, num_lr, t - num_lr // 2, prev[seg], nxt[seg], t, t + 1)
    if head != "all":
        raise ValueError(f"unknown head {head!r}")
    # Per segment: ceil(L / NL) windows (at least one). Window j starts at start + j*NL while it fits;
    # the last one is shifted back to end at the segment end; a segment shorter than NL gets one window
    # that starts at the segment start (or earlier, at the archive end) and reaches into its neighbours.
    per = np.maximum(1, -(-length // num_lr))
    seg = np.repeat(np.arange(len(start)), per)
    j = np.arange(len(seg), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    s0, s1, ln = start[seg], stop[seg], length[seg]
    nominal = s0 + j * num_lr
    short = np.maximum(0, np.minimum(s0, n_frames - num_lr))
    base = np.where(nominal + num_lr <= s1, nominal, np.where(ln >= num_lr, s1 - num_lr, short))
    lo, hi = np.maximum(base, nominal), np.minimum(base + num_lr, s1)
    return WindowTable(n_frames, num_lr, base, prev[seg], nxt[seg], lo, hi)


def plan_units(windows: Sequence[Window], n_frames: int, unit_frames: int, batch: int) -> list[Unit]:
    """Cut [0, N) into units of ``unit_frames`` output frames, each with its batches and halo."""
    if unit_frames < 1:
        raise ValueError("unit_frames must be >= 1")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if isinstance(windows, WindowTable):
        emit_lo = windows.emit_lo
    else:
        emit_lo = np.array([min(t for t, _ in w.emit) for w in windows], dtype=np.int64)
    starts = unit_starts(emit_lo, n_frames, unit_frames, batch)
    stops = np.r_[starts[1:], n_frames].astype(np.int64)
    if isinstance(windows, WindowTable):
        fmin, fmax = windows.frame_bounds()
        kp, kn = windows.key_prev, windows.key_next
        first, last = windows.emitters(starts), windows.emitters(stops - 1)  # emitters grow with t
    else:  # any sequence of Window objects
        fmin = np.array([min(w.frames) for w in windows], dtype=np.int64)
        fmax = np.array([max(w.frames) for w in windows], dtype=np.int64)
        kp = np.array([w.keys[0] for w in windows], dtype=np.int64)
        kn = np.array([w.keys[1] for w in windows], dtype=np.int64)
        emitter = np.empty(n_frames, dtype=np.int64)
        for w in windows:
            for t, _ in w.emit:
                emitter[t] = w.index
        first = np.array([emitter[a:b].min() for a, b in zip(starts, stops)], dtype=np.int64)
        last = np.array([emitter[a:b].max() for a, b in zip(starts, stops)], dtype=np.int64)
    b0s, b1s = first // batch, last // batch + 1
    units = []
    for uid in range(len(starts)):
        b0, b1 = int(b0s[uid]), int(b1s[uid])
        w0, w1 = b0 * batch, min(b1 * batch, len(fmin))
        keys = np.unique(np.concatenate((kp[w0:w1], kn[w0:w1])))
        units.append(Unit(uid, int(starts[uid]), int(stops[uid]), (b0, b1),
                          (int(fmin[w0:w1].min()), int(fmax[w0:w1].max()) + 1), tuple(int(k) for k in keys)))
    return units


def unit_starts(emit_lo: np.ndarray, n_frames: int, unit_frames: int, batch: int) -> np.ndarray:
    """First output frame of every unit: nominal boundaries ``u * unit_frames`` moved to the nearest global-batch
    boundary, so that no batch is computed by two units.

    ``emit_lo`` is the first frame each window emits (increasing). A batch boundary is the first frame of window
    ``b * batch``. Boundary ``u`` becomes the batch boundary nearest to ``u * U`` (ties to the lower one) if it
    lies strictly between the boundary chosen before it and the next nominal boundary ``(u + 1) * U``;
    otherwise (units shorter than a batch) it stays at ``u * U``. So the number of units is always
    ``ceil(N / U)``, every unit is non-empty, and a unit is within one batch span of ``U`` frames long.
    """
    n_units = -(-int(n_frames) // int(unit_frames))
    nominal = np.arange(n_units, dtype=np.int64) * int(unit_frames)
    bstart = np.asarray(emit_lo, dtype=np.int64)[::int(batch)]
    if n_units <= 1 or len(bstart) == 0:
        return nominal
    c = nominal[1:]
    idx = np.searchsorted(bstart, c, side="left")  # bstart[idx] is the first batch start >= c
    up = np.where(idx < len(bstart), bstart[idx.clip(0, len(bstart) - 1)], np.iinfo(np.int64).max // 2)
    down = np.where(idx > 0, bstart[(idx - 1).clip(0)], np.iinfo(np.int64).min // 2)
    snapped = np.where(up - c < c - down, up, down)
    nxt = np.r_[c[1:], n_frames]
    out = np.empty(n_units, dtype=np.int64)
    out[0] = 0
    prev = 0
    for i in range(len(c)):  # sequential rule; about 1 µs a unit
        s = int(snapped[i])
        b = s if prev < s < int(nxt[i]) else int(c[i])
        out[i + 1] = prev = b
    return out


def duplicate_batch_fraction(plan: "Plan") -> float:
    """Extra model batches the units compute beyond the global batches (0.0: no batch runs twice)."""
    n_batches = -(-len(plan.windows) // plan.batch)
    run = sum(u.batches[1] - u.batches[0] for u in plan.units)
    return run / max(1, n_batches) - 1.0


def batch_windows(windows: Sequence[Window], b: int, batch: int) -> list[Window]:
    """Global batch ``b``: exactly ``batch`` windows, the last batch padded by repeating its last window."""
    chunk = list(windows[b * batch:(b + 1) * batch])
    return chunk + [chunk[-1]] * (batch - len(chunk))


@dataclass
class Plan:
    n_frames: int
    hr_index: list[int]
    num_lr: int
    head: str
    unit_frames: int
    batch: int
    windows: Sequence[Window]  # a WindowTable from make_plan
    units: list[Unit]

    def to_dict(self) -> dict:
        """What the manifest and /process record (windows are re-derived; their count is recorded)."""
        return {
            "n_frames": self.n_frames, "num_lr": self.num_lr, "head": self.head,
            "unit_frames": self.unit_frames, "batch": self.batch, "n_windows": len(self.windows),
            "n_batches": -(-len(self.windows) // self.batch), "edge_policy": EDGE_POLICY,
            "window_policy": ("all: non-overlapping NL-frame windows inside each bracket, last one shifted back"
                              if self.head == "all" else "centre: sliding window, reflected at the archive ends"),
            "unit_layout": UNIT_LAYOUT, "units": [u.to_dict() for u in self.units],
        }

    def frames_of(self, units: Iterable[Unit]) -> int:
        return sum(u.stop - u.start for u in units)


def plan_memory_bytes(n_frames: int, n_keys: int, num_lr: int, head: str, unit_frames: int) -> int:
    """An upper bound on the peak memory :func:`make_plan` needs, in bytes (without building anything)."""
    n_windows = n_frames if head == "centre" else -(-n_frames // max(1, num_lr)) + n_keys + 1
    n_units = -(-n_frames // max(1, unit_frames))
    return _BYTES_PER_WINDOW * n_windows + _BYTES_PER_KEY * n_keys + _BYTES_PER_UNIT * n_units


def _check_plan_size(n_frames: int, n_keys: int, num_lr: int, head: str, unit_frames: int) -> None:
    """Refuse, with the numbers, a plan with too many units or one that would not fit in memory."""
    n_units = -(-n_frames // unit_frames)
    if n_units > MAX_UNITS:
        raise UserError(
            f"{n_frames} frames in units of {unit_frames} frames make {n_units} work units, more than the "
            f"{MAX_UNITS} a plan can hold (each unit is a part file and a journal entry); pass "
            f"--unit-frames {-(-n_frames // MAX_UNITS)} or more")
    need = plan_memory_bytes(n_frames, n_keys, num_lr, head, unit_frames)
    avail = int(psutil.virtual_memory().available)
    if need > avail // 2:
        raise UserError(
            f"planning {n_frames} frames with {n_keys} key frames needs about {need / 2**30:.1f} GiB of memory, "
            f"more than half of the {avail / 2**30:.1f} GiB available; split the archive into shorter ones "
            "(e.g. several files or virtual datasets of consecutive frames) and reconstruct each")


def make_plan(n_frames: int, hr_index: Sequence[int], num_lr: int, head: str, unit_frames: int, batch: int) -> Plan:
    """The windows and units of an archive; raises :class:`UserError` (before allocating) for a plan with more
    than :data:`MAX_UNITS` units or one that would need more than half of the memory available."""
    if unit_frames < 1:
        raise ValueError("unit_frames must be >= 1")
    keys = np.asarray(hr_index, dtype=np.int64).reshape(-1)
    _check_plan_size(int(n_frames), len(keys), int(num_lr), head, int(unit_frames))
    wins = plan_windows(n_frames, keys, num_lr, head)
    units = plan_units(wins, n_frames, unit_frames, batch)
    return Plan(n_frames, keys.tolist(), num_lr, head, unit_frames, batch, wins, units)
