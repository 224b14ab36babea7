#!/usr/bin/env bash
# The accelerated public network on a lent NVIDIA machine (scripts/gpu_check.py): sealnet's TensorRT plan vs a
# bare TensorRT engine vs ONNX Runtime's CUDA / TensorRT providers vs the CPU, at batch 64. GPU parts are skipped,
# each with its reason, where the machine lacks them. One command, a few minutes:
#   scripts/gpu_check.sh [--out DIR] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  echo "[gpu_check] no nvidia-smi: no NVIDIA GPU here; the TensorRT and CUDA rows will be skipped" >&2
fi
exec timeout 480 "$PY" scripts/gpu_check.py "$@"
