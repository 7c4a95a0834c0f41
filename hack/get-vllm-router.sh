#!/usr/bin/env bash
# Installs (once per machine, cached outside the repo) the vLLM project's router, `vllm-router` from PyPI (a Rust
# binary in a wheel), in its own virtualenv: the routing benchmark (bench/routing.py) runs it beside our gateway.
# Prints "VLLM_ROUTER=<path of the binary>" on stdout; progress goes to stderr.
# Usage: eval "$(hack/get-vllm-router.sh)"
set -euo pipefail
VERSION="0.1.17"
# shellcheck source=hack/pip-tool.sh
source "$(dirname "$0")/pip-tool.sh"
venv=$(pip_tool_venv vllm-router "$VERSION" get-vllm-router)
bin="$venv/bin/vllm-router"
[[ -x "$bin" ]] || { echo "get-vllm-router: no vllm-router binary in $venv/bin" >&2; ls "$venv/bin" >&2; exit 1; }
echo "VLLM_ROUTER=$bin"
