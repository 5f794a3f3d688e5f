#!/usr/bin/env bash
# The GPU check: policy trainer vs TRL's DPOTrainer (DDP and FSDP2 on 1 GPU), token-reward scoring vs a naive
# full-vocabulary forward, and bf16 vs fp32 agreement, on a Qwen2.5-0.5B-shaped model. One JSON line per
# measurement; under 10 minutes on one H100/H200. Needs TRL for the comparison: pip install -e '.[bench]'.
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --dry-run  # tiny shapes, every code path, CPU is fine (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" bench/gpu_check.py "$@"
