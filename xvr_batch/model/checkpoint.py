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

import io
import os
import pickle
import re
import stat
import zipfile
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
    "load_state_dict_strict", "check_finite_state", "from_xfusion", "xfusion_config", "xfusion_to_state_dict",
    "read_untrusted", "MAX_CHECKPOINT_BYTES",
]


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a checkpoint file (:func:`xvr_batch.durable.sha256_file`)."""
    from xvr_batch.durable import sha256_file

    return sha256_file(path)


#: Largest checkpoint file read: a training checkpoint (weights, EMA weights, two Adam moments) of a network at
#: the parameter cap of :func:`~xvr_batch.model.config.size_caps` is 1.6 GB; anything far larger is not ours.
MAX_CHECKPOINT_BYTES = 4 * 2**30


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_size(size: int, name: str) -> None:
    if size > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{name}: refused, the file is {size / 2**30:.2f} GiB, more than the "
                        f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB a checkpoint of the largest accepted network needs; "
                        "check the --weights path")


def _open_regular(path: str | os.PathLike, name: str) -> io.BufferedReader:
    """Open ``path`` for reading only if it is a regular file of a sane size; never blocks on a FIFO."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{name}: weights file not found; check the --weights path") from None
    except OSError as exc:
        raise UserError(f"{name}: cannot read the weights file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{name}: is {_file_kind(st.st_mode)}, not a weights file; give the path of a checkpoint file")
    _check_size(st.st_size, name)
    try:  # O_NONBLOCK: should the path have been swapped for a FIFO since the stat, open() does not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UserError(f"{name}: cannot read the weights file ({exc.strerror or exc})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"{name}: is {_file_kind(st.st_mode)}, not a weights file; give the path of a checkpoint file")
    try:
        _check_size(st.st_size, name)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _check_zip_records(f: Any, name: str) -> None:
    """Refuse a zip-format checkpoint with compressed records or a declared total size above the cap.

    ``torch.save`` stores its records uncompressed; a deflated record is how a file of a few hundred KB makes
    ``torch.load`` allocate gigabytes before it fails."""
    try:
        if not zipfile.is_zipfile(f):
            return
        f.seek(0)
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{name}: not a readable torch checkpoint (bad zip archive: {str(exc)[:160]})") from None
    finally:
        f.seek(0)
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UserError(f"{name}: refused, the checkpoint has compressed records (first: {packed[0][:80]!r}); "
                        "torch.save never writes them; re-save the weights with torch.save")
    total = sum(i.file_size for i in infos)
    if total > MAX_CHECKPOINT_BYTES:
        raise UserError(f"{name}: refused, the checkpoint's records add up to {total / 2**30:.2f} GiB, more than "
                        f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB")


def read_untrusted(source: str | os.PathLike | bytes) -> Any:
    """``torch.load`` with ``weights_only=True``; every failure becomes one clear :class:`UserError`.

    A path must name a regular file (a directory, FIFO or device is refused before it is read) of at most
    :data:`MAX_CHECKPOINT_BYTES`; a zip-format file must hold only uncompressed records, as ``torch.save``
    writes them."""
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        _check_size(len(source), name)
        f: Any = io.BytesIO(source)
    else:
        f = _open_regular(source, name)
    try:
        with f:
            _check_zip_records(f, name)
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{name}: refused, the file needs arbitrary pickled objects to load ({first[:160]}); "
            "only tensors and plain containers are accepted; re-save the weights as a plain state dict"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError, KeyError, IndexError,
            MemoryError, RecursionError, OverflowError) as exc:
        raise UserError(f"{name}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from exc


def build_model(cfg: ModelConfig) -> SwinXVR:
    return SwinXVR(cfg)


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``; any missing/unexpected key, wrong shape, non-float or sparse tensor, or
    a tensor holding NaN/Inf is one UserError (which names the first bad tensor)."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: the weights are not a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [str(k) for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(k[:80] for k in unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} keys with wrong shapes (first: {'; '.join(shapes[:3])})")
    if problems:
        raise UserError(f"{source}: weights do not fit the model: " + "; ".join(problems)
                        + "; check that the weights match the config")
    check_finite_state(state, source)
    model.load_state_dict({k: v for k, v in state.items()}, strict=True)


