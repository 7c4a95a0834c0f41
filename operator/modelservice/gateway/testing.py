"""Test helpers: a fake ClusterOps, sample Kubernetes objects, and serving an aiohttp app on loopback.

In the package (like aiohttp.test_utils) so unit and integration tests share one definition of "what the
operator's objects look like to the gateway".
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional

from aiohttp import web

from modelservice.labels import MANAGED_BY, MANAGED_BY_VALUE, MODELSERVICE_LABEL

if TYPE_CHECKING:
    from modelservice.gateway.routes import RouteTable
    from modelservice.gateway.server import Gateway


def modelservice(
    name: str,
    namespace: str = "default",
    *,
    engine: str = "vllm",
    served_name: Optional[str] = None,
    uri: str = "hf://org/model",
    min_replicas: Optional[int] = None,
    max_replicas: int = 3,
    api_key_secret: Optional[str] = None,
    uid: str = "",
    routing: Optional[str] = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"engine": engine, "model": {"uri": uri}}
    if routing:
        spec["routing"] = {"policy": routing}
    if served_name:
        spec["model"]["servedName"] = served_name
    if min_replicas is not None:
        spec["autoscaling"] = {"minReplicas": min_replicas, "maxReplicas": max_replicas}
    if api_key_secret:
        spec["apiKeySecretRef"] = {"name": api_key_secret}
    return {
        "apiVersion": "serving.modelservice.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or f"uid-{namespace}-{name}",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": spec,
    }


def endpointslice(
    service: str,
    addresses: list[tuple[str, bool]],
    port: int,
    namespace: str = "default",
    *,
    name: Optional[str] = None,
    port_name: str = "http",
) -> dict[str, Any]:
    """addresses: (ip, ready) pairs."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": name or f"{service}-abcde",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in addresses],
    }


def deployment(name: str, replicas: int, namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY: MANAGED_BY_VALUE, MODELSERVICE_LABEL: name},
        },
        "spec": {"replicas": replicas},
    }


class FakeOps:
    """Records what the gateway would write; on_scale lets a test bring 'pods' up (or fail the call)."""

    def __init__(self, on_scale: Optional[Callable[[str, str, int], Any]] = None):
        self.leases: list[dict[str, Any]] = []
        self.scales: list[tuple[str, str, int]] = []
        self.calls: list[str] = []  # order of writes: the wake must write the Lease before it scales
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.on_scale = on_scale

    async def write_lease(self, lease: dict[str, Any]) -> None:
        self.calls.append("lease")
        self.leases.append(lease)

    async def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.calls.append("scale")
        self.scales.append((namespace, name, replicas))
        if self.on_scale is not None:
            result = self.on_scale(namespace, name, replicas)
            if asyncio.iscoroutine(result):
                await result

    async def get_secret(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        return self.secrets.get((namespace, name))


@contextlib.asynccontextmanager
async def serving(
    app: web.Application, *, host: str = "127.0.0.1", runner: Optional[web.AppRunner] = None, **runner_kw: Any
) -> AsyncIterator[str]:
    """Serve app on host:<free port>; yields the base URL."""
    runner = runner or web.AppRunner(app, access_log=None, **runner_kw)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def feed(table: "RouteTable", *objs: dict[str, Any], event: str = "ADDED") -> None:
    """Apply objects to a routing table as watch events would."""
    for o in objs:
        {
            "ModelService": table.apply_modelservice,
            "EndpointSlice": table.apply_slice,
            "Deployment": table.apply_deployment,
        }[o["kind"]](event, o)


@contextlib.asynccontextmanager
async def gateway_with(*objs: dict[str, Any], ops: Any = None, **config: Any) -> AsyncIterator[tuple["Gateway", str]]:
    """A Gateway whose table holds objs, served on 127.0.0.1; yields (gateway, base URL)."""
    from modelservice.gateway.config import Config
    from modelservice.gateway.server import Gateway

    gw = Gateway(Config(**{"pod_name": "gw-0", "metrics_port": 0, **config}), ops or FakeOps())
    feed(gw.table, *objs)
    gw.synced = True
    app = gw.app()
    async with serving(app, runner=gw.runner(app)) as url:
        yield gw, url
