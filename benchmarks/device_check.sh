#!/usr/bin/env bash
# One prepared GPU check (issue 16): node training, a 100-node simulation, exact top-k
# and the LM step, GPU vs CPU, in one JSON file (benchmarks/device_check.py says what
# each figure is).  Bounded to 8 minutes; fails at once, with exit status 3 and one line,
# where torch sees no CUDA GPU.
#
#   bash benchmarks/device_check.sh [--out runs/bench/device_check.json] [--parts topk,node,llm,simulation] [--quick]
#
# PYTHON: the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export RAY_DEDUP_LOGS="${RAY_DEDUP_LOGS:-0}"
# 480 s hard stop; the module's own deadline (450 s) skips parts before it comes to that
exec timeout --kill-after=15 480 "$PYTHON" -m benchmarks.device_check "$@"
