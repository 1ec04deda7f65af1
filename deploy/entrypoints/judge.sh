#!/usr/bin/env bash
# The judge: vLLM's own OpenAI-compatible server, model served as "judge" on $JUDGE_PORT.
# Extra arguments go to vllm.entrypoints.openai.api_server (e.g. --tensor-parallel-size 2).
set -euo pipefail
# shellcheck source=deploy/entrypoints/defaults.sh
source "$(dirname "$0")/defaults.sh"
# One engine-core process with the worker inside: faster on CPUs; GPU images may set it to 1.
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
exec "$PYTHON" -m vllm.entrypoints.openai.api_server \
  --model "${JUDGE_MODEL:-$TILLER_MODEL}" \
  --served-model-name "${TILLER_JUDGE_MODEL_NAME:-judge}" \
  --host "${JUDGE_HOST:-0.0.0.0}" \
  --port "${JUDGE_PORT:-8000}" \
  --max-model-len "${JUDGE_MAX_MODEL_LEN:-2048}" \
  --dtype "${JUDGE_DTYPE:-auto}" \
  --gpu-memory-utilization "${JUDGE_GPU_MEMORY_UTILIZATION:-0.3}" \
  "$@"
