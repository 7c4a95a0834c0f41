"""Kubernetes client helpers shared by the fixtures, tests and benchmarks."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.cluster.wait import wait_for


@dataclass
class Kube:
    """A configured ApiClient plus the kubeconfig it came from (for kubectl, the operator, subprocesses)."""

    api_client: client.ApiClient
    kubeconfig: Path

    @cached_property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)

    @cached_property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api_client)

    @cached_property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        return client.RbacAuthorizationV1Api(self.api_client)

    @cached_property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    @cached_property
    def apis(self) -> client.ApisApi:
        return client.ApisApi(self.api_client)

    def preferred_version(self, group: str) -> str:
        """The served version of an API group, e.g. discovery.k8s.io -> v1beta1 on 1.20, v1 on newer clusters."""
        for g in self.apis.get_api_versions().groups:
            if g.name == group:
                return g.preferred_version.version
        raise LookupError(f"API group {group} is not served")


def connect(kubeconfig: str | Path) -> Kube:
    return Kube(config.new_client_from_config(config_file=str(kubeconfig)), Path(kubeconfig))


def answers(kubeconfig: str | Path) -> bool:
    """True if the kubeconfig's cluster serves requests (a cheap /version call with a short timeout)."""
    try:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        client.VersionApi(api).get_code(_request_timeout=3)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


def pod_ready(pod: client.V1Pod) -> bool:
    """The pod's Ready condition is True (the kubelet's, or our node agent's, word that it passes its probe)."""
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def unique_name(hint: str, max_len: int = 50) -> str:
    """A DNS-1123 label from a test name, with a random suffix so reruns never collide with a terminating one."""
    slug = re.sub(r"[^a-z0-9-]+", "-", hint.lower()).strip("-")[: max_len - 6].strip("-") or "t"
    return f"{slug}-{secrets.token_hex(2)}"


def create_namespace(kube: Kube, hint: str, timeout: float = 30.0) -> str:
    """Create a namespace and wait until pods can be created in it (default ServiceAccount with its token)."""
    name = unique_name(hint)
    kube.core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"modelservice.dev/test": "true"}))
    )

    # Clusters >= 1.24 make no token Secrets; there the ServiceAccount alone lets pods in.
    needs_secret = _server_minor(kube) < 24

    def sa_ready() -> bool:
        sa = kube.core.read_namespaced_service_account("default", name)
        return bool(sa.secrets) or not needs_secret

    wait_for(sa_ready, timeout=timeout, interval=0.05, message=f"default ServiceAccount in {name}")
    return name


def _server_minor(kube: Kube) -> int:
    v = client.VersionApi(kube.api_client).get_code()
    return int(re.sub(r"\D", "", v.minor) or 0)


def delete_namespace(kube: Kube, name: str) -> None:
    try:
        kube.core.delete_namespace(name, propagation_policy="Background")
    except ApiException as e:
        if e.status != 404:
            raise
