#!/usr/bin/env bash
# Score weights on archives that no training run has seen: the model card's "more held-out checks".
#
#   bash examples/heldout_check.sh                       # the shipped weights, ~10 min on 2 CPU cores
#   WEIGHTS=my.pt FRAMES=41 SPEED_FRAMES=41 bash examples/heldout_check.sh   # quicker, shorter archives
#
# Makes 6 archives with the `xvr-batch synth` defaults (seeds 7100-7105: random mixes of 1-3 moving
# families, crack included, random speeds and doses) and 3 at speeds outside the trained 0.1-4 LR px/frame
# (seeds 7200-7202), then runs examples/score_weights.py on them. Knobs: WEIGHTS (the shipped default),
# WORK (a new temporary folder), FRAMES (200), SPEED_FRAMES (81), PYTHON (python), JSON (no JSON file).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python}"
FRAMES="${FRAMES:-200}"
SPEED_FRAMES="${SPEED_FRAMES:-81}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/xvr-heldout.XXXXXX")}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
synth() { "$PYTHON" -m xvr_batch synth "$@" > /dev/null; }

mkdir -p "$WORK"
echo "archives in $WORK"
for seed in 7100 7101 7102 7103 7104 7105; do
    [[ -f "$WORK/default_$seed.h5" ]] || synth "$WORK/default_$seed.h5" --seed "$seed" --frames "$FRAMES"
done
[[ -f "$WORK/fast_particles_rotor.h5" ]] || synth "$WORK/fast_particles_rotor.h5" --frames "$SPEED_FRAMES" \
    --seed 7200 --family particles --family rotor --speed 6
[[ -f "$WORK/fast_crack.h5" ]] || synth "$WORK/fast_crack.h5" --frames "$SPEED_FRAMES" --seed 7201 \
    --family crack --speed 6
[[ -f "$WORK/slow_cavity.h5" ]] || synth "$WORK/slow_cavity.h5" --frames "$SPEED_FRAMES" --seed 7202 \
    --family cavity --speed 0.05
args=(--archives "$WORK"/default_*.h5 "$WORK"/fast_*.h5 "$WORK"/slow_*.h5)
[[ -n "${WEIGHTS:-}" ]] && args+=(--weights "$WEIGHTS")
[[ -n "${JSON:-}" ]] && args+=(--json "$JSON")
"$PYTHON" "$REPO/examples/score_weights.py" "${args[@]}"
