#!/usr/bin/env bash
# Before a GPU lease, here (where the package registry is reachable): download the wheels bench/gpu_check.py needs
# and the GPU image lacks (bench/gpu_wheels.txt), for its Python 3.12 on x86-64, into .whl/ (git-ignored). The GPU
# machine reaches no registry; carry .whl with the working tree and bench/gpu_check.sh installs them there.
#
#   bash bench/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(python3 -m pip)
"${PIP[@]}" --version >/dev/null 2>&1 || PIP=(uv pip)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --dest .whl -r bench/gpu_wheels.txt
ls .whl | wc -l | xargs printf '%s wheels in .whl/, '
du -sh .whl | cut -f1
