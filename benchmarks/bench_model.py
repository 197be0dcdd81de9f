"""Model throughput: frames/s, peak memory and achieved TFLOP/s for one preset and frame size, one row per
variant of the model path:

    eager          the eager model, SDPA window attention (the default)
    compile        SwinXVR.compiled_features (masks prepared outside, one graph, deterministic Inductor)
    flex           eager model, FlexAttention window attention (its kernel compiled on its own)
    compile+flex   compiled_features with FlexAttention inside the one graph

    python benchmarks/bench_model.py --preset lite --lr-size 32 40 --batch 4 --reuse-keys    # CPU, demo size

    # GPU, paper preset at the paper's size (LR 100x256 -> HR 400x1024), bf16 autocast, batch 8, all four rows:
    python benchmarks/bench_model.py --preset paper --lr-size 100 256 --batch 8 \\
        --device cuda --dtype bf16 --reuse-keys --rows eager,compile,flex,compile+flex --json

Frames are output frames (NL per call for the "all" head). FLOPs come from SwinXVR.flops (2 x MACs of
convs, linears and attention, padding included; with --reuse-keys the key-frame encoder is not run, so
TFLOP/s is a little overstated). Without --reuse-keys the key frames are encoded in every call (the worst
case); with it they are encoded once and only forward_features runs per call, as in the pipeline. The
compiled rows time the compiled path itself (the compiled function is what runs in the timed calls;
compile time is in first_call_s, the first warm-up call). Every row runs in one process
from the same weights; each row reports the attention kernel that ran (attention_backend_report) and the
facts of kernel_identity. cudnn.benchmark stays off unless --cudnn-benchmark (the pipeline leaves it off:
autotuned convolutions can differ between processes).

--compile is kept for old command lines: it is --rows compile.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from contextlib import nullcontext

import torch

from xvr_batch.model import SwinXVR, preset
from xvr_batch.model.attention import attention_backend_report, compile_fn, kernel_identity

ROWS = ("eager", "compile", "flex", "compile+flex")


def _parse_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or not rows:
        raise argparse.ArgumentTypeError(f"rows must be a comma list of {', '.join(ROWS)}; got {text!r}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--head", default="all", choices=["all", "centre"])
    ap.add_argument("--lr-size", nargs=2, type=int, default=(32, 40), metavar=("H", "W"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "tf32"],
                    help="bf16: autocast (CUDA or CPU); tf32: CUDA only")
    ap.add_argument("--rows", type=_parse_rows, default=None,
                    help=f"comma list of {', '.join(ROWS)} (default: eager)")
    ap.add_argument("--compile", action="store_true", help="old spelling of --rows compile")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reuse-keys", action="store_true", help="encode the key frames once, as the pipeline does")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune convolutions (off in the pipeline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    a = ap.parse_args()
    rows = a.rows or (["compile"] if a.compile else ["eager"])

    cfg = preset(a.preset, head=a.head, drop_path=0.0)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = a.dtype == "tf32"
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    elif a.dtype == "tf32":
        ap.error("--dtype tf32 needs a CUDA device")
    h, w = a.lr_size
    g = torch.Generator().manual_seed(a.seed)
    lr = torch.rand(a.batch, cfg.num_lr, 1, h, w, generator=g).to(dev)
    hr = torch.rand(a.batch, 2, 1, 4 * h, 4 * w, generator=g).to(dev)
    torch.manual_seed(a.seed)
    state = SwinXVR(cfg).state_dict()
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if a.dtype == "bf16" else nullcontext
    reference = None

    for row in rows:
        model = SwinXVR(cfg)
        model.load_state_dict(state)
        model = model.to(dev).eval().set_attention("flex" if "flex" in row else "sdpa")
        compiled = row.startswith("compile")
        features = model.compiled_features() if compiled else model.forward_features
        encode = compile_fn(model.encode_keys) if compiled and not a.reuse_keys else model.encode_keys
        with torch.inference_mode(), ctx():
            # the pipeline's path: key features computed once (and cached), then only forward_features
            keys = model.encode_keys(hr[:1]).expand(a.batch, -1, -1, -1, -1).contiguous()
            base_once = model.key_base(hr[:1]).expand(a.batch, -1, -1, -1, -1) if cfg.residual != "none" else None

        def step():
            with torch.inference_mode(), ctx():
                if a.reuse_keys:
                    return features(lr, keys, base_once)
                base = model.key_base(hr) if cfg.residual != "none" else None
                return features(lr, encode(hr), base)

        t0 = time.perf_counter()
        out = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        for _ in range(a.warmup - 1):
            out = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / a.iters
        out = out.float()
        if reference is None:
            reference, diff = out, 0.0
        else:
            diff = (out - reference).abs().max().item()
        with torch.no_grad(), ctx():
            backend = attention_backend_report(model, lr)
        frames = a.batch * cfg.n_out
        flops = model.flops(h, w) * a.batch
        peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        res = {
            "row": row, "preset": a.preset, "head": a.head, "lr_size": [h, w], "hr_size": [4 * h, 4 * w],
            "batch": a.batch,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": a.dtype, "reuse_keys": a.reuse_keys, "s_per_call": dt, "frames_per_s": frames / dt,
            "tflops_achieved": flops / dt / 1e12, "tflop_per_frame": model.flops(h, w) / cfg.n_out / 1e12,
            "first_call_s": first_s, "max_abs_diff_vs_first_row": diff,
            "peak_memory_gib": peak / 2**30, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "kernel": backend["kernel"], "kernel_identity": kernel_identity(model, dev), "torch": torch.__version__,
        }
        if dev.type != "cuda":
            res["peak_memory_note"] = "ru_maxrss of the process so far (all rows up to this one)"
        if a.json:
            print(json.dumps(res), flush=True)
        else:
            for k, v in res.items():
                print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
            print(flush=True)
        del model, features, encode
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
