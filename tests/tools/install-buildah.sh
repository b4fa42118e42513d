#!/usr/bin/env bash
# Installs Debian's buildah (to build the image, deploy/image/build.sh),
# skopeo (to push it, as the README says), the CA bundle the image carries
# and openssl, once per machine.
set -euo pipefail
if command -v buildah >/dev/null && command -v skopeo >/dev/null && command -v openssl >/dev/null \
  && [[ -s /etc/ssl/certs/ca-certificates.crt ]]; then
  exit 0
fi
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -qq
as_root apt-get install -y -qq buildah skopeo ca-certificates openssl >/dev/null
