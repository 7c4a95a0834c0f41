"""Issue #7.5, on a real API server: no Secret value in logs, Events or status; the chart's RBAC keeps the operator
away from Secrets and gives it (and the gateway) exactly enough to work.

The Pod Security Standards half of #7.5 is pure and lives in tests/unit/test_pss_*.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests import helm_util as hu
from tests.cluster.kube import create_namespace, delete_namespace
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.operator_process import kubectl
from tests.reliability.harness import kubectl_json

pytestmark = pytest.mark.integration

RELEASE_NS = hu.NAMESPACE  # modelservice-system
OPERATOR_SA = "modelservice-modelservice-operator"
GATEWAY_SA = "modelservice-modelservice-operator-gateway"


def _forms(value: str) -> list[str]:
    """A secret as it could leak: raw, base64 (a Secret's data), and JSON-escaped."""
    return [value, base64.b64encode(value.encode()).decode(), json.dumps(value)[1:-1]]


async def test_secret_values_stay_out_of_logs_events_and_status(
    rcluster, kube, namespace, start_operator, start_gateway, figures
):
    ns = namespace
    token, api_key = f"hf_{secrets.token_hex(16)}", f"sk-{secrets.token_hex(16)}"
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "hf"}, "stringData": {"token": token}})
    kube.core.create_namespaced_secret(ns, {"metadata": {"name": "keys"}, "stringData": {"keys": f"{api_key}\n"}})
    op = start_operator(rcluster.kubeconfig, "--namespace", ns, "--gateway-enabled", "--log-level", "debug")
    gw = start_gateway(rcluster.kubeconfig, "--namespace", ns, "--log-level", "DEBUG", "--activity-interval", "1s")
    ms.create(
        kube,
        ns,
        ms.body(
            "secretive",
            env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
            apiKeySecretRef={"name": "keys"},
        ),
    )
    # A second object whose Secret reference is broken, so error paths get their chance to leak too.
    ms.create(
        kube,
        ns,
        ms.body(
            "broken",
            env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "no-such-key"}}}],
            apiKeySecretRef={"name": "no-such-secret"},
        ),
    )
    ms.wait_condition(kube, ns, "secretive", "Ready", "True", timeout=60)
    wait_for(
        lambda: gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/secretive") == 1,
        timeout=30,
        message="the gateway routes to the model",
    )

    async def traffic():
        async with aiohttp.ClientSession() as s:
            out = []
            for auth in (api_key, "wrong", api_key[:-1], None):
                headers = {"Authorization": f"Bearer {auth}"} if auth else {}
                async with s.post(
                    f"{gw.url}/v1/chat/completions",
                    headers=headers,
                    json={"model": "secretive", "messages": [{"role": "user", "content": "hi"}]},
                ) as r:
                    out.append(r.status)
            return out

    statuses = await asyncio.wait_for(traffic(), 60)
    assert statuses == [200, 401, 401, 401]
    wait_for(
        lambda: ms.get(kube, ns, "broken")["status"].get("observedGeneration") == 1,
        timeout=30,
        message="the broken object reported",
    )

    places = {
        "operator log": op.log_path.read_text(errors="replace"),
        "gateway log": gw.log_path.read_text(errors="replace"),
        "events (all namespaces)": json.dumps(kubectl_json(rcluster.kubeconfig, "get", "events", "-A")),
        "ModelService status": json.dumps([ms.get(kube, ns, n)["status"] for n in ("secretive", "broken")]),
        "children": json.dumps(
            [
                kubectl_json(
                    rcluster.kubeconfig,
                    "get",
                    kind,
                    "-n",
                    ns,
                    "-l",
                    "app.kubernetes.io/managed-by=modelservice-operator",
                )
                for kind in ("deployments", "services", "replicasets")
            ]
        ),
        "activity leases": json.dumps(kubectl_json(rcluster.kubeconfig, "get", "leases", "-n", ns)),
    }
    leaks = [
        f"{what} holds the {name}"
        for what, text in places.items()
        for name, value in (("HF token", token), ("API key", api_key))
        if any(f in text for f in _forms(value))
    ]
    figures.update(
        places_searched=sorted(places),
        bytes_searched=sum(len(t) for t in places.values()),
        requests=statuses,
        leaks=leaks,
    )
    assert leaks == []


