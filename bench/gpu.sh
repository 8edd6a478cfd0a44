#!/usr/bin/env bash
# GPU benchmarks: MFU of the 124M config and time to val loss 1.47 on tinyshakespeare-char (bench/gpu.py).
# Runs on any CUDA machine; never part of CI. Extra arguments go to bench/gpu.py (e.g. --dry-run on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
exec python -m bench.gpu "$@"
