#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager 1.20 from Debian's source
# package, once per machine. Binaries are cached outside the clone so every
# clone, test run and CI run on this machine reuses them.
set -euo pipefail

CACHE_DIR="${TOKENKEEPER_CACHE:-$HOME/.cache/tokenkeeper}"
BIN_DIR="$CACHE_DIR/k8s/bin"
BINARIES=(kube-apiserver kube-controller-manager)

have_all_binaries() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$BIN_DIR/$b" ]] || return 1; done
  command -v etcd >/dev/null || [[ -x /usr/bin/etcd ]] || return 1
  command -v jq >/dev/null || return 1
}

if have_all_binaries; then
  exit 0
fi

log() { printf '[cluster-build] %s\n' "$*" >&2; }

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  log "adding a deb-src entry for bookworm main"
  as_root tee /etc/apt/sources.list.d/tokenkeeper-deb-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
log "installing build and runtime packages"
as_root apt-get update -qq
as_root apt-get install -y -qq golang-go etcd-server rsync jq golang-github-modern-go-reflect2-dev dpkg-dev >/dev/null

WORK="$CACHE_DIR/k8s/src"
mkdir -p "$WORK" "$BIN_DIR"
cd "$WORK"
if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
  log "downloading Debian's kubernetes source package"
  apt-get source --download-only kubernetes >/dev/null
fi
TREE="$WORK/tree"
if [[ ! -d "$TREE" ]]; then
  log "unpacking"
  mkdir -p "$TREE.tmp"
  tar -xzf "$(ls kubernetes_*.orig.tar.gz | head -n1)" -C "$TREE.tmp" --strip-components=1
  # reflect2 1.0.1 (vendored) crashes on Go >= 1.18 at the first custom
  # resource write; Debian ships a fixed 1.0.2.
  rm -rf "$TREE.tmp/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$TREE.tmp/vendor/github.com/modern-go/reflect2"
  rm -f "$TREE.tmp/vendor/github.com/modern-go/reflect2/go.mod"
  mv "$TREE.tmp" "$TREE"
fi
cd "$TREE"
for b in "${BINARIES[@]}"; do
  if [[ ! -x "$BIN_DIR/$b" ]]; then
    log "building $b (several minutes on 2 cores)"
    make WHAT="cmd/$b" >"$WORK/build-$b.log" 2>&1 || { tail -n 40 "$WORK/build-$b.log" >&2; exit 1; }
    built=$(find _output -type f -name "$b" -perm -u+x | head -n1)
    install -m 0755 "$built" "$BIN_DIR/$b"
  fi
done
log "binaries ready in $BIN_DIR"