# -- RBAC --------------------------------------------------------------------------------------------------------
def _can(kubeconfig: Path, sa: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    resource, _, sub = resource.partition("/")  # kubectl reads res/x as a resource *name*: subresources by flag
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{RELEASE_NS}:{sa}"]
    args += [f"--subresource={sub}"] if sub else []
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, timeout=30)
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), (args, out.stdout, out.stderr)
    return answer == "yes"


OPERATOR_NEEDS = [
    ("get", "modelservices.serving.modelservice.dev"),
    ("list", "modelservices.serving.modelservice.dev"),
    ("watch", "modelservices.serving.modelservice.dev"),
    ("patch", "modelservices.serving.modelservice.dev/status"),
    ("create", "deployments.apps"),
    ("patch", "deployments.apps"),
    ("delete", "deployments.apps"),
    ("watch", "deployments.apps"),
    ("patch", "deployments.apps/scale"),
    ("create", "services"),
    ("patch", "services"),
    ("delete", "services"),
    ("watch", "services"),
    ("create", "persistentvolumeclaims"),
    ("watch", "persistentvolumeclaims"),
    ("create", "horizontalpodautoscalers.autoscaling"),
    ("patch", "horizontalpodautoscalers.autoscaling"),
    ("delete", "horizontalpodautoscalers.autoscaling"),
    ("watch", "horizontalpodautoscalers.autoscaling"),
    ("create", "poddisruptionbudgets.policy"),
    ("delete", "poddisruptionbudgets.policy"),
    ("watch", "pods"),
    ("patch", "pods/status"),  # the GPU pool's reservation: status.nominatedNodeName (docs/gpu-pool.md)
    ("watch", "leases.coordination.k8s.io"),
    ("create", "events"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
]
NOBODY_GETS = [  # neither the operator nor the gateway (default values)
    ("get", "secrets"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("create", "pods"),
    ("create", "pods/exec"),
    ("update", "modelservices.serving.modelservice.dev"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("get", "configmaps"),
    ("create", "serviceaccounts/token"),
    ("delete", "namespaces"),
    ("*", "*"),
]
GATEWAY_NEEDS = [
    ("watch", "modelservices.serving.modelservice.dev"),
    ("watch", "endpointslices.discovery.k8s.io"),
    ("watch", "deployments.apps"),
    ("patch", "deployments.apps/scale"),
    ("create", "leases.coordination.k8s.io"),
    ("patch", "leases.coordination.k8s.io"),
]


def _apply_rbac(kubeconfig: Path, docs: list[dict]) -> None:
    rbac = [
        d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    kubectl(kubeconfig, "apply", "-f", "-", input=hu.to_yaml(rbac))


@pytest.fixture
def release_namespace(kube):
    try:
        kube.core.create_namespace({"metadata": {"name": RELEASE_NS}})
    except Exception:  # noqa: BLE001 - already there from an earlier test
        pass
    yield RELEASE_NS


def test_chart_rbac_keeps_secrets_out_of_reach(rcluster, kube, release_namespace, figures):
    try:
        docs = hu.render()
        with_keys = hu.render(values={"gateway": {"apiKeys": {"enabled": True}}})
    except hu.HelmUnavailable as e:
        pytest.skip(str(e))
    kc = rcluster.kubeconfig
    _apply_rbac(kc, docs)
    other = create_namespace(kube, "rbac-other")
    try:
        missing = [(v, r) for v, r in OPERATOR_NEEDS if not _can(kc, OPERATOR_SA, v, r)]
        missing += [(v, r, "gateway") for v, r in GATEWAY_NEEDS if not _can(kc, GATEWAY_SA, v, r)]
        granted = [
            (sa, v, r, where)
            for sa in (OPERATOR_SA, GATEWAY_SA)
            for v, r in NOBODY_GETS
            for where in (None, other, "kube-system")
            if _can(kc, sa, v, r, where)
        ]
        # With API keys on, the gateway may *get* Secrets (the ones models name), never list or watch them.
        _apply_rbac(kc, with_keys)
        gw_get = _can(kc, GATEWAY_SA, "get", "secrets")
        gw_list = _can(kc, GATEWAY_SA, "list", "secrets") or _can(kc, GATEWAY_SA, "watch", "secrets")
        op_get_with_keys = _can(kc, OPERATOR_SA, "get", "secrets")
    finally:
        delete_namespace(kube, other)
    figures.update(
        checks=len(OPERATOR_NEEDS) + len(GATEWAY_NEEDS) + 3 * 2 * len(NOBODY_GETS) + 3,
        missing=missing,
        wrongly_granted=granted,
        gateway_get_secrets_with_api_keys=gw_get,
    )
    assert missing == []
    assert granted == []
    assert gw_get and not gw_list and not op_get_with_keys


def _sa_kubeconfig(kube, kubeconfig: Path, sa: str, out: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (its token Secret, made by the token controller)."""

    def token():
        acct = kube.core.read_namespaced_service_account(sa, RELEASE_NS)
        if not acct.secrets:
            return None
        s = kube.core.read_namespaced_secret(acct.secrets[0].name, RELEASE_NS)
        return base64.b64decode(s.data["token"]).decode() if s.data and s.data.get("token") else None

    tok = wait_for(token, timeout=30, message=f"a token for {sa}")
    cfg = yaml.safe_load(kubeconfig.read_text())
    cfg["users"] = [{"name": sa, "user": {"token": tok}}]
    cfg["contexts"][0]["context"]["user"] = sa
    out.write_text(yaml.safe_dump(cfg))
    out.chmod(0o600)
    return out


def test_operator_and_gateway_work_with_only_the_chart_rbac(
    rcluster, kube, namespace, release_namespace, start_operator, start_gateway, tmp_path, figures
):
    """The least-privilege rules are enough: the operator, authenticated as the chart's ServiceAccount, brings a
    ModelService to Ready, and the gateway, as its own, lists and routes."""
    try:
        docs = hu.render()
    except hu.HelmUnavailable as e:
        pytest.skip(str(e))
    _apply_rbac(rcluster.kubeconfig, docs)
    op_kc = _sa_kubeconfig(kube, rcluster.kubeconfig, OPERATOR_SA, tmp_path / "operator.kubeconfig")
    gw_kc = _sa_kubeconfig(kube, rcluster.kubeconfig, GATEWAY_SA, tmp_path / "gateway.kubeconfig")
    op = start_operator(op_kc, "--gateway-enabled", log_name="operator-sa.log")
    gw = start_gateway(gw_kc, log_name="gateway-sa.log")
    ms.create(kube, namespace, ms.body("least", replicas=2, autoscaling=None))
    ms.wait_condition(kube, namespace, "least", "Ready", "True", timeout=60)
    ms.create(
        kube,
        namespace,
        ms.body(
            "auto",
            resources={"requests": {"cpu": "1"}},
            autoscaling={"minReplicas": 2, "maxReplicas": 3, "cpuUtilization": 50},
        ),
    )
    ms.wait_condition(kube, namespace, "auto", "Ready", "True", timeout=60)
    wait_for(
        lambda: gw.metric("modelservice_gateway_ready_endpoints", model=f"{namespace}/least") == 2,
        timeout=30,
        message="the gateway sees the endpoints",
    )
    log = op.log_path.read_text(errors="replace")
    # An RBAC refusal names the user ("... is forbidden: User ... cannot ..."); a 403 for a namespace that another
    # test is deleting ("unable to create new content ... being terminated") is not about RBAC.
    forbidden = [line for line in log.splitlines() if "forbidden: User" in line]
    gw_forbidden = [line for line in gw.log_path.read_text(errors="replace").splitlines() if "forbidden: User" in line]
    figures.update(operator_forbidden_lines=len(forbidden), gateway_forbidden_lines=len(gw_forbidden))
    assert forbidden == [] and gw_forbidden == [], (forbidden[:5], gw_forbidden[:5])
