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
    Unit u owns output frames [u*U, min((u+1)*U, N)). It reads its own frames plus a halo: the LR frames and
    key frames that its batches need.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = ["Window", "Segment", "Unit", "segments", "plan_windows", "plan_units", "reflect", "Plan", "make_plan"]

EDGE_POLICY = ("frames before the first key frame use (k_0, k_0); frames after the last key frame use "
               "(k_{K-1}, k_{K-1}): the nearest key frame on both sides")


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


def segments(n_frames: int, hr_index: Sequence[int]) -> list[Segment]:
    keys = [int(k) for k in hr_index]
    kk = len(keys)
    if kk < 2:
        raise ValueError("need at least 2 key frames")
    segs: list[Segment] = []
    if keys[0] > 0:
        segs.append(Segment(0, keys[0], 0, 0))
    for i in range(kk - 1):
        stop = keys[i + 1] + 1 if i == kk - 2 else keys[i + 1]
        segs.append(Segment(keys[i], stop, i, i + 1))
    if keys[-1] + 1 < n_frames:
        segs.append(Segment(keys[-1] + 1, n_frames, kk - 1, kk - 1))
    return segs


def plan_windows(n_frames: int, hr_index: Sequence[int], num_lr: int, head: str) -> list[Window]:
    """Every window of the archive, in time order. Each frame is emitted exactly once."""
    wins: list[Window] = []
    segs = segments(n_frames, hr_index)
    if head == "centre":
        before = num_lr // 2
        for seg in segs:
            for t in range(seg.start, seg.stop):
                frames = tuple(reflect(t - before + j, n_frames) for j in range(num_lr))
                wins.append(Window(len(wins), frames, (seg.key_prev, seg.key_next), ((t, before),)))
        return wins
    if head != "all":
        raise ValueError(f"unknown head {head!r}")
    for seg in segs:
        length = seg.stop - seg.start
        if length >= num_lr:
            starts = list(range(seg.start, seg.stop - num_lr + 1, num_lr))
            if starts[-1] + num_lr < seg.stop:
                starts.append(seg.stop - num_lr)
        else:
            starts = [max(0, min(seg.start, n_frames - num_lr))]
        done = seg.start  # frames in [seg.start, done) are emitted already
        for p in starts:
            frames = tuple(reflect(p + j, n_frames) for j in range(num_lr))
            emit = tuple((t, t - p) for t in range(max(p, done), min(p + num_lr, seg.stop)))
            done = max(done, p + num_lr)
            wins.append(Window(len(wins), frames, (seg.key_prev, seg.key_next), emit))
    return wins


def plan_units(windows: Sequence[Window], n_frames: int, unit_frames: int, batch: int) -> list[Unit]:
    """Cut [0, N) into units of ``unit_frames`` output frames, each with its batches and halo."""
    if unit_frames < 1:
        raise ValueError("unit_frames must be >= 1")
    if batch < 1:
        raise ValueError("batch must be >= 1")
    # for each frame, the window that emits it
    emitter = np.empty(n_frames, dtype=np.int64)
    for w in windows:
        for t, _ in w.emit:
            emitter[t] = w.index
    units = []
    for uid, start in enumerate(range(0, n_frames, unit_frames)):
        stop = min(start + unit_frames, n_frames)
        idx = emitter[start:stop]
        b0, b1 = int(idx.min()) // batch, int(idx.max()) // batch + 1
        used = windows[b0 * batch: min(b1 * batch, len(windows))]
        frames = [f for w in used for f in w.frames]
        keys = sorted({k for w in used for k in w.keys})
        units.append(Unit(uid, start, stop, (b0, b1), (min(frames), max(frames) + 1), tuple(keys)))
    return units


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
    windows: list[Window]
    units: list[Unit]

    def to_dict(self) -> dict:
        """What the manifest and /process record (windows are re-derived; their count is recorded)."""
        return {
            "n_frames": self.n_frames, "num_lr": self.num_lr, "head": self.head,
            "unit_frames": self.unit_frames, "batch": self.batch, "n_windows": len(self.windows),
            "n_batches": -(-len(self.windows) // self.batch), "edge_policy": EDGE_POLICY,
            "window_policy": ("all: non-overlapping NL-frame windows inside each bracket, last one shifted back"
                              if self.head == "all" else "centre: sliding window, reflected at the archive ends"),
            "units": [u.to_dict() for u in self.units],
        }

    def frames_of(self, units: Iterable[Unit]) -> int:
        return sum(u.stop - u.start for u in units)


def make_plan(n_frames: int, hr_index: Sequence[int], num_lr: int, head: str, unit_frames: int, batch: int) -> Plan:
    wins = plan_windows(n_frames, hr_index, num_lr, head)
    units = plan_units(wins, n_frames, unit_frames, batch)
    return Plan(n_frames, [int(k) for k in hr_index], num_lr, head, unit_frames, batch, wins, units)
