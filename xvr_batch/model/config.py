"""Model configuration and presets for SWIN-XVR.

A :class:`ModelConfig` is a plain, JSON-serialisable description of the network. It is saved in every
checkpoint and in every output file, so a run can always be reproduced from its record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from xvr_batch.errors import UserError

HEADS = ("all", "centre")
RESIDUALS = ("none", "key_mean")


@dataclass(frozen=True)
class ModelConfig:
    """Constructor arguments of :class:`~xvr_batch.model.swin_xvr.SwinXVR`.

    num_lr:      NL, the number of LR frames per window (>= 1).
    embed_dim:   E, width of the features and of the transformer.
    depths:      Swin blocks per residual stage (RSTB).
    num_heads:   attention heads per stage (E must be divisible by each).
    window:      spatial window size (ws x ws on the LR grid).
    window_t:    temporal window; ``None`` means NL + 2, i.e. attention spans every slice.
    mlp_ratio:   hidden width of the MLP, as a multiple of E.
    drop_path:   stochastic depth; rises linearly from 0 to this value over all blocks.
    recon_dim:   width of the pixel-shuffle reconstruction head.
    scale:       spatial factor between the cameras (a power of two).
    head:        "all" (every LR frame of the window) or "centre" (slice NL // 2 only).
    qkv_bias:    bias in the qkv projection.
    residual:    "none" (the paper's network: the head outputs the frame) or "key_mean" (the head outputs a
                 correction added to the mean of the two key frames). "key_mean" is a global skip outside
                 the paper's network, used by the shipped CPU-trained ``lite`` weights: it starts training
                 at the key frames instead of at zero, which matters when training time is short.
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

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
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

    def validate(self) -> None:
        problems = []
        if self.num_lr < 1:
            problems.append(f"num_lr must be >= 1, got {self.num_lr}")
        if len(self.depths) == 0 or len(self.depths) != len(self.num_heads):
            problems.append(f"depths {self.depths} and num_heads {self.num_heads} must have the same, non-zero length")
        for h in self.num_heads:
            if h < 1 or self.embed_dim % h:
                problems.append(f"embed_dim {self.embed_dim} is not divisible by num_heads {h}")
        if self.window < 1:
            problems.append(f"window must be >= 1, got {self.window}")
        if self.scale < 1 or self.scale & (self.scale - 1):
            problems.append(f"scale must be a power of two, got {self.scale}")
        if self.scale != 4:
            # The HR branch has two stride-2 max-pools, so it maps HR to the LR grid only for x4.
            problems.append(f"scale must be 4 (the HR branch pools by 4), got {self.scale}")
        if self.head not in HEADS:
            problems.append(f"head must be one of {HEADS}, got {self.head!r}")
        if self.residual not in RESIDUALS:
            problems.append(f"residual must be one of {RESIDUALS}, got {self.residual!r}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path}")
        if problems:
            raise UserError("invalid model config: " + "; ".join(problems))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depths"] = list(self.depths)
        d["num_heads"] = list(self.num_heads)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)


PRESETS: dict[str, ModelConfig] = {
    # The paper's model: E=192, 24 blocks in [2, 2, 18, 2], 3 heads, window 8, MLP 2, 10.0 M parameters.
    "paper": ModelConfig(),
    # Small model for CPUs and the shipped default weights: fast enough for the demo on 2 cores.
    "lite": ModelConfig(embed_dim=48, depths=(2, 2, 2), num_heads=(3, 3, 3), recon_dim=32, drop_path=0.1,
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

