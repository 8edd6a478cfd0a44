#!/usr/bin/env bash
# The CPU benchmark suite (docs/benchmarks.md): every figure is a ratio against a baseline measured in the
# same run. Arguments go to `python -m bench` (--threads N, --only train,ttq,decode,prepare, --nanogpt DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Thread|Core" || true
exec python -m bench "$@"
