"""SWIN-XVR network, presets, checkpoints (ours and XFusion's) and inference helpers."""

from xvr_batch.model.checkpoint import (
    FORMAT_VERSION,
    build_model,
    file_sha256,
    from_xfusion,
    load_checkpoint,
    load_model,
    save_checkpoint,
    xfusion_config,
)
from xvr_batch.model.config import PRESETS, ModelConfig, preset
from xvr_batch.model.swin_xvr import SwinXVR, drop_path_schedule

__all__ = [
    "FORMAT_VERSION", "PRESETS", "ModelConfig", "SwinXVR", "build_model", "drop_path_schedule", "file_sha256",
    "from_xfusion", "load_checkpoint", "load_model", "preset", "save_checkpoint", "xfusion_config",
]
