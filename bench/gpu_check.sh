#!/usr/bin/env bash
# The GPU check: the policy trainer's precisions, packing and compile against TRL's DPOTrainer, token-reward scoring
# vs a naive full-vocabulary forward, on a Qwen2.5-0.5B-shaped model. One JSON line per measurement; under 8 minutes
# on one H100/H200 (bench/gpu_check.py says what each line is).
#
#   bash bench/gpu_prepare.sh          # here first: the wheels the GPU image lacks, into .whl/
#   bash bench/gpu_check.sh            # on the GPU machine, with .whl carried
#   bash bench/gpu_check.sh --dry-run  # tiny shapes, every code path, CPU is fine (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PYTHON=.venv/bin/python
elif [ -z "${PYTHON:-}" ]; then
  # The GPU image: its python3 holds torch. Install the carried wheels and this repository (no index, no network).
  site="${TMPDIR:-/tmp}/creditflow-gpu-site"
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run bash bench/gpu_prepare.sh here and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  # This repository as the installed package lays it out (pyproject.toml's package-dir), without a build step.
  mkdir -p "$site/creditflow" && cp -r creditflow/. "$site/creditflow/"
  for part in configs flows storage tasks; do ln -sfn "$PWD/$part" "$site/creditflow/$part"; done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  PYTHON=python3
fi
"$PYTHON" -c 'import sys, torch, transformers; print("# python", sys.version.split()[0], "torch", torch.__version__,
  "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
exec "$PYTHON" bench/gpu_check.py "$@"
