#!/usr/bin/env bash
# Puts promtool (from Debian's prometheus package, without its service) into
# the tokenkeeper cache, once per machine. Prints the path of promtool.
exec "$(dirname "${BASH_SOURCE[0]}")/binary-from-deb.sh" prometheus usr/bin/promtool
