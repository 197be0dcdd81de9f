"""What the refine-step benchmarks (bench_beam.py, bench_motion.py) share: the command line that sizes one batch, and
a seeded source of random tensors on the chosen device. Imported by the scripts as ``python benchmarks/X.py`` runs
them (their folder is on ``sys.path``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Batch:
    args: argparse.Namespace  # frames, lr (h, w), scale, device, repeat
    device: torch.device
    rand: Callable[..., torch.Tensor]  # rand(*shape): uniform [0, 1) on the device, one seeded stream
    sync: Callable[[], None]  # waits for the device (CUDA), else nothing


def parse_batch(doc: str, repeat: int) -> Batch:
    """Parse ``--frames --lr --scale --device --repeat`` (12 frames at LR 100x256, x4, CPU by default) for the
    benchmark whose module docstring is ``doc``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--lr", type=int, nargs=2, default=(100, 256))
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=repeat)
    a = ap.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    return Batch(a, dev, lambda *shape: torch.rand(*shape, generator=g).to(dev),
                 torch.cuda.synchronize if dev.type == "cuda" else (lambda: None))
