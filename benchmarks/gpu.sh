#!/usr/bin/env bash
# The CUDA checks: the rephrase, generation and training benchmarks on the GPU, then the offline recipe's chain on the
# GPU (gate + batched TMaRCo in float16, 4-bit QLoRA on both arms, evaluation); on request the full-size rehearsal.
#
#   bash benchmarks/gpu.sh [OUT] [STEP ...]   (OUT: where logs and results go; default benchmarks/results/gpu)
#
# Steps (default: cuda-tests rephrase rephrase-fp32 rephrase-phases generation chain training, about 10 minutes on an
# H200; where a command may run 10 minutes at most, name them in two calls):
#   cuda-tests     pytest -m gpu: the argmax shim on CUDA tensors, float16 parity within its bounds, 4-bit training
#   rephrase       batched TMaRCo in float16 vs TrustyAI's in float32 (as each loads: not like for like)
#   rephrase-fp32  the same with the batched engine in float32 too: like for like
#   rephrase-phases  the training-set rephrase step split into its phases (start-up, scorer load, gate, model load,
#                  engine, cache writes, rescoring): why the step is slower than the engine benchmark (run after
#                  rephrase, whose rephrase.json it compares the engine's samples/s with)
#   generation     k sampled continuations per prompt: ours vs model.generate(num_return_sequences=k) vs the loop
#   chain          the offline recipe end to end on the GPU
#   training       full fine-tuning vs LoRA vs QLoRA
#   rehearsal      notebooks 1-2 of recipes/rehearsal.yaml (the tutorial at full size, hub-shaped random models,
#                  built first: about 6 GB), wall time and peak GPU memory per notebook to OUT/rehearsal.json; not in
#                  the default set. Run dir runs/rehearsal (kept: notebook 2 reads notebook 1's adapters). Where a
#                  command may run 10 minutes at most, one notebook per call:
#                    REHEARSAL_NOTEBOOKS=1-sft bash benchmarks/gpu.sh OUT rehearsal   (then =2-eval)
#
# Needs the project's environment (make setup) on a machine with CUDA; PY overrides the interpreter. Figures from it
# are in BENCHMARKS.md ("GPU" rows).
set -u
PY=${PY:-.venv/bin/python}
OUT=${1:-benchmarks/results/gpu}
shift || true
STEPS=${*:-cuda-tests rephrase rephrase-fp32 rephrase-phases generation chain training}
want() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
step() { echo "=== [$(($(date +%s) - t0)) s] $*" | tee -a "$LOG"; }

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA here: these are the GPU checks')" ||
  exit 2

if want cuda-tests; then
  step "pytest -m gpu (the CUDA checks)"
  timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15 | tee -a "$LOG"
fi

if want rephrase; then
  step "rephrase benchmark (cuda): batched float16 vs TrustyAI float32"
  timeout 190 "$PY" benchmarks/rephrase.py --force --devices cuda --sentences 100 --models zoo bart-base-random \
    --repeats 3 --budget-s 25 --warmup 20 2>&1 | grep -v "it/s\]" | tee -a "$LOG"
  cp benchmarks/results/rephrase.json "$OUT/" 2>/dev/null
fi

if want rephrase-fp32; then
  # like for like: both engines in float32; a full-length warm-up (the float16 row's first timed pass was slow)
  step "rephrase benchmark (cuda): batched float32 vs TrustyAI float32"
  timeout 240 "$PY" benchmarks/rephrase.py --force --devices cuda --batched-dtype float32 --sentences 100 \
    --models zoo bart-base-random --repeats 3 --budget-s 40 2>&1 | grep -v "it/s\]" | tee -a "$LOG"
  cp benchmarks/results/rephrase.json "$OUT/rephrase_float32.json" 2>/dev/null
fi

if want rephrase-phases; then
  step "rephrase step phases (cuda): where the training-set step's time goes"
  timeout 240 "$PY" benchmarks/rephrase_phases.py --device cuda --out "$OUT/rephrase_phases.json" 2>&1 |
    grep -v "it/s\]" | tee -a "$LOG"
fi

if want generation; then
  # the tutorial's sampling: 32 prompts x k=25, 20 new tokens, top_p 0.9, batches of 32 prompts
  step "generation benchmark (cuda)"
  timeout 240 "$PY" benchmarks/generation.py --force --device cuda --num-prompts 32 --repeats 3 2>&1 | tee -a "$LOG"
  cp benchmarks/results/generation.json "$OUT/" 2>/dev/null
fi

if want chain; then
# (the body is not indented: its heredoc's EOF must start a line)
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
fi

if want training; then
  step "training benchmark (cuda)"
  timeout 120 "$PY" benchmarks/training.py --force --device cuda 2>&1 | tee -a "$LOG"
  cp benchmarks/results/training.json "$OUT/" 2>/dev/null
fi

if want rehearsal; then
  # notebooks 1-2 at the tutorial's sizes on hub-shaped random models; rehearsal.json: per notebook wall_s and
  # peak_gpu_memory_mib (nvidia-smi, every process), and each step's time beside the token lengths it ran on
  step "rehearsal models (built once: config + save)"
  timeout 300 "$PY" -c "from detox_sft_dev import zoo; [print(zoo.resolve(n)) for n in zoo.REHEARSAL_NAMES]" 2>&1 |
    tee -a "$LOG"
  for nb in ${REHEARSAL_NOTEBOOKS:-1-sft 2-eval}; do
    step "rehearsal: notebook $nb of recipes/rehearsal.yaml (full size, random weights)"
    timeout 560 "$PY" -m detox_sft_dev.rehearsal --recipe rehearsal --notebooks "$nb" --run-dir runs/rehearsal \
      --out runs/rehearsal/rehearsal.json >>"$OUT/rehearsal.log" 2>&1
    echo "notebook $nb exit $?" | tee -a "$LOG"
  done
  cp runs/rehearsal/rehearsal.json runs/rehearsal/*.ipynb "$OUT/" 2>/dev/null && tee -a "$LOG" <"$OUT/rehearsal.json"
fi
step done
