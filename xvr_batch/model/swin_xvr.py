"""SWIN-XVR: a shifted-window video transformer that fuses LR frames with HR key frames.

The network follows the facts of the authors' public XFusion code (docs/ARCHITECTURE.md, "The model"):

    lr (B, NL, 1, h, w) ──conv3x3+LReLU──────────────────────────────┐
    hr (B, 2, 1, 4h, 4w) ─conv+LReLU─conv+LReLU+pool─conv+LReLU+pool──┤ stack in time: D = NL + 2 slices
                                                                      ▼
        shallow (B, D, h, w, E) ──► RSTB × S (Swin blocks with 3-D windows D×ws×ws, per-slice conv, residual)
                                ──► LayerNorm ──► per-slice conv ──► + shallow (long skip)
                                ──► head: slices [0, NL) ("all") or NL // 2 ("centre")
                                    conv(E→R)+LReLU ─ [conv(R→4R) + PixelShuffle(2)] × 2 ─ conv(R→1)
                                ──► (B, n_out, 1, 4h, 4w)

Implementation notes
- Features live channels-last, (B, D, h, w, E), inside the body; every reshape works on contiguous data
  (the reference's ``.view`` on a sliced tensor is what makes it fail at batch > 1).
- Attention runs through ``F.scaled_dot_product_attention`` ("sdpa", the default) or FlexAttention
  ("flex"), chosen at run time with :meth:`SwinXVR.set_attention` (not a config field: checkpoints do not
  change). See ``attention.py``. For "sdpa" the relative position bias and the shifted-window region mask
  (-100) are merged into one additive mask per block; for "flex" they are a ``score_mod``.
- Masks are built OUTSIDE the traced path: :meth:`SwinXVR.prepare_masks` (eager, cached per LR shape,
  device, dtype and parameter version) returns one entry per block, which :meth:`SwinXVR.forward_features`
  takes as ``masks=``. :meth:`SwinXVR.compiled_features` wraps the two: masks in eager Python, then one
  compiled graph with no breaks. If ``forward_features`` is itself traced without ``masks``, they are built
  inside the graph (no cache; correct, a little slower).
- Under autocast the residual stream is in the autocast dtype end to end: the shallow features are cast
  once, LayerNorms return the input dtype (fp32 statistics inside the kernel), masks are built in the
  compute dtype. Without autocast everything is as in fp32.
- Nothing is computed for key-frame slices that nothing reads: the last stage's last MLP, its per-slice
  conv, the final norm and ``conv_after_body`` run only on the slices the head reads (attention still sees
  all D slices). Same maths for the outputs.
- Key frames can be encoded once (:meth:`SwinXVR.encode_keys`) and reused by every window that shares
  them (:meth:`SwinXVR.forward_features`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xvr_batch.model.attention import (
    ATTENTION_KINDS, COMPILE_MODE, compile_fn, flex_window_attention, region_ids, region_penalty,
    sdpa_window_attention,
)
from xvr_batch.model.config import ModelConfig

__all__ = ["SwinXVR", "drop_path_schedule", "TIME_PARAMS", "with_time_cond"]

#: The parameters ``ModelConfig.time_cond`` adds (both start at zero).
TIME_PARAMS = ("time_embed", "base_gate")


def drop_path_schedule(rate: float, n_blocks: int) -> list[float]:
    """Stochastic depth per block: linear from 0 to ``rate`` over all blocks."""
    return [x.item() for x in torch.linspace(0, rate, n_blocks)]


class DropPath(nn.Module):
    """Drop whole residual branches per sample (stochastic depth)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


def _effective_window(size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]):
    """A dimension no larger than its window is covered by one window of its own size, unshifted."""
    win, sh = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            win[i] = size[i]
            sh[i] = 0
    return tuple(win), tuple(sh)


def _rel_index(window: tuple[int, int, int], device=None) -> torch.Tensor:
    """(N, N) index into the (2Wd-1)(2Wh-1)(2Ww-1) bias table for a Wd×Wh×Ww window (traceable)."""
    wd, wh, ww = window
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    coords = torch.stack(torch.meshgrid(ar(wd), ar(wh), ar(ww), indexing="ij"))
    coords = coords.flatten(1)  # 3, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # N, N, 3
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1], device=device)
    return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


