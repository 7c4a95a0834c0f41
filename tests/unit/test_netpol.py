"""The NetworkPolicy per ModelService (netpol.py): exactly the model's pods, the engine port, from the gateway only."""

import pytest

from modelservice.api import Engine, validate_spec
from modelservice.netpol import NetworkPolicyConfig, network_policy, parse_labels
from modelservice.render import Context, render

GW = {"app.kubernetes.io/name": "modelservice-operator", "app.kubernetes.io/component": "gateway"}
URIS = {"triton": "s3://bucket/repo", "ollama": "ollama://llama3.2:1b", "custom": None}


def _ctx(namespace="team-a"):
    return Context(name="m", namespace=namespace, uid="uid-1", labels={}, replicas=1)


def _spec(engine="vllm", **extra):
    uri = URIS.get(engine, "hf://org/repo")
    spec = {"engine": engine, "model": {"uri": uri} if uri else {}, **extra}
    if engine == "custom":
        spec.setdefault("image", "ghcr.io/acme/server:1")
    return validate_spec(spec, gateway_enabled=True)


@pytest.mark.parametrize("engine", [e.value for e in Engine])
def test_policy_selects_the_deployments_pods_and_opens_only_the_engine_port(engine):
    spec = _spec(engine)
    children = render(_ctx(), spec)
    pol = network_policy(_ctx(), spec, NetworkPolicyConfig("modelservice-system", GW))
    dep = children["Deployment"]
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert pol["spec"]["podSelector"] == dep["spec"]["selector"]  # exactly the model's pods
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = pol["spec"]["ingress"]
    # The serving port, and the metrics port where the engine has its own (Triton): the gateway re-exports metrics.
    assert rule["ports"] == [{"protocol": "TCP", "port": p["containerPort"]} for p in container["ports"]]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "modelservice-system"}},
            "podSelector": {"matchLabels": GW},
        }
    ]
    assert pol["metadata"]["ownerReferences"] == dep["metadata"]["ownerReferences"]
    assert pol["metadata"]["labels"] == dep["metadata"]["labels"]


def test_gateway_in_the_models_namespace_needs_no_namespace_label():
    pol = network_policy(_ctx("shared"), _spec(), NetworkPolicyConfig("shared", GW))
    assert pol["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": GW}}]


def test_metrics_namespaces_are_an_opt_in_on_the_metrics_port():
    cfg = NetworkPolicyConfig("gw", GW, ("monitoring",))
    (_, metrics) = network_policy(_ctx(), _spec("vllm", port=9000), cfg)["spec"]["ingress"]
    assert metrics == {
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }  # vLLM: metrics on the serving port
    (_, triton) = network_policy(_ctx(), _spec("triton"), cfg)["spec"]["ingress"]
    assert triton["ports"] == [{"protocol": "TCP", "port": 8002}]  # Triton's own metrics port
    assert len(network_policy(_ctx(), _spec(), NetworkPolicyConfig("gw", GW))["spec"]["ingress"]) == 1


def test_off_renders_nothing():
    assert network_policy(_ctx(), _spec(), None) is None


@pytest.mark.parametrize("text", ["", ",", "novalue", "=v"])
def test_bad_gateway_selector_is_refused(text):
    with pytest.raises(ValueError):
        parse_labels(text)


def test_selector_parses():
    assert parse_labels("a=b, c=d") == {"a": "b", "c": "d"}
