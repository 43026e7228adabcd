#!/bin/bash
# Measure this machine's GPU in one command (at most ~10 minutes, no network): see benchmarks/gpu.py.
#   bash benchmarks/gpu.sh [--nanogpt PATH] [--out DIR]     # on a GPU node, after `make install`
#   bash benchmarks/gpu.sh --dry-run                          # on any CPU: tiny sizes, checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" benchmarks/gpu.py "$@"
