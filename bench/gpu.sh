#!/usr/bin/env bash
# GPU benchmark (shared/design/benchmarks.md, section 3): cifar10-ict (~56M parameters) training images/s in
# fp32/bf16/fp16, EDM / sCT / sCD step times (bf16), sampling images/s at batch 512 (1 step, Heun-35), peak
# memory; random tensors, no data or network needed; under 5 minutes on one H100-class GPU.
# Result: bench/results/gpu-<gpu name>.json.
# Usage: bench/gpu.sh [--batch 128] [--repeats 5] [--smoke]   (--smoke: a tiny net, checks the script on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 290 python bench/gpu.py "$@"
