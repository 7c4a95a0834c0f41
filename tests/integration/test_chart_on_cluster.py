"""The Helm chart against the real API server: every manifest is accepted, the operator and the gateway work as
their own ServiceAccounts with exactly the chart's RBAC, and what they must not touch they cannot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests import helm_util as hu
from tests.cluster.kube import create_namespace, delete_namespace
from tests.integration import ms
from tests.integration.gateway_process import TEST_FLAGS, GatewayProcess
from tests.integration.operator_process import OPERATOR_FLAGS, OperatorProcess, kubectl

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@pytest.fixture
def helm():
    try:
        return hu.helm_binary()
    except hu.HelmUnavailable as e:
        pytest.skip(f"no helm binary: {e}")


def _render(kube, release_ns: str, values: dict | None = None, values_files: tuple = ()) -> list[dict]:
    """Rendered for this server's version, as `helm install` would (PDB policy/v1beta1 on 1.20, for example)."""
    version = json.loads(kubectl(kube.kubeconfig, "version", "-o", "json"))["serverVersion"]
    return hu.render(
        values_files,
        values=values,
        namespace=release_ns,
        kube_version=f"{version['major']}.{version['minor'].rstrip('+')}.0",
    )


def _apply(kube, docs: list[dict], *extra: str) -> str:
    return kubectl(kube.kubeconfig, "apply", *extra, "-f", "-", input=hu.to_yaml(docs))


