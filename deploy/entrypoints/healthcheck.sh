#!/usr/bin/env bash
# The server image's HEALTHCHECK: grpc.health.v1 Check on this container's port; 0 = SERVING.
# TILLER_HEALTH_TLS_CA: the server serves TLS; verify it with this PEM CA.
set -euo pipefail
tls=()
if [[ -n "${TILLER_HEALTH_TLS_CA:-}" ]]; then
  tls=(--tls-ca "$TILLER_HEALTH_TLS_CA")
fi
exec tiller health --quiet --target "127.0.0.1:${TILLER_PORT:-50051}" \
  --timeout "${TILLER_HEALTH_TIMEOUT:-5}" "${tls[@]}"
