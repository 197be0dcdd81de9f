#!/usr/bin/env bash
# Everything this project measures on a GPU, in one run that fits a short device lease (~9 min):
#   1. the model benchmarks of benchmarks/RESULTS.md (paper preset, LR 100x256, bf16; lite);
#   2. stage 1 of the default lite weights (examples/train_default.sh with FT_STEPS=0), for as many
#      steps as the time left allows;
#   3. scoring them on held-out archives (examples/score_weights.py) with the GPU reconstruct, timed.
# Stage 2 of the shipped weights (5000 more steps at 3e-4 from these) ran as a second command on the same
# machine; docs/MODEL_CARD.md gives it. `bash examples/train_default.sh` runs both stages in one go.
#
#   OUT=/tmp/gpu BUDGET_S=540 bash benchmarks/gpu_session.sh
#
# Writes $OUT/session.log, $OUT/lite.pt, $OUT/score.json and $OUT/train_options.json. The training
# step count is chosen from a 60-step calibration run so that the whole script ends within BUDGET_S.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${OUT:-/tmp/xvr-gpu}"
BUDGET_S="${BUDGET_S:-540}"
PYTHON="${PYTHON:-python3}"
WORK="${WORK:-/tmp/xvr-gpu-work}"
SCORE_RESERVE_S="${SCORE_RESERVE_S:-75}"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(el) s] $*"; }
exec > >(tee -a "$OUT/session.log") 2>&1

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch, h5py, hdf5plugin; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'h5py', h5py.__version__)"

# The recipe of the shipped weights is train_default.sh's defaults (docs/MODEL_CARD.md); only what this
# session does differently is set here, and any knob of train_default.sh can still come from the
# environment. Data generation runs on the CPUs while the benchmarks use the GPU.
export WORK KEEP_WORK=1 DEVICE="${DEVICE:-cuda}" FT_STEPS=0 LOG_EVERY=200 VAL_EVERY=1000 CKPT_EVERY=100000 PYTHON
say "data (background): $WORK/data.log"
DATA_ONLY=1 JOBS="${JOBS:-12}" bash "$REPO/examples/train_default.sh" > "$WORK/data.log" 2>&1 &
DATA_PID=$!

if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
    say "benchmarks"
    B="$PYTHON $REPO/benchmarks/bench_model.py"
    timeout 60 $B --preset paper --lr-size 100 256 --batch 8 --device cuda --dtype bf16 --reuse-keys --json
    timeout 60 $B --preset paper --lr-size 100 256 --batch 8 --device cuda --dtype fp32 --reuse-keys --json
    timeout 40 $B --preset paper --lr-size 100 256 --batch 1 --device cuda --dtype fp32 --head centre --json
    timeout 40 $B --preset lite --lr-size 100 256 --batch 8 --device cuda --dtype bf16 --reuse-keys --json
    timeout 90 $B --preset paper --lr-size 100 256 --batch 8 --device cuda --dtype bf16 --reuse-keys --compile --json
fi
wait $DATA_PID || { say "data generation failed"; cat "$WORK/data.log"; exit 1; }
tail -1 "$WORK/data.log"

say "calibration: 60 steps"
STEPS=60 LOG_EVERY=20 VAL_EVERY=100000 OUT="$WORK/calib.pt" bash "$REPO/examples/train_default.sh" > "$WORK/calib.log" 2>&1
grep "s/step" "$WORK/calib.log"
SPS=$(grep -o '[0-9.]* s/step' "$WORK/calib.log" | tail -1 | cut -d' ' -f1)
LEFT=$(( BUDGET_S - $(el) - SCORE_RESERVE_S - 25 ))
STEPS=$("$PYTHON" -c "print(max(100, int($LEFT / ($SPS * 1.08)) // 100 * 100))")
say "training: $STEPS steps at ~$SPS s/step in the $LEFT s left"
STEPS=$STEPS OUT="$OUT/lite.pt" bash "$REPO/examples/train_default.sh"
cp "$WORK/train_options.json" "$WORK/split.json" "$OUT/" 2>/dev/null

say "scoring on the held-out archives (GPU reconstruct)"
T1=$(date +%s)
"$PYTHON" "$REPO/examples/score_weights.py" --split "$WORK/split.json" --weights "$OUT/lite.pt" --batch 8 \
    --json "$OUT/score.json"
say "scored the test archives in $(( $(date +%s) - T1 )) s"
say "done"
