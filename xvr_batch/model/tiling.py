"""Spatial tiling for frames too large to run in one piece.

The LR frame is cut into overlapping tiles of ``tile`` x ``tile`` LR pixels (the last tile on each axis is
shifted back to end at the frame edge). Each tile runs through the network with its matching HR region,
and the HR outputs are blended with separable linear ramps across the overlaps. Peak activation memory then
follows the tile size; only the output frame itself is full size.

The tile layout depends only on the frame size, tile and overlap, so tiled output is deterministic and
independent of how the archive is cut into work units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Tile", "plan_tiles", "tiled_forward", "tiled_run"]


@dataclass(frozen=True)
class Tile:
    y0: int
    y1: int
    x0: int
    x1: int


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step))
    starts.append(size - tile)
    return starts


def plan_tiles(h: int, w: int, tile: int, overlap: int) -> list[Tile]:
    """Overlapping LR tiles covering an h x w frame."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    return [Tile(y, min(y + tile, h), x, min(x + tile, w))
            for y in _starts(h, tile, overlap) for x in _starts(w, tile, overlap)]


def _ramp(n: int, lo_open: bool, hi_open: bool, ramp: int, device, dtype) -> torch.Tensor:
    """1-D weights: 1 inside, linear ramps of length ``ramp`` on sides that border another tile."""
    wgt = torch.ones(n, device=device, dtype=dtype)
    r = min(ramp, n)
    if r > 0:
        up = (torch.arange(r, device=device, dtype=dtype) + 0.5) / r
        if lo_open:
            wgt[:r] = torch.minimum(wgt[:r], up)
        if hi_open:
            wgt[n - r:] = torch.minimum(wgt[n - r:], up.flip(0))
    return wgt


def tiled_run(run: Callable[[Tile], torch.Tensor], h: int, w: int, scale: int, tile: int, overlap: int) -> torch.Tensor:
    """Blend ``run(tile) -> (..., tile_h*scale, tile_w*scale)`` outputs over an h x w LR frame."""
    tiles = plan_tiles(h, w, tile, overlap)
    out = norm = None
    for t in tiles:
        y = run(t)
        if out is None:
            out = y.new_zeros(*y.shape[:-2], h * scale, w * scale)
            norm = y.new_zeros(h * scale, w * scale)
        wy = _ramp((t.y1 - t.y0) * scale, t.y0 > 0, t.y1 < h, overlap * scale, y.device, y.dtype)
        wx = _ramp((t.x1 - t.x0) * scale, t.x0 > 0, t.x1 < w, overlap * scale, y.device, y.dtype)
        wgt = wy[:, None] * wx[None, :]
        ys, xs = slice(t.y0 * scale, t.y1 * scale), slice(t.x0 * scale, t.x1 * scale)
        out[..., ys, xs] += y * wgt
        norm[ys, xs] += wgt
    return out / norm


def tiled_forward(model, lr: torch.Tensor, hr: torch.Tensor, tile: int, overlap: int | None = None) -> torch.Tensor:
    """``model(lr, hr)`` computed tile by tile. lr (B, NL, 1, h, w), hr (B, 2, 1, s*h, s*w).

    ``overlap`` defaults to twice the spatial window and must be at least one window."""
    cfg = model.cfg
    overlap = 2 * cfg.window if overlap is None else overlap
    if overlap < cfg.window:
        raise ValueError(f"tile overlap ({overlap}) must be at least one window ({cfg.window})")
    h, w = lr.shape[-2:]
    s = cfg.scale

    def run(t: Tile) -> torch.Tensor:
        return model(lr[..., t.y0:t.y1, t.x0:t.x1], hr[..., t.y0 * s:t.y1 * s, t.x0 * s:t.x1 * s])

    return tiled_run(run, h, w, s, tile, overlap)
