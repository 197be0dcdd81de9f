"""Window attention kernels for SWIN-XVR, the masks they need, and the facts that identify them.

Two implementations of the same maths, ``softmax(q k^T / sqrt(hd) + bias + region) v`` per 3-D window:

- ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` with one additive float mask per
  block, (heads, N, N) for unshifted blocks and (nW * heads, N, N) for shifted ones (relative position bias
  plus -100 across the regions of a cyclically shifted window). A float mask rules out the flash kernels:
  on CUDA the dispatcher picks memory-efficient attention (or math). The mask is built once per geometry and
  weight version, in the compute dtype, by :meth:`SwinXVR.prepare_masks`.
- ``"flex"``: :func:`torch.nn.attention.flex_attention.flex_attention` with a ``score_mod`` that adds the
  (heads, N, N) bias and, for shifted blocks, -100 where the region ids of the query and key tokens differ
  (ids (nW, N) int32, indexed by ``b % nW``). No (nW * heads, N, N) mask is ever materialised. FlexAttention
  is only fused when compiled: outside a compiled region it runs through ``torch.compile(flex_attention)``.

Determinism: nothing here is autotuned at run time. Every compile uses Inductor's default mode with
``deterministic=True`` (:data:`COMPILE_OPTIONS`): no on-device benchmarking that can change numerics, so two
processes on the same GPU model, torch and CUDA version pick the same kernels. ``mode="max-autotune"`` is
never used. :func:`kernel_identity` lists the facts that must enter the settings hash.
"""

from __future__ import annotations

import math
import platform
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_KINDS", "COMPILE_MODE", "COMPILE_OPTIONS", "attention_backend_report", "compile_fn",
    "flex_window_attention", "kernel_identity", "region_ids", "sdpa_window_attention",
]

ATTENTION_KINDS = ("sdpa", "flex")
#: Inductor options of every compile in this package: default mode, no numerics-changing autotuning.
COMPILE_OPTIONS: dict[str, Any] = {"deterministic": True}
#: How the compile mode is recorded (kernel_identity, the settings hash).
COMPILE_MODE = "inductor-default-deterministic"

REGION_PENALTY = -100.0  # the reference's additive mask across shifted-window regions


def compile_fn(fn, *, fullgraph: bool = True):
    """``torch.compile`` as this package does it: static shapes, one graph, deterministic Inductor."""
    return torch.compile(fn, fullgraph=fullgraph, dynamic=False, options=dict(COMPILE_OPTIONS))


