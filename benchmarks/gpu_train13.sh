#!/usr/bin/env bash
# Issue 13: train on the domain-randomised split, one prepared run per ~13-minute GPU lease (H100/H200, 16
# cores), chained across leases through the exact resume of xvr_batch.train, then score the held-out split.
#
#   OUT=$OUT BUDGET_S=720 bash benchmarks/gpu_train13.sh                  # lease 1
#   STATE_IN=.gpu13 OUT=$OUT BUDGET_S=720 bash benchmarks/gpu_train13.sh  # lease 2, 3, ...: .gpu13 holds the
#                                  # previous lease's $OUT (copied into the working tree and carried)
#   PRESET=mid TOTAL_STEPS=20000 ... bash benchmarks/gpu_train13.sh       # the mid preset (E=96, [2,2,4,2])
#   DEVICE=cpu TOTAL_STEPS=6 CALIB_STEPS=2 N_TRAIN=2 N_VAL=1 N_TEST=5 N_FRAMES=41 HR_SIZE=64 CROP=16 BATCH=2 \
#       NUM_WORKERS=0 JOBS=2 BUDGET_S=400 SCORE_RESERVE_S=120 OUT=/tmp/g13 bash benchmarks/gpu_train13.sh  # CPU dry run
#
# Each lease:
#   1. restores the previous lease's state from STATE_IN (PRESET.last.pt: the exact-resume checkpoint;
#      PRESET.pt: the final weights; progress.json; logs) into OUT;
#   2. generates the split of examples/make_split.py into WORK (cached: kept archives are reused; WORK is a
#      fixed path because the archives' absolute paths are part of the resume identity);
#   3. trains PRESET for one cosine schedule of TOTAL_STEPS steps spread over the leases: the first chunk of a
#      lease runs CALIB_STEPS steps to measure s/step (the previous lease's rate is used when known), the next
#      fills the time left before SCORE_RESERVE_S; each chunk ends with stop_at (OUT/PRESET.last.pt), and a
#      watchdog sends SIGTERM (xvr_batch.train then writes the same checkpoint) if a chunk overruns. After the last
#      step xvr_batch.train writes the slim final OUT/PRESET.pt;
#   4. writes the slim EMA checkpoint of the current state, OUT/PRESET.ema.pt (inference only), and scores it
#      (or PRESET.pt when training is complete) on the held-out test split: OUT/score_PRESET_stepN.json and
#      OUT/score_PRESET.json (the latest);
#   5. OUT/progress.json: preset, step, total steps, s/step, one record per lease.
# The recipe is examples/train_default.sh's (L1 unless LOSS=psnr, Adam (0.9, 0.99), cosine to 1e-7, EMA 0.999, batch
# 32, crop 24, p_motion 0.5, bf16 on CUDA) at LR (5e-4), without the stage-2 fine-tune.
#
# Knobs: OUT (/tmp/xvr13), STATE_IN (none), WORK (/tmp/xvr13-work), BUDGET_S (720), SCORE_RESERVE_S (150),
# PRESET (lite | mid: the model presets of xvr_batch.model.config), TOTAL_STEPS (30000 lite, 20000 mid), CALIB_STEPS (200),
# LR, BATCH, CROP, P_MOTION, MOTION_TRIES, SEED, DEVICE (cuda), NUM_WORKERS (12), JOBS (16), N_TRAIN (96),
# N_VAL (4), N_TEST (20), N_FRAMES (81), HR_SIZE (256), STRIDE (20), HELD_OUT_FAMILY (debris), HELD_OUT_EFFECT
# (flicker), PLAIN_FRACTION (0.25), SKIP_SCORE (0), PYTHON (python3), TIME_COND (0; 1: the network is told each
# LR frame's time between its keys, ModelConfig.time_cond), LOSS (l1 | psnr: xvr_batch.train's loss option).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${OUT:-/tmp/xvr13}"
WORK="${WORK:-/tmp/xvr13-work}"
STATE_IN="${STATE_IN:-}"
BUDGET_S="${BUDGET_S:-720}"
SCORE_RESERVE_S="${SCORE_RESERVE_S:-150}"
PYTHON="${PYTHON:-python3}"
PRESET="${PRESET:-lite}"
if [[ "$PRESET" == mid ]]; then TOTAL_STEPS="${TOTAL_STEPS:-20000}"; else TOTAL_STEPS="${TOTAL_STEPS:-30000}"; fi
CALIB_STEPS="${CALIB_STEPS:-200}"
export LR="${LR:-5e-4}" BATCH="${BATCH:-32}" CROP="${CROP:-24}" P_MOTION="${P_MOTION:-0.5}"
export TIME_COND="${TIME_COND:-0}" LOSS="${LOSS:-l1}"
export MOTION_TRIES="${MOTION_TRIES:-4}" SEED="${SEED:-0}" DEVICE="${DEVICE:-cuda}" NUM_WORKERS="${NUM_WORKERS:-12}"
JOBS="${JOBS:-16}"
N_TRAIN="${N_TRAIN:-96}" N_VAL="${N_VAL:-4}" N_TEST="${N_TEST:-20}"
N_FRAMES="${N_FRAMES:-81}" HR_SIZE="${HR_SIZE:-256}" STRIDE="${STRIDE:-20}"
export PRESET TOTAL_STEPS
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(el) s] $*"; }
exec > >(tee -a "$OUT/session13.log") 2>&1
CK="$OUT/$PRESET.pt"
LAST="$OUT/$PRESET.last.pt"

