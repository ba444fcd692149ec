#!/usr/bin/env bash
# GPU readiness (docs/scaling.md, "Benchmarks"): for every CIFAR-10 preset at its paper's batch, training
# images/s in fp32 and bf16 (gradient accumulation where the batch does not fit), the projected GPU-hours of its
# whole run, sampling images/s (1 step; Heun-35 for the EDM presets), sCT/sCD step time against EDM's; random tensors,
# no data or network needed; under 10 minutes on one H100/H200-class GPU. Result: bench/results/gpu-<gpu name>.json.
# Usage: bench/gpu.sh [--presets a,b] [--repeats 3] [--sample-batch 512] [--batch-gpu N] [--out FILE] [--smoke]
#   --smoke: tiny nets and batches, every code path (accumulation after a simulated out-of-memory) on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 590 python bench/gpu.py "$@"
