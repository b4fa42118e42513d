#!/usr/bin/env bash
# Brings up tokenkeeper on a real local Kubernetes control plane
# (etcd + kube-apiserver + kube-controller-manager, built once per machine
# from Debian's source package), applies the examples and shows them.
# Leaves everything running; deploy/local/down.sh stops it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO="$PWD"
STATE="${TOKENKEEPER_DEMO_DIR:-$REPO/.tokenkeeper/demo}"

tests/cluster/up.sh "$STATE"
export KUBECONFIG="$STATE/kubeconfig"

echo "[demo] building tokenkeeper" >&2
cargo build --locked --quiet --bin tokenkeeper

kubectl apply -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s -f crds/ >/dev/null

# Restart the operator so that a rebuilt binary takes over.
if grep -q '^tokenkeeper ' "$STATE/pids" 2>/dev/null; then
  old_pid="$(awk '$1 == "tokenkeeper" {print $2}' "$STATE/pids")"
  kill -TERM "$old_pid" 2>/dev/null || true
  sed -i '/^tokenkeeper /d' "$STATE/pids"
fi
# The demo provider's tokens live 2 minutes, so that refreshes show within
# minutes; the default 2-minute propagation margin cannot fit them, 30 s can.
setsid "$REPO/target/debug/tokenkeeper" run --allow-plain-http-loopback --refresh-propagation-margin-seconds 30 \
  >"$STATE/logs/tokenkeeper.log" 2>&1 </dev/null &
echo "tokenkeeper $!" >>"$STATE/pids"

# A local OAuth 2.0 provider (oidc-provider, the one the tests use) for the
# OAuth example, since no real provider is reachable from here.
if [[ ! -d tests/oauth/node_modules/oidc-provider ]]; then
  npm ci --prefix tests/oauth --no-audit --no-fund --loglevel=error
fi
if grep -q '^oauth-provider ' "$STATE/pids" 2>/dev/null; then
  kill -TERM "$(awk '$1 == "oauth-provider" {print $2}' "$STATE/pids")" 2>/dev/null || true
  sed -i '/^oauth-provider /d' "$STATE/pids"
fi
setsid node tests/oauth/server.mjs '{"accessTokenTtl": 120}' >"$STATE/logs/oauth-provider.out" 2>"$STATE/logs/oauth-provider.log" </dev/null &
echo "oauth-provider $!" >>"$STATE/pids"
for _ in $(seq 1 50); do [[ -s "$STATE/logs/oauth-provider.out" ]] && break; sleep 0.2; done
provider_port="$(sed -n 's/.*"port":\([0-9]*\).*/\1/p' "$STATE/logs/oauth-provider.out")"

kubectl apply -f deploy/examples/basic-postgres.yaml -f deploy/examples/apikey-stripe.yaml
sed "s#http://127.0.0.1:9400#http://127.0.0.1:$provider_port#" deploy/examples/oauth-client-credentials.yaml | kubectl apply -f -
kubectl wait --for condition=Ready --timeout=60s \
  sourceconnection/warehouse-db sourceconnection/stripe sourceconnection/crm-reporting >/dev/null

echo
echo "\$ kubectl get srcconn"
kubectl get srcconn
echo
echo "\$ kubectl describe srcconn crm-reporting"
kubectl describe srcconn crm-reporting
cat <<MSG

tokenkeeper is running (log: $STATE/logs/tokenkeeper.log). To use this cluster:

  export KUBECONFIG=$STATE/kubeconfig

Stop everything with: deploy/local/down.sh
MSG
