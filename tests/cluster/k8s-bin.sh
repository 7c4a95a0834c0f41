#!/usr/bin/env bash
# Builds (once per machine) the Kubernetes control-plane binaries our tests and demo run on, and prints the
# directory that holds them. No Docker and no setup-envtest downloads here, so we build v1.20.2 from Debian's
# `kubernetes` source package (it vendors its dependencies) with Debian's Go. See docs/local-control-plane.md.
#
# envtest conventions win: if KUBEBUILDER_ASSETS (or TEST_ASSET_KUBE_APISERVER + TEST_ASSET_ETCD) point at usable
# binaries, nothing is built and nothing is installed.
#
# hack/deps.sh (`make deps`) asks first, so that a machine that cannot install stops early with a clear message:
#   --apt-needs   print the Debian packages still missing, one a line ("deb-src" for the source entry), and exit
#   --sources     add the deb-src entry the build downloads Debian's kubernetes source from (root), and exit
set -euo pipefail
MODE="${1:-}"

K8S_DEB_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
CACHE="${MODELSERVICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelservice}"
OUT="$CACHE/k8s-v1.20.2"
log() { echo "k8s-bin: $*" >&2; }

if [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "${KUBEBUILDER_ASSETS}/kube-apiserver" ]]; then
  [[ -n "$MODE" ]] || echo "$KUBEBUILDER_ASSETS"; exit 0
fi
if [[ -n "${TEST_ASSET_KUBE_APISERVER:-}" && -x "${TEST_ASSET_KUBE_APISERVER}" ]]; then
  [[ -n "$MODE" ]] || dirname "$TEST_ASSET_KUBE_APISERVER"; exit 0
fi
src_list=/etc/apt/sources.list.d/modelservice-deb-src.sources
add_sources() {
  # Same mirror and keyring as the machine's own Debian entry, source packages only.
  local uri sec
  uri=$(awk '/^URIs:/ && $2 ~ /debian$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  uri=${uri:-http://deb.debian.org/debian}
  sec=${uri%/debian}/debian-security
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb-src\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" "$sec" | $SUDO tee "$src_list" >/dev/null
  $SUDO apt-get update -qq >&2
}

SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
need_pkgs=()
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
command -v openssl >/dev/null || need_pkgs+=(openssl)  # the control plane's certificates (tests/cluster/certs.py)
if [[ ! -x "$OUT/kube-apiserver" || ! -x "$OUT/kube-controller-manager" || ! -x "$OUT/kube-scheduler" ]]; then
  command -v go >/dev/null || need_pkgs+=(golang-go)
  command -v rsync >/dev/null || need_pkgs+=(rsync)
  [[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need_pkgs+=(golang-github-modern-go-reflect2-dev)
  BUILD=1
else
  BUILD=0
fi
if [[ "$MODE" == --apt-needs ]]; then
  (( ${#need_pkgs[@]} )) && printf '%s\n' "${need_pkgs[@]}"
  (( BUILD )) && [[ ! -f "$src_list" ]] && echo deb-src
  exit 0
fi
if [[ "$MODE" == --sources ]]; then
  [[ -f "$src_list" ]] || add_sources
  exit 0
fi
if (( ${#need_pkgs[@]} )); then
  log "installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >&2
fi
# etcd is also needed where it is: link it beside the apiserver so KUBEBUILDER_ASSETS=$OUT works like envtest's.
mkdir -p "$OUT"
[[ -x "$OUT/etcd" ]] || ln -sf "$(command -v etcd)" "$OUT/etcd"

if (( BUILD )); then
  work="$CACHE/build"
  rm -rf "$work"; mkdir -p "$work"; cd "$work"
  [[ -f "$src_list" ]] || add_sources
  log "downloading Debian source kubernetes=$K8S_DEB_VERSION"
  apt-get source --download-only "kubernetes=$K8S_DEB_VERSION" >&2
  tar xzf kubernetes_*.orig.tar.gz
  srcdir=$(find . -maxdepth 1 -mindepth 1 -type d | head -n1)
  cd "$srcdir"
  # The trap: vendored reflect2 v1.0.1 segfaults under Go >= 1.18 on the first watch. Use Debian's v1.0.2.
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  sed -i '/modern-go\/reflect2/ s/v1\.0\.1/v1.0.2/' go.mod vendor/modules.txt
  mkdir -p .go/src/k8s.io && ln -s ../../.. .go/src/k8s.io/kubernetes
  log "building kube-apiserver, kube-controller-manager, kube-scheduler (a few minutes, once per machine)"
  home=$(mktemp -d)
  env GOPATH="$PWD/.go" CGO_ENABLED=0 HOME="$home" GOFLAGS=-mod=vendor GO111MODULE=on \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2
  for b in kube-apiserver kube-controller-manager kube-scheduler; do
    install -m 0755 "_output/bin/$b" "$OUT/$b"
  done
  cd /; rm -rf "$work" "$home"
  log "cached in $OUT"
fi
echo "$OUT"
