"""Score weights on held-out synthetic archives against the classical baselines.

    python examples/score_weights.py --split WORK/split.json --weights xvr_batch/model/weights/lite.pt
    python examples/score_weights.py --archives a.h5 b.h5 --weights W.pt     # any archives with data_gt

For each test archive: `reconstruct` with the weights, then `evaluate` (frames strictly between key frames).
Prints one row per archive (families, effects, method PSNR, best baseline PSNR, margin), then the mean margin
per scene family, per detector/scene effect, per speed bin and per split category, and the overall mean; writes
the same as JSON with --json. The margin is swin_xvr minus the best baseline (per frame the better of the
key-frame blend and the cubic-upsampled LR), in dB.

The families, effects and speeds of an archive come from its /synth metadata (xvr_batch.synth writes it), so
--archives gets the tables too. split.json comes from examples/train_default.sh (held-out family) or
examples/make_split.py (held-out family and effect, categories). An archive counts in the group of each of
its moving families and of each of its effects ("none" when it has none). Speed bins use the fastest moving
family: slow < 0.5 <= medium < 2 <= fast LR px/frame.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import h5py

from xvr_batch.driver import reconstruct
from xvr_batch.evaluate import as_float, evaluate
from xvr_batch.pipeline import Options
from xvr_batch.refine import REFINE_KINDS

SPEED_BINS = ((0.5, "slow <0.5"), (2.0, "medium 0.5-2"), (float("inf"), "fast >=2"))


def speed_bin(v: float | None) -> str:
    if v is None:
        return "static"
    return next(name for hi, name in SPEED_BINS if v < hi)


def archive_meta(path: str) -> dict:
    """families (moving), effects and speeds from the archive's /synth metadata ({} if absent)."""
    try:
        with h5py.File(path, "r") as f:
            if "synth" not in f or "params_json" not in f["synth"].attrs:
                return {}
            p = json.loads(f["synth"].attrs["params_json"])
    except OSError:
        return {}
    return {"families": [x for x in p.get("families", []) if x != "static"], "effects": list(p.get("effects", [])),
            "speeds": dict(p.get("speeds", {})), "lr_dose": p.get("lr_dose"), "hr_dose": p.get("hr_dose")}


def _mean(rows: list[dict]) -> float:
    return sum(r["margin_db"] for r in rows) / len(rows)


def group_means(rows: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{"family"|"effect"|"speed"|"category": {name: {"mean_margin_db", "n"}}}."""
    groups: dict[str, dict[str, list[dict]]] = {"family": {}, "effect": {}, "speed": {}, "category": {}}
    for r in rows:
        for fam in r["families"] if isinstance(r["families"], list) else []:
            groups["family"].setdefault(fam, []).append(r)
        if r["effects"] is not None:
            for fx in r["effects"] or ["none"]:
                groups["effect"].setdefault(fx, []).append(r)
        groups["speed"].setdefault(r["speed_bin"], []).append(r)
        if r.get("category"):
            groups["category"].setdefault(r["category"], []).append(r)
    return {g: {k: {"mean_margin_db": _mean(v), "n": len(v)} for k, v in sorted(d.items())}
            for g, d in groups.items() if d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", help="split.json (train_default.sh or make_split.py): its 'test' archives are scored")
    ap.add_argument("--archives", nargs="*", default=[])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--refine", choices=REFINE_KINDS, default=None,
                    help="reconstruct's --refine (default: reconstruct's default)")
    ap.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    items = []
    split = json.load(open(a.split)) if a.split else {}
    items += [dict(t, role="test") for t in split.get("test", [])]
    items += [{"path": p, "families": "?", "role": "given"} for p in a.archives]
    held_out = split.get("held_out_family")
    held_out_fx = split.get("held_out_effect")
    rows = []
    out_dir = Path(tempfile.mkdtemp(prefix="xvr-score-"))
    for it in items:
        meta = archive_meta(it["path"])
        families = it.get("families") if it.get("families") not in (None, "?") else meta.get("families", "?")
        effects = it["effects"] if "effects" in it else meta.get("effects")
        speeds = meta.get("speeds") or {}
        vmax = max(speeds.values()) if speeds else None
        out = out_dir / (Path(it["path"]).stem + "_recon.h5")
        reconstruct(Options(archive=it["path"], output=str(out), weights=a.weights, batch=a.batch, overwrite=True,
                            force_replan=True, **({"refine": a.refine} if a.refine else {})), progress=False)
        res = evaluate(str(out), it["path"], frames="between")
        out.unlink(missing_ok=True)
        m = res["methods"]
        row = {"archive": Path(it["path"]).name, "families": families, "effects": effects,
               "category": it.get("category"), "speeds": speeds, "max_speed": vmax, "speed_bin": speed_bin(vmax),
               "held_out_family": bool(held_out and held_out in (families if isinstance(families, list) else [])),
               "held_out_effect": bool(held_out_fx and held_out_fx in (effects or [])),
               "swin_xvr": as_float(m["swin_xvr"]["mean_psnr"]), "lr_bicubic": as_float(m["lr_bicubic"]["mean_psnr"]),
               "key_blend": as_float(m["key_blend"]["mean_psnr"]),
               "best_baseline": as_float(m["best_baseline"]["mean_psnr"]), "margin_db": as_float(res["margin_db"]),
               "swin_xvr_ssim": as_float(m["swin_xvr"]["mean_ssim"]),
               "best_baseline_ssim": as_float(m["best_baseline"]["mean_ssim"])}
        rows.append(row)
        fams = "+".join(families) if isinstance(families, list) else str(families)
        fx = "+".join(effects) if effects else ("-" if effects is not None else "?")
        print(f"{row['archive']:<18} {fams:<28} {fx:<40} swin_xvr {row['swin_xvr']:6.2f}  best baseline "
              f"{row['best_baseline']:6.2f}  margin {row['margin_db']:+6.2f} dB", flush=True)
    if not rows:
        raise SystemExit("no archives to score (give --split or --archives)")
    mean = _mean(rows)
    summary = {"rows": rows, "mean_margin_db": mean, "min_margin_db": min(r["margin_db"] for r in rows),
               "held_out_family": held_out, "held_out_effect": held_out_fx}
    known = [r for r in rows if r["families"] != "?"]  # families unknown: no split by family
    sels = [("held-out family", [r for r in known if r["held_out_family"]]),
            ("seen families", [r for r in known if not r["held_out_family"]])]
    if held_out_fx:
        sels += [("held-out effect", [r for r in rows if r["held_out_effect"]]),
                 ("seen effects", [r for r in rows if not r["held_out_effect"]])]
    for name, sel in sels:
        if sel and (held_out or held_out_fx):
            key = "mean_margin_db_" + name.replace(" ", "_").replace("-", "_")
            summary[key] = _mean(sel)
            print(f"mean margin, {name}: {summary[key]:+.2f} dB over {len(sel)} archives")
    summary["groups"] = group_means(rows)
    for g, d in summary["groups"].items():
        print(f"mean margin per {g}: " + ", ".join(f"{k} {v['mean_margin_db']:+.2f} ({v['n']})" for k, v in d.items()))
    print(f"mean margin over all {len(rows)} archives: {mean:+.2f} dB (min {summary['min_margin_db']:+.2f})")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