def _sa_kubeconfig(kube, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (a TokenRequest token, as a pod would get)."""
    token = kubectl(kube.kubeconfig, "create", "token", sa, "-n", namespace, "--duration=1h").strip()
    cfg = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cfg["users"] = [{"name": sa, "user": {"token": token}}]
    for ctx in cfg["contexts"]:
        ctx["context"]["user"] = sa
    path.write_text(yaml.safe_dump(cfg))
    return path


def _can_i(kube, namespace: str, sa: str, verb: str, resource: str, *scope: str) -> bool:
    out = kubectl(
        kube.kubeconfig,
        "auth",
        "can-i",
        verb,
        resource,
        *scope,
        f"--as=system:serviceaccount:{namespace}:{sa}",
        check=False,
    )
    return out.strip() == "yes"


def test_every_rendered_manifest_is_accepted_by_the_api_server(kube, namespace, crds, helm):
    for values_file in [None, *hu.ci_values_files()]:
        docs = _render(kube, namespace, values_files=(values_file,) if values_file else ())
        # ServiceMonitor is prometheus-operator's CRD, not served here; its schema is checked in the unit tests.
        docs = [d for d in docs if d["kind"] != "ServiceMonitor"]
        for d in docs:
            if d["kind"] in ("Role", "RoleBinding") and d["metadata"].get("namespace") in ("team-a", "team-b"):
                d["metadata"]["namespace"] = namespace  # tenant namespaces of the example values
        out = _apply(kube, docs, "--server-side", "--force-conflicts", "--dry-run=server")
        assert out.count("(server dry run)") == len(docs), (values_file, out)


@pytest.mark.parametrize("scope", ["cluster-wide", "watchNamespaces"])
def test_operator_and_gateway_run_as_their_service_accounts(kube, namespace, crds, fake_nodes, helm, tmp_path, scope):
    release_ns = namespace
    work = create_namespace(kube, "as-sa")
    values = {"gateway": {"enabled": True}, "crds": {"install": False}}
    if scope == "watchNamespaces":
        values["watchNamespaces"] = [work]
    docs = _render(kube, release_ns, values)
    _apply(kube, [d for d in docs if d["kind"] in RBAC_KINDS])
    op_sa = hu.find(docs, "Deployment", f"{hu.RELEASE}-modelservice-operator")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    gw_sa = hu.find(docs, "Deployment", f"{hu.RELEASE}-modelservice-operator-gateway")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]

    # What each may not do (checked by the API server's own authorizer).
    for sa in (op_sa, gw_sa):
        assert not _can_i(kube, release_ns, sa, "get", "secrets", "-A")
        assert not _can_i(kube, release_ns, sa, "list", "secrets", "-A")
        assert not _can_i(kube, release_ns, sa, "create", "pods", "-n", "default")
        assert not _can_i(kube, release_ns, sa, "delete", "namespaces")
        assert not _can_i(kube, release_ns, sa, "update", "modelservices.serving.modelservice.dev", "-A")
    assert _can_i(kube, release_ns, op_sa, "patch", "deployments.apps", "-n", work)
    assert _can_i(kube, release_ns, op_sa, "patch", "deployments.apps", "-n", "default") == (scope == "cluster-wide")
    assert not _can_i(kube, release_ns, gw_sa, "delete", "deployments.apps", "-n", work)

    # What each must do: the real processes, authenticated as the ServiceAccounts, on a real scenario, with the
    # same scope arguments the chart gives them.
    scope_args = ["--namespace", work] if scope == "watchNamespaces" else []
    op = gw = None
    try:
        op = OperatorProcess(
            _sa_kubeconfig(kube, release_ns, op_sa, tmp_path / "op.kubeconfig"),
            tmp_path / "operator.log",
            extra_args=[*OPERATOR_FLAGS, *scope_args],
        ).start()
        gw = GatewayProcess(
            _sa_kubeconfig(kube, release_ns, gw_sa, tmp_path / "gw.kubeconfig"),
            tmp_path / "gateway.log",
            *TEST_FLAGS,
            *scope_args,
        ).start()
        ms.create(
            kube,
            work,
            ms.body(
                "rbac",
                resources={"requests": {"cpu": "1"}},
                autoscaling={"minReplicas": 0, "maxReplicas": 2, "cpuUtilization": 80, "scaleToZeroAfter": "3s"},
            ),
        )
        ms.wait_condition(kube, work, "rbac", "Ready", "True", timeout=60)  # Deployment, Service, HPA applied
        ms.wait_condition(kube, work, "rbac", "Ready", "False", "ScaledToZero", timeout=60)  # deployments/scale
        status, body = asyncio.run(_chat(gw.url, "rbac"))  # gateway: watches, Lease create/patch, scale 0→1
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]"), body[:200]
        ms.wait_condition(kube, work, "rbac", "Ready", "True", timeout=60)
        assert ms.events_for(kube, work, "rbac", "ScaledToZero")  # Events as the operator's SA
        for log in (op.log_path, gw.log_path):  # an RBAC refusal names the ServiceAccount; nothing else counts here
            denied = [line for line in log.read_text().splitlines() if "forbidden: User" in line]
            assert not denied, denied[:3]
    finally:
        for proc in (gw, op):
            if proc:
                proc.stop()
        delete_namespace(kube, work)


async def _chat(url: str, model: str):
    body = {"model": model, "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.read()


def test_gitops_reapply_changes_nothing_the_user_owns(kube, namespace, operator, fake_nodes):
    """Argo CD / Flux apply the same manifest again and again: the operator must leave them nothing to fix."""
    manifest = yaml.safe_dump({**ms.example("vllm"), "metadata": {"name": "gitops", "namespace": namespace}})
    apply = ("apply", "--server-side", "--field-manager=argocd-controller", "-f", "-")
    kubectl(kube.kubeconfig, *apply, input=manifest)
    ready = ms.wait_condition(kube, namespace, "gitops", "Ready", "True", timeout=60)
    diff = kubectl(
        kube.kubeconfig,
        "diff",
        "--server-side",
        "--field-manager=argocd-controller",
        "-f",
        "-",
        input=manifest,
        check=False,
    )
    assert diff.strip() == "", diff
    kubectl(kube.kubeconfig, *apply, input=manifest)
    again = ms.get(kube, namespace, "gitops")
    assert again["metadata"]["generation"] == ready["metadata"]["generation"]
    assert again["spec"] == ready["spec"]
    managers = {m["manager"]: m for m in again["metadata"]["managedFields"]}
    assert "f:spec" not in json.dumps(managers.get("modelservice-operator", {}).get("fieldsV1", {}))
    assert not any(
        k.startswith(("kopf.", "serving.modelservice.dev/")) for k in (again["metadata"].get("annotations") or {})
    )  # no framework state on the user's object
