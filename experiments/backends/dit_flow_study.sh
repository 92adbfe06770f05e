#!/usr/bin/env bash
# The denoisers and objectives of issue 17 at the same wall-clock budget: openmoji_ldm's UNet (v-prediction,
# today's default), the same UNet on the flow objective, and the latent DiT on flow (experiment=openmoji_dit),
# each for SEEDS seeds from one shared first stage, then compare.py on 1,000 test images per run.
# Resumable: a finished run (its `done` file) is not retrained, one cut off resumes from its last.ckpt, and
# compare.py reuses its evaluation reports.
#   [SEEDS="0 1 2"] [RUNS="ldm ldm_flow dit"] [OUT=outputs/backends/dit_flow] experiments/backends/dit_flow_study.sh [extra overrides ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/backends/dit_flow}
SEEDS=${SEEDS:-0}
RUNS=${RUNS:-ldm ldm_flow dit}
# the flow runs sample alike (FlowMatch Euler, 20 steps, guidance 5: openmoji_dit's), so ldm_flow and dit differ
# only in the denoiser
declare -A PRESET=(
  [ldm]="experiment=openmoji_ldm"
  [ldm_flow]="experiment=openmoji_ldm_flow"
  [dit]="experiment=openmoji_dit"
)
checkpoints=()
for seed in $SEEDS; do
  for run in $RUNS; do
    dir=$OUT/runs/$run-s$seed
    if [ ! -e "$dir/done" ]; then
      # ckpt_path=last: a fresh start when the folder has no checkpoint yet
      # shellcheck disable=SC2086  # the preset is a list of overrides
      "$PY" -m text2img.train ${PRESET[$run]} seed="$seed" test=false logger=csv ckpt_path=last "$@" hydra.run.dir="$dir"
      touch "$dir/done"
    fi
    checkpoints+=("$run-s$seed=$dir/checkpoints/last.ckpt")
  done
done
"$PY" experiments/backends/compare.py "${checkpoints[@]}" --n-samples 1000 --out "$OUT" --eval-dir "$OUT/eval"
