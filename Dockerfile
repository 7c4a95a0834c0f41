# syntax=docker/dockerfile:1
# One image for the operator and the gateway; the command picks the role:
#   modelservice-operator run ...        the operator (the default command)
#   modelservice-operator gateway ...    the serverless gateway
# The chart sets `command: ["modelservice-operator"]` and the role in `args`.
#
# Build: `docker build .` (BuildKit), or `make image` where no Docker runs (buildah + a local Debian base; see
# docs/image.md). The base comes from BASE_IMAGE so the same file builds on the official Python image and on a
# plain Debian root filesystem whose python3 is /usr/bin/python3: the app lives in its own virtualenv, /opt/venv.
#
# The default base: python:3.11.14-slim-bookworm, pinned by the digest of its multi-architecture index (amd64 and
# arm64). Bump tag and digest together (`docker buildx imagetools inspect python:3.11-slim-bookworm`).
ARG BASE_IMAGE=docker.io/library/python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- build: the virtualenv, from the lock files only --------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
# Dependencies first (their layer is reused until a lock file changes): exact versions with hashes, wheels only
# (nothing is compiled in the image), --no-deps (the lock is the whole set). /opt/build holds the build backend
# (setuptools, wheel) for the package itself and never reaches the final image.
# The optional secret "pip-cert" is a CA bundle for networks that intercept TLS (hack/build-image.sh passes the
# host's); without it pip uses its own certificates. A secret mount leaves nothing in a layer.
COPY requirements.lock requirements-build.lock /src/
RUN --mount=type=secret,id=pip-cert \
    set -eu; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1; \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi; \
    python3 -m venv /opt/venv; \
    python3 -m venv /opt/build; \
    /opt/build/bin/pip install --quiet --require-hashes --no-deps --only-binary=:all: -r /src/requirements-build.lock; \
    /opt/venv/bin/pip install --quiet --require-hashes --no-deps --only-binary=:all: -r /src/requirements.lock
# Then the package (.dockerignore lets in only pyproject.toml, README.md, operator/, the locks and this file), built
# offline with the pinned backend and installed without dependencies. pip and setuptools leave the runtime venv
# (nothing installs at run time). Bytecode is compiled here, in unchecked-hash mode so it stays valid whatever mtimes
# the copy gives the sources; at run time the root filesystem is read-only and PYTHONDONTWRITEBYTECODE keeps Python
# from trying to write. Everything the final image adds is gathered under /overlay, copied in one layer.
COPY . /src/
RUN set -eu; \
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1; \
    cd /src; \
    /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --no-index --wheel-dir /tmp/dist .; \
    /opt/venv/bin/pip install --quiet --no-deps --no-index /tmp/dist/*.whl; \
    /opt/venv/bin/python -m pip uninstall --quiet --yes pip setuptools; \
    find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} +; \
    /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib; \
    /opt/venv/bin/modelservice-operator version; \
    mkdir -p /overlay/opt /overlay/etc /overlay/home/nonroot; \
    mv /opt/venv /overlay/opt/venv; \
    cp -p /etc/passwd /etc/group /overlay/etc/; \
    echo 'nonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin' >> /overlay/etc/passwd; \
    echo 'nonroot:x:65532:' >> /overlay/etc/group; \
    chown 65532:65532 /overlay/home/nonroot

# ---- runtime --------------------------------------------------------------------------------------------------------
# Metadata first and the per-build labels last: with a layer cache (buildah --layers, BuildKit) everything above the
# COPY is reused from build to build, and after it comes a single instruction.
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    HOME=/home/nonroot \
    TMPDIR=/tmp
USER 65532:65532
WORKDIR /home/nonroot
# Exec form: no shell between the runtime and the process (it gets the signals: the gateway drains on SIGTERM).
ENTRYPOINT ["/opt/venv/bin/modelservice-operator"]
CMD ["run"]
# One layer on top of the base: /opt/venv, and /etc/passwd + /etc/group naming uid/gid 65532 "nonroot" (tools that
# look the uid up find it). Its home is not writable under a read-only root, which is fine: nothing writes there
# (TMPDIR is /tmp, an emptyDir in the chart). Files are root's: the app cannot change its own code.
COPY --from=build /overlay/ /
LABEL org.opencontainers.image.title="modelservice-operator" \
      org.opencontainers.image.description="ModelService operator and serverless gateway for model serving on Kubernetes" \
      org.opencontainers.image.source="https://github.com/modelservice/modelservice-operator" \
      org.opencontainers.image.url="https://github.com/modelservice/modelservice-operator" \
      org.opencontainers.image.documentation="https://github.com/modelservice/modelservice-operator/blob/main/docs/image.md" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
