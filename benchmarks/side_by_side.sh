#!/bin/bash
# The figures of issue 7, measured side by side with upstream nanoGPT on this machine.
# Run on a quiet machine (nothing else using the cores): the bench records the load average.
#   benchmarks/side_by_side.sh [NANOGPT_DIR] [INPUT_TXT]
# nanoGPT is never vendored: clone it anywhere (tested at karpathy/nanoGPT 3adf61e), e.g.
#   git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
# The bench copies its train.py, model.py, configurator.py and data/shakespeare_char/prepare.py into a
# temp folder and makes its data there with its own prepare.py from the same input.txt (numpy and
# requests must be installed; nothing is downloaded), checked byte for byte against ours. Without
# INPUT_TXT, Tiny Shakespeare is the copy bundled with nanorepro.
# About 25 minutes on 2 cores: step 1 ~3 min, step 2 ~5 min, step 3 ~15 min.
set -euo pipefail
NANOGPT=${1:-/tmp/nanoGPT}
input=()
[ -z "${2:-}" ] || input=(--input "$2")
mkdir -p results/bench
nanorepro prepare "${input[@]}" --encoding char            # data/shakespeare_char

# 1. Same config (the faithful CPU recipe), per-iteration speed, 3 alternating pairs
nanorepro bench --preset shakespeare-char-cpu --nanogpt "$NANOGPT" --pairs 3 --iters 300 --warmup 20 "${input[@]}" \
  --out results/bench/cpu-recipe-vs-nanogpt.json

# 2. Time to val <= 1.88: the quick preset against nanoGPT's CPU recipe (which ends at ~1.886), 3 pairs
nanorepro bench --preset shakespeare-char-cpu-quick --nanogpt "$NANOGPT" --nanogpt-preset shakespeare-char-cpu \
  --target-loss 1.88 --pairs 3 "${input[@]}" --out results/bench/cpu-quick-vs-nanogpt.json

# 3. Val <= 1.50 within 15 minutes with the tuned preset (the run stops at the first evaluation reaching it)
nanorepro bench --preset shakespeare-char-cpu-tuned --target-loss 1.50 --out results/bench/cpu-tuned.json
