"""Checkpoints: our own format, and the authors' XFusion checkpoints.

Checkpoints are untrusted input. They are only ever read with ``torch.load(..., weights_only=True)``,
which accepts tensors and plain containers and refuses arbitrary pickled objects. Our format keeps to
exactly that:

    {
      "format": "xvr_batch.checkpoint", "format_version": 1,
      "config": ModelConfig.to_dict(),      # includes the head
      "params": state_dict,                 # raw weights
      "params_ema": state_dict,             # EMA weights (used for inference when present)
      "meta": {...},                        # training metadata: data, steps, scores, versions
      # training checkpoints also carry "optimizer", "scheduler", "step", "rng"
    }

XFusion checkpoints are dicts with ``params`` and/or ``params_ema`` (BasicSR style). Their keys are
mapped onto ours by :func:`xfusion_to_state_dict`, driven by the reference's constructor arguments
(``network_g``), so any depth, width, head count, window or NL maps, not just one fixture.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from xvr_batch.errors import UserError
from xvr_batch.model.config import ModelConfig
from xvr_batch.model.swin_xvr import SwinXVR

FORMAT = "xvr_batch.checkpoint"
FORMAT_VERSION = 1

__all__ = [
    "FORMAT_VERSION", "load_checkpoint", "load_model", "save_checkpoint", "build_model", "file_sha256",
    "load_state_dict_strict", "from_xfusion", "xfusion_config", "xfusion_to_state_dict", "read_untrusted",
]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_untrusted(source: str | os.PathLike | bytes) -> Any:
    """``torch.load`` with ``weights_only=True``; every failure becomes one clear :class:`UserError`."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes):
        if not os.path.exists(source):
            raise UserError(f"{name}: weights file not found; check the --weights path")
        if os.path.isdir(source):
            raise UserError(f"{name}: is a directory, not a weights file")
    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                          weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{name}: refused, the file needs arbitrary pickled objects to load ({first[:160]}); "
            "only tensors and plain containers are accepted; re-save the weights as a plain state dict"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        raise UserError(f"{name}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from exc


def build_model(cfg: ModelConfig) -> SwinXVR:
    return SwinXVR(cfg)


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``; any missing/unexpected key or wrong shape is one UserError."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: the weights are not a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} keys with wrong shapes (first: {'; '.join(shapes[:3])})")
    if problems:
        raise UserError(f"{source}: weights do not fit the model: " + "; ".join(problems)
                        + "; check that the weights match the config")
    model.load_state_dict({k: v for k, v in state.items()}, strict=True)


def save_checkpoint(path: str | os.PathLike, model: SwinXVR, params_ema: Mapping[str, torch.Tensor] | None = None,
                    meta: dict | None = None, extra: dict | None = None) -> str:
    """Write our format atomically (temp name, then rename); return the file's sha256."""
    ckpt: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "params": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    if params_ema is not None:
        ckpt["params_ema"] = {k: v.detach().cpu().clone() for k, v in params_ema.items()}
    if extra:
        ckpt.update(extra)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return file_sha256(path)


def load_checkpoint(source: str | os.PathLike | dict, ema: bool = True) -> tuple[SwinXVR, dict]:
    """Load our format (path or dict). Returns (model in eval mode, the checkpoint dict)."""
    name = "<dict>" if isinstance(source, dict) else str(source)
    ckpt = source if isinstance(source, dict) else read_untrusted(source)
    if not isinstance(ckpt, dict):
        raise UserError(f"{name}: not a checkpoint dict")
    if ckpt.get("format") != FORMAT:
        if "params" in ckpt or "params_ema" in ckpt:
            raise UserError(f"{name}: looks like an XFusion checkpoint; convert it with "
                            "`xvr-batch convert-weights FILE --network-g CFG.yml -o OUT.pt`")
        raise UserError(f"{name}: not an xvr_batch checkpoint (no 'format' field)")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{name}: checkpoint format version {version!r} is newer than this xvr_batch "
                        f"understands ({FORMAT_VERSION}); upgrade xvr_batch")
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{name}: checkpoint has no model config")
    cfg = ModelConfig.from_dict(ckpt["config"])
    model = build_model(cfg)
    key = "params_ema" if ema and "params_ema" in ckpt else "params"
    if key not in ckpt:
        raise UserError(f"{name}: checkpoint has no weights ('params' or 'params_ema')")
    load_state_dict_strict(model, ckpt[key], f"{name} [{key}]")
    return model.eval(), ckpt


def load_model(source: str | os.PathLike | dict, ema: bool = True) -> SwinXVR:
    return load_checkpoint(source, ema)[0]


# ---------------------------------------------------------------------------------------- XFusion

