#!/usr/bin/env bash
# GPU check on a machine with NVIDIA GPUs (no Spark or Java needed): GPT-2 small (124M, random init),
# packed 1024-token blocks, bf16, fused AdamW, torchrun over every GPU, eager and torch.compile;
# prints tokens/s and MFU. Extra arguments go to bench/gpu_check.py (e.g. --steps 100 --batch-size 24).
#   bash bench/gpu_check.sh
#   SPARKTUNE_SHARED=/path/to/shared bash bench/gpu_check.sh --work /tmp/gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
  echo "gpu_check.sh: nvidia-smi failed: no NVIDIA GPU here (use: python bench/gpu_check.py --smoke)" >&2; exit 1; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python bench/gpu_check.py --json "$@"
