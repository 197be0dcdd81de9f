"""Model configuration and presets for SWIN-XVR.

A :class:`ModelConfig` is a plain, JSON-serialisable description of the network. It is saved in every
checkpoint and in every output file, so a run can always be reproduced from its record.

Configs read from checkpoints are untrusted: every field is type- and range-checked when a config is made,
and its parameter count and work per LR pixel are computed from the fields alone (no model is built) and
refused above :func:`size_caps`, ten times the largest preset. A hostile config therefore fails with one
:class:`~xvr_batch.errors.UserError` before anything is allocated.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

from xvr_batch.errors import UserError

HEADS = ("all", "centre")
RESIDUALS = ("none", "key_mean")

#: Range limits on single fields (the size caps below bound their combinations).
MAX_NUM_LR = 64
MAX_WIDTH = 4096  # embed_dim and recon_dim
MAX_STAGES = 64
MAX_WINDOW = 64  # window and window_t
MAX_WINDOW_TOKENS = 8192  # window_t x window x window: the (N, N) position index is built for the full window
MAX_MLP_RATIO = 16.0
#: Caps relative to the largest preset.
SIZE_CAP_FACTOR = 10

_INT_FIELDS = ("num_lr", "embed_dim", "window", "recon_dim", "scale", "in_ch")
_REAL_FIELDS = ("mlp_ratio", "drop_path")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return type(v).__name__


@dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of :class:`~xvr_batch.model.swin_xvr.SwinXVR`.

    num_lr:      NL, the number of LR frames per window (1 to 64).
    embed_dim:   E, width of the features and of the transformer.
    depths:      Swin blocks per residual stage (RSTB), each >= 1.
    num_heads:   attention heads per stage (E must be divisible by each).
    window:      spatial window size (ws x ws on the LR grid), 1 to 64.
    window_t:    temporal window; ``None`` means NL + 2, i.e. attention spans every slice.
    mlp_ratio:   hidden width of the MLP, as a multiple of E.
    drop_path:   stochastic depth; rises linearly from 0 to this value over all blocks.
    recon_dim:   width of the pixel-shuffle reconstruction head.
    scale:       spatial factor between the cameras; must be 4.
    head:        "all" (every LR frame of the window) or "centre" (slice NL // 2 only).
    qkv_bias:    bias in the qkv projection.
    in_ch:       image channels; must be 1 (the cameras record one channel).
    residual:    "none" (the paper's network: the head outputs the frame) or "key_mean" (the head outputs a
                 correction added to the mean of the two key frames). "key_mean" is a global skip outside
                 the paper's network, used by the shipped CPU-trained ``lite`` weights: it starts training
                 at the key frames instead of at zero, which matters when training time is short.
    time_cond:   tell the network where each LR frame lies between its two key frames (its time weight
                 ``w`` in [0, 1]). Each LR slice's features get ``(w - 1/2)`` times a learned vector, and with
                 ``residual="key_mean"`` the base moves from the keys' mean towards their time blend by a
                 learned gate: ``mean + gate (w - 1/2) (K1 - K0)``. Both start at zero, so a network
                 fine-tuned from weights without it starts as exactly that network. Outside the paper's
                 network; off by default.
    """

    num_lr: int = 3
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (3, 3, 3, 3)
    window: int = 8
    window_t: int | None = None
    mlp_ratio: float = 2.0
    drop_path: float = 0.2
    recon_dim: int = 64
    scale: int = 4
    head: str = "all"
    qkv_bias: bool = True
    in_ch: int = 1
    residual: str = "none"
    time_cond: bool = False

    def __post_init__(self) -> None:
        problems = self._type_problems()
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        for name in _INT_FIELDS:
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.window_t is not None:
            object.__setattr__(self, "window_t", int(self.window_t))
        for name in _REAL_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def n_slices(self) -> int:
        """D = NL + 2: the LR frames plus the two key frames."""
        return self.num_lr + 2

    @property
    def window_3d(self) -> tuple[int, int, int]:
        return (self.window_t or self.n_slices, self.window, self.window)

    @property
    def n_out(self) -> int:
        """Output frames per call."""
        return self.num_lr if self.head == "all" else 1

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP."""
        return int(self.embed_dim * self.mlp_ratio)

    def parameter_count(self) -> int:
        """Number of parameters of the network this config builds, computed without building it."""
        e, r, c = self.embed_dim, self.recon_dim, self.in_ch
        conv = lambda cin, cout: 9 * cin * cout + cout  # noqa: E731  (3x3 conv with bias)
        linear = lambda cin, cout, bias=True: cin * cout + (cout if bias else 0)  # noqa: E731
        wd, wh, ww = self.window_3d
        table = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
        total = conv(c, e) + conv(c, e) + 2 * conv(e, e)  # LR branch, HR branch
        for depth, heads in zip(self.depths, self.num_heads):
            block = (2 * e + table * heads + linear(e, 3 * e, self.qkv_bias) + linear(e, e) + 2 * e
                     + linear(e, self.mlp_hidden) + linear(self.mlp_hidden, e))
            total += depth * block + conv(e, e)
        total += 2 * e + conv(e, e)  # norm, conv_after_body
        total += conv(e, r) + int(math.log2(self.scale)) * conv(r, 4 * r) + conv(r, c)
        if self.time_cond:
            total += e + 1  # time vector, base gate
        return total

    def flops_per_lr_pixel(self) -> float:
        """Multiply-adds x 2 of one model call per LR pixel, for frames larger than one window.

        The same terms as :meth:`SwinXVR.flops` without window padding, computed from the config alone."""
        e, r, d, c = self.embed_dim, self.recon_dim, self.n_slices, self.in_ch
        conv = lambda cin, cout: 2 * 9 * cin * cout  # noqa: E731  (per output pixel)
        s2 = self.scale * self.scale
        total = self.num_lr * conv(c, e)
        total += 2 * (s2 * conv(c, e) + s2 * conv(e, e) + (s2 / 4) * conv(e, e))
        n = min(self.window_3d[0], d) * self.window * self.window  # tokens per (temporally clamped) window
        per_block = d * (2 * 4 * e * e + 2 * 2 * n * e + 2 * 2 * e * self.mlp_hidden)
        total += sum(self.depths) * per_block + (len(self.depths) + 1) * d * conv(e, e)
        px, up = 1, 0
        for _ in range(int(math.log2(self.scale))):
            up += px * conv(r, 4 * r)
            px *= 4
        total += self.n_out * (conv(e, r) + up + px * conv(r, c))
        return float(total)

    # ------------------------------------------------------------------ validation
    def _type_problems(self) -> list[str]:
        problems = []
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not _is_int(v):
                problems.append(f"{name} must be an integer, got {_type_name(v)} {v!r:.40}")
        if self.window_t is not None and not _is_int(self.window_t):
            problems.append(f"window_t must be an integer or null, got {_type_name(self.window_t)} "
                            f"{self.window_t!r:.40}")
        for name in _REAL_FIELDS:
            v = getattr(self, name)
            if not _is_real(v):
                problems.append(f"{name} must be a number, got {_type_name(v)} {v!r:.40}")
            elif not math.isfinite(v):
                problems.append(f"{name} must be finite, got {v!r}")
        for name in ("depths", "num_heads"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)):
                problems.append(f"{name} must be a list of integers, got {_type_name(v)} {v!r:.40}")
            elif len(v) > MAX_STAGES:
                problems.append(f"{name} has {len(v)} entries, more than {MAX_STAGES}")
            elif not all(_is_int(x) for x in v):
                bad = next(x for x in v if not _is_int(x))
                problems.append(f"{name} must be a list of integers, has {_type_name(bad)} {bad!r:.40}")
        for name in ("head", "residual"):
            v = getattr(self, name)
            if not isinstance(v, str):
                problems.append(f"{name} must be a string, got {_type_name(v)} {v!r:.40}")
        for name in ("qkv_bias", "time_cond"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                problems.append(f"{name} must be true or false, got {_type_name(v)} {v!r:.40}")
        return problems

    def validate(self) -> None:
        """Range checks, then the size caps; one :class:`UserError` listing the problems."""
        problems = []
        if not 1 <= self.num_lr <= MAX_NUM_LR:
            problems.append(f"num_lr must be in 1..{MAX_NUM_LR}, got {self.num_lr}")
        for name in ("embed_dim", "recon_dim"):
            if not 1 <= getattr(self, name) <= MAX_WIDTH:
                problems.append(f"{name} must be in 1..{MAX_WIDTH}, got {getattr(self, name)}")
        if len(self.depths) == 0 or len(self.depths) != len(self.num_heads):
            problems.append(f"depths {list(self.depths)} and num_heads {list(self.num_heads)} must have the same, "
                            "non-zero length")
        for dep in self.depths:
            if dep < 1:
                problems.append(f"depths must be >= 1, got {dep}")
                break
        for h in self.num_heads:
            if h < 1 or h > self.embed_dim or self.embed_dim % h:
                problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {h}")
                break
        if not 1 <= self.window <= MAX_WINDOW:
            problems.append(f"window must be in 1..{MAX_WINDOW}, got {self.window}")
        if self.window_t is not None and not 1 <= self.window_t <= MAX_WINDOW:
            problems.append(f"window_t must be in 1..{MAX_WINDOW} or null, got {self.window_t}")
        if not problems and math.prod(self.window_3d) > MAX_WINDOW_TOKENS:
            problems.append(f"a window of {self.window_3d} holds {math.prod(self.window_3d)} tokens, more than "
                            f"{MAX_WINDOW_TOKENS}")
        if not 0.0 < self.mlp_ratio <= MAX_MLP_RATIO or self.mlp_hidden < 1:
            problems.append(f"mlp_ratio must be in (0, {MAX_MLP_RATIO:g}] with embed_dim * mlp_ratio >= 1, "
                            f"got {self.mlp_ratio}")
        if self.scale != 4:
            # The HR branch has two stride-2 max-pools, so it maps HR to the LR grid only for x4.
            problems.append(f"scale must be 4 (the HR branch pools by 4), got {self.scale}")
        if self.in_ch != 1:
            problems.append(f"in_ch must be 1 (the cameras record one channel), got {self.in_ch}")
        if self.head not in HEADS:
            problems.append(f"head must be one of {HEADS}, got {self.head!r:.40}")
        if self.residual not in RESIDUALS:
            problems.append(f"residual must be one of {RESIDUALS}, got {self.residual!r:.40}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not problems:
            problems = self._size_problems()
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    def _size_problems(self) -> list[str]:
        caps = size_caps()
        if caps is None:  # the presets themselves are being defined
            return []
        max_params, max_flops = caps
        params, flops = self.parameter_count(), self.flops_per_lr_pixel()
        problems = []
        if params > max_params:
            problems.append(f"{params / 1e6:.4g} M parameters is above the cap of {max_params / 1e6:.4g} M "
                            f"({SIZE_CAP_FACTOR}x the largest preset)")
        if flops > max_flops:
            problems.append(f"{flops / 1e9:.4g} GFLOP per LR pixel is above the cap of {max_flops / 1e9:.4g} "
                            f"({SIZE_CAP_FACTOR}x the largest preset)")
        return problems

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depths"] = list(self.depths)
        d["num_heads"] = list(self.num_heads)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config from a plain dict (a checkpoint's or a record's); unknown keys, wrong types, out-of-range
        values and oversized networks are refused with one :class:`UserError`."""
        if not isinstance(d, dict):
            raise UserError(f"invalid model config: expected a dict of fields, got {_type_name(d)}")
        known = {f.name for f in fields(cls)}
        if not all(isinstance(k, str) for k in d):
            raise UserError(f"invalid model config: field names must be strings, got {list(d)!r:.80}")
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown!r:.120}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)


