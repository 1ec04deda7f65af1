#!/usr/bin/env bash
# Annotator sidecar: follows one log shard ($TILLER_LOG_DB) with the providers of
# $TILLER_ANNOTATE_CONFIG (a template; ${VARS} come from the environment).
# Extra arguments go to `tiller annotate` (e.g. --once).
set -euo pipefail
# shellcheck source=deploy/entrypoints/defaults.sh
source "$(dirname "$0")/defaults.sh"
template=${TILLER_ANNOTATE_CONFIG:-$TILLER_CONFIG_DIR/annotate.toml}
export TILLER_JUDGE_MODEL_NAME=${TILLER_JUDGE_MODEL_NAME:-judge}
mkdir -p "$(dirname "$TILLER_LOG_DB")"
config=$(render "$template" annotate.toml)
exec tiller annotate --config "$config" "$@"
