#!/usr/bin/env bash
# The chaos soak (see tests/chaos/chaos.py): a control plane of its own,
# oidc-provider with rotation and reuse detection, two replicas, and faults
# at random moments for a fixed time. Prints what they cost.
#
#   tests/chaos/run.sh [--connections 100] [--minutes 10] [--token-seconds 20] [--seed N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
tests/cluster/build.sh
if [[ ! -d tests/oauth/node_modules/oidc-provider ]]; then
  npm ci --prefix tests/oauth --no-audit --no-fund --loglevel=error
fi
cargo build --locked --bin tokenkeeper
exec python3 tests/chaos/chaos.py "$@"
