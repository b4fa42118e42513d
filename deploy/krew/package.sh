#!/usr/bin/env bash
# Packages the kubectl plugin for krew: an archive with the binary and the
# license, and the krew manifest that names it with its sha256.
#
#   deploy/krew/package.sh [BINARY] [OUT_DIR] [BASE_URL]
#
# BINARY   default: target/release/kubectl-tokenkeeper (built if missing)
# OUT_DIR  default: target/krew
# BASE_URL where the archive will be served from (the manifest's uri);
#          default: file://OUT_DIR, for `kubectl krew install --manifest`.
# KREW_HOMEPAGE (environment) the manifest's homepage; default: this
#          checkout's README.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
binary="${1:-target/release/kubectl-tokenkeeper}"
out="${2:-target/krew}"
if [[ ! -x "$binary" ]]; then
  cargo build --release --locked --bin kubectl-tokenkeeper
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
base="${3:-file://$out}"
version="v$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
arch="$(uname -m)"
case "$arch" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
esac
archive="kubectl-tokenkeeper-linux-${arch}.tar.gz"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp "$binary" "$stage/kubectl-tokenkeeper"
cp LICENSE "$stage/LICENSE"
tar -C "$stage" -czf "$out/$archive" kubectl-tokenkeeper LICENSE
sha="$(sha256sum "$out/$archive" | cut -d' ' -f1)"
homepage="${KREW_HOMEPAGE:-file://$PWD/README.md}"
sed -e "s|@VERSION@|$version|" -e "s|@HOMEPAGE@|$homepage|" -e "s|@ARCH@|$arch|" -e "s|@URI@|$base/$archive|" -e "s|@SHA256@|$sha|" \
  deploy/krew/tokenkeeper.yaml > "$out/tokenkeeper.yaml"
echo "$out/tokenkeeper.yaml"
