#!/bin/bash
# The CPU figures, measured side by side with upstream nanoGPT on this machine.
# Run on a quiet machine (nothing else using the cores): the bench records the load average, the CPU's
# kind (AVX-512, native bf16, AMX) and the CPUs it may use. On one core of a busy machine:
#   OMP_NUM_THREADS=1 taskset -c 0 benchmarks/side_by_side.sh [NANOGPT_DIR] [INPUT_TXT]
#   benchmarks/side_by_side.sh [NANOGPT_DIR] [INPUT_TXT]
# nanoGPT is never vendored: clone it anywhere (tested at karpathy/nanoGPT 3adf61e), e.g.
#   git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
# The bench copies its train.py, model.py, configurator.py and data/shakespeare_char/prepare.py into a
# temp folder and makes its data there with its own prepare.py from the same input.txt (numpy and
# requests must be installed; nothing is downloaded), checked byte for byte against ours. Without
# INPUT_TXT, Tiny Shakespeare is the copy bundled with nanorepro.
# Steps 1-2 take ~10 min on 2 cores with native bf16, ~20 min on one AVX2 core; step 3 ~12 min with
# native bf16 and about an hour on one AVX2 core (PAIRS=1 STEPS=12 runs only steps 1-2).
set -euo pipefail
NANOGPT=${1:-/tmp/nanoGPT}
PAIRS=${PAIRS:-3}
STEPS=${STEPS:-123}
input=()
[ -z "${2:-}" ] || input=(--input "$2")
mkdir -p results/bench
nanorepro prepare "${input[@]}" --encoding char            # data/shakespeare_char

if [[ $STEPS == *1* ]]; then
# 1. Same config (the faithful CPU recipe), per-iteration speed, 3 alternating pairs
nanorepro bench --preset shakespeare-char-cpu --nanogpt "$NANOGPT" --pairs 3 --iters 300 --warmup 20 "${input[@]}" \
  --out results/bench/cpu-recipe-vs-nanogpt.json
fi

if [[ $STEPS == *2* ]]; then
# 2. Time to val <= 1.88: the quick preset against nanoGPT's CPU recipe (which ends at ~1.886)
nanorepro bench --preset shakespeare-char-cpu-quick --nanogpt "$NANOGPT" --nanogpt-preset shakespeare-char-cpu \
  --target-loss 1.88 --pairs "$PAIRS" "${input[@]}" --out results/bench/cpu-quick-vs-nanogpt.json
fi

if [[ $STEPS == *3* ]]; then
# 3. Time to the baby GPT's A100 result with a margin, val <= 1.4650, with the tuned preset, against nanoGPT's
#    CPU recipe (the goal: at most 2.3x its time; the run stops at the first evaluation reaching it)
nanorepro bench --preset shakespeare-char-cpu-tuned --nanogpt "$NANOGPT" --nanogpt-preset shakespeare-char-cpu \
  --target-loss 1.4650 --pairs 1 "${input[@]}" --out results/bench/cpu-tuned-vs-nanogpt.json
fi
