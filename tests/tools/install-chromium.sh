#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver for the browser test of the
# consent flow, once per machine.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
as_root apt-get update -qq
as_root apt-get install -y -qq chromium chromium-driver >/dev/null
