#!/usr/bin/env bash
# GPU smoke test: a few real bf16 training steps of every recipe at WavLM-Large shape (random init, written
# locally: no hub) on 11 s utterances; prints per recipe s/step, the memory planner's prediction, the measured
# torch.cuda.max_memory_allocated and max_memory_reserved and both over the prediction; exits non-zero if any
# recipe fails. Budget: ~8 minutes on one H200 (timeout below). The allocator runs as the recipes' run.sh runs it
# (expandable segments unless PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF is set).
#   benchmarks/gpu_smoke.sh [--batch 8] [--steps 3] [--only adaltm,ser] [--work /tmp/gpu_smoke]
# UNTESTED on CUDA so far (written without a GPU; the Python part was run with --device cpu --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${PYTORCH_ALLOC_CONF:-}" ] || export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_smoke.sh: no CUDA device")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout "${SMOKE_TIMEOUT:-480}" "$PY" benchmarks/gpu_smoke.py --device cuda "$@"
