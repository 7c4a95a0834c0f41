"""The NetworkPolicy per ModelService on a real API server: accepted (networking.k8s.io/v1), owned, selecting exactly
the model's pods, repaired when deleted. The local cluster's fake node enforces no policy (neither does any cluster
whose network plugin does not): what is checked here is what the operator asks for, which a plugin then enforces."""

from __future__ import annotations

import json

from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.operator_process import GATEWAY_POD_SELECTOR, kubectl

_GW_LABELS = dict(kv.split("=") for kv in GATEWAY_POD_SELECTOR.split(","))


def _policy(kube, ns, name):
    out = kubectl(
        kube.kubeconfig, "get", "networkpolicies.networking.k8s.io", name, "-n", ns, "-o", "json", "--ignore-not-found"
    )
    return json.loads(out) if out.strip() else None


def _pods_owned_by(kube, ns, deployment):
    """Pods whose ReplicaSet belongs to the Deployment: ownership, independent of the labels the policy selects by."""
    sets = {
        rs.metadata.name
        for rs in kube.apps.list_namespaced_replica_set(ns).items
        if any(r.kind == "Deployment" and r.name == deployment for r in rs.metadata.owner_references or [])
    }
    return {
        p.metadata.name
        for p in kube.core.list_namespaced_pod(ns).items
        if p.metadata.deletion_timestamp is None
        and any(r.kind == "ReplicaSet" and r.name in sets for r in p.metadata.owner_references or [])
    }


def test_each_model_gets_a_policy_that_selects_exactly_its_pods(kube, namespace, operator, fake_nodes):
    created = ms.create(kube, namespace, ms.body("two", replicas=2))
    ms.create(kube, namespace, ms.body("other", port=9000))
    for name in ("two", "other"):
        ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=90)
    pol = _policy(kube, namespace, "two")
    assert pol is not None, "no NetworkPolicy for the model"
    (owner,) = pol["metadata"]["ownerReferences"]
    assert owner["uid"] == created["metadata"]["uid"] and owner["controller"] is True
    spec = pol["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    selector = ",".join(f"{k}={v}" for k, v in spec["podSelector"]["matchLabels"].items())
    selected = {
        p.metadata.name
        for p in kube.core.list_namespaced_pod(namespace, label_selector=selector).items
        if p.metadata.deletion_timestamp is None
    }
    owned = _pods_owned_by(kube, namespace, "two")
    assert len(owned) == 2 and selected == owned
    (rule,) = spec["ingress"]
    pod = kube.core.read_namespaced_pod(sorted(owned)[0], namespace)
    assert rule["ports"] == [{"protocol": "TCP", "port": pod.spec.containers[0].ports[0].container_port}]
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "modelservice-system"}},
            "podSelector": {"matchLabels": _GW_LABELS},
        }
    ]
    other = _policy(kube, namespace, "other")
    assert other["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9000}]
    assert not (_pods_owned_by(kube, namespace, "other") & selected)

    # Drift: a deleted policy comes back (the operator watches NetworkPolicies like its other children).
    kubectl(kube.kubeconfig, "delete", "networkpolicies.networking.k8s.io", "two", "-n", namespace)
    wait_for(
        lambda: (
            (_policy(kube, namespace, "two") or {}).get("metadata", {}).get("uid") not in (None, pol["metadata"]["uid"])
        ),
        timeout=30,
        message="NetworkPolicy recreated",
    )