def size_caps() -> tuple[int, float] | None:
    """(max parameters, max FLOP per LR pixel): :data:`SIZE_CAP_FACTOR` times the largest preset.

    None while the presets are being defined (at import), when there is nothing to compare with yet."""
    presets = globals().get("PRESETS")
    if presets is None:
        return None
    return (SIZE_CAP_FACTOR * max(p.parameter_count() for p in presets.values()),
            SIZE_CAP_FACTOR * max(p.flops_per_lr_pixel() for p in presets.values()))


PRESETS: dict[str, ModelConfig] = {
    # The paper's model: E=192, 24 blocks in [2, 2, 18, 2], 3 heads, window 8, MLP 2, 10.0 M parameters.
    "paper": ModelConfig(),
    # Small model for CPUs and the shipped default weights: fast enough for the demo on 2 cores.
    "lite": ModelConfig(embed_dim=48, depths=(2, 2, 2), num_heads=(3, 3, 3), recon_dim=32, drop_path=0.1,
                        residual="key_mean"),
    # Between lite and paper (E=96, 10 blocks in [2, 2, 4, 2], 1.6 M parameters): issue 13's candidate for a
    # larger shipped weight set, chosen for quality per unit of cost.
    "mid": ModelConfig(embed_dim=96, depths=(2, 2, 4, 2), num_heads=(3, 3, 3, 3), recon_dim=48, drop_path=0.1,
                       residual="key_mean"),
    # Tiny model for tests.
    "tiny": ModelConfig(embed_dim=24, depths=(2,), num_heads=(3,), recon_dim=16, drop_path=0.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return a preset, optionally with some fields changed."""
    try:
        cfg = PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return cfg.replace(**overrides) if overrides else cfg
