#!/usr/bin/env bash
# Puts a container registry (Debian's docker-registry, the CNCF
# distribution) into the tokenkeeper cache, once per machine, without
# installing the package and its service. Prints its path.
set -euo pipefail
CACHE_DIR="${TOKENKEEPER_CACHE:-$HOME/.cache/tokenkeeper}"
REGISTRY="$CACHE_DIR/bin/docker-registry"
if [[ ! -x "$REGISTRY" ]]; then
  mkdir -p "$CACHE_DIR/bin"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
  if ! apt-cache show docker-registry >/dev/null 2>&1; then
    as_root apt-get update -qq >&2
  fi
  (cd "$work" && apt-get download -qq docker-registry >&2)
  dpkg-deb -x "$work"/docker-registry_*.deb "$work/root"
  cp "$work/root/usr/bin/docker-registry" "$REGISTRY"
  chmod +x "$REGISTRY"
fi
echo "$REGISTRY"
