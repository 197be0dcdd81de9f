#!/usr/bin/env bash
# Every GPU check of issue 10 (GPU rate end to end), in one run that fits one short device lease (~9 min):
#   1. the CUDA tests of the model paths (sdpa/flex, eager/compiled, fp32 parity and bf16);
#   2. bench_model rows eager, compile, flex, compile+flex: paper preset, LR 100x256, bf16, batch 8;
#   3. bench_e2e with paper-preset weights (random, same cost) at LR 100x256 -> HR 400x1024, and --null-model;
#   4. byte identity on the GPU: two runs, and two unit sizes, with compile + flex on, compared with cmp;
#   5. a registered two-camera run (LR camera's frame, output resampled on the device) at two unit sizes.
# Not yet run: no GPU was lent to the session that wrote it. Results go to benchmarks/RESULTS.md with the
# device name.
#
#   OUT=/tmp/gpu10 bash benchmarks/gpu_issue10.sh
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${OUT:-/tmp/xvr-gpu10}"
PYTHON="${PYTHON:-python3}"
FRAMES="${FRAMES:-2000}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
exec > >(tee -a "$OUT/session.log") 2>&1

say "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

say "1. CUDA model tests"
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider "$REPO/tests/test_model_fast.py" -k cuda 2>&1 | tail -5

say "2. bench_model, paper preset, bf16, batch 8, key reuse"
timeout 420 "$PYTHON" "$REPO/benchmarks/bench_model.py" --preset paper --lr-size 100 256 --batch 8 --device cuda \
    --dtype bf16 --reuse-keys --rows eager,compile,flex,compile+flex --json > "$OUT/bench_model.json"
cat "$OUT/bench_model.json"

say "3. bench_e2e, paper-preset weights"
"$PYTHON" - "$OUT/paper.pt" <<'PY'
import sys, torch
from xvr_batch.model import SwinXVR, preset, save_checkpoint
torch.manual_seed(0)
save_checkpoint(sys.argv[1], SwinXVR(preset("paper")).eval())
PY
timeout 420 "$PYTHON" "$REPO/benchmarks/bench_e2e.py" --frames "$FRAMES" --device cuda --weights "$OUT/paper.pt" \
    --batch 8 | tee "$OUT/bench_e2e.txt"
timeout 240 "$PYTHON" "$REPO/benchmarks/bench_e2e.py" --frames "$FRAMES" --device cuda --null-model \
    | tee "$OUT/bench_e2e_null.txt"

say "4. identical bytes: two runs and two unit sizes, compile + flex, bf16"
W="$OUT/ident"; rm -rf "$W"; mkdir -p "$W"
"$PYTHON" -m xvr_batch synth "$W/a.h5" --frames 160 --hr-size 400 1024 --stride 20 --seed 3 > /dev/null
for run in "u128a 128" "u128b 128" "u40 40"; do
    set -- $run
    timeout 300 "$PYTHON" -m xvr_batch reconstruct "$W/a.h5" -o "$W/$1.h5" --weights "$OUT/paper.pt" \
        --device cuda --batch 8 --unit-frames "$2" --compile --attention flex -q || say "run $1 failed"
done
"$PYTHON" - "$W" <<'PY'
import sys, h5py, hdf5plugin  # noqa: F401
d = sys.argv[1]
data = {n: h5py.File(f"{d}/{n}.h5")["/exchange/data"][()] for n in ("u128a", "u128b", "u40")}
print("two runs identical:", data["u128a"].tobytes() == data["u128b"].tobytes())
print("unit 128 vs 40 identical:", data["u128a"].tobytes() == data["u40"].tobytes())
PY
say "5. a registered two-camera run on the GPU: unit sizes give identical bytes (device-side resampling)"
C="$OUT/cams"; rm -rf "$C"; mkdir -p "$C"
"$PYTHON" -m xvr_batch synth --two-cameras "$C/c" --frames 61 --hr-size 400 1024 --stride 10 > /dev/null
"$PYTHON" - "$C" <<'PY'
import json, subprocess, sys
c = sys.argv[1]
t = json.load(open(f"{c}/c/truth.json"))
f = {k: f"{c}/c/{v}" for k, v in t["files"].items()}
subprocess.run([sys.executable, "-m", "xvr_batch", "assemble", "-o", f"{c}/arc.h5", "--lr", f["lr"], "--lr-time",
                f["lr_time"], "--hr", f["hr"], "--hr-time", f["hr_time"], "--hr-delay", str(t["hr_delay"])], check=True)
PY
for u in 8 23; do
    timeout 240 "$PYTHON" -m xvr_batch reconstruct "$C/arc.h5" -o "$C/u$u.h5" --device cuda --unit-frames "$u" -q \
        || say "registered run u$u failed"
done
"$PYTHON" - "$C" <<'PY'
import sys, h5py, hdf5plugin  # noqa: F401
c = sys.argv[1]
a, b = (h5py.File(f"{c}/u{u}.h5")["/exchange/data"][()] for u in (8, 23))
print("registered, unit 8 vs 23 identical:", a.tobytes() == b.tobytes())
PY
say "done"
