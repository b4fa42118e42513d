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
server="$(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
ca="$(k config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority}')"
ca_data="$(k config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')"
{
  echo "apiVersion: v1"
  echo "kind: Config"
  echo "clusters:"
  echo "- name: cluster"
  echo "  cluster:"
  echo "    server: $server"
  if [[ -n "$ca_data" ]]; then echo "    certificate-authority-data: $ca_data"; else echo "    certificate-authority: $ca"; fi
  echo "users:"
  echo "- name: tokenkeeper"
  echo "  user:"
  echo "    token: $token"
  echo "contexts:"
  echo "- name: tokenkeeper"
  echo "  context: {cluster: cluster, user: tokenkeeper}"
  echo "current-context: tokenkeeper"
} >"$out"
chmod 600 "$out"
