#!/usr/bin/env bash
# Every method family on a DeepSeek-V2-Lite shape twin on one CUDA GPU, offline, in minutes;
# prints a table and the extrapolation to the full 27-layer model. See bench/gpu_smoke.py.
#   bash bench/gpu_smoke.sh          # GPU
#   bash bench/gpu_smoke.sh --cpu    # the CI dry run of the same code on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python bench/gpu_smoke.py "$@"