@lru_cache(maxsize=64)
def _relative_position_index(window: tuple[int, int, int]) -> torch.Tensor:
    """Cached CPU copy of :func:`_rel_index` (eager use only). Built outside inference mode: the first call may
    come from a reconstruct (under ``torch.inference_mode``), and autograd cannot save an inference tensor when
    the same process trains later (``finetune`` after ``validate``)."""
    with torch.inference_mode(False):
        return _rel_index(window)


class Geometry(NamedTuple):
    """Window layout of one block for features of D×h×w (plain ints, computed outside any graph)."""

    window: tuple[int, int, int]
    shift: tuple[int, int, int]
    pad: tuple[int, int, int]
    padded: tuple[int, int, int]
    n_windows: int


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state-dict keys) that keeps a low-precision input's dtype under
    autocast (autocast would return float32). The statistics are still accumulated in float32 by the kernel;
    the affine parameters are rounded to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                    self.eps)
        return super().forward(x)


def _partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """(B, D, H, W, C) -> (B * nW, N, C); windows in (d, h, w) order, tokens in (d, h, w) order."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, c)


def _reverse(windows: torch.Tensor, window: tuple[int, int, int], b: int, d: int, h: int, w: int) -> torch.Tensor:
    """(B * nW, N, C) -> (B, D, H, W, C)."""
    wd, wh, ww = window
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3-D windows, with a learnable relative position bias.

    ``kind`` ("sdpa" or "flex") is a run-time attribute, set by :meth:`SwinXVR.set_attention`."""

    def __init__(self, dim: int, window: tuple[int, int, int], num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.kind = "sdpa"
        wd, wh, ww = window
        self.rel_bias_table = nn.Parameter(torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads))
        nn.init.trunc_normal_(self.rel_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def bias(self, n: int) -> torch.Tensor:
        """(heads, N, N) relative position bias for windows of N tokens."""
        device = self.rel_bias_table.device
        if torch.compiler.is_compiling():
            index = _rel_index(self.window, device)[:n, :n].reshape(-1)
        else:
            index = _relative_position_index(self.window)[:n, :n].reshape(-1).to(device)
        return self.rel_bias_table[index].view(n, n, -1).permute(2, 0, 1)

    def make_mask(self, g: Geometry, device, dtype: torch.dtype) -> Any:
        """What :meth:`forward` takes as ``mask`` for geometry ``g`` (traceable, no cache).

        sdpa: (heads, N, N) or, shifted, (nW * heads, N, N) additive, in ``dtype``;
        flex: ``(bias (heads, N, N) float32, region ids (nW, N) int32 or None)``."""
        n = math.prod(g.window)
        bias = self.bias(n)  # heads, N, N
        ids = region_ids(g.padded, g.window, g.shift, device) if any(g.shift) else None
        if self.kind == "flex":
            return (bias.contiguous(), ids)
        if ids is None:
            return bias.to(dtype).contiguous()
        mask = (region_penalty(ids)[:, None] + bias[None]).reshape(g.n_windows * bias.shape[0], n, n)
        return mask.to(dtype).contiguous()

    def forward(self, x: torch.Tensor, mask: Any, n_windows: int) -> torch.Tensor:
        """x: (B * nW, N, C); mask from :meth:`make_mask`."""
        bw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # 3, B*nW, heads, N, hd
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.kind == "flex":
            bias, ids = mask
            out = flex_window_attention(q, k, v, bias, ids, n_windows)
        else:
            out = sdpa_window_attention(q, k, v, mask, n_windows)
        out = out.transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class SwinBlock3D(nn.Module):
    """Pre-norm Swin block: x + DropPath(W-MSA(LN x)), then x + DropPath(MLP(LN x))."""

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int, int], shift: tuple[int, int, int],
                 mlp_ratio: float, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def geometry(self, d: int, h: int, w: int) -> Geometry:
        window, shift = _effective_window((d, h, w), self.window, self.shift)
        pad = tuple((window[i] - s % window[i]) % window[i] for i, s in enumerate((d, h, w)))
        padded = (d + pad[0], h + pad[1], w + pad[2])
        n_windows = (padded[0] // window[0]) * (padded[1] // window[1]) * (padded[2] // window[2])
        return Geometry(window, shift, pad, padded, n_windows)

    def forward(self, x: torch.Tensor, mask: Any = None, keep: slice | None = None) -> torch.Tensor:
        """x (B, D, h, w, C) -> same, or only the slices ``keep`` (attention still reads every slice).

        ``mask``: from :meth:`WindowAttention3D.make_mask` for this geometry (built here when None)."""
        b, d, h, w, c = x.shape
        g = self.geometry(d, h, w)
        window, shift, pad, padded = g.window, g.shift, g.pad, g.padded

        y = self.norm1(x)
        if mask is None:
            mask = self.attn.make_mask(g, x.device, y.dtype)
        if any(pad):  # zero padding on the far side of each axis, after the norm (as the reference)
            y = F.pad(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        if any(shift):
            y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        y = self.attn(_partition(y, window), mask, g.n_windows)  # B*nW, N, C
        y = _reverse(y, window, b, *padded)
        if any(shift):
            y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
        if keep is not None:
            x, y = x[:, keep], y[:, keep]
        if any(pad) or keep is not None:
            y = y[:, :, :h, :w] if keep is not None else y[:, :d, :h, :w]
            y = y.contiguous()
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RSTB(nn.Module):
    """Residual Swin stage: blocks (alternately shifted), then a per-slice conv, plus the stage input."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: tuple[int, int, int], mlp_ratio: float,
                 qkv_bias: bool, drop_paths: list[float]):
        super().__init__()
        shift = tuple(wi // 2 for wi in window)
        self.blocks = nn.ModuleList(
            SwinBlock3D(dim, num_heads, window, (0, 0, 0) if i % 2 == 0 else shift, mlp_ratio, qkv_bias, drop_paths[i])
            for i in range(depth)
        )
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1)

    def forward(self, x: torch.Tensor, masks: list | None = None, keep: slice | None = None) -> torch.Tensor:
        """x: (B, D, h, w, E) -> same, or only the slices ``keep``. ``masks``: one per block, or None."""
        y = x
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            y = blk(y, None if masks is None else masks[i], keep if i == last else None)
        if keep is not None:
            x = x[:, keep]
        return x + _slice_conv(self.conv, y)


def _slice_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D conv to every slice of channels-last (B, D, h, w, C) features."""
    b, d, h, w, c = x.shape
    y = conv(x.reshape(b * d, h, w, c).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(b, d, h, w, -1)


class SwinXVR(nn.Module):
    """The SWIN-XVR network. ``model(lr, hr)`` maps (B, NL, 1, h, w) and (B, 2, 1, 4h, 4w) in [0, 1]
    to (B, n_out, 1, 4h, 4w), with n_out = NL for ``head="all"`` and 1 for ``head="centre"``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e, r = cfg.embed_dim, cfg.recon_dim
        # LR branch, per frame
        self.lr_conv = nn.Conv2d(cfg.in_ch, e, 3, 1, 1)
        # HR branch, per key frame: full HR resolution down to the LR grid
        self.hr_conv0 = nn.Conv2d(cfg.in_ch, e, 3, 1, 1)
        self.hr_conv1 = nn.Conv2d(e, e, 3, 1, 1)
        self.hr_conv2 = nn.Conv2d(e, e, 3, 1, 1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.lrelu = nn.LeakyReLU(0.1)
        # body
        dpr = drop_path_schedule(cfg.drop_path, sum(cfg.depths))
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.stages = nn.ModuleList(
            RSTB(e, depth, heads, cfg.window_3d, cfg.mlp_ratio, cfg.qkv_bias, dpr[s : s + depth])
            for depth, heads, s in zip(cfg.depths, cfg.num_heads, starts)
        )
        self.norm = LayerNorm(e)
        self.conv_after_body = nn.Conv2d(e, e, 3, 1, 1)
        # reconstruction head
        self.head_conv = nn.Conv2d(e, r, 3, 1, 1)
        self.head_act = nn.LeakyReLU(0.01)
        self.upsample = nn.ModuleList(nn.Conv2d(r, 4 * r, 3, 1, 1) for _ in range(int(math.log2(cfg.scale))))
        self.shuffle = nn.PixelShuffle(2)
        self.conv_last = nn.Conv2d(r, cfg.in_ch, 3, 1, 1)
        if cfg.time_cond:  # zero: the network starts as the same network without them (ModelConfig.time_cond)
            self.time_embed = nn.Parameter(torch.zeros(e))
            self.base_gate = nn.Parameter(torch.zeros(1))
        self.apply(self._init_linear)
        # run-time choices (not in the config: checkpoints do not change)
        self.attention = "sdpa"
        self.compile_mode: str | None = None  # set by compiled_features; see attention.kernel_identity
        self._masks: OrderedDict[tuple, tuple[tuple, list]] = OrderedDict()

    # ------------------------------------------------------------------ run-time choices
    def set_attention(self, kind: str) -> "SwinXVR":
        """Choose the attention kernel: "sdpa" (default) or "flex" (FlexAttention; fast only compiled)."""
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
        self.attention = kind
        for blk in self._blocks():
            blk.attn.kind = kind
        self._masks.clear()
        return self

    def _blocks(self) -> list[SwinBlock3D]:
        return [blk for st in self.stages for blk in st.blocks]

    def compute_dtype(self, device) -> torch.dtype:
        """The dtype of the residual stream: autocast's when it is on for ``device``, else the weights'."""
        kind = torch.device(device).type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.lr_conv.weight.dtype

    def _build_masks(self, h: int, w: int, device, dtype: torch.dtype) -> list:
        d = self.cfg.n_slices
        return [blk.attn.make_mask(blk.geometry(d, h, w), device, dtype) for blk in self._blocks()]

    def prepare_masks(self, h: int, w: int, device=None, dtype: torch.dtype | None = None) -> list:
        """Attention masks for LR frames of h×w, one entry per block, for ``forward_features(masks=...)``.

        Built in eager Python, outside any traced graph, and cached by plain keys (attention kind, h, w,
        device, dtype) plus the bias tables' versions, so an in-place weight update rebuilds them. Not
        cached while the bias tables need gradients (training)."""
        device = torch.device(device) if device is not None else self.lr_conv.weight.device
        dtype = dtype or self.compute_dtype(device)
        tables = [blk.attn.rel_bias_table for blk in self._blocks()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tables):
            return self._build_masks(h, w, device, dtype)
        key = (self.attention, int(h), int(w), device, dtype)
        version = tuple((t._version, t.data_ptr(), t.device) for t in tables)
        hit = self._masks.get(key)
        if hit is not None and hit[0] == version:
            self._masks.move_to_end(key)
            return hit[1]
        with torch.no_grad():
            masks = self._build_masks(h, w, device, dtype)
        # sdpa masks are large ((nW * heads, N, N) per shifted block): keep one geometry; flex ids are small
        limit = 1 if self.attention == "sdpa" else 8
        self._masks.pop(key, None)
        while len(self._masks) >= limit:
            self._masks.popitem(last=False)
        self._masks[key] = (version, masks)
        return masks

    def compiled_features(self, fullgraph: bool = True) -> Callable:
        """A drop-in for :meth:`forward_features`: masks prepared in eager Python, then one compiled graph.

        Compiled with Inductor's default mode and ``deterministic=True`` (no autotuning that can differ
        between processes); static shapes, so each new LR shape compiles once. Records the compile mode on
        the model (``self.compile_mode``) for :func:`~xvr_batch.model.attention.kernel_identity`."""
        compiled = compile_fn(self.forward_features, fullgraph=fullgraph)
        self.compile_mode = COMPILE_MODE

        def features(lr: torch.Tensor, key_feats: torch.Tensor, base: torch.Tensor | None = None,
                     times: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
            masks = self.prepare_masks(lr.shape[-2], lr.shape[-1], lr.device, self.compute_dtype(lr.device))
            return compiled(lr, key_feats, base, masks, times, delta)

        features.compiled = compiled  # type: ignore[attr-defined]
        return features

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ encoders
    def encode_lr(self, lr: torch.Tensor) -> torch.Tensor:
        """(B, T, 1, h, w) -> (B, T, E, h, w)."""
        b, t, c, h, w = lr.shape
        return self.lrelu(self.lr_conv(lr.reshape(b * t, c, h, w))).view(b, t, -1, h, w)

    def encode_keys(self, hr: torch.Tensor) -> torch.Tensor:
        """(B, K, 1, H, W) -> (B, K, E, H/4, W/4). Encode each key frame once, reuse for every window."""
        b, k, c, hh, ww = hr.shape
        y = self.lrelu(self.hr_conv0(hr.reshape(b * k, c, hh, ww)))
        y = self.pool(self.lrelu(self.hr_conv1(y)))
        y = self.pool(self.lrelu(self.hr_conv2(y)))
        return y.view(b, k, *y.shape[1:])

    # ------------------------------------------------------------------ forward
    @staticmethod
    def key_base(hr: torch.Tensor) -> torch.Tensor:
        """(B, 2, 1, H, W) key frames -> (B, 1, 1, H, W) their mean (the base of ``residual="key_mean"``)."""
        return hr.mean(dim=1, keepdim=True)

    def forward_features(self, lr: torch.Tensor, key_feats: torch.Tensor,
                         base: torch.Tensor | None = None, masks: list | None = None,
                         times: torch.Tensor | None = None, delta: torch.Tensor | None = None) -> torch.Tensor:
        """lr (B, NL, 1, h, w), key_feats (B, 2, E, h, w) from :meth:`encode_keys` -> (B, n_out, 1, 4h, 4w).

        ``base`` (B, 1, 1, 4h, 4w) from :meth:`key_base` is required when ``cfg.residual == "key_mean"``.
        ``masks`` from :meth:`prepare_masks` (for this h, w and compute dtype); when None they are taken from
        that cache (eager) or built inside the graph (when traced). With ``cfg.time_cond``: ``times`` (B, NL)
        each LR frame's time weight between the two keys (:func:`~xvr_batch.normalise.time_weight`) and, with
        ``residual="key_mean"``, ``delta`` (B, 1, 1, 4h, 4w) from :meth:`key_delta`; ignored otherwise."""
        b, nl, _, h, w = lr.shape
        if nl != self.cfg.num_lr:
            raise ValueError(f"expected {self.cfg.num_lr} LR frames, got {nl}")
        if key_feats.shape[-2:] != (h, w):
            raise ValueError(f"key-frame features {tuple(key_feats.shape[-2:])} do not match the LR grid {(h, w)}")
        feats = self.encode_lr(lr)  # the compute dtype: autocast's, or the weights'
        if self.cfg.time_cond:
            if times is None or tuple(times.shape) != (b, nl):
                raise ValueError(f"this model needs each LR frame's time weight: times of shape {(b, nl)}")
            centred = (times.to(feats.dtype) - 0.5)[:, :, None, None, None]  # B, NL, 1, 1, 1
            feats = feats + centred * self.time_embed.to(feats.dtype)[None, None, :, None, None]
        shallow = torch.cat((feats, key_feats.to(feats.dtype)), dim=1)  # B, D, E, h, w
        shallow = shallow.permute(0, 1, 3, 4, 2).contiguous()  # B, D, h, w, E
        if masks is None:
            if torch.compiler.is_compiling():
                masks = self._build_masks(h, w, lr.device, shallow.dtype)
            else:
                masks = self.prepare_masks(h, w, lr.device, shallow.dtype)
        # only the slices the head reads leave the body (per-slice ops after the last attention)
        keep = slice(0, nl) if self.cfg.head == "all" else slice(nl // 2, nl // 2 + 1)
        x = shallow
        start, last = 0, len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            depth = len(stage.blocks)
            x = stage(x, masks[start:start + depth], keep if i == last else None)
            start += depth
        feat = shallow[:, keep] + _slice_conv(self.conv_after_body, self.norm(x))  # B, n_out, h, w, E
        n_out = feat.shape[1]
        feat = feat.reshape(b * n_out, h, w, -1).permute(0, 3, 1, 2)
        y = self.head_act(self.head_conv(feat))
        for up in self.upsample:
            y = self.shuffle(up(y))
        y = self.conv_last(y)
        y = y.view(b, n_out, *y.shape[1:])
        if self.cfg.residual == "key_mean":
            if base is None:
                raise ValueError("this model adds the key-frame mean: pass base=SwinXVR.key_base(hr)")
            y = y + base  # bf16 head output + fp32 base -> fp32 (type promotion); fp32 + fp32 as before
            if self.cfg.time_cond:
                if delta is None:
                    raise ValueError("this model moves the base towards the key blend: pass "
                                     "delta=SwinXVR.key_delta(hr)")
                w_out = times[:, keep].to(y.dtype) - 0.5  # B, n_out
                y = y + (self.base_gate.to(y.dtype) * w_out)[:, :, None, None, None] * delta.to(y.dtype)
        return y

    @staticmethod
    def key_delta(hr: torch.Tensor) -> torch.Tensor:
        """(B, 2, 1, H, W) key frames -> (B, 1, 1, H, W) the later minus the earlier (``time_cond`` base)."""
        return hr[:, 1:2] - hr[:, 0:1]

    def forward(self, lr: torch.Tensor, hr: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
        """``times`` (B, NL): each LR frame's time weight between the keys, needed with ``cfg.time_cond``."""
        base = self.key_base(hr) if self.cfg.residual == "key_mean" else None
        delta = self.key_delta(hr) if self.cfg.residual == "key_mean" and self.cfg.time_cond else None
        return self.forward_features(lr, self.encode_keys(hr), base, times=times, delta=delta)

    # ------------------------------------------------------------------ accounting
    def flops(self, h: int, w: int) -> float:
        """Multiply-adds x 2 of one call at LR size h x w (convs, linears and attention)."""
        cfg = self.cfg
        e, r, d, s = cfg.embed_dim, cfg.recon_dim, cfg.n_slices, cfg.scale
        hh, ww = h * s, w * s
        conv = lambda cin, cout, px: 2 * 9 * cin * cout * px  # noqa: E731
        total = cfg.num_lr * conv(1, e, h * w)
        total += 2 * (conv(1, e, hh * ww) + conv(e, e, hh * ww) + conv(e, e, (hh // 2) * (ww // 2)))
        tokens = d * h * w
        win, _ = _effective_window((d, h, w), cfg.window_3d, (0, 0, 0))
        padded = math.prod(-(-size // wi) * wi for size, wi in zip((d, h, w), win))  # attention sees padding
        n = math.prod(win)
        hidden = int(e * cfg.mlp_ratio)
        per_block = 2 * padded * 4 * e * e + 2 * 2 * padded * n * e + 2 * tokens * 2 * e * hidden
        total += sum(cfg.depths) * per_block + (len(cfg.depths) + 1) * d * conv(e, e, h * w)
        px, out = h * w, cfg.n_out
        up = 0
        for _ in self.upsample:
            up += conv(r, 4 * r, px)
            px *= 4
        total += out * (conv(e, r, h * w) + up + conv(r, 1, px))
        return float(total)


def with_time_cond(model: SwinXVR) -> SwinXVR:
    """``model`` itself if it has ``time_cond``; else the same network with it, its time terms at zero (which
    computes exactly what ``model`` computes), in eval mode."""
    if model.cfg.time_cond:
        return model
    timed = SwinXVR(model.cfg.replace(time_cond=True))
    state = model.state_dict()
    state.update({k: torch.zeros_like(v) for k, v in timed.state_dict().items() if k in TIME_PARAMS})
    timed.load_state_dict(state)
    return timed.eval()