def check_finite_state(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Refuse (UserError naming the first bad tensor and ``source``) a tensor that is sparse, not floating
    point, or holds NaN or Inf: such weights would turn every output frame into NaN."""
    for key, v in state.items():
        if v.layout != torch.strided:
            raise UserError(f"{source}: tensor {key!r} is {v.layout}, not a dense tensor; re-save the weights")
        if not v.is_floating_point():
            raise UserError(f"{source}: tensor {key!r} has dtype {v.dtype}, not floating point; "
                            "the checkpoint is corrupt; re-export the weights")
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise UserError(f"{source}: tensor {key!r} holds {bad} NaN/Inf values (of {v.numel()}); the weights are "
                            "corrupt or training diverged; use another checkpoint")


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
    from xvr_batch.durable import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
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
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{name}: checkpoint format version {version!r:.40} is not valid; the file is corrupt")
    if version > FORMAT_VERSION:
        raise UserError(f"{name}: checkpoint format version {version!r} is newer than this xvr_batch "
                        f"understands ({FORMAT_VERSION}); upgrade xvr_batch")
    if not isinstance(ckpt.get("config"), dict):
        raise UserError(f"{name}: checkpoint has no model config")
    try:  # types, ranges and the size cap, from the config alone: nothing is allocated before this passes
        cfg = ModelConfig.from_dict(ckpt["config"])
    except UserError as exc:
        raise UserError(f"{name}: {exc}; the checkpoint's config is corrupt or not for xvr_batch") from None
    key = "params_ema" if ema and "params_ema" in ckpt else "params"
    if key not in ckpt:
        raise UserError(f"{name}: checkpoint has no weights ('params' or 'params_ema')")
    model = build_model(cfg)
    load_state_dict_strict(model, ckpt[key], f"{name} [{key}]")
    return model.eval(), ckpt


def load_model(source: str | os.PathLike | dict, ema: bool = True) -> SwinXVR:
    return load_checkpoint(source, ema)[0]


# ---------------------------------------------------------------------------------------- XFusion

def xfusion_config(network_g: Mapping[str, Any], head: str = "all") -> ModelConfig:
    """Our config from the reference's constructor kwargs (the ``network_g`` block of its YAML).

    The values are untrusted: each is type-checked (by :class:`ModelConfig`, which also applies the size caps)
    and every problem is one :class:`UserError`."""
    if not isinstance(network_g, Mapping):
        raise UserError(f"network_g must be a mapping of constructor arguments, got {type(network_g).__name__}")
    g = dict(network_g)
    g.pop("type", None)
    unsupported = []
    if g.get("align_features_ok"):
        unsupported.append("align_features_ok (PCD alignment)")
    if g.get("adapt_deformable_conv"):
        unsupported.append("adapt_deformable_conv")
    if g.get("upsampler", "pixelshuffle") not in ("pixelshuffle",):
        unsupported.append(f"upsampler={g.get('upsampler')!r:.40}")
    if g.get("resi_connection", "1conv") != "1conv":
        unsupported.append(f"resi_connection={g.get('resi_connection')!r:.40}")
    if g.get("conv_window_size", 3) != 3:
        unsupported.append(f"conv_window_size={g.get('conv_window_size')!r:.40}")
    if g.get("num_in_ch", 1) != 1:
        unsupported.append(f"num_in_ch={g.get('num_in_ch')!r:.40}")
    e = g.get("embed_dim", 96)
    if g.get("num_feat_ext", e) != e:
        unsupported.append("num_feat_ext != embed_dim")
    nl = g.get("num_frame", 3)
    cfi = g.get("center_frame_idx")
    if cfi is not None and (not isinstance(nl, int) or cfi != nl // 2):
        unsupported.append(f"center_frame_idx={cfi!r:.40}")
    if unsupported:
        raise UserError("network_g uses options xvr_batch does not implement: " + ", ".join(unsupported))
    window = g.get("window_size", [25, 16, 16])
    if isinstance(window, int) and not isinstance(window, bool):
        window = [window, window, window]
    if not isinstance(window, (list, tuple)) or len(window) != 3 or window[1] != window[2]:
        raise UserError(f"network_g window_size must be [T, ws, ws], got {window!r:.60}")
    seq = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731  (ModelConfig reports the rest)
    try:
        return ModelConfig(
            num_lr=nl, embed_dim=e, depths=seq(g.get("depths", (6, 6, 54, 6))),
            num_heads=seq(g.get("num_heads", (1, 1, 1, 1))), window=window[1], window_t=window[0],
            mlp_ratio=g.get("mlp_ratio", 4.0), drop_path=g.get("drop_path_rate", 0.2),
            recon_dim=g.get("num_feat_rec", 64), scale=g.get("upscale", 4), head=head,
            qkv_bias=g.get("qkv_bias", True),
        )
    except UserError as exc:
        raise UserError(f"network_g: {exc}") from None


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
