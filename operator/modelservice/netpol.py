"""Pure: the NetworkPolicy that lets only the gateway's pods reach a model's engine port.

API keys and quotas live in the gateway; a pod that calls a model's Service or pod address directly would skip both.
So each ModelService gets a NetworkPolicy selecting exactly its pods (the Deployment's selector label), with one
ingress rule: TCP to the engine's serving port, from the gateway's pods. Everything else to those pods is denied,
including a scraper: engines serve /metrics on the serving port, so letting a monitoring namespace in (an opt-in,
`metrics_namespaces`) also lets it call the model (docs/tenants.md states the trade-off).

Enforced only where the cluster's network plugin enforces NetworkPolicy (Calico, Cilium, ...); elsewhere the object
is accepted and does nothing. Probes come from the kubelet on the node, which these plugins let through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from modelservice.api import ModelServiceSpec
from modelservice.labels import child_name, selector_labels
from modelservice.render import Context, base_labels, engine_of, owner_reference, port_of

API_VERSION = "networking.k8s.io/v1"  # served since Kubernetes 1.7
# Set on every namespace by the API server since 1.21 (1.20 and older: label the namespace yourself).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True)
class NetworkPolicyConfig:
    gateway_namespace: str
    gateway_pod_labels: dict[str, str]  # the gateway pods' labels (the chart's gateway selector labels)
    metrics_namespaces: tuple[str, ...] = field(default=())  # opt-in: may reach the engine's metrics port


def parse_labels(text: str) -> dict[str, str]:
    """'k=v,k2=v2' → dict; a flag's value, refused when malformed (the operator does not start on a typo)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{text!r} is not a label selector of the form key=value[,key=value]")
        out[k.strip()] = v.strip()
    if not out:
        raise ValueError("the gateway pod selector is empty: it would let every pod in the namespace in")
    return out


def _peer(namespace: str, pods: Optional[dict[str, str]], model_namespace: str) -> dict[str, Any]:
    peer: dict[str, Any] = {}
    if namespace != model_namespace:
        # Same namespace: a podSelector alone means "in this namespace", which needs no namespace label (1.20).
        peer["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}}
    if pods is not None:
        peer["podSelector"] = {"matchLabels": dict(pods)}
    return peer


def network_policy(
    ctx: Context, spec: ModelServiceSpec, config: Optional[NetworkPolicyConfig]
) -> Optional[dict[str, Any]]:
    """The desired NetworkPolicy, or None when policies are off (the apply then deletes one we made before)."""
    if config is None:
        return None
    port = port_of(spec)
    ports = [{"protocol": "TCP", "port": port}]
    if engine_of(spec).metrics_port and engine_of(spec).metrics_port != port:
        # The gateway re-exports engines' metrics (gateway/engine_metrics.py): Triton serves them on a port of its own.
        ports.append({"protocol": "TCP", "port": engine_of(spec).metrics_port})
    rules: list[dict[str, Any]] = [
        {"from": [_peer(config.gateway_namespace, config.gateway_pod_labels, ctx.namespace)], "ports": ports}
    ]
    if config.metrics_namespaces:
        metrics_port = engine_of(spec).metrics_port or port
        rules.append(
            {
                "from": [
                    _peer(ns, None, ctx.namespace) if ns != ctx.namespace else {"podSelector": {}}
                    for ns in config.metrics_namespaces
                ],
                "ports": [{"protocol": "TCP", "port": metrics_port}],
            }
        )
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": {
            "name": child_name(ctx.name),
            "namespace": ctx.namespace,
            "labels": base_labels(ctx, spec),
            "ownerReferences": [owner_reference(ctx)],
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ctx.name)},
            "policyTypes": ["Ingress"],
            "ingress": rules,
        },
    }
