#!/usr/bin/env bash
# Usage: binary-from-deb.sh PACKAGE PATH_IN_PACKAGE
# Puts one program out of a Debian package into the tokenkeeper cache, once
# per machine, without installing the package: the .deb is downloaded and
# only that file is taken out of it, so no service is set up. Prints its path.
set -euo pipefail
PACKAGE="${1:?usage: binary-from-deb.sh PACKAGE PATH_IN_PACKAGE}"
IN_PACKAGE="${2:?usage: binary-from-deb.sh PACKAGE PATH_IN_PACKAGE}"
CACHE_DIR="${TOKENKEEPER_CACHE:-$HOME/.cache/tokenkeeper}"
TARGET="$CACHE_DIR/bin/$(basename "$IN_PACKAGE")"
if [[ ! -x "$TARGET" ]]; then
  mkdir -p "$CACHE_DIR/bin"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
  if ! apt-cache show "$PACKAGE" >/dev/null 2>&1; then
    as_root apt-get update -qq >&2
  fi
  (cd "$work" && apt-get download -qq "$PACKAGE" >&2)
  dpkg-deb -x "$work/${PACKAGE}"_*.deb "$work/root"
  cp "$work/root/$IN_PACKAGE" "$TARGET"
  chmod +x "$TARGET"
fi
echo "$TARGET"
