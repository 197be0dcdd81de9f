#!/usr/bin/env bash
# Train the shipped default weights, xvr_batch/model/weights/lite.pt, reproducibly.
#
#   bash examples/train_default.sh                      # the shipped weights: ~10 min on one H100
#   STEPS=20 FT_STEPS=0 N_TRAIN=2 N_VAL=1 N_TEST=0 N_FRAMES=41 HR_SIZE=64 CROP=16 BATCH=2 \
#       OUT=/tmp/lite.pt bash examples/train_default.sh # a smoke test (CPU, a minute)
#
# What it does
#   1. Generates a varied synthetic training set with xvr_batch.synth (seeds 1000.., scene families
#      particles / cavity / rotor in all combinations, uint16 / uint8 / float32 archives, random speeds
#      and doses), validation archives from held-out seeds, and a test set that is never trained on:
#      held-out seeds AND the held-out scene family "crack" (alone and mixed). The split is recorded in
#      $WORK/split.json. JOBS archives are generated at once.
#   2. Stage 1: trains the "lite" preset from scratch for STEPS steps at LR (xvr_batch.train: L1, Adam
#      (0.9, 0.99), cosine to 1e-7, EMA 0.999, flips/transposes, key-frame jitter, bf16 on CUDA). Half
#      of the samples are the most moving of MOTION_TRIES random crops (P_MOTION=0.5). Writes
#      ${OUT%.pt}.stage1.pt.
#   3. Stage 2: a second cosine schedule of FT_STEPS steps at FT_LR, starting from the stage-1 weights.
#      Writes $OUT, an inference-only ("slim") checkpoint. FT_STEPS=0 skips it (stage 1 writes $OUT).
#   P_NOISE=0 (no extra LR noise: the archives carry their own low-dose noise) and DROP_PATH=0 differ
#   from the paper's recipe (LR=2e-4 P_NOISE=0.5 DROP_PATH=0.2), which needs far more steps.
#
# Timing (docs/MODEL_CARD.md): on one H100, about 0.04 s per step at batch 32 / crop 24 with 12 loader
# workers. Both stages take about 8 min, plus about 1.5 min of data generation on 12 cores. On the
# 2-core CPU a step takes seconds: use a GPU.
#
# Re-running after an interruption resumes each stage from its ".last.pt" (written every CKPT_EVERY
# steps): the synthetic data is a pure function of the seeds, so the resumed run continues exactly.
#
# SPLIT=randomised trains on the domain-randomised split of examples/make_split.py instead (issue 13): all
# scene families of xvr_batch.synth but HELD_OUT_FAMILY (debris), random subsets of the opt-in effects but
# HELD_OUT_EFFECT (flicker), PLAIN_FRACTION (0.25) of the archives without effects; seeds 20000.. (train),
# 25000.. (val), 29000.. (test, five categories: seen / held-out family / held-out effect / both / plain).
# Existing archives in WORK are kept (cached). Score with examples/score_weights.py --split WORK/split.json.
#   SPLIT=randomised N_TRAIN=64 N_VAL=4 N_TEST=15 WORK=/data/xvr13 KEEP_WORK=1 bash examples/train_default.sh
# PRESET=mid trains the preset between lite and paper (E=96, stages [2, 2, 4, 2], 1.6 M parameters, key_mean
# residual) instead of lite.
#
# Every knob is an environment variable:
#   STEPS (6900), LR (5e-4), FT_STEPS (5000), FT_LR (3e-4), BATCH (32), CROP (24), P_MOTION (0.5),
#   MOTION_TRIES (4), P_NOISE (0), DROP_PATH (0), SEED (0), DEVICE (auto), NUM_WORKERS (min(12, nproc)),
#   N_TRAIN (56), N_VAL (2), N_TEST (6), N_FRAMES (81), HR_SIZE (256), STRIDE (20),
#   OUT (xvr_batch/model/weights/lite.pt), WORK (a new temporary folder), KEEP_WORK (0),
#   LOG_EVERY (200), VAL_EVERY (1000), CKPT_EVERY (1000), PYTHON (python), JOBS (nproc: parallel data
#   generation), DATA_ONLY (0: 1 stops after the data), SPLIT (default | randomised), HELD_OUT_FAMILY (debris),
#   HELD_OUT_EFFECT (flicker), PLAIN_FRACTION (0.25), PRESET (lite | mid | paper)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python}"

