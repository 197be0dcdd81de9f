"""Interpolate two checkpoints of one model in weight space (WiSE-FT: Wortsman et al., "Robust fine-tuning of
zero-shot models", 2022): ``(1 - alpha) * BASE + alpha * TUNED``, EMA weights when a checkpoint has them.

    python examples/interpolate_weights.py BASE.pt TUNED.pt --alpha 0.5 -o OUT.pt

A fine-tune on a shifted distribution (here: the randomised archives of examples/make_split.py) tends to lose part
of what the base weights did well (the plain generator); a point between the two often keeps most of both.
TUNED may add time conditioning (``train --time-cond`` over BASE): BASE then counts as the same network with
those parameters at zero, which is what it computes. OUT.pt is a slim checkpoint of our format (no optimizer
state) whose ``meta`` records both sources (path, sha256, meta) and ``alpha``; ``xvr-batch reconstruct --weights
OUT.pt`` and ``examples/score_weights.py`` take it as is.
"""

from __future__ import annotations

import argparse
import sys

from xvr_batch.errors import UserError
from xvr_batch.model.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from xvr_batch.model.swin_xvr import with_time_cond


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("--alpha", type=float, required=True, help="weight of TUNED, in [0, 1]")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    if not 0.0 <= a.alpha <= 1.0:
        print(f"error: --alpha {a.alpha}: must lie in [0, 1]", file=sys.stderr)
        return 2
    try:
        base, cb = load_checkpoint(a.base)
        tuned, ct = load_checkpoint(a.tuned)
    except UserError as exc:  # a missing, truncated or foreign file: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not base.cfg.time_cond and tuned.cfg == base.cfg.replace(time_cond=True):
        base = with_time_cond(base)  # the tuned weights added time conditioning: the base with it at zero
    if base.cfg.to_dict() != tuned.cfg.to_dict():
        print(f"error: {a.base} and {a.tuned} are different models (configs differ); nothing to interpolate",
              file=sys.stderr)
        return 2
    sb, st = base.state_dict(), tuned.state_dict()
    mixed = {k: (sb[k].double() * (1.0 - a.alpha) + st[k].double() * a.alpha).to(sb[k].dtype)
             if sb[k].is_floating_point() else sb[k] for k in sb}
    base.load_state_dict(mixed)

    def source(path: str, ckpt: dict) -> dict:
        meta = {k: v for k, v in (ckpt.get("meta") or {}).items() if k not in ("loss_log", "val_log")}
        return {"path": path, "sha256": file_sha256(path), "meta": meta}

    meta = {"kind": "interpolation", "alpha": a.alpha, "base": source(a.base, cb), "tuned": source(a.tuned, ct)}
    sha = save_checkpoint(a.out, base, params_ema=mixed, meta=meta)
    print(f"wrote {a.out} (alpha {a.alpha}, sha256 {sha[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
