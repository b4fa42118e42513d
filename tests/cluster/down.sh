#!/usr/bin/env bash
# Stops what up.sh started in DIR, by the pids it recorded, newest first.
set -uo pipefail
DIR="${1:?usage: down.sh STATE_DIR}"
[[ -f "$DIR/pids" ]] || exit 0
mapfile -t entries < <(tac "$DIR/pids")
for entry in "${entries[@]}"; do
  pid="${entry##* }"
  kill -TERM "$pid" 2>/dev/null || true
done
for entry in "${entries[@]}"; do
  pid="${entry##* }"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
done
rm -f "$DIR/pids"
