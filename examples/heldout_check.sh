#!/usr/bin/env bash
# Score weights on archives that no training run has seen, in one command.
#
#   bash examples/heldout_check.sh                          # the shipped weights on the held-out split, ~8 min on 2 cores
#   N_TEST=10 FRAMES=41 HR_SIZE=96 bash examples/heldout_check.sh   # smaller and quicker
#   N_TEST=40 FRAMES=81 HR_SIZE=256 WEIGHTS=my.pt JSON=score.json bash examples/heldout_check.sh   # the full test set
#   SET=cli bash examples/heldout_check.sh                  # the model card's "more held-out checks" (~10 min)
#
# SET=split (default): the test part of the randomised split of examples/make_split.py (seeds 29000.., five
# categories cycling: seen families and effects, the held-out family, the held-out effect, both, and plain
# archives of the old generator), generated into WORK (kept: a second run reuses them), then scored by
# examples/score_weights.py, which prints per archive and the mean margin per family, per effect, per speed bin
# and per category. The held-out family (HELD_OUT_FAMILY, debris) and effect (HELD_OUT_EFFECT, flicker) must be
# the ones the weights were trained without (make_split.py's defaults).
#
# SET=cli: 6 archives with the `xvr-batch synth` defaults (seeds 7100-7105: random mixes of 1-3 moving
# families, crack included, random speeds and doses) and 3 at speeds outside the trained 0.1-4 LR px/frame
# (seeds 7200-7202), then examples/score_weights.py on them. Its knobs: FRAMES (200), SPEED_FRAMES (81).
#
# Knobs: WEIGHTS (the shipped default), WORK (a new temporary folder), PYTHON (python), JSON (no JSON file),
# JOBS (nproc); SET=split: N_TEST (20), FRAMES (41), HR_SIZE (128), STRIDE (20), HELD_OUT_FAMILY, HELD_OUT_EFFECT.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python}"
SET="${SET:-split}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/xvr-heldout.XXXXXX")}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 1)}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK"
echo "archives in $WORK"
score=("$PYTHON" "$REPO/examples/score_weights.py")
[[ -n "${WEIGHTS:-}" ]] && score+=(--weights "$WEIGHTS")
[[ -n "${JSON:-}" ]] && score+=(--json "$JSON")

if [[ "$SET" == split ]]; then
    FRAMES="${FRAMES:-41}"
    "$PYTHON" "$REPO/examples/make_split.py" --work "$WORK" --roles test --n-test "${N_TEST:-20}" \
        --frames "$FRAMES" --hr-size "${HR_SIZE:-128}" --stride "${STRIDE:-20}" \
        --held-out-family "${HELD_OUT_FAMILY:-debris}" --held-out-effect "${HELD_OUT_EFFECT:-flicker}" \
        --generate --jobs "$JOBS"
    "${score[@]}" --split "$WORK/split.json"
    exit 0
elif [[ "$SET" != cli ]]; then
    echo "SET=$SET: choose split or cli" >&2
    exit 2
fi

FRAMES="${FRAMES:-200}"
SPEED_FRAMES="${SPEED_FRAMES:-81}"
synth() { "$PYTHON" -m xvr_batch synth "$@" > /dev/null; }
for seed in 7100 7101 7102 7103 7104 7105; do
    [[ -f "$WORK/default_$seed.h5" ]] || synth "$WORK/default_$seed.h5" --seed "$seed" --frames "$FRAMES"
done
[[ -f "$WORK/fast_particles_rotor.h5" ]] || synth "$WORK/fast_particles_rotor.h5" --frames "$SPEED_FRAMES" \
    --seed 7200 --family particles --family rotor --speed 6
[[ -f "$WORK/fast_crack.h5" ]] || synth "$WORK/fast_crack.h5" --frames "$SPEED_FRAMES" --seed 7201 \
    --family crack --speed 6
[[ -f "$WORK/slow_cavity.h5" ]] || synth "$WORK/slow_cavity.h5" --frames "$SPEED_FRAMES" --seed 7202 \
    --family cavity --speed 0.05
"${score[@]}" --archives "$WORK"/default_*.h5 "$WORK"/fast_*.h5 "$WORK"/slow_*.h5
