"""The routing table from ModelService / EndpointSlice / Deployment dicts: pure, no I/O."""

import pytest

from modelservice.gateway.errors import GatewayError
from modelservice.gateway.routes import Endpoint, RouteTable, model_entry, slice_endpoints
from modelservice.gateway.testing import deployment, endpointslice, modelservice
from modelservice.watching import Mirror

pytestmark = pytest.mark.unit


def table_with(*objs):
    changes = []
    t = RouteTable(on_change=changes.append)
    for o in objs:
        {"ModelService": t.apply_modelservice, "EndpointSlice": t.apply_slice, "Deployment": t.apply_deployment}[
            o["kind"]
        ]("ADDED", o)
    return t, changes


def test_entry_defaults_and_ollama_tag():
    e = model_entry(modelservice("llama", "team-a"))
    assert (e.served_name, e.upstream_model, e.api_key_ref, e.autoscaled, e.wake_replicas) == (
        "llama",
        None,
        None,
        False,
        1,
    )
    o = model_entry(
        modelservice(
            "small",
            engine="ollama",
            uri="ollama://llama3.2:1b",
            served_name="tiny",
            min_replicas=0,
            api_key_secret="keys",
        )
    )
    assert (o.served_name, o.upstream_model, o.api_key_ref, o.autoscaled, o.wake_replicas) == (
        "tiny",
        "llama3.2:1b",
        ("keys", "keys"),
        True,
        1,
    )
    assert model_entry(modelservice("big", min_replicas=2)).wake_replicas == 2
    assert (e.prefix_affinity, e.load_factor) == (True, 1.25)  # spec.routing's defaults
    tuned = modelservice("sticky")
    tuned["spec"]["routing"] = {"loadFactor": 2}
    assert model_entry(tuned).load_factor == 2.0


def test_slice_ready_endpoints_on_http_port_only():
    s = endpointslice("m", [("127.0.1.1", True), ("127.0.1.2", False)], 8000)
    s["endpoints"].append({"addresses": ["127.0.1.3"], "conditions": {}})  # unknown readiness counts as ready
    s["endpoints"].append({"addresses": ["127.0.1.4"], "conditions": {"ready": True, "terminating": True}})
    s["ports"].append({"name": "metrics", "port": 9000})
    assert slice_endpoints(s) == ("m", (Endpoint("127.0.1.1", 8000), Endpoint("127.0.1.3", 8000)))
    assert slice_endpoints(endpointslice("m", [("127.0.1.1", True)], 8000, port_name="grpc")) == ("m", ())
    fqdn = endpointslice("m", [("pod.example", True)], 8000)
    fqdn["addressType"] = "FQDN"
    assert slice_endpoints(fqdn) == ("m", ())


def test_endpoints_union_over_slices_and_removal():
    t, changes = table_with(
        modelservice("m"),
        endpointslice("m", [("127.0.1.1", True)], 8000, name="m-a"),
        endpointslice("m", [("127.0.1.2", True)], 8000, name="m-b"),
        endpointslice("other", [("127.0.9.9", True)], 8000, name="other-a"),
    )
    assert set(t.ready(("default", "m"))) == {Endpoint("127.0.1.1", 8000), Endpoint("127.0.1.2", 8000)}
    t.apply_slice("DELETED", endpointslice("m", [], 8000, name="m-a"))
    assert t.ready(("default", "m")) == (Endpoint("127.0.1.2", 8000),)
    t.apply_slice("MODIFIED", endpointslice("m", [("127.0.1.2", False)], 8000, name="m-b"))
    assert t.ready(("default", "m")) == ()
    assert changes.count(("default", "m")) >= 4
    assert t.ready(("default", "other")) == (Endpoint("127.0.9.9", 8000),)


def test_resolve_served_name_namespace_form_and_errors():
    t, _ = table_with(
        modelservice("llama", "a", served_name="meta/llama"),
        modelservice("llama", "b"),
        modelservice("qwen", "b"),
        modelservice("qwen", "c"),
    )
    assert t.resolve("meta/llama").key == ("a", "llama")  # served names may contain "/"
    assert t.resolve("llama").key == ("b", "llama")
    assert t.resolve("c/qwen").key == ("c", "qwen")
    with pytest.raises(GatewayError) as e:
        t.resolve("qwen")
    assert e.value.status == 400 and "b/qwen" in e.value.message and "c/qwen" in e.value.message
    with pytest.raises(GatewayError) as e:
        t.resolve("nope")
    assert e.value.status == 404
    ids = [i for i, _ in t.listing()]
    assert ids == ["meta/llama", "llama", "b/qwen", "c/qwen"]


def test_modelservice_update_and_delete():
    t, _ = table_with(modelservice("m", served_name="old"))
    t.apply_modelservice("MODIFIED", modelservice("m", served_name="new"))
    assert t.resolve("new").name == "m"
    with pytest.raises(GatewayError):
        t.resolve("old")
    t.apply_modelservice("DELETED", modelservice("m", served_name="new"))
    assert t.models == {}


def test_deployment_replicas():
    t, _ = table_with(deployment("m", 0))
    assert t.replicas(("default", "m")) == 0
    d = deployment("m", 0)
    del d["spec"]["replicas"]
    t.apply_deployment("MODIFIED", d)
    assert t.replicas(("default", "m")) == 1
    t.apply_deployment("DELETED", d)
    assert t.replicas(("default", "m")) is None


def test_mirror_drops_what_a_relist_no_longer_has():
    t, _ = table_with()
    m = Mirror(t.apply_slice)
    m.feed("LISTING", {})
    m.feed("ADDED", endpointslice("m", [("127.0.1.1", True)], 8000, name="m-a"))
    m.feed("ADDED", endpointslice("m", [("127.0.1.2", True)], 8000, name="m-b"))
    m.feed("SYNCED", {})
    # Watched changes after the first list do not count as "still there" at the next one.
    m.feed("MODIFIED", endpointslice("m", [("127.0.1.1", True)], 8000, name="m-a"))
    # 410 Gone → relist: only m-b still exists; m-a was deleted while we were not watching.
    m.feed("LISTING", {})
    m.feed("ADDED", endpointslice("m", [("127.0.1.2", True)], 8000, name="m-b"))
    m.feed("SYNCED", {})
    assert t.ready(("default", "m")) == (Endpoint("127.0.1.2", 8000),)


def test_a_spec_that_turns_invalid_stops_routing_until_fixed_and_status_updates_are_seen():
    t, changes = table_with()
    ms = modelservice("m")
    ms["metadata"]["generation"] = 1
    t.apply_modelservice("ADDED", ms)
    assert t.resolve("m").name == "m"
    bad = {**ms, "metadata": {**ms["metadata"], "generation": 2}, "spec": {**ms["spec"], "replicas": -1}}
    t.apply_modelservice("MODIFIED", bad)
    assert t.get("default", "m") is None and "spec.replicas" in t.invalid[("default", "m")]
    fixed = {**ms, "metadata": {**ms["metadata"], "generation": 3}}
    t.apply_modelservice("MODIFIED", fixed)
    assert t.get("default", "m") is not None and t.invalid == {}
    # A status write keeps the generation: the parsed spec is reused, the status is read afresh.
    stalled = {
        **fixed,
        "status": {
            "observedGeneration": 3,
            "conditions": [{"type": "Stalled", "status": "True", "reason": "CrashLoopBackOff", "message": "boom"}],
        },
    }
    t.apply_modelservice("MODIFIED", stalled)
    assert t.get("default", "m").stalled == "CrashLoopBackOff: boom"
    assert changes.count(("default", "m")) == 4
