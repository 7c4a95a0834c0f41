"""A private local control plane per benchmark phase (never .cluster/, which people use), plus the async client.

Each phase gets a fresh cluster so one phase's objects cannot slow or pad the next (the operator would otherwise
see the baseline's children through its label-selected watches, and count them in its memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import yaml

from bench.stats import Sample, parse_prometheus
from modelservice.kube import ApiError, Kube, object_path
from tests.cluster.controlplane import ControlPlane

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "modelservices.serving.modelservice.dev.yaml"
API_METRICS = ("apiserver_request_total",)


@contextlib.asynccontextmanager
async def control_plane(
    work: Path, label: str, *, pods: int, engines: tuple[str, ...] = ()
) -> AsyncIterator["Cluster"]:
    """Start a fresh control plane in work/<label>, yield a Cluster, always stop it (and its processes).
    `engines` run for real on its nodes (tests/cluster/native.py); other pods get the stub."""
    state = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work))
    cp = ControlPlane(state, nodes=2, pods_per_node=max(1000, (pods + 1) // 2 + 50), start_timeout=180, engines=engines)
    t0 = time.monotonic()
    await asyncio.to_thread(cp.start)
    log.info("[%s] control plane up in %.1fs (%s)", label, time.monotonic() - t0, state)
    kube = Kube.from_env(str(cp.kubeconfig), user_agent="modelservice-bench", limit=64)
    cluster = Cluster(cp, kube, state)
    try:
        await cluster.install_crd()
        yield cluster
    finally:
        await kube.close()
        await asyncio.to_thread(cp.stop)
        shutil.rmtree(state, ignore_errors=True)


async def run_part(work: Path, label: str, pods: int, body, out: dict[str, Any]) -> dict[str, Any]:
    """Run `body(cluster)` on a fresh control plane; a failure is logged and recorded as out["error"], so the JSON
    keeps what the part measured before it failed. Returns `out`."""
    try:
        async with control_plane(work, label, pods=pods) as cluster:
            await body(cluster)
    except Exception as e:  # noqa: BLE001 - reported in the table; the JSON keeps what was measured
        log.exception("%s benchmark failed", label)
        out["error"] = f"{type(e).__name__}: {e}"
    return out


class Cluster:
    def __init__(self, cp: ControlPlane, kube: Kube, state: Path):
        self.cp, self.kube, self.state = cp, kube, state

    @property
    def kubeconfig(self) -> Path:
        return self.cp.kubeconfig

    async def install_crd(self) -> None:
        crd = yaml.safe_load(CRD_FILE.read_text())
        await self.kube.apply(crd, field_manager="modelservice-bench")
        path = object_path(crd["apiVersion"], crd["kind"], name=crd["metadata"]["name"])
        for _ in range(300):  # bounded: 30 s
            obj = await self.kube.get(path)
            conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
            if conds.get("Established") == "True":
                return
            await asyncio.sleep(0.1)
        raise RuntimeError("the ModelService CRD never became Established")

    async def namespace(self, name: str) -> str:
        """Create a namespace and wait for its default ServiceAccount token (1.20 admission needs it for pods)."""
        try:
            await self.kube.create(
                "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        except ApiError as e:
            if e.status != 409:
                raise
        path = f"/api/v1/namespaces/{name}/serviceaccounts/default"
        for _ in range(600):  # bounded: 60 s
            sa = await self.kube.get_or_none(path)
            if sa and sa.get("secrets"):
                return name
            await asyncio.sleep(0.1)
        raise RuntimeError(f"namespace {name}: no default ServiceAccount token after 60 s")

    async def api_metrics(self) -> dict[Sample, float]:
        """The apiserver's own request counters (GET /metrics with the admin token)."""
        text = await self.kube.request("GET", "/metrics", timeout=60)
        return parse_prometheus(text if isinstance(text, str) else str(text), API_METRICS)

    async def count(self, path: str, label_selector: Optional[str] = None) -> int:
        params: dict[str, Any] = {"labelSelector": label_selector} if label_selector else {}
        items = (await self.kube.get(path, **params)).get("items", [])
        return len(items)