say "machine ($PRESET, $TOTAL_STEPS steps in all, budget $BUDGET_S s)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import torch, h5py; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'h5py', h5py.__version__)" || exit 1

# ---------------------------------------------------------------------------------------------- 1. state
if [[ -n "$STATE_IN" && -d "$STATE_IN" ]]; then
    for f in "$PRESET.last.pt" "$PRESET.pt" progress.json; do
        if [[ -f "$STATE_IN/$f" && ! -f "$OUT/$f" ]]; then cp "$STATE_IN/$f" "$OUT/$f" && say "restored $f from $STATE_IN"; fi
    done
    for f in "$STATE_IN"/train_*.log "$STATE_IN"/session13.log; do
        [[ -f "$f" ]] && cat "$f" > "$OUT/prev_$(basename "$f")"
    done
fi

# ---------------------------------------------------------------------------------------------- 2. data
say "data: the randomised split in $WORK ($N_TRAIN train, $N_VAL val, $N_TEST test; $JOBS jobs)"
"$PYTHON" "$REPO/examples/make_split.py" --work "$WORK" --n-train "$N_TRAIN" --n-val "$N_VAL" --n-test "$N_TEST" \
    --frames "$N_FRAMES" --hr-size "$HR_SIZE" --stride "$STRIDE" --held-out-family "${HELD_OUT_FAMILY:-debris}" \
    --held-out-effect "${HELD_OUT_EFFECT:-flicker}" --plain-fraction "${PLAIN_FRACTION:-0.25}" --generate \
    --jobs "$JOBS" || { say "data generation failed"; exit 1; }
cp "$WORK/split.json" "$OUT/split.json"
say "data ready"

# ---------------------------------------------------------------------------------------------- 3. train
OPTS="$OUT/train_options_$PRESET.json"
write_opts() {  # write_opts STOP_AT
    STOP_AT="$1" OUT_CK="$CK" OPTS="$OPTS" WORK="$WORK" "$PYTHON" - <<'EOF'
import json
import os

e = os.environ
split = json.load(open(os.path.join(e["WORK"], "split.json")))
last = e["OUT_CK"][:-3] + ".last.pt"
opts = {
    "archives": [a["path"] for a in split["train"]], "val_archives": [a["path"] for a in split["val"]],
    "out": e["OUT_CK"], "preset": e["PRESET"], "head": "all", "init": None,
    "steps": int(e["TOTAL_STEPS"]), "stop_at": int(e["STOP_AT"]), "batch": int(e["BATCH"]), "crop": int(e["CROP"]),
    "lr": float(e["LR"]), "seed": int(e["SEED"]), "device": e["DEVICE"], "num_workers": int(e["NUM_WORKERS"]),
    "log_every": 200, "val_every": 2000, "ckpt_every": 1000, "slim": True, "progress": False,
    "resume": last if os.path.isfile(last) else None,
    "p_noise": 0.0, "drop_path": 0.0, "p_motion": float(e["P_MOTION"]), "motion_tries": int(e["MOTION_TRIES"]),
    "time_cond": e["TIME_COND"] == "1", "loss": e["LOSS"],
}
with open(e["OPTS"], "w") as f:
    json.dump(opts, f, indent=1)
EOF
}

current_step() {  # the step of the exact-resume checkpoint (0 without one; TOTAL when the final one exists)
    if [[ -f "$CK" ]]; then echo "$TOTAL_STEPS"; return; fi
    if [[ ! -f "$LAST" ]]; then echo 0; return; fi
    "$PYTHON" -c "import torch, sys; print(int(torch.load(sys.argv[1], map_location='cpu', weights_only=True)['step']))" "$LAST"
}

run_chunk() {  # run_chunk STOP_AT DEADLINE_S LOG: one xvr_batch.train process; SIGTERM at the deadline
    local stop_at="$1" deadline="$2" log="$3"
    write_opts "$stop_at" || return 1
    "$PYTHON" -m xvr_batch.train --json "$OPTS" >> "$log" 2>&1 &
    local pid=$! t_end=$(( $(date +%s) + deadline )) rc
    while kill -0 "$pid" 2>/dev/null; do
        if (( $(date +%s) > t_end )); then
            say "chunk overran its deadline: SIGTERM to the training process $pid (it writes $LAST)"
            kill -TERM "$pid" 2>/dev/null
            t_end=$(( $(date +%s) + 100000 ))
        fi
        sleep 2
    done
    wait "$pid"; rc=$?
    grep -E "s/step|stopped|wrote|validation|resume" "$log" | tail -4
    return "$rc"
}

