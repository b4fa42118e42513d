#!/usr/bin/env bash
# Stops the operator and the control plane that deploy/local/up.sh started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
STATE="${TOKENKEEPER_DEMO_DIR:-$PWD/.tokenkeeper/demo}"
tests/cluster/down.sh "$STATE"
echo "stopped; state kept in $STATE (delete it for a fresh start)"
