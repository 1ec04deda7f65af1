# shellcheck shell=bash
# Sourced by every entrypoint: the environment they share, with defaults for the images.
# Everything is an environment variable so that compose, Kubernetes and the tests
# (tests/deploy/test_entrypoints.py, which runs these scripts outside docker) set the same knobs.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHON=${PYTHON:-python3}
export TILLER_DATA=${TILLER_DATA:-/data}                      # the shared volume
export TILLER_LOG_SHARD=${TILLER_LOG_SHARD:-generations}      # one log file per server replica
export TILLER_LOG_DB=${TILLER_LOG_DB:-$TILLER_DATA/logs/$TILLER_LOG_SHARD.sqlite}
export TILLER_REGISTRY=${TILLER_REGISTRY:-$TILLER_DATA/registry}
export TILLER_LEARN_DB=${TILLER_LEARN_DB:-$TILLER_LOG_DB}      # learner: its records (with shards)
export TILLER_LEARN_SHARDS=${TILLER_LEARN_SHARDS:-[]}          # learner: TOML list of shard globs
export TILLER_LEARN_WORKDIR=${TILLER_LEARN_WORKDIR:-$TILLER_DATA/learner}  # gate candidates too
export TILLER_CACHE_DIR=${TILLER_CACHE_DIR:-$HOME/.cache/tiller}
export TILLER_MODEL=${TILLER_MODEL:-$TILLER_CACHE_DIR/models/SmolLM2-135M-Instruct}
export TILLER_BASE_MODEL=${TILLER_BASE_MODEL:-$(basename "$TILLER_MODEL")}
export TILLER_PORT=${TILLER_PORT:-50051}
export TILLER_TARGET=${TILLER_TARGET:-127.0.0.1:$TILLER_PORT}  # where workers reach the server
export TILLER_JUDGE_URL=${TILLER_JUDGE_URL:-http://judge:8000/v1}
export TILLER_CONFIG_DIR=${TILLER_CONFIG_DIR:-$(cd "$here/../config" && pwd)}

# render TEMPLATE NAME: fill the template's placeholders from the environment into a private
# copy and print its path. A variable the template names but the environment lacks is an error, not "".
render() {
  local out
  out=$(mktemp -d)/"$2"
  "$PYTHON" -c '
import os, string, sys
text = string.Template(open(sys.argv[1]).read()).substitute(os.environ)
open(sys.argv[2], "w").write(text)
' "$1" "$out" || return 1
  echo "$out"
}
