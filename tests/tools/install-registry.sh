#!/usr/bin/env bash
# Puts a container registry (Debian's docker-registry, the CNCF
# distribution, without its service) into the tokenkeeper cache, once per
# machine. Prints its path.
exec "$(dirname "${BASH_SOURCE[0]}")/binary-from-deb.sh" docker-registry usr/bin/docker-registry
