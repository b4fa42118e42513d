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
setsid "$REPO/target/debug/tokenkeeper" run >"$STATE/logs/tokenkeeper.log" 2>&1 </dev/null &
echo "tokenkeeper $!" >>"$STATE/pids"

kubectl apply -f deploy/examples/basic-postgres.yaml -f deploy/examples/apikey-stripe.yaml
kubectl wait --for condition=Ready --timeout=60s sourceconnection/warehouse-db sourceconnection/stripe >/dev/null

echo
echo "\$ kubectl get srcconn"
kubectl get srcconn
echo
echo "\$ kubectl describe srcconn warehouse-db"
kubectl describe srcconn warehouse-db
cat <<MSG

tokenkeeper is running (log: $STATE/logs/tokenkeeper.log). To use this cluster:

  export KUBECONFIG=$STATE/kubeconfig

Stop everything with: deploy/local/down.sh
MSG
