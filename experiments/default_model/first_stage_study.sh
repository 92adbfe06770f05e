#!/usr/bin/env bash
# What keeps OpenMoji's colours in openmoji_ldm's first stage: the 250-step unconditional VAE of
# experiment=openmoji_first_stage against variants of its schedule, length, KL weight, latent width, GroupNorm
# and reconstruction error, each trained once (seed 0), then first_stage_colours.py on the same 256 images
# (PSNR, colour error, a strip per variant).
# With LDM_ON="base mse ...", then trains experiments/backends' flow LDM (experiment=openmoji_ldm_flow) on each
# of those first stages for SEEDS seeds and compares the runs with compare.py on 1,000 test images each
# (results and grids in first_stage_ldm/ here).
# Resumable: a finished variant or LDM run (its `done` file) is not retrained; compare.py reuses its reports.
#   [VARIANTS="base lr3e-3 ..."] [LDM_ON="base mse"] [SEEDS="0 1 2"] [OUT=outputs/first_stage_study] \
#     experiments/default_model/first_stage_study.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/first_stage_study}
HERE=experiments/default_model
declare -A OVERRIDES=(
  [base]=""
  # the same 250 steps with a 3x peak and a short warm-up: base spends 100 of its 250 steps warming up
  [lr3e-3]="model.optimizer.lr=3e-3 model.lr_scheduler.num_warmup_steps=25"
  # twice the steps at base's schedule
  [steps500]="trainer.max_steps=500 trainer.val_check_interval=500"
  # 4x the steps: the length of experiment=openmoji_vae
  [steps1000]="trainer.max_steps=1000 trainer.val_check_interval=1000"
  # a 10x weaker KL (closer to a plain autoencoder)
  [kl1e-3]="generator.kl_weight=1e-3"
  # 8 latent channels instead of 4 (6x compression instead of 12x); the latent denoiser's cost barely changes
  [latent8]="generator.autoencoder.latent_channels=8"
  # GroupNorm of 4 channels a group (Stable Diffusion's VAE: 128 channels, 32 groups) instead of 32 groups over
  # the top level's 32 channels, where each group is one channel: an instance norm that erases each channel's
  # per-image mean and scale right before the decoder's output convolution
  [groups8]="generator.autoencoder.norm_num_groups=8"
  # one group: a layer norm over channels and pixels, nothing erased between channels
  [groups1]="generator.autoencoder.norm_num_groups=1"
  # squared instead of absolute error: L1 pushes a nearly-right white pixel as hard as a yellow one drawn brown
  [mse]="generator.reconstruction=mse"
)
VARIANTS=${VARIANTS:-base lr3e-3 steps500 kl1e-3 latent8 groups8 groups1 mse steps1000}
checkpoints=()
for variant in $VARIANTS; do
  dir=$OUT/$variant
  if [ ! -e "$dir/done" ]; then
    # shellcheck disable=SC2086  # the overrides are a list
    "$PY" -m text2img.train experiment=openmoji_first_stage ${OVERRIDES[$variant]} seed=0 logger=csv hydra.run.dir="$dir"
    touch "$dir/done"
  fi
  checkpoints+=("$dir/checkpoints/last.ckpt")
done
# --pca: fixed linear codes of 4x4 patches, 4 channels (the VAE's latent shape), 8 and 16, for reference
"$PY" $HERE/first_stage_colours.py "${checkpoints[@]}" --pca 4 8 16 --strips $HERE/first_stages \
  --json $HERE/first_stage_results.json

ldm_runs=()
for seed in ${SEEDS:-0 1 2}; do
  for variant in ${LDM_ON:-}; do
    dir=$OUT/ldm/$variant-s$seed
    if [ ! -e "$dir/done" ]; then
      # ckpt_path=last: a fresh start when the folder has no checkpoint yet
      "$PY" -m text2img.train experiment=openmoji_ldm_flow \
        generator.first_stage.source="$OUT/$variant/checkpoints/last.ckpt" seed="$seed" test=false logger=csv \
        ckpt_path=last hydra.run.dir="$dir"
      touch "$dir/done"
    fi
    ldm_runs+=("ldm_flow_$variant-s$seed=$dir/checkpoints/last.ckpt")
  done
done
if [ ${#ldm_runs[@]} -gt 0 ]; then
  "$PY" experiments/backends/compare.py "${ldm_runs[@]}" --n-samples 1000 --out $HERE/first_stage_ldm \
    --eval-dir "$OUT/ldm/eval"
fi
