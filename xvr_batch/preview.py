"""``xvr-batch preview``: look at a reconstruction beside what it was made from.

One row per frame: the LR frame upsampled (bicubic, in HR counts), the reconstruction, the key-frame
blend and, when the archive has it, the dense truth. A ``.png`` is a strip of a few frames (rows); a
``.gif`` or ``.mp4`` is a movie with one frame of the row per time step. Every panel of one frame shares
one grey scale (the truth's range, else the reconstruction's), so brightness differences are real.

PNG needs matplotlib (``pip install 'xvr_batch[plot]'``); GIF and MP4 need imageio, MP4 also
imageio-ffmpeg (``pip install 'xvr_batch[movie]'``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xvr_batch.errors import UserError

__all__ = ["parse_frames", "preview_frames", "write_preview"]

#: Most frames a PNG strip shows (a longer range is subsampled evenly).
MAX_STRIP_ROWS = 6
#: Most frames a movie holds (a longer range is subsampled evenly).
MAX_MOVIE_FRAMES = 2000


def parse_frames(spec: str | None, n_frames: int) -> tuple[int, int]:
    """``"A:B"`` (Python slice bounds, either may be empty or negative) -> ``(start, stop)`` in [0, n]."""
    if spec is None:
        return 0, n_frames
    parts = spec.split(":")
    if len(parts) != 2:
        raise UserError(f"--frames {spec!r}: give a range A:B (e.g. 100:140, :50 or -20:)")
    try:
        a = int(parts[0]) if parts[0].strip() else None
        b = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise UserError(f"--frames {spec!r}: A and B must be integers (e.g. 100:140)") from None
    start, stop, _ = slice(a, b).indices(n_frames)
    if stop <= start:
        raise UserError(f"--frames {spec!r} selects no frame of the {n_frames} in the reconstruction")
    return start, stop


def _pick(start: int, stop: int, most: int) -> list[int]:
    n = stop - start
    if n <= most:
        return list(range(start, stop))
    return sorted({int(round(x)) for x in np.linspace(start, stop - 1, most)})


def preview_frames(recon: str | os.PathLike[str], archive: str | os.PathLike[str] | None,
                   frames: Sequence[int]) -> tuple[list[str], list[list[np.ndarray]]]:
    """(panel titles, per frame the list of panels as float32 HR images)."""
    from xvr_batch.evaluate import _archive_options, _choose_normalisation, _Recon, baselines_for_archive
    from xvr_batch.io.archive import Archive

    with _Recon(recon) as rec:
        recon_imgs = {t: rec.frame(t) for t in frames}
        if archive is None:
            recorded = rec.input.get("path")
            if isinstance(recorded, str) and Path(recorded).is_file():
                archive = recorded
        if archive is None:
            return ["reconstruction"], [[recon_imgs[t]] for t in frames]
        opts = _archive_options(rec, None, None, None)
        with Archive(archive, opts["paths"], opts["hr_stride"], opts["hr_offset"]) as arc:
            if (arc.n_frames, *arc.hr_shape) != rec.shape:
                raise UserError(f"{recon}: {rec.shape[0]} frames of {rec.shape[1]}x{rec.shape[2]}, but {archive} "
                                f"has {arc.n_frames} of {arc.hr_shape[0]}x{arc.hr_shape[1]}; pass the archive the "
                                "reconstruction was made from")
            norm, _ = _choose_normalisation(rec, arc, [])
            base = dict(baselines_for_archive(arc, list(frames), norm))
            titles = ["LR (bicubic)", "reconstruction", "key-frame blend"]
            rows = [[base[t]["lr_bicubic"], recon_imgs[t], base[t]["key_blend"]] for t in frames]
            if arc.has_gt:
                titles.append("truth")
                for row, t in zip(rows, frames):
                    row.append(arc.read_gt(t, t + 1)[0].astype(np.float32))
    return titles, rows


def _scale(row: list[np.ndarray]) -> tuple[float, float]:
    ref = row[-1] if len(row) == 4 else row[1] if len(row) > 1 else row[0]
    lo, hi = np.percentile(ref, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _movie_frame(row: list[np.ndarray], gap: int = 4) -> np.ndarray:
    lo, hi = _scale(row)
    tiles = [_to_uint8(img, lo, hi) for img in row]
    h = max(t.shape[0] for t in tiles)
    sep = np.full((h, gap), 255, np.uint8)
    out = []
    for i, t in enumerate(tiles):
        out.append(t)
        if i + 1 < len(tiles):
            out.append(sep)
    frame = np.concatenate(out, axis=1)
    pad_h, pad_w = (-frame.shape[0]) % 16, (-frame.shape[1]) % 16  # codecs want multiples of 16
    return np.pad(frame, ((0, pad_h), (0, pad_w)), constant_values=255)


def _write_png(path: Path, titles: list[str], rows: list[list[np.ndarray]], frames: Sequence[int]) -> None:
    if not os.environ.get("MPLCONFIGDIR"):
        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="xvr-batch-mpl-")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("a PNG preview needs matplotlib: pip install 'xvr_batch[plot]'") from None
    h, w = rows[0][0].shape
    ncol = len(titles)
    fig = Figure(figsize=(3.2 * ncol * max(1.0, w / h) ** 0.5, 3.0 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), ncol, squeeze=False)
    for r, (row, t) in enumerate(zip(rows, frames)):
        lo, hi = _scale(row)
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c])
            if c == 0:
                ax.set_ylabel(f"frame {t}")
    fig.savefig(path, dpi=100, format="png")


def _encode_movie(rows: list[list[np.ndarray]], fps: float, kind: str) -> bytes:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise UserError(f"a {kind} preview needs imageio: pip install 'xvr_batch[movie]'") from None
    frames = np.stack([_movie_frame(row) for row in rows])
    try:
        if kind == ".gif":
            return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000.0 / fps, loop=0)
        return iio.imwrite("<bytes>", frames, extension=".mp4", fps=fps, codec="libx264", macro_block_size=16)
    except ImportError:
        raise UserError("an .mp4 preview needs imageio-ffmpeg: pip install 'xvr_batch[movie]'; or write "
                        "a .gif") from None


def write_preview(recon: str | os.PathLike[str], out: str | os.PathLike[str],
                  archive: str | os.PathLike[str] | None = None, frames: str | None = None,
                  fps: float = 10.0) -> dict[str, Any]:
    """Write the preview of ``recon`` to ``out`` (.png strip, .gif or .mp4 movie); returns a summary.

    ``archive`` defaults to the input path recorded in the reconstruction, when that file exists; without
    it only the reconstruction is shown. ``frames`` is ``"A:B"``."""
    out = Path(out)
    kind = out.suffix.lower()
    if kind not in (".png", ".gif", ".mp4"):
        raise UserError(f"-o {out}: choose a .png (strip), .gif or .mp4 (movie) file name")
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: folder {out.parent} does not exist")
    if not (fps > 0 and np.isfinite(fps)):
        raise UserError(f"--fps {fps}: must be a positive number")
    from xvr_batch.evaluate import _Recon

    with _Recon(recon) as rec:
        n = rec.shape[0]
    start, stop = parse_frames(frames, n)
    picked = _pick(start, stop, MAX_STRIP_ROWS if kind == ".png" else MAX_MOVIE_FRAMES)
    titles, rows = preview_frames(recon, archive, picked)
    from xvr_batch.durable import atomic_path, atomic_write_bytes

    if kind == ".png":
        with atomic_path(out) as tmp:  # the temporary name has no suffix: matplotlib is told the format
            _write_png(Path(tmp), titles, rows, picked)
    else:
        atomic_write_bytes(out, _encode_movie(rows, fps, kind))
    return {"output": str(out), "frames": picked, "panels": titles}
