#!/usr/bin/env bash
# make train's latent diffusion (experiment=openmoji_ldm: UNet, v-prediction, 1,000 steps) on its trained VAE
# first stage against generator/first_stage=patch_pca variants: 16 or 8 whitened components, or 16 half-whitened
# (the fine components kept smaller than the coarse ones). SEEDS seeds each, then compare.py on 1,000 test
# images per run (results and grids in RESULTS, patch_code/ here). trainer.max_time=null: every run makes its steps,
# however busy the machine.
# Resumable: a finished run (its `done` file) is not retrained, one cut off resumes from its last.ckpt, and
# compare.py reuses its evaluation reports.
# Overrides after the script apply to every run, e.g. at twice the steps (give it its own OUT and RESULTS):
#   [VARIANTS="vae pca16 pca8 pca16_w05"] [SEEDS="0 1 2"] [OUT=outputs/patch_code_study] \
#     [RESULTS=experiments/default_model/patch_code] experiments/default_model/patch_code_study.sh [overrides ...]
#   OUT=outputs/patch_code_2000 RESULTS=experiments/default_model/patch_code_2000 VARIANTS="vae pca8" \
#     experiments/default_model/patch_code_study.sh trainer.max_steps=2000 trainer.val_check_interval=1000
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/patch_code_study}
RESULTS=${RESULTS:-experiments/default_model/patch_code}
declare -A OVERRIDES=(
  [vae]=""
  [pca16]="generator/first_stage=patch_pca"
  [pca8]="generator/first_stage=patch_pca generator.first_stage.latent_channels=8"
  [pca16_w05]="generator/first_stage=patch_pca generator.first_stage.whitening=0.5"
)
checkpoints=()
# seeds outside, variants inside: a study cut short has every variant at its first seeds
for seed in ${SEEDS:-0 1 2}; do
  for variant in ${VARIANTS:-vae pca16 pca8 pca16_w05}; do
    dir=$OUT/runs/$variant-s$seed
    if [ ! -e "$dir/done" ]; then
      # shellcheck disable=SC2086  # the overrides are a list
      "$PY" -m text2img.train experiment=openmoji_ldm ${OVERRIDES[$variant]} seed="$seed" trainer.max_time=null \
        test=false logger=csv ckpt_path=last "$@" hydra.run.dir="$dir"
      touch "$dir/done"
    fi
    checkpoints+=("$variant-s$seed=$dir/checkpoints/last.ckpt")
  done
done
"$PY" experiments/backends/compare.py "${checkpoints[@]}" --n-samples 1000 --out "$RESULTS" \
  --eval-dir "$OUT/eval"
