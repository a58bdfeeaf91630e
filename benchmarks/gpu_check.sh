#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): scorer vs a training step and the anchors in fp32 and
# bf16 autocast, and, where Ray is installed, a query with GPU scoring and one Ray Train epoch.
# Needs only torch and torchvision for the scorer part. Writes gpu_check.json and prints a table.
#
#   benchmarks/gpu_check.sh                       # on a machine with one GPU, about 8 minutes
#   benchmarks/gpu_check.sh --out /tmp/gpu.json
#   PYTHON=/path/to/python benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# 8 minutes of work plus slack for CUDA start-up; the script itself stops starting rows in time.
exec timeout 600 "$python" -m benchmarks.gpu_check "$@"
