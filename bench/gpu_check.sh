#!/usr/bin/env bash
# On a GPU machine: install Tiller's [gpu] extra, then print Tiller ÷ `vllm serve` tok/s, the
# steering k=4 overhead and the hot-swap latency on a small model, in under 10 minutes.
#
#   bench/gpu_check.sh [--dry-run] [--model tiny|smollm2|DIR] [--out DIR]
#
# --dry-run prints the commands without running them (works on any machine). The figures come
# from bench/serve_throughput.py, bench/steer_overhead.py and bench/hotswap.py (their JSON in
# --out); both servers of the throughput ratio get the same engine arguments.
set -euo pipefail

dry_run=0
model=tiny
out=bench/out/gpu_check
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --model) model="$2"; shift ;;
    --out) out="$2"; shift ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
deadline=$((SECONDS + 570)) # the whole check, install included

# step LIMIT_S CMD...: print the command; unless --dry-run, run it within LIMIT_S seconds and
# what is left of the deadline.
step() {
  local limit="$1"
  shift
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ $dry_run -eq 1 ]]; then
    return 0
  fi
  local left=$((deadline - SECONDS))
  if ((left < limit)); then limit=$left; fi
  if ((limit <= 0)); then
    echo "gpu_check: out of time before: $*" >&2
    return 1
  fi
  timeout "$limit" "$@"
}

# the bench scripts also need tqdm, and tokenizers to build the tiny model
step 150 "$py" -m pip install --no-build-isolation -e ".[gpu]" tqdm tokenizers
step 30 "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
step 240 "$py" bench/serve_throughput.py --model "$model" --requests 128 --rounds 1 \
  --gpu-memory-utilization 0.9 --out "$out/serve_throughput.json"
step 150 "$py" bench/steer_overhead.py --model "$model" --requests 96 --rounds 1 \
  --out "$out/steer_overhead.json"
step 120 "$py" bench/hotswap.py --model "$model" --duration 60 --out "$out/hotswap.json"

summary='
import json, statistics, sys
out = sys.argv[1]
tp = json.load(open(f"{out}/serve_throughput.json"))["tiller_ratio"]["vllm-serve"]
steer = json.load(open(f"{out}/steer_overhead.json"))["ratios"]["k=4 low-rank"]
swap = json.load(open(f"{out}/hotswap.json"))["swap_latency_s"]
print(f"Tiller ÷ vllm serve tok/s: {tp:.2f}")
print(f"steering k=4 overhead: {(1 - steer) * 100:.1f}% (steered/unsteered {steer:.3f})")
print(f"hot-swap latency: median {statistics.median(swap):.3f} s, max {max(swap):.3f} s")
'
step 30 "$py" -c "$summary" "$out"
