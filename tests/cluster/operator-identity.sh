#!/usr/bin/env bash
# Gives the operator of the tests the identity the Helm chart gives it: the
# chart's ServiceAccount and RBAC, installed in tokenkeeper-system, and a
# kubeconfig with a token for that ServiceAccount (TokenRequest). Tests run
# the operator with it, never as admin, so every scenario proves the RBAC.
#   operator-identity.sh ADMIN_KUBECONFIG OUT_KUBECONFIG
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
admin="$1"; out="$2"
namespace=tokenkeeper-system
helm="$(tests/tools/install-helm.sh)"
k() { kubectl --kubeconfig "$admin" "$@"; }
k get namespace "$namespace" >/dev/null 2>&1 || k create namespace "$namespace" >/dev/null
"$helm" template tokenkeeper charts/tokenkeeper --namespace "$namespace" --set crds.install=false \
  | k apply -n "$namespace" -f - >/dev/null
token="$(k create token tokenkeeper -n "$namespace" --duration=24h)"
# The user's cluster entry as it is (server, CA file or data, insecure-skip-
# tls-verify, tls-server-name, proxy-url, ...), CA files inlined, with the
# ServiceAccount's token as the only credential.
k config view --minify --raw --flatten -o json | python3 -c '
import json, sys
token, out = sys.argv[1], sys.argv[2]
cluster = json.load(sys.stdin)["clusters"][0]["cluster"]
config = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "cluster", "cluster": cluster}],
    "users": [{"name": "tokenkeeper", "user": {"token": token}}],
    "contexts": [{"name": "tokenkeeper", "context": {"cluster": "cluster", "user": "tokenkeeper"}}],
    "current-context": "tokenkeeper",
}
with open(out, "w") as f:
    json.dump(config, f, indent=2)
' "$token" "$out"
chmod 600 "$out"
