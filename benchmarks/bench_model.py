"""Model throughput: frames/s, peak memory and achieved TFLOP/s for one preset and frame size.

    python benchmarks/bench_model.py --preset lite --lr-size 32 40 --batch 4            # CPU, demo size
    python benchmarks/bench_model.py --preset paper --lr-size 100 256 --batch 8 \\
        --device cuda --dtype bf16 --compile                                          # GPU, paper size

Frames are output frames (NL per call for the "all" head). FLOPs come from SwinXVR.flops (2 x MACs of
convs, linears and attention, padding included). Key frames are encoded once per call here (no reuse),
which is the worst case for the model path.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from xvr_batch.model import SwinXVR, preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--head", default="all", choices=["all", "centre"])
    ap.add_argument("--lr-size", nargs=2, type=int, default=(32, 40), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "tf32"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reuse-keys", action="store_true", help="encode the key frames once, as the pipeline does")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    cfg = preset(a.preset, head=a.head, drop_path=0.0)
    dev = torch.device(a.device)
    model = SwinXVR(cfg).to(dev).eval()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = a.dtype == "tf32"
        torch.backends.cudnn.benchmark = True
    h, w = a.lr_size
    lr = torch.rand(a.batch, cfg.num_lr, 1, h, w, device=dev)
    hr = torch.rand(a.batch, 2, 1, 4 * h, 4 * w, device=dev)
    fwd = torch.compile(model) if a.compile else model
    # the pipeline's path: key features computed once, then only forward_features per batch
    features = torch.compile(model.forward_features) if a.compile else model.forward_features
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if a.dtype == "bf16" else torch.no_grad

    def step():
        with torch.inference_mode(), ctx():
            if a.reuse_keys:
                keys = model.encode_keys(hr[:1]).expand(a.batch, -1, -1, -1, -1)
                base = model.key_base(hr[:1]).expand(a.batch, -1, -1, -1, -1) if cfg.residual != "none" else None
                return features(lr, keys, base)
            return fwd(lr, hr)

    for _ in range(a.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.iters
    frames = a.batch * cfg.n_out
    flops = model.flops(h, w) * a.batch
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    res = {
        "preset": a.preset, "head": a.head, "lr_size": [h, w], "hr_size": [4 * h, 4 * w], "batch": a.batch,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": a.dtype, "compile": a.compile, "reuse_keys": a.reuse_keys, "s_per_call": dt,
        "frames_per_s": frames / dt, "tflops_achieved": flops / dt / 1e12,
        "tflop_per_frame": model.flops(h, w) / cfg.n_out / 1e12,
        "peak_memory_gib": peak / 2**30, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "torch": torch.__version__,
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>18}: {v:.4g}" if isinstance(v, float) else f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
