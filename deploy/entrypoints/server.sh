#!/usr/bin/env bash
# Tiller server: gRPC on 0.0.0.0:$TILLER_PORT, this replica's log shard, hot-swap from the registry.
# Extra arguments go to `tiller serve` (compose `command:`, Kubernetes `args:`).
set -euo pipefail
# shellcheck source=deploy/entrypoints/defaults.sh
source "$(dirname "$0")/defaults.sh"
mkdir -p "$(dirname "$TILLER_LOG_DB")" "$TILLER_REGISTRY" "$TILLER_LEARN_WORKDIR"
# Admin LoadAdapter may only load from the registry and the learner's gate candidates.
args=(
  serve
  --model "$TILLER_MODEL"
  --host "${TILLER_HOST:-0.0.0.0}"
  --port "$TILLER_PORT"
  --log-db "$TILLER_LOG_DB"
  --registry "$TILLER_REGISTRY"
  --enable-admin
  --adapter-root "$TILLER_REGISTRY"
  --adapter-root "$TILLER_LEARN_WORKDIR"
  --drain-grace "${TILLER_DRAIN_GRACE:-30}"
)
# Bearer tokens with roles (server/auth.py); unset = no authentication. The learner's token
# needs the admin role (its gate loads candidates over the admin RPCs on this port).
if [[ -n "${TILLER_TOKENS_FILE:-}" ]]; then
  args+=(--tokens "$TILLER_TOKENS_FILE")
fi
if [[ -n "${TILLER_METRICS_PORT:-}" ]]; then
  args+=(--metrics-host "${TILLER_METRICS_HOST:-0.0.0.0}" --metrics-port "$TILLER_METRICS_PORT")
fi
exec tiller "${args[@]}" "$@"
