"""``xvr-batch plan``: the unit table, halo, and estimates of memory and work, without running anything."""

from __future__ import annotations

from typing import Any

import psutil

from xvr_batch.io.archive import Archive, ArchivePaths
from xvr_batch.plan import make_plan
from xvr_batch.weights import resolve_weights

__all__ = ["describe_plan", "format_plan", "estimate_memory"]


def estimate_memory(cfg, batch: int, h: int, w: int) -> int:
    """Rough peak bytes of one fp32 inference call (activations; weights are small)."""
    e, d, s = cfg.embed_dim, cfg.n_slices, cfg.scale
    ws = cfg.window
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    tokens = d * hp * wp
    n = min(cfg.window_3d[0], d) * min(ws, h) * min(ws, w)
    heads = max(cfg.num_heads)
    body = tokens * e * 4 * 8 + tokens * int(e * cfg.mlp_ratio) * 4 * 2
    attn = (tokens // n) * heads * n * n * 4 * 2  # scores (math kernel) + merged mask
    head = cfg.n_out * (h * s) * (w * s) * cfg.recon_dim * 4 * 3
    keys = 2 * e * (h * s) * (w * s) * 4 * 2  # HR branch at full resolution (one key frame at a time)
    return int(batch * (body + attn + head) + keys)


def describe_plan(archive: str, weights: str | None = None, unit_frames: int = 128, batch: int = 4,
                  tile: int | None = None, tile_overlap: int | None = None, lr: str | None = None,
                  hr: str | None = None, hr_index: str | None = None, hr_stride: int | None = None,
                  hr_offset: int = 0, wait_for_writer: float | None = None,
                  registration: str = "auto") -> dict[str, Any]:
    """The plan of ``archive`` as a JSON-serialisable dict (see :func:`format_plan`); writes nothing.

    Opens the archive as :class:`Archive` does (so every refusal of a hostile or incomplete archive applies;
    ``wait_for_writer`` as there) and refuses, like :func:`make_plan`, plans too large to hold. ``warnings``
    lists problems that do not stop planning, e.g. an estimated peak memory above the memory available.
    """
    base = ArchivePaths()
    paths = ArchivePaths(lr=lr or base.lr, hr=hr or base.hr, hr_index=hr_index or base.hr_index)
    rw = resolve_weights(weights)
    cfg = rw.config
    with Archive(archive, paths, hr_stride, hr_offset, wait_for_writer=wait_for_writer) as arc:
        n, (h, w), (hh, ww) = arc.n_frames, arc.lr_shape, arc.hr_shape
        plan = make_plan(n, arc.hr_index, cfg.num_lr, cfg.head, unit_frames, batch)
        hr_idx = [int(k) for k in arc.hr_index]
        from xvr_batch.registration import resolve as resolve_registration
        notes: list[str] = []
        reg = resolve_registration(arc, registration, log=notes.append)
    from xvr_batch.model import SwinXVR
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    model = SwinXVR(cfg)
    call_flops = model.flops(th, tw)
    n_tiles = 1
    if tile:
        from xvr_batch.model.tiling import plan_tiles
        n_tiles = len(plan_tiles(h, w, tile, tile_overlap or 2 * cfg.window))
    windows_run = sum((u.batches[1] - u.batches[0]) * batch for u in plan.units)
    peak = estimate_memory(cfg, batch, th, tw)
    avail = int(psutil.virtual_memory().available)
    warnings = []
    if peak > avail:
        warnings.append(f"estimated peak memory {peak / 2**30:.1f} GiB per process is more than the "
                        f"{avail / 2**30:.1f} GiB available here; lower --batch or pass --tile")
    units = []
    for u in plan.units:
        units.append({"id": u.id, "frames": [u.start, u.stop], "batches": list(u.batches),
                      "halo_lr_frames": (u.start - u.halo_lr[0]) + (u.halo_lr[1] - u.stop),
                      "lr_read": list(u.halo_lr), "key_frames": list(u.keys)})
    return {
        "archive": archive, "n_frames": n, "lr_shape": [h, w], "hr_shape": [hh, ww], "key_frames": hr_idx,
        "weights": rw.source, "model": cfg.to_dict(), "head": cfg.head, "windows": len(plan.windows),
        "batch": batch, "unit_frames": unit_frames, "n_units": len(plan.units), "units": units,
        "tile": tile, "n_tiles": n_tiles, "windows_computed": windows_run,
        "overhead_pct": 100.0 * (windows_run - len(plan.windows)) / max(1, len(plan.windows)),
        "flops_per_call": call_flops * n_tiles, "total_tflop": call_flops * n_tiles * windows_run / 1e12,
        "peak_memory_bytes": peak, "warnings": warnings,
        "registration": reg.to_dict() if reg is not None else None, "registration_mode": registration,
        "registration_notes": notes,
        "output_bytes_float32": n * hh * ww * 4,
        "policy": plan.to_dict()["edge_policy"], "window_policy": plan.to_dict()["window_policy"],
    }


def format_plan(info: dict[str, Any], max_rows: int = 20) -> str:
    lines = [
        f"{info['archive']}: {info['n_frames']} LR frames {info['lr_shape'][0]}x{info['lr_shape'][1]} -> "
        f"HR {info['hr_shape'][0]}x{info['hr_shape'][1]}, {len(info['key_frames'])} key frames",
        f"model: {info['weights']} (head {info['head']}, NL {info['model']['num_lr']}, E {info['model']['embed_dim']}, "
        f"depths {info['model']['depths']})",
        f"windows: {info['windows']} ({info['window_policy']})",
        f"edges: {info['policy']}",
        f"units: {info['n_units']} of up to {info['unit_frames']} frames; batch {info['batch']}; "
        f"windows computed incl. halo {info['windows_computed']} (+{info['overhead_pct']:.1f}%)",
        f"work: {info['total_tflop']:.3f} TFLOP in all ({info['flops_per_call'] / 1e9:.1f} GFLOP per call"
        + (f", {info['n_tiles']} tiles" if info.get("tile") else "") + ")",
        f"memory: ~{info['peak_memory_bytes'] / 2**30:.2f} GiB peak per process (fp32 estimate); "
        f"output {info['output_bytes_float32'] / 2**30:.2f} GiB as float32 before compression",
    ]
    if info.get("registration"):
        from xvr_batch.registration import Registration
        r = info["registration"]
        reg = Registration(r["matrix"], r["lr_shape"], r["grid_shape"], source=r.get("source", ""),
                           stats=r.get("stats") or {})
        lines.append(f"registration ({reg.source}): {reg.summary()}; reconstructed in the LR camera's frame and "
                     f"resampled onto the HR pixels, the {100 * (1 - reg.overlap()):.1f}% of them outside the LR "
                     "field from the key-frame blend")
    else:
        lines.append(f"registration: none (--registration {info.get('registration_mode', 'auto')}; LR read as it is)")
    lines += [f"note: {n}" for n in info.get("registration_notes", []) if "registration" in n and "no transform" in n]
    lines += [f"warning: {w}" for w in info.get("warnings", [])]
    lines += ["", f"{'unit':>5} {'frames':>15} {'halo':>5} {'LR read':>15} {'batches':>12}  key frames"]
    units = info["units"]
    shown = units if len(units) <= max_rows else units[: max_rows // 2] + [None] + units[-max_rows // 2:]
    for u in shown:
        if u is None:
            lines.append(f"{'...':>5}")
            continue
        lines.append(f"{u['id']:>5} {str(u['frames'][0]) + '-' + str(u['frames'][1] - 1):>15} "
                     f"{u['halo_lr_frames']:>5} {str(u['lr_read'][0]) + '-' + str(u['lr_read'][1] - 1):>15} "
                     f"{str(u['batches'][0]) + '-' + str(u['batches'][1] - 1):>12}  {u['key_frames']}")
    return "\n".join(lines)
