#!/usr/bin/env bash
# Renders the plain manifests in this folder from the Helm chart, for users
# of kubectl apply -k / -f. A test fails when they are stale:
#   deploy/manifests/render.sh > deploy/manifests/tokenkeeper.yaml
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
helm="$(tests/tools/install-helm.sh)"
echo "# Rendered from charts/tokenkeeper by deploy/manifests/render.sh; do not edit."
"$helm" template tokenkeeper charts/tokenkeeper --namespace tokenkeeper
