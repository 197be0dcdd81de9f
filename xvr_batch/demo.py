"""``xvr-batch demo``: synthesise a small archive, reconstruct it with the default weights, score it, and
write a preview picture (when matplotlib is installed)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

__all__ = ["run_demo", "DEMO_HR_SHAPE", "DEMO_STRIDE"]

DEMO_HR_SHAPE = (128, 160)
DEMO_STRIDE = 20


def run_demo(directory: Path, frames: int = 60, seed: int = 1234, progress: bool = True,
             echo: Callable[[str], None] = print) -> dict:
    from xvr_batch import synth
    from xvr_batch.evaluate import evaluate, format_table
    from xvr_batch.driver import reconstruct
    from xvr_batch.pipeline import Options

    directory = Path(directory)
    archive = directory / "demo_archive.h5"
    output = directory / "demo_recon.h5"
    t0 = time.perf_counter()
    synth.synthesize(str(archive), n_frames=frames, hr_shape=DEMO_HR_SHAPE, stride=DEMO_STRIDE, seed=seed)
    echo(f"synthetic archive: {archive} ({frames} frames, HR {DEMO_HR_SHAPE[0]}x{DEMO_HR_SHAPE[1]}, "
         f"key frame every {DEMO_STRIDE})")
    t1 = time.perf_counter()
    opts = Options(archive=str(archive), output=str(output), overwrite=True, force_replan=True)
    reconstruct(opts, progress=progress, log=echo)
    t2 = time.perf_counter()
    result = evaluate(str(output), str(archive), frames="between")
    echo(format_table(result))
    echo(f"output: {output}")
    from xvr_batch.errors import UserError
    from xvr_batch.preview import write_preview
    try:
        picture = write_preview(str(output), directory / "demo_preview.png", archive=str(archive))
        echo(f"preview: {picture['output']} (LR upsampled | reconstruction | key-frame blend | truth)")
    except UserError as exc:  # matplotlib is an optional extra
        echo(f"preview: skipped ({exc})")
    echo(f"time: synth {t1 - t0:.1f} s, reconstruct {t2 - t1:.1f} s, evaluate {time.perf_counter() - t2:.1f} s")
    return result
