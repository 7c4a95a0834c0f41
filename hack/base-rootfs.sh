#!/usr/bin/env bash
# Builds (once per input set) a minimal Debian bookworm root filesystem with python3 and python3-venv, as a tar,
# with mmdebstrap from Debian's archive: the local stand-in for the python:3.11-slim-bookworm base the Dockerfile
# names by default (no image registry is reachable here). Prints the tar's path on stdout; progress goes to stderr.
#
#   hack/base-rootfs.sh            # ~/.cache/modelservice/images/base/bookworm-python3-<arch>-<key>.tar
#   REBUILD_BASE=1 hack/base-rootfs.sh   # rebuild even when cached (e.g. to pick up Debian security updates)
#
# The cache key is a hash of this script (less its comments) and its inputs (suite, packages, mirrors, architecture):
# changing any of them builds a new base; nothing else does. Needs root (mmdebstrap's root mode; `make image` runs as root anyway).
set -euo pipefail

SUITE="bookworm"
# essential: the Essential:yes set (dpkg, coreutils, dash, ...), no apt. python3-venv brings python3 and ensurepip's
# wheels (pip, setuptools), which the Dockerfile's build stage uses to create /opt/venv.
VARIANT="essential"
PACKAGES="python3,python3-venv"
MIRROR="${MODELSERVICE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${MODELSERVICE_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
ARCH="$(dpkg --print-architecture 2>/dev/null || echo unknown)"

cache="${MODELSERVICE_CACHE:-$HOME/.cache/modelservice}/images/base"
script_hash="$(grep -v '^[[:space:]]*#' "$0" | sha256sum | cut -c1-64)"  # comments do not count
key="$(printf '%s\n' "$script_hash" "$SUITE" "$VARIANT" "$PACKAGES" "$MIRROR" "$SECURITY_MIRROR" "$ARCH" \
        | sha256sum | cut -c1-12)"
out="$cache/$SUITE-python3-$ARCH-$key.tar"

if [[ -s "$out" && "${REBUILD_BASE:-0}" != 1 ]]; then
  echo "base-rootfs: cached $out" >&2
  echo "$out"
  exit 0
fi

if [[ "$(id -u)" != 0 ]]; then
  echo "base-rootfs: run as root (mmdebstrap builds the root filesystem in root mode): sudo $0" >&2
  exit 1
fi
command -v mmdebstrap >/dev/null || {
  echo "base-rootfs: mmdebstrap is missing: apt-get install -y mmdebstrap (Debian 12 / Ubuntu 22.04 or newer)" >&2
  exit 1
}

mkdir -p "$cache"
start=$(date +%s)
echo "base-rootfs: building $SUITE ($VARIANT + $PACKAGES, $ARCH) from $MIRROR" >&2
# Documentation, man pages and translations are left out (dpkg path-exclude); copyright files stay (licences).
# maybe-merged-usr: the /usr merge done by the hook (usr-is-merged) instead of the usrmerge package, which pulls in
# perl (about 50 MB) for a one-time conversion.
# shellcheck disable=SC2016  # the hook's $1 is mmdebstrap's (the root directory), not ours
mmdebstrap --quiet --mode=root --format=tar --variant="$VARIANT" --architectures="$ARCH" --include="$PACKAGES" \
  --hook-dir=/usr/share/mmdebstrap/hooks/maybe-merged-usr \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/log/*.log "$1"/var/lib/dpkg/*-old' \
  "$SUITE" "$out.tmp.$$" \
  "deb $MIRROR $SUITE main" \
  "deb $MIRROR $SUITE-updates main" \
  "deb $SECURITY_MIRROR $SUITE-security main"
mv -f "$out.tmp.$$" "$out"
# Older bases of other keys are not needed any more.
find "$cache" -maxdepth 1 -name "$SUITE-python3-$ARCH-*.tar" ! -name "$(basename "$out")" -delete
echo "base-rootfs: built $out ($(du -h "$out" | cut -f1), $(( $(date +%s) - start ))s)" >&2
echo "$out"
