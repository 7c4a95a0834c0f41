"""Issue #7.5: every pod we ship meets the Pod Security Standards (checker: tests/reliability/pss.py).

- The operator and gateway pods of the Helm chart, for the default values and every ci/*-values.yaml: restricted.
- The model pods the operator renders, for every engine marked restricted in engines.ENGINES and every way a model
  reaches the pod (hub id, pvc://, downloaded by an init container, oci:// modelcar, cache PVC): restricted; and for
  the engines marked not restricted (ollama, custom): baseline, failing restricted only on running as root.
- A property test: any valid spec the fuzz generator draws renders a compliant pod.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modelservice.api import Engine, InvalidSpec, validate_spec
from modelservice.engines import ENGINES
from modelservice.render import ApiVersions, Context, render
from tests import helm_util as hu
from tests.reliability import pss
from tests.reliability.fuzz import Gen

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")
RESTRICTED = sorted(e.value for e, spec in ENGINES.items() if spec.restricted)
NOT_RESTRICTED = sorted(e.value for e, spec in ENGINES.items() if not spec.restricted)
# What a non-restricted engine may fail of "restricted": it runs as the image's user (root for ollama).
ROOT_ONLY = ("runAsNonRoot must be true",)


@pytest.fixture(scope="module")
def helm() -> None:
    try:
        hu.helm_binary()
    except hu.HelmUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(
    "values",
    [None, *hu.ci_values_files()],
    ids=["default", *(p.name.removesuffix("-values.yaml") for p in hu.ci_values_files())],
)
def test_chart_pods_are_restricted(helm, values):
    docs = hu.render([values] if values else [])
    workloads = [d for d in docs if d.get("kind") in WORKLOAD_KINDS]
    assert workloads, "the chart rendered no workload"
    for w in workloads:
        violations = pss.restricted(pss.pod_template_of(w))
        assert violations == [], f"{w['kind']}/{w['metadata']['name']}: {violations}"


def test_chart_with_the_gateway_renders_both_pods(helm):
    names = {hu.component(d) for d in hu.of_kind(hu.render(values={"gateway": {"enabled": True}}), "Deployment")}
    assert names == {"operator", "gateway"}


# The ways a model gets into the pod, per engine. None: that engine does not take such a URI.
SOURCES = {
    "hub": {
        "vllm": "hf://org/m",
        "sglang": "hf://org/m",
        "tgi": "hf://org/m",
        "llamacpp": "hf://org/m-GGUF:Q4",
        "ollama": "ollama://llama3.2:1b",
        "custom": "hf://org/m",
        "triton": None,
    },
    "pvc": {e.value: "pvc://weights/models/m" for e in Engine if e is not Engine.ollama},
    "download": {e.value: "s3://bucket/m" for e in Engine if e is not Engine.ollama},
    "http": {e.value: "https://example.com/m.bin" for e in Engine if e is not Engine.ollama},
    "modelcar": {e.value: "oci://registry.example.com/models/m:1" for e in Engine if e is not Engine.ollama},
}


def _pods(engine: str):
    for source, uris in SOURCES.items():
        uri = uris.get(engine)
        if uri is None:
            continue
        for cache in (False, True):
            spec = {
                "engine": engine,
                "model": {"uri": uri},
                "placement": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
                "podTemplate": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
                "resources": {"limits": {"nvidia.com/gpu": 1}},
            }
            if engine == "custom":
                spec["image"] = "registry.example.com/server:1"
            if cache:
                spec["cache"] = {"size": "50Gi"}
            yield f"{source}{'+cache' if cache else ''}", _render(spec)


def _render(spec_dict):
    spec = validate_spec(spec_dict, gateway_enabled=True)
    ctx = Context(name="m", namespace="ns", uid="u", labels={}, replicas=1, versions=ApiVersions())
    return render(ctx, spec)["Deployment"]["spec"]["template"]


@pytest.mark.parametrize("engine", RESTRICTED)
def test_model_pods_of_restricted_engines_are_restricted(engine):
    seen = 0
    for variant, pod in _pods(engine):
        seen += 1
        assert pss.restricted(pod) == [], f"{engine} {variant}: {pss.restricted(pod)}"
    assert seen >= 2


@pytest.mark.parametrize("engine", NOT_RESTRICTED)
def test_model_pods_of_other_engines_are_baseline(engine):
    for variant, pod in _pods(engine):
        assert pss.baseline(pod) == [], f"{engine} {variant}: {pss.baseline(pod)}"
        # Everything but the user they run as still meets restricted (init containers included).
        others = [v for v in pss.restricted(pod) if not any(r in v for r in ROOT_ONLY)]
        assert others == [], f"{engine} {variant}: {others}"


def test_the_engine_table_marks_what_we_expect():
    assert set(NOT_RESTRICTED) == {"ollama", "custom"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32))
def test_any_valid_spec_renders_a_compliant_pod(seed):
    raw = Gen(seed).valid()
    try:
        spec = validate_spec(raw, gateway_enabled=True)
    except InvalidSpec:
        assume(False)
    ctx = Context(name="m", namespace="ns", uid="u", labels={}, replicas=1)
    pod = render(ctx, spec)["Deployment"]["spec"]["template"]
    if ENGINES[spec.engine].restricted:
        assert pss.restricted(pod) == []
    else:
        assert pss.baseline(pod) == []
