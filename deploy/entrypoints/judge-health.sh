#!/usr/bin/env bash
# The judge's healthcheck: vLLM's /health on this container's port answers 200.
set -euo pipefail
exec "${PYTHON:-python3}" -c '
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
' "http://127.0.0.1:${JUDGE_PORT:-8000}/health" "${TILLER_HEALTH_TIMEOUT:-5}"
