#!/usr/bin/env bash
# The scale benchmark: starts a local control plane (like tests/run.sh),
# builds tokenkeeper in release mode, and runs benches/scale with
# CONNECTIONS SourceConnections for MEASURE_SECONDS after all are Ready.
#
#   tests/bench/run.sh [CONNECTIONS] [MEASURE_SECONDS] [TOKEN_LIFETIME_SECONDS]
#
# Prints one table; the figures also go to target/bench/scale-N.json and
# the operator's log to target/bench/operator.log.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

connections="${1:-1000}"
measure="${2:-240}"
lifetime="${3:-120}"

tests/cluster/build.sh
# TOKENKEEPER_BENCH_BUILD_FLAGS, e.g. --no-default-features for heaptrack
# (which does not see mimalloc). cargo bench builds target/release/tokenkeeper
# too, with the bench profile (= release), so it is built once, here, before
# the control plane starts.
read -r -a build_flags <<<"${TOKENKEEPER_BENCH_BUILD_FLAGS:-}"
cargo bench --locked "${build_flags[@]}" --bench scale --no-run

state="$(mktemp -d "${TMPDIR:-/tmp}/tokenkeeper-bench.XXXXXX")"
cleanup() {
  tests/cluster/down.sh "$state"
  rm -rf "$state"
}
trap cleanup EXIT
tests/cluster/up.sh "$state"
export KUBECONFIG="$state/kubeconfig"
export TOKENKEEPER_BENCH_CONTROL_PLANE_PIDS="$state/pids"
kubectl apply -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s -f crds/ >/dev/null

cargo bench --locked "${build_flags[@]}" --bench scale -- \
  --connections "$connections" --measure "$measure" --token-lifetime "$lifetime" \
  --operator target/release/tokenkeeper
