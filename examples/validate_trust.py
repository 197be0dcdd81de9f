"""How far to trust `xvr-batch validate`: its key-frame scores beside the dense-truth scores.

    .venv/bin/python examples/validate_trust.py [--dir DIR] [--frames 81] [--weights W]

On a few small synthetic archives (`xvr_batch.synth.synthesize`: HR 128x160, a key every 10 frames,
different seeds, scene families and speeds) this computes:

- validate: every interior key reconstructed from its two neighbours (no dense truth);
- dense: `reconstruct`, then `evaluate` against `/exchange/data_gt` on the frames between key frames.

It prints both per archive, with the margin of swin_xvr over the best baseline, and the correlation of
the two margins across the archives.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: (seed, families, speed in LR px per frame); None = the generator's own choice.
CASES = [
    (101, "static", None),
    (102, "particles", 0.5),
    (103, "cavity", 1.5),
    (104, "rotor", 1.0),
    (105, "crack", 2.0),
    (106, "particles,crack", 3.0),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--weights", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from xvr_batch import synth
    from xvr_batch.cli import main as cli
    from xvr_batch.evaluate import evaluate
    from xvr_batch.validate import validate_archive

    d = Path(a.dir or tempfile.mkdtemp(prefix="xvr-trust-"))
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.time()
    for seed, fam, speed in CASES:
        arc, out = d / f"s{seed}.h5", d / f"s{seed}_hr.h5"
        if not arc.exists():
            synth.synthesize(arc, n_frames=a.frames, hr_shape=(128, 160), stride=10, offset=0, seed=seed,
                             families=fam, speed=speed)
        if not out.exists():
            try:
                cli(["reconstruct", str(arc), "-o", str(out), "-q", "--device", "cpu"]
                    + (["--weights", a.weights] if a.weights else []))
            except SystemExit as exc:
                if exc.code:
                    raise
        v = validate_archive(arc, weights=a.weights)
        e = evaluate(out, arc, frames="between")["methods"]
        rows.append({
            "seed": seed, "families": fam, "speed": speed,
            "val_swin": v["swin_xvr"]["psnr"], "val_blend": v["key_blend"]["psnr"], "val_bicubic": v["lr_bicubic"]["psnr"],
            "val_margin": v["margin_db"],
            "dense_swin": e["swin_xvr"]["mean_psnr"], "dense_blend": e["key_blend"]["mean_psnr"],
            "dense_bicubic": e["lr_bicubic"]["mean_psnr"], "dense_margin": e["swin_xvr"]["margin_db"],
        })
        print(f"  s{seed} done ({time.time() - t0:.0f} s)", file=sys.stderr)

    hdr = (f"{'archive':<8} {'families':<16} {'speed':>5} | {'validate: swin':>14} {'blend':>6} {'bicub':>6} "
           f"{'margin':>7} | {'dense: swin':>11} {'blend':>6} {'bicub':>6} {'margin':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        sp = "auto" if r["speed"] is None else f"{r['speed']:.1f}"
        print(f"s{r['seed']:<7} {r['families']:<16} {sp:>5} | {r['val_swin']:>14.2f} {r['val_blend']:>6.2f} "
              f"{r['val_bicubic']:>6.2f} {r['val_margin']:>+7.2f} | {r['dense_swin']:>11.2f} {r['dense_blend']:>6.2f} "
              f"{r['dense_bicubic']:>6.2f} {r['dense_margin']:>+7.2f}")
    vm = np.array([r["val_margin"] for r in rows], dtype=float)
    dm = np.array([r["dense_margin"] for r in rows], dtype=float)
    corr = float(np.corrcoef(vm, dm)[0, 1]) if len(rows) > 2 and vm.std() > 0 and dm.std() > 0 else float("nan")
    rank = float(np.corrcoef(np.argsort(np.argsort(vm)), np.argsort(np.argsort(dm)))[0, 1])
    print(f"margins (swin_xvr - best baseline): Pearson r = {corr:.2f}, Spearman rho = {rank:.2f} over "
          f"{len(rows)} archives; validate margin - dense margin: mean {float(np.mean(vm - dm)):+.2f} dB, "
          f"range {float(np.min(vm - dm)):+.2f} .. {float(np.max(vm - dm)):+.2f} dB")
    print(f"({time.time() - t0:.0f} s; folder {d})")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "pearson": corr, "spearman": rank}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
