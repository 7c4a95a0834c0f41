"""One ModelService contract: what the gateway routes by is what the operator renders, for any spec.

The gateway reads ModelServices with the operator's own pydantic model and helpers (routes.model_entry); these
properties fail the day one side changes a default or a name without the other: the served name the engine is
told, the Service whose EndpointSlices carry the endpoints, the Deployment the gateway scales, the replicas a wake
leaves that the operator then keeps, the API key Secret. Specs come from the reliability fuzzer's generator.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from modelservice.api import Engine, InvalidSpec, ModelServiceSpec, validate_spec
from modelservice.engines import ENGINES
from modelservice.gateway.metrics import Metrics
from modelservice.gateway.routes import RouteTable, model_entry
from modelservice.gateway.testing import endpointslice
from modelservice.render import Context, render
from modelservice.scaling import Activity, decide
from tests.reliability.fuzz import Gen

pytestmark = pytest.mark.unit
NOW = 1_800_000_000.0


def modelservice(name: str, spec: object) -> dict:
    return {
        "apiVersion": "serving.modelservice.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
    }


def told_name(container: dict, engine: Engine) -> str | None:
    """The name the rendered pod tells its engine to serve under, or None when the engine takes none."""
    args = ENGINES[engine].args
    if "{name}" in args:
        flag = args[args.index("{name}") - 1]
        return container["args"][container["args"].index(flag) + 1]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return env.get("SERVED_MODEL_NAME")


# What the fuzzer's valid specs leave out and the gateway reads: served names, every kind of autoscaling, key refs.
served_names = st.one_of(st.none(), st.sampled_from(["llama", "meta/llama-3:8b", "a.b_c"]))
autoscaling = st.one_of(
    st.none(),
    st.builds(
        lambda lo, extra, how: {"minReplicas": lo, "maxReplicas": max(1, lo) + extra, **how},
        st.integers(0, 3),
        st.integers(0, 3),
        st.sampled_from([{}, {"targetInFlight": 4}, {"cpuUtilization": 70}, {"scaleToZeroAfter": "5m"}]),
    ),
)
key_refs = st.one_of(
    st.none(),
    st.fixed_dictionaries({"name": st.just("keys-secret")}, optional={"key": st.sampled_from(["keys", "api-keys"])}),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=0, max_value=2**32),
    st.sampled_from(["m", "llama-3-8b", "a" * 63]),
    served_names,
    autoscaling,
    key_refs,
)
def test_the_gateway_routes_what_the_operator_renders(seed, name, served, scaling, key_ref):
    raw = Gen(seed).valid()
    for field, value in (("autoscaling", scaling), ("apiKeySecretRef", key_ref)):
        if value is not None:
            raw[field] = value
    if served is not None:
        raw["model"]["servedName"] = served
    if scaling and "cpuUtilization" in scaling:
        raw.setdefault("resources", {}).setdefault("requests", {})["cpu"] = "1"
    try:
        spec = validate_spec(raw, gateway_enabled=True)
    except InvalidSpec:
        assume(False)
    a = spec.autoscaling
    ctx = Context(name=name, namespace="ns", uid=f"uid-{name}", labels={}, replicas=None if a else spec.replicas)
    objs = render(ctx, spec)
    deployment, service = objs["Deployment"], objs["Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    entry = model_entry(modelservice(name, raw))

    # The served name is the one the engine answers to; ollama is asked for the tag it pulled.
    told = told_name(container, spec.engine)
    if told is not None:
        assert entry.served_name == told and entry.upstream_model is None
    if spec.engine is Engine.ollama:
        assert f"ollama pull '{entry.upstream_model}'" in container["lifecycle"]["postStart"]["exec"]["command"][-1]

    # Endpoints come from the EndpointSlices of the Service the operator renders, on its port named http; replicas
    # from the Deployment it renders; a wake scales that Deployment.
    assert entry.child == service["metadata"]["name"] == deployment["metadata"]["name"]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    table = RouteTable()
    table.apply_modelservice("ADDED", modelservice(name, raw))
    table.apply_slice("ADDED", endpointslice(service["metadata"]["name"], [("10.0.0.1", True)], port, "ns"))
    table.apply_deployment("ADDED", {**deployment, "spec": {**deployment["spec"], "replicas": 0}})
    assert [e.port for e in table.ready(entry.key)] == [port]
    assert table.replicas(entry.key) == 0

    # The replicas a wake asks for are the ones the operator keeps once the model is awake (no second scale).
    if a is not None:
        d = decide(spec, entry.wake_replicas, Activity(last_request=NOW), ready_since=NOW, now=NOW)
        assert d.scale_to is None and d.hpa_floor in (None, entry.wake_replicas)
    assert entry.autoscaled == (a is not None)

    ref = spec.apiKeySecretRef
    assert entry.api_key_ref == ((ref.name, ref.key) if ref else None)


def test_a_secret_reference_without_a_key_uses_the_apis_default():
    raw = {"engine": "vllm", "model": {"uri": "hf://org/m"}, "apiKeySecretRef": {"name": "keys-secret"}}
    assert model_entry(modelservice("m", raw)).api_key_ref == (
        "keys-secret",
        ModelServiceSpec.model_validate(raw).apiKeySecretRef.key,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=2**32))
def test_a_spec_the_api_refuses_is_not_routed_and_nothing_crashes(seed):
    body, _ = Gen(seed).body("fz")
    metrics = Metrics()
    table = RouteTable()
    metrics.invalid_modelservices.set_function(lambda: len(table.invalid))
    obj = modelservice("fz", body["spec"])
    try:
        ModelServiceSpec.model_validate(obj["spec"] or {})
        valid = True
    except ValidationError:
        valid = False
    table.apply_modelservice("ADDED", obj)
    assert (table.get("ns", "fz") is not None) == valid
    assert metrics.registry.get_sample_value("modelservice_gateway_invalid_modelservices") == (0 if valid else 1)
    table.apply_modelservice("DELETED", obj)
    assert table.models == {} and table.invalid == {}