RATE=$("$PYTHON" -c "import json,sys; p=json.load(open(sys.argv[1])); print(p.get('s_per_step', '') if p.get('preset')==sys.argv[2] else '')" \
       "$OUT/progress.json" "$PRESET" 2>/dev/null || true)
STEP0=$(current_step)
STEP=$STEP0
TRAIN_LOG="$OUT/train_${PRESET}_$(date +%Y%m%d-%H%M%S).log"
say "training $PRESET from step $STEP0 of $TOTAL_STEPS${RATE:+ (last lease: $RATE s/step)}; log $TRAIN_LOG"
CHUNK=0
while [[ ! -f "$CK" ]] && (( STEP < TOTAL_STEPS )); do
    LEFT=$(( BUDGET_S - $(el) - SCORE_RESERVE_S - 40 ))
    if [[ -z "$RATE" ]]; then
        N=$CALIB_STEPS
        (( LEFT < 60 )) && { say "no time left to train"; break; }
    else
        N=$("$PYTHON" -c "print(int(max(0, $LEFT - 25) / ($RATE * 1.08)))")
        (( N < 20 && STEP + N < TOTAL_STEPS )) && { say "time left ($LEFT s) is too short for another chunk"; break; }
    fi
    STOP=$(( STEP + N < TOTAL_STEPS ? STEP + N : TOTAL_STEPS ))
    DEADLINE=$(( LEFT > 60 ? LEFT : 60 ))
    say "chunk $CHUNK: steps $STEP -> $STOP (deadline $DEADLINE s)"
    T1=$(date +%s)
    run_chunk "$STOP" "$DEADLINE" "$TRAIN_LOG"
    RC=$?
    NEW=$(current_step)
    DT=$(( $(date +%s) - T1 ))
    say "chunk $CHUNK: exit $RC, step $NEW, $DT s"
    if (( NEW <= STEP )); then say "no progress; stopping (see $TRAIN_LOG)"; break; fi
    # s/step including the process start and validation: conservative for the next chunk
    RATE=$("$PYTHON" -c "print(round($DT / max($NEW - $STEP, 1), 4))")
    STEP=$NEW
    CHUNK=$(( CHUNK + 1 ))
done

# ---------------------------------------------------------------------------------------------- 4. weights, score
WEIGHTS=""
if [[ -f "$CK" ]]; then
    WEIGHTS="$CK"
    say "training complete: $CK"
elif [[ -f "$LAST" ]]; then
    "$PYTHON" - "$LAST" "$OUT/$PRESET.ema.pt" <<'EOF' && WEIGHTS="$OUT/$PRESET.ema.pt"
import sys

import torch

from xvr_batch.durable import atomic_path

ck = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
slim = {k: ck[k] for k in ("format", "format_version", "config", "meta") if k in ck}
slim["params"] = ck["params_ema"]
slim["params_ema"] = ck["params_ema"]
slim["step"] = int(ck["step"])
with atomic_path(sys.argv[2]) as tmp:
    torch.save(slim, tmp)
print(f"slim EMA checkpoint at step {slim['step']}: {sys.argv[2]}")
EOF
fi
"$PYTHON" - "$OUT/progress.json" <<EOF
import json, os, sys, time
p = {}
if os.path.isfile(sys.argv[1]):
    p = json.load(open(sys.argv[1]))
if p.get("preset") not in (None, "$PRESET"):
    p = {}
p.update({"preset": "$PRESET", "step": int("$STEP"), "total_steps": int("$TOTAL_STEPS"),
          "s_per_step": float("${RATE:-0}") or None, "final": os.path.isfile("$CK")})
p.setdefault("leases", []).append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_step": int("$STEP0"),
                                   "to_step": int("$STEP"), "elapsed_s": int("$(el)")})
json.dump(p, open(sys.argv[1], "w"), indent=1)
EOF
if [[ -n "$WEIGHTS" && "${SKIP_SCORE:-0}" != 1 ]]; then
    LEFT=$(( BUDGET_S - $(el) - 10 ))
    say "scoring $WEIGHTS on the held-out test split (at most $LEFT s)"
    timeout "$(( LEFT > 30 ? LEFT : 30 ))" "$PYTHON" "$REPO/examples/score_weights.py" --split "$WORK/split.json" \
        --weights "$WEIGHTS" --batch 8 --json "$OUT/score_${PRESET}_step${STEP}.json" \
        && cp "$OUT/score_${PRESET}_step${STEP}.json" "$OUT/score_${PRESET}.json"
fi
say "done: step $STEP of $TOTAL_STEPS; carry $OUT (its $PRESET.last.pt or $PRESET.pt, and progress.json) to the next lease as STATE_IN"