def xfusion_config(network_g: Mapping[str, Any], head: str = "all") -> ModelConfig:
    """Our config from the reference's constructor kwargs (the ``network_g`` block of its YAML)."""
    g = dict(network_g)
    g.pop("type", None)
    unsupported = []
    if g.get("align_features_ok"):
        unsupported.append("align_features_ok (PCD alignment)")
    if g.get("adapt_deformable_conv"):
        unsupported.append("adapt_deformable_conv")
    if g.get("upsampler", "pixelshuffle") not in ("pixelshuffle",):
        unsupported.append(f"upsampler={g.get('upsampler')!r}")
    if g.get("resi_connection", "1conv") != "1conv":
        unsupported.append(f"resi_connection={g.get('resi_connection')!r}")
    if g.get("conv_window_size", 3) != 3:
        unsupported.append(f"conv_window_size={g.get('conv_window_size')}")
    if g.get("num_in_ch", 1) != 1:
        unsupported.append(f"num_in_ch={g.get('num_in_ch')}")
    e = int(g.get("embed_dim", 96))
    if int(g.get("num_feat_ext", e)) != e:
        unsupported.append("num_feat_ext != embed_dim")
    nl = int(g.get("num_frame", 3))
    cfi = g.get("center_frame_idx")
    if cfi is not None and int(cfi) != nl // 2:
        unsupported.append(f"center_frame_idx={cfi}")
    if unsupported:
        raise UserError("network_g uses options xvr_batch does not implement: " + ", ".join(unsupported))
    window = g.get("window_size", [25, 16, 16])
    if isinstance(window, int):
        window = [window, window, window]
    if len(window) != 3 or window[1] != window[2]:
        raise UserError(f"network_g window_size must be [T, ws, ws], got {window}")
    return ModelConfig(
        num_lr=nl, embed_dim=e, depths=tuple(g.get("depths", (6, 6, 54, 6))),
        num_heads=tuple(g.get("num_heads", (1, 1, 1, 1))), window=int(window[1]), window_t=int(window[0]),
        mlp_ratio=float(g.get("mlp_ratio", 4)), drop_path=float(g.get("drop_path_rate", 0.2)),
        recon_dim=int(g.get("num_feat_rec", 64)), scale=int(g.get("upscale", 4)), head=head,
        qkv_bias=bool(g.get("qkv_bias", True)),
    )


_XF_RULES = [
    (r"conv_first\.", "lr_conv."),
    (r"conv_first_hi\.", "hr_conv0."),
    (r"conv1_hi\.", "hr_conv1."),
    (r"conv2_hi\.", "hr_conv2."),
    (r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.attn\.relative_position_bias_table",
     r"stages.\1.blocks.\2.attn.rel_bias_table"),
    (r"layers\.(\d+)\.residual_group\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"layers\.(\d+)\.conv\.", r"stages.\1.conv."),
    (r"norm\.", "norm."),
    (r"conv_after_body\.", "conv_after_body."),
    (r"conv_before_upsample\.0\.", "head_conv."),
    (r"conv_last\.", "conv_last."),
]


def _map_xfusion_key(key: str) -> str | None:
    if key.endswith("relative_position_index"):
        return None  # a derived buffer; ours is computed from the window
    m = re.fullmatch(r"upsample\.(\d+)\.(weight|bias)", key)
    if m:
        i = int(m.group(1))
        return f"upsample.{i // 2}.{m.group(2)}" if i % 2 == 0 else f"<odd upsample index {i}>"
    for pattern, repl in _XF_RULES:
        new, n = re.subn("^" + pattern, repl, key)
        if n:
            return new
    return f"<unmapped {key}>"


def xfusion_to_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an XFusion state dict to our keys (``module.`` prefixes from DDP are stripped)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        new = _map_xfusion_key(k)
        if new is not None:
            out[new] = value
    return out


def _xfusion_state(checkpoint: str | os.PathLike | Mapping[str, Any], name: str) -> Mapping[str, torch.Tensor]:
    ckpt = checkpoint if isinstance(checkpoint, Mapping) else read_untrusted(checkpoint)
    if not isinstance(ckpt, Mapping):
        raise UserError(f"{name}: not a checkpoint dict")
    for key in ("params_ema", "params"):
        if key in ckpt and isinstance(ckpt[key], Mapping):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt  # a bare state dict
    raise UserError(f"{name}: no 'params_ema' or 'params' state dict in the XFusion checkpoint")


def from_xfusion(checkpoint: str | os.PathLike | Mapping[str, Any], network_g: Mapping[str, Any],
                 head: str = "all") -> SwinXVR:
    """Build our model from an XFusion checkpoint (path or dict; ``params_ema`` preferred) and the
    reference's constructor kwargs. ``head="centre"`` is the reference's STF model, ``"all"`` its VSTF."""
    name = "<dict>" if isinstance(checkpoint, Mapping) else str(checkpoint)
    cfg = xfusion_config(network_g, head=head)
    model = build_model(cfg)
    load_state_dict_strict(model, xfusion_to_state_dict(_xfusion_state(checkpoint, name)), name)
    return model.eval()
