"""Does `xvr-batch finetune` help on a setting the base weights never saw? One command, end to end.

    .venv/bin/python examples/finetune_check.py [--dir DIR] [--seed 11] [--steps 400] [--lr 1e-4] [--batch 4]
                                                [--crop 16] [--families cavity,crack]

1. A two-camera experiment (`xvr_batch.synth.two_cameras`: HR 128x160, 121 frames, a key every 10): the LR
   camera is rotated, scaled and shifted against the HR one, so `assemble` writes a registered archive
   and `reconstruct` works in the LR camera's frame. The shipped weights were trained on aligned cameras
   only. With ``--effects``, a one-camera archive with those synth effects (which the shipped weights never
   saw) instead.
2. `assemble` it, `reconstruct` with the base (default) weights and score against the dense truth
   (`DIR/cams/truth.h5`, `evaluate(..., frames="all")`).
3. `finetune` on the archive's own key frames (no dense truth), then `reconstruct --weights` and score again.
4. Print the dense-truth PSNR before/after and validate on the held-out keys before/after.

No dense truth is used in step 3: the truth file is only read by `evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _cli(*args) -> None:
    """``xvr-batch ARGS`` in a child process (as a user runs it; it also keeps reconstruct's inference-mode
    tensors out of this process, which trains)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "xvr_batch", *map(str, args)])
    if proc.returncode:
        raise RuntimeError(f"xvr-batch {' '.join(map(str, args))} exited with {proc.returncode}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="work folder [a new temp folder]")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--families", default=None, help="scene families, comma separated [the seed's]")
    p.add_argument("--effects", default=None,
                   help="detector/scene effects of synth (comma separated) for a one-camera archive instead of "
                        "the two-camera pair, e.g. psf or fpn,psf [two cameras, no effects]")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None, help="[finetune's default]")
    p.add_argument("--batch", type=int, default=None, help="[finetune's default]")
    p.add_argument("--crop", type=int, default=None, help="[finetune's default]")
    p.add_argument("--max-gap", type=int, default=None, help="[finetune's default]")
    p.add_argument("--p-motion", type=float, default=None, help="[finetune's default]")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)

    from xvr_batch import synth
    from xvr_batch.evaluate import evaluate
    from xvr_batch.finetune import FinetuneOptions, run_finetune

    d = Path(a.dir or tempfile.mkdtemp(prefix="xvr-ftcheck-"))
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cams = d / "cams"
    arc = d / "arc.h5"
    truth_path = cams / "truth.h5"
    if a.effects:
        truth_path = arc  # the one-camera archive holds its own dense truth (read by evaluate only)
        if not arc.exists():
            synth.synthesize(arc, n_frames=121, hr_shape=(128, 160), stride=10, offset=3, seed=a.seed,
                             families=a.families, effects=a.effects.split(","))
    elif not arc.exists():
        truth = synth.two_cameras(cams, n_frames=121, hr_shape=(128, 160), stride=10, offset=3, seed=a.seed,
                                  families=a.families)
        f = truth["files"]
        _cli("assemble", "-o", arc, "--lr", cams / f["lr"], "--lr-time", cams / f["lr_time"], "--hr", cams / f["hr"],
             "--hr-time", cams / f["hr_time"], "--hr-delay", truth["hr_delay"], "--lr-dark", cams / f["lr_dark"],
             "--lr-flat", cams / f["lr_flat"], "--hr-dark", cams / f["hr_dark"], "--hr-flat", cams / f["hr_flat"])
    base_out = d / "base.h5"
    if not base_out.exists():
        _cli("reconstruct", arc, "-o", base_out, "-q", "--device", "cpu")
    dense_before = evaluate(base_out, truth_path, frames="all")
    t_data = time.time() - t0

    weights = d / f"ft_s{a.steps}.pt"
    kw = {k: getattr(a, k) for k in ("lr", "batch", "crop", "max_gap", "p_motion") if getattr(a, k) is not None}
    t1 = time.time()
    res = run_finetune(FinetuneOptions(archive=str(arc), out=str(weights), steps=a.steps, device="cpu",
                                       progress=False, **kw), log=lambda m: print(m, file=sys.stderr))
    t_ft = time.time() - t1
    ft_out = d / f"ft_s{a.steps}.h5"
    if ft_out.exists():
        ft_out.unlink()
    _cli("reconstruct", arc, "-o", ft_out, "-q", "--device", "cpu", "--weights", weights)
    dense_after = evaluate(ft_out, truth_path, frames="all")

    def m(r, name="swin_xvr"):
        return float(r["methods"][name]["mean_psnr"])

    before, after = res["before"], res["after"]
    numbers = {
        "seed": a.seed, "families": a.families, "effects": a.effects, "steps": a.steps, "options": kw, "finetune_s": round(t_ft, 1),
        "data_s": round(t_data, 1), "holdout_keys": res["holdout_keys"],
        "dense_psnr_base": m(dense_before), "dense_psnr_finetuned": m(dense_after),
        "dense_gain_db": m(dense_after) - m(dense_before),
        "dense_best_baseline": m(dense_before, "best_baseline"),
        "validate_heldout_base": float(before["swin_xvr"]["psnr"]),
        "validate_heldout_finetuned": float(after["swin_xvr"]["psnr"]),
        "validate_heldout_key_blend": float(before["key_blend"]["psnr"]),
        "validate_gain_db": float(after["swin_xvr"]["psnr"]) - float(before["swin_xvr"]["psnr"]),
    }
    print(f"folder: {d}")
    print(f"fine-tuning: {a.steps} steps in {t_ft:.0f} s on the CPU, options {kw or 'defaults'}; "
          f"held-out keys {res['holdout_keys']}")
    print(f"dense truth, all non-key frames: base {numbers['dense_psnr_base']:.3f} dB -> fine-tuned "
          f"{numbers['dense_psnr_finetuned']:.3f} dB ({numbers['dense_gain_db']:+.3f} dB; best baseline "
          f"{numbers['dense_best_baseline']:.3f} dB)")
    print(f"validate, held-out keys:        base {numbers['validate_heldout_base']:.3f} dB -> fine-tuned "
          f"{numbers['validate_heldout_finetuned']:.3f} dB ({numbers['validate_gain_db']:+.3f} dB; key blend "
          f"{numbers['validate_heldout_key_blend']:.3f} dB)")
    ok = numbers["dense_gain_db"] >= 0.5 and numbers["validate_gain_db"] >= 0
    print(f"bar (dense +0.5 dB, held-out validate not lower): {'met' if ok else 'NOT met'}")
    if a.json:
        Path(a.json).write_text(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
