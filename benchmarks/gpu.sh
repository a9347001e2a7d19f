#!/usr/bin/env bash
# The CUDA checks in one go (about 6 minutes on an H200): the rephrase, generation and training benchmarks on the GPU,
# then the offline recipe's chain on the GPU (gate + batched TMaRCo in float16, 4-bit QLoRA on both arms, evaluation).
#
#   bash benchmarks/gpu.sh [OUT]        (OUT: where logs and results go; default benchmarks/results/gpu)
#
# Needs the project's environment (make setup) on a machine with CUDA; PY overrides the interpreter. Figures from it
# are in BENCHMARKS.md ("GPU" rows).
set -u
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
step() { echo "=== [$(($(date +%s) - t0)) s] $*" | tee -a "$LOG"; }

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA here: these are the GPU checks')" ||
  exit 2

step "rephrase benchmark (cuda)"
timeout 190 "$PY" benchmarks/rephrase.py --devices cuda --sentences 100 --models zoo bart-base-random \
  --repeats 3 --budget-s 25 --warmup 20 2>&1 | grep -v "it/s\]" | tee -a "$LOG"
cp benchmarks/results/rephrase.json "$OUT/" 2>/dev/null

step "generation benchmark (cuda)"
timeout 90 "$PY" benchmarks/generation.py --device cuda 2>&1 | tee -a "$LOG"
cp benchmarks/results/generation.json "$OUT/" 2>/dev/null

step "offline chain on cuda: rephrase (gate + batched TMaRCo), QLoRA train both arms, evaluate"
run=$(mktemp -d)
sed -e 's/device: cpu/device: cuda/' -e 's/^name: offline/name: offline-cuda/' recipes/offline.yaml >"$run/recipe.yaml"
timeout 200 bash -c "
'$PY' - <<EOF
import time
from detox_sft.config import load_recipe
from detox_sft.data import load_train_dataset
from detox_sft.rephrase import detoxify_training_set
r = load_recipe('$run/recipe.yaml', run_dir='$run')
start = time.perf_counter()
_, summary = detoxify_training_set(r, load_train_dataset(r.data, r.seed)['train'], progress=False)
print('rephrase step', round(time.perf_counter() - start, 1), 's:', summary)
EOF
'$PY' -m detox_sft.cli train --recipe '$run/recipe.yaml' --run-dir '$run' --arm both &&
'$PY' -m detox_sft.cli evaluate --recipe '$run/recipe.yaml' --run-dir '$run' --quiet
" >"$OUT/chain.log" 2>&1
grep -v -e "it/s\]" -e "examples/s\]" -e "Warning" -e "warnings.warn" "$OUT/chain.log" | tail -45 | tee -a "$LOG"
(cd "$run" && tar czf "$OUT/chain.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude=cache \
  data/rephrase_summary.jsonl adapters eval figures 2>/dev/null)
rm -rf "$run"

step "training benchmark (cuda)"
timeout 120 "$PY" benchmarks/training.py --device cuda 2>&1 | tee -a "$LOG"
cp benchmarks/results/training.json "$OUT/" 2>/dev/null
step done
