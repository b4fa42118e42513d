#!/usr/bin/env bash
# Runs every test: unit tests and integration tests on a real
# kube-apiserver + etcd (+ controller-manager) that this script starts on
# free loopback ports and stops again, whatever happens.
#
#   tests/run.sh                        local control plane (built once per machine)
#   tests/run.sh --use-current-cluster  the cluster $KUBECONFIG points at (kind, k3d, ...)
#
# Extra arguments after `--` go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

use_current=false
if [[ "${1:-}" == "--use-current-cluster" ]]; then use_current=true; shift; fi
[[ "${1:-}" == "--" ]] && shift

tests/cluster/build.sh
# Headless Chromium for the browser test of the consent flow.
tests/tools/install-chromium.sh
# The image, built as the README says; tests/image.rs runs it.
tests/tools/install-buildah.sh
image_report="$(deploy/image/build.sh)"
echo "$image_report"
export TOKENKEEPER_IMAGE_ARCHIVE="$(sed -n 's/^archive *//p' <<<"$image_report")"
# The OAuth 2.0 provider of the tests (oidc-provider), from the npm registry.
if [[ ! -d tests/oauth/node_modules/oidc-provider ]]; then
  npm ci --prefix tests/oauth --no-audit --no-fund --loglevel=error
fi

if $use_current; then
  : "${KUBECONFIG:?--use-current-cluster needs KUBECONFIG}"
  export TOKENKEEPER_TEST_KUBECONFIG="$KUBECONFIG"
else
  state="$(mktemp -d "${TMPDIR:-/tmp}/tokenkeeper-test.XXXXXX")"
  cleanup() {
    tests/cluster/down.sh "$state"
    if [[ -d target/test-artifacts ]]; then cp -r "$state/logs" target/test-artifacts/control-plane-logs 2>/dev/null || true; fi
    rm -rf "$state"
  }
  trap cleanup EXIT
  tests/cluster/up.sh "$state"
  export TOKENKEEPER_TEST_KUBECONFIG="$state/kubeconfig"
fi

rm -rf target/test-artifacts
mkdir -p target/test-artifacts
kubectl --kubeconfig "$TOKENKEEPER_TEST_KUBECONFIG" apply -f crds/
kubectl --kubeconfig "$TOKENKEEPER_TEST_KUBECONFIG" wait --for condition=established --timeout=60s -f crds/ >/dev/null
# The operator under test runs as the Helm chart's ServiceAccount.
export TOKENKEEPER_TEST_OPERATOR_KUBECONFIG="$PWD/target/test-artifacts/operator.kubeconfig"
tests/cluster/operator-identity.sh "$TOKENKEEPER_TEST_KUBECONFIG" "$TOKENKEEPER_TEST_OPERATOR_KUBECONFIG"
export TOKENKEEPER_HELM="$(tests/tools/install-helm.sh)"
# promtool, for the alert rules' unit tests and the metrics lint.
export TOKENKEEPER_PROMTOOL="$(tests/tools/install-promtool.sh)"
# A registry of the tests' own, to push the image as the README says.
export TOKENKEEPER_REGISTRY="$(tests/tools/install-registry.sh)"

# fault-injection: tests/never_fall_over.rs makes one reconcile panic.
status=0
cargo test --tests --features fault-injection --locked --no-fail-fast "$@" -- --test-threads "${TOKENKEEPER_TEST_THREADS:-8}" || status=$?
# Figures some tests measure (printed, never asserted on).
if [[ -f target/test-artifacts/figures.txt ]]; then
  echo "== measured by the tests"
  cat target/test-artifacts/figures.txt
fi
exit "$status"
