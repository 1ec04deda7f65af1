#!/usr/bin/env bash
# The server image's HEALTHCHECK: grpc.health.v1 Check on this container's port; 0 = SERVING.
set -euo pipefail
exec tiller health --quiet --target "127.0.0.1:${TILLER_PORT:-50051}" \
  --timeout "${TILLER_HEALTH_TIMEOUT:-5}"
