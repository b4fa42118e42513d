#!/usr/bin/env bash
# Builds the tokenkeeper image from this checkout on this machine, pulling
# nothing from a registry: FROM scratch with a static tokenkeeper binary,
# Debian's CA bundle and a passwd entry for UID 65532. Prints the image id
# and size, and saves an OCI archive under target/image/.
#
#   deploy/image/build.sh [IMAGE]      default: localhost/tokenkeeper:<version>
#
# Needs buildah or podman (apt-get install buildah) and Debian's
# ca-certificates. CONTAINER_TOOL=podman picks podman when both exist.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
image="${1:-localhost/tokenkeeper:$version}"
out="$repo/target/image"
archive="$out/tokenkeeper-$version.oci.tar"

tool="${CONTAINER_TOOL:-}"
if [[ -z "$tool" ]]; then
  for candidate in buildah podman; do
    if command -v "$candidate" >/dev/null; then tool="$candidate"; break; fi
  done
fi
[[ -n "$tool" ]] || { echo "build.sh: needs buildah or podman (apt-get install buildah)" >&2; exit 1; }
bundle=/etc/ssl/certs/ca-certificates.crt
[[ -s "$bundle" ]] || { echo "build.sh: needs $bundle (apt-get install ca-certificates)" >&2; exit 1; }

# Static on the host's gnu target: no rustup target can be fetched here, and
# glibc 2.34+ has its files and DNS resolvers inside libc, so name lookups
# need no NSS module at run time. getrandom calls glibc's getrandom()
# directly: its default looks the function up with dlsym, which finds
# nothing in a static binary and falls back to /dev/urandom. The flags are
# scoped to the target so that build scripts and proc macros stay dynamic.
triple="$(rustc -vV | sed -n 's/^host: //p')"
flags_var="CARGO_TARGET_$(echo "$triple" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
export "$flags_var=-C target-feature=+crt-static --cfg getrandom_backend=\"linux_getrandom\""
cargo build --release --locked --target "$triple" --bin tokenkeeper >&2
binary="target/$triple/release/tokenkeeper"
if readelf -lW "$binary" | grep -q 'Requesting program interpreter' \
  || readelf -dW "$binary" | grep -q '(NEEDED)'; then
  echo "build.sh: $binary is not static" >&2
  exit 1
fi

context="$out/context"
rm -rf "$context"
mkdir -p "$context/rootfs/etc/ssl/certs"
install -m 0755 "$binary" "$context/rootfs/tokenkeeper"
install -m 0644 "$bundle" "$context/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
  >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' >"$context/rootfs/etc/group"
chmod 0644 "$context/rootfs/etc/passwd" "$context/rootfs/etc/group"
cat >"$context/Containerfile" <<CONTAINERFILE
FROM scratch
COPY rootfs/ /
USER 65532:65532
ENTRYPOINT ["/tokenkeeper"]
CMD ["run"]
LABEL org.opencontainers.image.title="tokenkeeper" \\
      org.opencontainers.image.description="Keeps SaaS source credentials fresh in Kubernetes Secrets" \\
      org.opencontainers.image.version="$version" \\
      org.opencontainers.image.licenses="Apache-2.0"
CONTAINERFILE

# vfs works where overlay mounts are not allowed (containers, CI sandboxes);
# no RUN step, so no container runtime is involved. The commit time makes
# the image the same for the same binary.
export STORAGE_DRIVER="${STORAGE_DRIVER:-vfs}"
created="$(git log -1 --format=%ct 2>/dev/null || echo 0)"
"$tool" build --quiet --timestamp "$created" -f "$context/Containerfile" -t "$image" "$context" >/dev/null
rm -f "$archive"
"$tool" push --quiet "$image" "oci-archive:$archive:$image" >&2

id="$("$tool" images --noheading --format '{{.ID}}' "$image" | head -n1)"
size="$(du -b "$context/rootfs/tokenkeeper" | cut -f1)"
echo "image   $image"
echo "id      $id"
echo "size    $(( $(du -b "$archive" | cut -f1) / 1024 )) KiB archive, binary $(( size / 1024 )) KiB"
echo "archive $archive"
