#!/usr/bin/env bash
# Quickstart: make a synthetic archive, reconstruct it, score it against the truth.
# Usage: examples/quickstart.sh [WORKDIR]     (default: a new temp folder)
set -euo pipefail
dir=${1:-$(mktemp -d -t xvr-quickstart-XXXX)}
mkdir -p "$dir"
cd "$dir"

# 1. A 60-frame archive: LR 32x40 every step, HR 128x160 key frames every 20 steps, dense truth.
xvr-batch synth run.h5 --frames 60 --hr-size 128 160 --stride 20 --seed 7 --overwrite

# 2. Look before a long run: datasets, key-frame spacing, darks/flats, problems; then the plan.
xvr-batch inspect run.h5
xvr-batch plan run.h5 --unit-frames 16

# 3. Reconstruct (re-running the same command resumes an interrupted run).
xvr-batch reconstruct run.h5 -o recon.h5 --unit-frames 16 --overwrite -q

# 4. Score against the truth, with the classical baselines.
xvr-batch evaluate recon.h5 --truth run.h5 --json scores.json
echo "quickstart done in $dir"