# ---------------------------------------------------------------------------- geometry (pure functions)
def region_ids(padded: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int],
               device=None) -> torch.Tensor:
    """(nW, N) int32 region id of each token of each cyclically shifted window (traceable)."""
    ids = torch.zeros(padded, dtype=torch.int32, device=device)
    for axis in range(3):
        if shift[axis] == 0:
            continue
        p, w, s = padded[axis], window[axis], shift[axis]
        region = torch.zeros(p, dtype=torch.int32, device=device)
        region[p - w: p - s] = 1
        region[p - s:] = 2
        shape = [1, 1, 1]
        shape[axis] = p
        ids = ids * 3 + region.view(shape)
    wd, wh, ww = window
    d, h, w = padded
    ids = ids.view(d // wd, wd, h // wh, wh, w // ww, ww).permute(0, 2, 4, 1, 3, 5)
    return ids.reshape(-1, wd * wh * ww).contiguous()


def region_penalty(ids: torch.Tensor) -> torch.Tensor:
    """(nW, N, N) float32: 0 inside a region, -100 across regions."""
    diff = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(diff.shape, dtype=torch.float32, device=ids.device).masked_fill(diff, REGION_PENALTY)


# ---------------------------------------------------------------------------- kernels
def sdpa_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          n_windows: int) -> torch.Tensor:
    """q, k, v (B*nW, heads, N, hd); mask (heads, N, N) or (nW*heads, N, N) additive -> (B*nW, heads, N, hd)."""
    bw, h, n, hd = q.shape
    if mask.shape[0] != h:  # per-window mask: fold windows into the head axis so it broadcasts over B
        q, k, v = (t.reshape(bw // n_windows, n_windows * h, n, hd) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))
    return out.reshape(bw, h, n, hd)


_FLEX = None


def _flex_kernel():
    """flex_attention itself inside a compiled region (the outer compile fuses it), else a compiled copy."""
    from torch.nn.attention.flex_attention import flex_attention
    if torch.compiler.is_compiling():
        return flex_attention
    global _FLEX
    if _FLEX is None:
        _FLEX = compile_fn(flex_attention)
    return _FLEX


def flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                          ids: torch.Tensor | None, n_windows: int) -> torch.Tensor:
    """q, k, v (B*nW, heads, N, hd); bias (heads, N, N); ids (nW, N) region ids or None -> (B*nW, heads, N, hd)."""
    if ids is None:
        def score_mod(score, b, h, qi, ki):
            return score + bias[h, qi, ki]
    else:
        def score_mod(score, b, h, qi, ki):
            w = b % n_windows
            score = score + bias[h, qi, ki]
            return torch.where(ids[w, qi] == ids[w, ki], score, score + REGION_PENALTY)
    return _flex_kernel()(q, k, v, score_mod=score_mod)


# ---------------------------------------------------------------------------- reporting
_SDPA_NAMES = {0: "sdpa-math", 1: "sdpa-flash", 2: "sdpa-efficient", 3: "sdpa-cudnn", 4: "sdpa-overrideable"}


def _example_block(model, lr_shape, device, dtype):
    """The first shifted block (else the first block), its geometry and a q of the right shape."""
    b, _, _, h, w = lr_shape
    blocks = [blk for st in model.stages for blk in st.blocks]
    geoms = [blk.geometry(model.cfg.n_slices, h, w) for blk in blocks]
    i = next((j for j, g in enumerate(geoms) if any(g.shift)), 0)
    g = geoms[i]
    heads = blocks[i].attn.num_heads
    hd = model.cfg.embed_dim // heads
    q = torch.zeros(b * g.n_windows, heads, math.prod(g.window), hd, device=device, dtype=dtype)
    return i, g, q


def attention_backend_report(model, example: torch.Tensor, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Which attention kernel the model runs for LR input ``example`` (B, NL, 1, h, w), or its shape.

    ``dtype`` is the compute dtype (default: the autocast dtype if autocast is on for the device, else the
    model's). For "sdpa" the kernel is the one the dispatcher picks for the first shifted block's q, k, v and
    mask (``torch._fused_sdp_choice``; math, efficient or cudnn: a float mask excludes flash). For "flex" it is
    ``flex-compiled`` (always: outside a compiled region the model calls ``torch.compile(flex_attention)``)."""
    shape = tuple(example.shape) if isinstance(example, torch.Tensor) else tuple(example)
    param = next(model.parameters())
    device = example.device if isinstance(example, torch.Tensor) else param.device
    dtype = dtype or model.compute_dtype(device)
    report: dict[str, Any] = {"attention": model.attention, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                              "compile": getattr(model, "compile_mode", None)}
    i, g, q = _example_block(model, shape, device, dtype)
    report.update(block=i, window=list(g.window), n_windows=g.n_windows, q_shape=list(q.shape))
    if model.attention == "flex":
        report["kernel"] = "flex-compiled"
        return report
    mask = model.prepare_masks(shape[-2], shape[-1], device, dtype)[i]
    qq = q.reshape(q.shape[0] // g.n_windows, g.n_windows * q.shape[1], *q.shape[2:]) if mask.shape[0] != q.shape[1] else q
    try:
        choice = int(torch._fused_sdp_choice(qq, qq, qq, mask, 0.0, False))
        report["kernel"] = _SDPA_NAMES.get(choice, f"sdpa-{choice}")
    except Exception as exc:  # private API: fall back to saying so
        report["kernel"] = "sdpa-unknown"
        report["kernel_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if device.type == "cuda":  # which pinned kernels accept these inputs
        from torch.nn.attention import SDPBackend, sdpa_kernel
        works = {}
        for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                         ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel([be]):
                    F.scaled_dot_product_attention(qq[:1], qq[:1], qq[:1], attn_mask=mask)
                works[name] = True
            except RuntimeError:
                works[name] = False
        report["pinned_kernels_that_run"] = works
    return report


def kernel_identity(model, device, *, attention: str | None = None, compile: bool | None = None) -> dict[str, Any]:
    """Facts that decide which kernels run, hence the output bytes: they belong in the settings hash.

    ``attention`` and ``compile`` default to the model's run-time state (``model.attention``, and whether
    :meth:`SwinXVR.compiled_features` was made); pass them to describe a run before the model is set up
    (e.g. in ``prepare``). CUDA facts are those of ``device``: a worker on another GPU model, torch or CUDA
    version gets another identity, hence another hash."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    mode = getattr(model, "compile_mode", None) if compile is None else (COMPILE_MODE if compile else None)
    ident: dict[str, Any] = {
        "attention": attention or getattr(model, "attention", "sdpa"),
        "compile": mode,  # None: eager
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) if cuda else None,  # autotuned convs if True
    }  # TF32 is not here: the settings' "precision" decides it (UnitRunner sets the flags from it)
    if cuda:
        ident["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        ident["cpu"] = platform.machine()
    if ident["compile"] is not None:
        try:
            import triton  # noqa: F401
            ident["triton"] = triton.__version__ if cuda else None
        except ImportError:
            ident["triton"] = None
    return ident
