#!/usr/bin/env bash
# Two bf16 training steps of every trl_tip trainer on one GPU, offline: transformers generation, QLoRA when
# bitsandbytes is installed, vLLM colocate generation when vllm is installed. A few minutes; one verdict line each.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'" \
  || { echo "verdict: no CUDA device visible"; exit 1; }
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$python" scripts/gpu_smoke.py --device cuda "$@"
