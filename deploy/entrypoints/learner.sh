#!/usr/bin/env bash
# Learner: trains from the annotated log, gates candidates on the live server ($TILLER_TARGET),
# publishes and promotes versions into $TILLER_REGISTRY, which every server replica follows.
# Config: $TILLER_LEARN_CONFIG (a template). Extra arguments go to `tiller learn`.
set -euo pipefail
# shellcheck source=deploy/entrypoints/defaults.sh
source "$(dirname "$0")/defaults.sh"
template=${TILLER_LEARN_CONFIG:-$TILLER_CONFIG_DIR/learn.toml}
export TILLER_ADAPTER=${TILLER_ADAPTER:-steer}
mkdir -p "$TILLER_REGISTRY" "$TILLER_LEARN_WORKDIR"
config=$(render "$template" learn.toml)
# glibc otherwise keeps freed activation buffers: 6.7 vs 3.7 GiB peak RSS (bench/learner_memory.py)
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-131072}"
exec tiller learn --config "$config" --no-progress "$@"
