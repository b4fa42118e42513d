#!/usr/bin/env bash
# Puts promtool (from Debian's prometheus package) into the tokenkeeper
# cache, once per machine, without installing the package: the .deb is
# downloaded and only promtool is taken out of it, so no Prometheus service
# is set up. Prints the path of promtool.
set -euo pipefail
CACHE_DIR="${TOKENKEEPER_CACHE:-$HOME/.cache/tokenkeeper}"
PROMTOOL="$CACHE_DIR/bin/promtool"
if [[ ! -x "$PROMTOOL" ]]; then
  mkdir -p "$CACHE_DIR/bin"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    as_root apt-get update -qq >&2
  fi
  (cd "$work" && apt-get download -qq prometheus >&2)
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  cp "$work/root/usr/bin/promtool" "$PROMTOOL"
  chmod +x "$PROMTOOL"
fi
echo "$PROMTOOL"
