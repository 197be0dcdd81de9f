"""Which weights a run uses: a checkpoint file, or the default weights shipped in the package."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from xvr_batch.errors import UserError
from xvr_batch.model import ModelConfig, SwinXVR, file_sha256, load_checkpoint, preset

WEIGHTS_DIR = Path(__file__).resolve().parent / "model" / "weights"
DEFAULT_NAME = "lite"

__all__ = ["ResolvedWeights", "resolve_weights", "default_weights_path", "named_weights"]


@dataclass
class ResolvedWeights:
    source: str  # a path, or "builtin:<name>", or "random:lite" (no trained weights shipped)
    sha256: str
    config: ModelConfig
    trained: bool

    def load(self) -> SwinXVR:
        """A model in eval mode that no one else holds. In the process that resolved the weights, the
        model :func:`resolve_weights` already loaded (to validate it) is handed out once, so the file is
        read once per process; other processes, and later calls, load it afresh."""
        model = _VALIDATED.pop((self.source, self.sha256), None)
        if model is not None:
            return model
        if self.source.startswith("random:"):
            return _random_model(self.config)
        path = self.source.split(":", 1)[1] if self.source.startswith("builtin:") else self.source
        if self.source.startswith("builtin:"):
            path = str(named_weights(path))
        model, _ = load_checkpoint(path)
        return model

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "config": self.config.to_dict(), "trained": self.trained}

    @classmethod
    def from_dict(cls, d: dict) -> "ResolvedWeights":
        """The inverse of :meth:`to_dict`; a record with missing or mistyped fields is one UserError."""
        where = "work directory manifest: weights record"
        if not isinstance(d, dict):
            raise UserError(f"{where} is not a mapping; the manifest was edited or is corrupt; "
                            "rerun with --force-replan")
        for key, kind in (("source", str), ("sha256", str), ("config", dict), ("trained", bool)):
            if not isinstance(d.get(key), kind):
                got = "missing" if key not in d else f"{type(d[key]).__name__} {d[key]!r:.40}"
                raise UserError(f"{where} field {key!r} is {got}, expected {kind.__name__}; the manifest was "
                                "edited or is corrupt; rerun with --force-replan")
        try:
            cfg = ModelConfig.from_dict(d["config"])
        except UserError as exc:
            raise UserError(f"{where}: {exc}; the manifest was edited or is corrupt; rerun with --force-replan") \
                from None
        return cls(d["source"], d["sha256"], cfg, d["trained"])


#: Models loaded by :func:`resolve_weights` in this process, waiting for their one :meth:`ResolvedWeights.load`.
_VALIDATED: dict[tuple[str, str], SwinXVR] = {}


def _resolved(source: str, path: Path, model: SwinXVR) -> ResolvedWeights:
    rw = ResolvedWeights(source, file_sha256(path), model.cfg, True)
    _VALIDATED.clear()  # keep at most one model waiting
    _VALIDATED[(rw.source, rw.sha256)] = model.eval()
    return rw


def named_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.pt"


def default_weights_path() -> Path:
    return named_weights(DEFAULT_NAME)


def _random_model(cfg: ModelConfig) -> SwinXVR:
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        return SwinXVR(cfg).eval()
    finally:
        torch.random.set_rng_state(state)


def _state_sha(model: SwinXVR) -> str:
    buf = io.BytesIO()
    for k, v in sorted(model.state_dict().items()):
        buf.write(k.encode())
        buf.write(v.detach().cpu().contiguous().numpy().tobytes())
    return hashlib.sha256(buf.getvalue()).hexdigest()


def resolve_weights(weights: str | None, head: str | None = None) -> ResolvedWeights:
    """``weights``: a checkpoint path, a shipped name (``lite``, ``paper``), or None for the default."""
    if weights is None or weights in ("default", DEFAULT_NAME) or (weights and named_weights(weights).exists()
                                                                   and not Path(weights).exists()):
        name = DEFAULT_NAME if weights in (None, "default") else weights
        path = named_weights(name)
        if path.exists():
            model, _ = load_checkpoint(path)
            return _resolved(f"builtin:{name}", path, model)
        cfg = preset("lite")
        warnings.warn("no trained default weights are installed: using a RANDOMLY INITIALISED 'lite' model; "
                      "the output is not a meaningful reconstruction", stacklevel=2)
        return ResolvedWeights("random:lite", _state_sha(_random_model(cfg)), cfg, False)
    path = Path(weights).expanduser()
    model, _ = load_checkpoint(path)  # validates fully; UserError on any problem
    if head is not None and model.cfg.head != head:
        raise UserError(f"{path}: weights are for head {model.cfg.head!r}, not {head!r}")
    return _resolved(str(path.resolve()), path, model)
