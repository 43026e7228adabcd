#!/bin/bash
# The first thing to run on a GPU machine: a preflight in seconds, then each GPU claim measured in its own
# time budget (10 minutes in all on one A100/H100), ending in one table of claim, measured, expected and
# verdict (also gpu.json). No network. See benchmarks/gpu.py.
#   bash benchmarks/gpu.sh [--nanogpt PATH] [--out DIR] [--steps gpu-tests,shakespeare-char,gpu-fast,gpt2-xl]
#   bash benchmarks/gpu.sh --dry-run                          # on any CPU: tiny sizes, checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" benchmarks/gpu.py "$@"
