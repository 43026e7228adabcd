#!/bin/bash
# One tuning experiment, in the background: a real `nanorepro train` run of the CPU recipe plus overrides.
#   benchmarks/tune.sh NAME THREADS [--field=value ...]     (log: $TUNE_DIR/NAME.log, run: $TUNE_DIR/NAME)
# The val losses it logs per iteration do not depend on machine load; time per iteration does
# (measure that with benchmarks/cpu_step.py). Needs data/shakespeare_char (`nanorepro prepare`).
set -euo pipefail
name=$1; threads=$2; shift 2
dir=${TUNE_DIR:-runs/tune}
mkdir -p "$dir"
OMP_NUM_THREADS=$threads nohup nanorepro train --preset shakespeare-char-cpu --out-dir "$dir/$name" \
  --dtype=bfloat16 --log_interval=50 --eval_interval=100 --eval_iters=50 "$@" > "$dir/$name.log" 2>&1 < /dev/null &
echo "$name: pid $!, OMP_NUM_THREADS=$threads, log $dir/$name.log"
