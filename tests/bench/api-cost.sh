#!/usr/bin/env bash
# Control-plane CPU per API request, for each kind of request a cold start
# makes (the target Secret, the status, an event, a Secret read), on a
# control plane of its own:
#
#   tests/bench/api-cost.sh [REQUESTS_PER_KIND=2000]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

requests="${1:-2000}"
tests/cluster/build.sh
state="$(mktemp -d "${TMPDIR:-/tmp}/tokenkeeper-api-cost.XXXXXX")"
cleanup() {
  tests/cluster/down.sh "$state"
  rm -rf "$state"
}
trap cleanup EXIT
tests/cluster/up.sh "$state"
kubectl --kubeconfig "$state/kubeconfig" apply -f crds/ >/dev/null
kubectl --kubeconfig "$state/kubeconfig" wait --for condition=established --timeout=60s -f crds/ >/dev/null
echo "control-plane CPU-milliseconds per request, $requests requests of each kind, 12 at a time"
python3 tests/bench/api_cost.py "$state" "$requests"