STEPS="${STEPS:-6900}"
FT_STEPS="${FT_STEPS:-5000}"
FT_LR="${FT_LR:-3e-4}"
BATCH="${BATCH:-32}"
CROP="${CROP:-24}"
LR="${LR:-5e-4}"
P_NOISE="${P_NOISE:-0}"
DROP_PATH="${DROP_PATH:-0}"
SEED="${SEED:-0}"
DEVICE="${DEVICE:-auto}"
NPROC="$(nproc 2>/dev/null || echo 1)"
NUM_WORKERS="${NUM_WORKERS:-$(( NPROC < 12 ? NPROC : 12 ))}"
N_TRAIN="${N_TRAIN:-56}"
N_VAL="${N_VAL:-2}"
N_TEST="${N_TEST:-6}"
N_FRAMES="${N_FRAMES:-81}"
HR_SIZE="${HR_SIZE:-256}"
STRIDE="${STRIDE:-20}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 1)}"
P_MOTION="${P_MOTION:-0.5}"
MOTION_TRIES="${MOTION_TRIES:-4}"
OUT="${OUT:-$REPO/xvr_batch/model/weights/lite.pt}"
LOG_EVERY="${LOG_EVERY:-200}"
VAL_EVERY="${VAL_EVERY:-1000}"
CKPT_EVERY="${CKPT_EVERY:-1000}"
KEEP_WORK="${KEEP_WORK:-0}"
SPLIT="${SPLIT:-default}"
PRESET="${PRESET:-lite}"
if [[ -z "${WORK:-}" ]]; then
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/xvr-train.XXXXXX")"
    if [[ "$KEEP_WORK" != 1 ]]; then
        trap 'rm -rf "$WORK"' EXIT
    fi
fi
mkdir -p "$WORK" "$(dirname "$OUT")"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
echo "work folder: $WORK"

# ------------------------------------------------------------------------------------------ data
export WORK N_TRAIN N_VAL N_TEST N_FRAMES HR_SIZE STRIDE JOBS
if [[ "$SPLIT" == randomised || "$SPLIT" == randomized ]]; then
    "$PYTHON" "$REPO/examples/make_split.py" --work "$WORK" --n-train "$N_TRAIN" --n-val "$N_VAL" --n-test "$N_TEST" \
        --frames "$N_FRAMES" --hr-size "$HR_SIZE" --stride "$STRIDE" --held-out-family "${HELD_OUT_FAMILY:-debris}" \
        --held-out-effect "${HELD_OUT_EFFECT:-flicker}" --plain-fraction "${PLAIN_FRACTION:-0.25}" --generate --jobs "$JOBS"
elif [[ "$SPLIT" != default ]]; then
    echo "SPLIT=$SPLIT: choose default or randomised" >&2
    exit 2
else
"$PYTHON" - <<'EOF'
"""Synthetic training / validation / test archives; the split goes to $WORK/split.json."""
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor

from xvr_batch.synth import synthesize

work = os.environ["WORK"]
n_frames, size, stride = int(os.environ["N_FRAMES"]), int(os.environ["HR_SIZE"]), int(os.environ["STRIDE"])
HELD_OUT_FAMILY = "crack"
TRAIN_FAMILIES = ["particles", "cavity", "rotor"]
combos = [list(c) for k in (1, 2, 3) for c in itertools.combinations(TRAIN_FAMILIES, k)]
dtypes = ["uint16", "uint16", "uint8", "uint16", "float32"]


def make(job):
    role, seed, families, dtype = job
    path = os.path.join(work, role, f"{role}_{seed:04d}.h5")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        synthesize(tmp, n_frames=n_frames, hr_shape=(size, size), stride=stride, seed=seed,
                   families=families, dtype=dtype)
        os.replace(tmp, path)
    return role, {"path": path, "seed": seed, "families": families, "dtype": dtype}


