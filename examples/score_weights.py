"""Score weights on held-out synthetic archives against the classical baselines.

    python examples/score_weights.py --split WORK/split.json --weights xvr_batch/model/weights/lite.pt
    python examples/score_weights.py --archives a.h5 b.h5 --weights W.pt     # any archives with data_gt

For each test archive: `reconstruct` with the weights, then `evaluate` (frames strictly between key frames).
Prints one row per archive (families, method PSNR, best baseline PSNR, margin) and the mean margin, and
writes the same as JSON with --json. examples/train_default.sh writes split.json (train/val/test seeds and
the held-out scene family).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from xvr_batch.evaluate import as_float, evaluate
from xvr_batch.driver import reconstruct
from xvr_batch.pipeline import Options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", help="split.json from examples/train_default.sh (its 'test' archives are scored)")
    ap.add_argument("--archives", nargs="*", default=[])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    items = []
    if a.split:
        items += [dict(t, role="test") for t in json.load(open(a.split))["test"]]
    items += [{"path": p, "families": "?", "role": "given"} for p in a.archives]
    held_out = json.load(open(a.split)).get("held_out_family") if a.split else None
    rows = []
    out_dir = Path(tempfile.mkdtemp(prefix="xvr-score-"))
    for it in items:
        out = out_dir / (Path(it["path"]).stem + "_recon.h5")
        reconstruct(Options(archive=it["path"], output=str(out), weights=a.weights, batch=a.batch, overwrite=True,
                            force_replan=True), progress=False)
        res = evaluate(str(out), it["path"], frames="between")
        m = res["methods"]
        row = {"archive": Path(it["path"]).name, "families": it.get("families"),
               "held_out_family": bool(held_out and held_out in (it.get("families") or [])),
               "swin_xvr": as_float(m["swin_xvr"]["mean_psnr"]), "lr_bicubic": as_float(m["lr_bicubic"]["mean_psnr"]),
               "key_blend": as_float(m["key_blend"]["mean_psnr"]),
               "best_baseline": as_float(m["best_baseline"]["mean_psnr"]), "margin_db": as_float(res["margin_db"]),
               "swin_xvr_ssim": as_float(m["swin_xvr"]["mean_ssim"]),
               "best_baseline_ssim": as_float(m["best_baseline"]["mean_ssim"])}
        rows.append(row)
        print(f"{row['archive']:<18} {'+'.join(row['families']) if isinstance(row['families'], list) else row['families']:<28}"
              f" swin_xvr {row['swin_xvr']:6.2f}  best baseline {row['best_baseline']:6.2f}  margin {row['margin_db']:+6.2f} dB",
              flush=True)
    mean = sum(r["margin_db"] for r in rows) / len(rows)
    summary = {"rows": rows, "mean_margin_db": mean, "min_margin_db": min(r["margin_db"] for r in rows)}
    known = [r for r in rows if r["families"] != "?"]  # --archives: families unknown, no split by family
    for name, sel in (("held-out family", [r for r in known if r["held_out_family"]]),
                      ("seen families", [r for r in known if not r["held_out_family"]])):
        if sel:
            key = "mean_margin_db_" + name.replace(" ", "_").replace("-", "_")
            summary[key] = sum(r["margin_db"] for r in sel) / len(sel)
            print(f"mean margin, {name}: {summary[key]:+.2f} dB over {len(sel)} archives")
    print(f"mean margin over all {len(rows)} archives: {mean:+.2f} dB (min {summary['min_margin_db']:+.2f})")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
