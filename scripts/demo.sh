#!/usr/bin/env bash
# The main job on the embedded default model: prune SmolLM2-135M-Instruct with SparseGPT 2:4 on a small
# C4 calibration set, evaluate a few WikiText-2 windows before and after, and save checkpoint + record.
# Extra arguments go to `oneshot prune` (e.g. --method wanda --pattern unstructured).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export ONESHOT_DATA_DIR="${ONESHOT_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/oneshot prune --method sparsegpt --pattern 2:4 --calib c4 --nsamples 16 --seqlen 512 \
  --eval-windows 8 --out runs/smollm2-sparsegpt-2of4 --overwrite "$@"