test_families = [["particles", "rotor"], ["cavity"], [HELD_OUT_FAMILY], [HELD_OUT_FAMILY, "particles"],
                 [HELD_OUT_FAMILY, "cavity"], ["rotor", "cavity", "particles"]]
jobs = [("train", 1000 + i, combos[i % len(combos)], dtypes[i % len(dtypes)]) for i in range(int(os.environ["N_TRAIN"]))]
jobs += [("val", 5000 + i, combos[(3 * i + 1) % len(combos)], "uint16") for i in range(int(os.environ["N_VAL"]))]
jobs += [("test", 9000 + i, test_families[i % len(test_families)], "uint16") for i in range(int(os.environ["N_TEST"]))]
split = {"held_out_family": HELD_OUT_FAMILY, "train": [], "val": [], "test": []}
with ProcessPoolExecutor(max(1, int(os.environ["JOBS"]))) as pool:  # archives are independent
    for role, entry in pool.map(make, jobs):
        split[role].append(entry)
with open(os.path.join(work, "split.json"), "w") as f:
    json.dump(split, f, indent=1)
print(f"{len(split['train'])} training, {len(split['val'])} validation, {len(split['test'])} test archives "
      f"({n_frames} frames, HR {size}x{size}, key frames every {stride}); held-out family: {HELD_OUT_FAMILY}")
EOF
fi

if [[ "${DATA_ONLY:-0}" == 1 ]]; then
    exit 0
fi

# ------------------------------------------------------------------------------------------ train
# train_stage OUT STEPS LR INIT: one xvr_batch.train run (INIT empty: from scratch); resumes from OUT's .last.pt
train_stage() {
    local stage_out="$1" stage_steps="$2" stage_lr="$3" init="$4"
    local last="${stage_out%.pt}.last.pt" resume=null opts="$WORK/train_options.json"
    if [[ -n "$init" ]]; then
        opts="$WORK/train_options_finetune.json"
    fi
    if [[ -f "$last" ]]; then
        echo "resuming from $last"
        resume="\"$last\""
    fi
    STAGE_OUT="$stage_out" STAGE_STEPS="$stage_steps" STAGE_LR="$stage_lr" STAGE_INIT="$init" RESUME="$resume" \
    OPTS="$opts" "$PYTHON" - <<'EOF'
import json
import os

e = os.environ
split = json.load(open(os.path.join(e["WORK"], "split.json")))
opts = {
    "archives": [a["path"] for a in split["train"]],
    "val_archives": [a["path"] for a in split["val"]],
    "out": e["STAGE_OUT"], "preset": e["PRESET"], "head": "all", "init": e["STAGE_INIT"] or None,
    "steps": int(e["STAGE_STEPS"]), "batch": int(e["BATCH"]), "crop": int(e["CROP"]), "lr": float(e["STAGE_LR"]),
    "seed": int(e["SEED"]), "device": e["DEVICE"], "num_workers": int(e["NUM_WORKERS"]),
    "log_every": int(e["LOG_EVERY"]), "val_every": int(e["VAL_EVERY"]), "ckpt_every": int(e["CKPT_EVERY"]),
    "resume": json.loads(e["RESUME"]), "slim": True,
    "p_noise": float(e["P_NOISE"]), "drop_path": float(e["DROP_PATH"]),
    "p_motion": float(e["P_MOTION"]), "motion_tries": int(e["MOTION_TRIES"]),
}
with open(e["OPTS"], "w") as f:
    json.dump(opts, f, indent=1)
EOF
    echo "training options: $opts"
    "$PYTHON" -m xvr_batch.train --json "$opts"
}

export BATCH CROP P_NOISE DROP_PATH SEED DEVICE NUM_WORKERS LOG_EVERY VAL_EVERY CKPT_EVERY P_MOTION MOTION_TRIES
export PRESET
if [[ "$FT_STEPS" -gt 0 ]]; then
    STAGE1="${OUT%.pt}.stage1.pt"
    if [[ ! -f "$STAGE1" ]]; then
        train_stage "$STAGE1" "$STEPS" "$LR" ""
    fi
    train_stage "$OUT" "$FT_STEPS" "$FT_LR" "$STAGE1"
else
    train_stage "$OUT" "$STEPS" "$LR" ""
fi
echo "default weights: $OUT"
