"""Every class of invalid spec yields a message that names the field and the fix."""

import pytest

from modelservice.api import InvalidSpec, parse_duration, parse_quantity, validate_spec

VALID = {"engine": "vllm", "model": {"uri": "hf://org/repo"}}


@pytest.mark.parametrize(
    "spec, gateway, field, hint",
    [
        ({"engine": "vllm"}, False, "spec.model.uri", "set spec.model.uri"),
        ({"engine": "custom"}, False, "spec.image", "set spec.image"),
        ({"engine": "nope", "model": {"uri": "hf://a/b"}}, False, "spec.engine", "vllm"),
        ({**VALID, "model": {"uri": "ftp://x"}}, False, "spec.model.uri", "pattern"),
        ({**VALID, "replicas": -1}, False, "spec.replicas", "greater than or equal to 0"),
        (
            {**VALID, "autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
            False,
            "spec.autoscaling",
            "lower minReplicas",
        ),
        (
            {**VALID, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
            False,
            "spec.autoscaling.minReplicas",
            "gateway.enabled=true",
        ),
        (
            {**VALID, "autoscaling": {"maxReplicas": 2, "targetInFlight": 4}},
            False,
            "spec.autoscaling.targetInFlight",
            "gateway.enabled=true",
        ),
        (
            {**VALID, "autoscaling": {"maxReplicas": 2, "targetQueue": 4}},
            False,
            "spec.autoscaling.targetQueue",
            "gateway.enabled=true",
        ),
        (
            {**VALID, "autoscaling": {"maxReplicas": 2, "targetQueue": 0}},
            True,
            "spec.autoscaling.targetQueue",
            "greater than or equal to 1",
        ),
        (
            {"engine": "sglang", "model": {"uri": "hf://a/b"}, "autoscaling": {"maxReplicas": 2, "targetQueue": 4}},
            True,
            "spec.autoscaling.targetQueue",
            "use targetInFlight",
        ),
        (
            {**VALID, "autoscaling": {"maxReplicas": 2, "cpuUtilization": 70}},
            True,
            "spec.autoscaling.cpuUtilization",
            "requests.cpu",
        ),
        (
            {**VALID, "autoscaling": {"maxReplicas": 2, "scaleToZeroAfter": "soon"}},
            True,
            "spec.autoscaling.scaleToZeroAfter",
            "pattern",
        ),
        ({**VALID, "apiKeySecretRef": {"name": "k"}}, False, "spec.apiKeySecretRef", "gateway.enabled=true"),
        ({"engine": "vllm", "model": {"uri": "ollama://llama3"}}, False, "spec.model.uri", "engine ollama"),
        ({"engine": "ollama", "model": {"uri": "hf://a/b"}}, False, "spec.model.uri", "ollama://<tag>"),
        ({"engine": "triton", "model": {"uri": "hf://a/b"}}, False, "spec.model.uri", "model repository"),
        ({**VALID, "model": {"uri": "pvc://Bad_Claim/x"}}, False, "spec.model.uri", "DNS-1123"),
        ({**VALID, "env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}, False, "spec.env", "set twice"),
        (
            {**VALID, "env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
            False,
            "spec.env",
            "keep one",
        ),
        ({**VALID, "args": ["--port", "9000"]}, False, "spec.args", "set spec.port instead"),
        (
            {**VALID, "resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}},
            False,
            "spec.resources",
            "more than limits.cpu",
        ),
        (
            {**VALID, "resources": {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}}},
            False,
            "spec.resources",
            "limits only",
        ),
        ({**VALID, "resources": {"limits": {"nvidia.com/gpu": "500m"}}}, False, "spec.resources", "whole number"),
        ({**VALID, "port": 70000}, False, "spec.port", "less than or equal to 65535"),
        ({**VALID, "unknownField": 1}, False, "spec.unknownField", "Extra inputs"),
        ({**VALID, "priority": 1001}, False, "spec.priority", "less than or equal to 1000"),
        ({**VALID, "priority": -1}, False, "spec.priority", "greater than or equal to 0"),
        ({**VALID, "routing": {"loadFactor": 0.5}}, True, "spec.routing.loadFactor", "greater than or equal to 1"),
        ({**VALID, "routing": {"loadFactor": 11}}, True, "spec.routing.loadFactor", "less than or equal to 10"),
    ],
)
def test_invalid_specs_name_the_field_and_the_fix(spec, gateway, field, hint):
    with pytest.raises(InvalidSpec) as e:
        validate_spec(spec, gateway_enabled=gateway)
    assert field in str(e.value)
    assert hint in str(e.value)


def test_valid_spec_defaults():
    spec = validate_spec(VALID, gateway_enabled=False)
    assert spec.replicas == 1 and spec.startupTimeout == "30m" and spec.autoscaling is None
    spec = validate_spec({**VALID, "autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, gateway_enabled=True)
    assert spec.autoscaling.scaleToZeroAfter == "300s"


def test_quantities_accept_ints_and_strings():
    spec = validate_spec(
        {**VALID, "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "16Gi"}}}, gateway_enabled=False
    )
    assert spec.resources.limits == {"nvidia.com/gpu": 1, "memory": "16Gi"}
    assert parse_quantity("500m") == 0.5 and parse_quantity("1Gi") == 2**30
    with pytest.raises(ValueError):
        parse_quantity("1 GB")


def test_durations():
    assert parse_duration("1h30m") == 5400
    assert parse_duration("300s") == 300
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("5 minutes")
