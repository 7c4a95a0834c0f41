"""Operator benchmarks on the local control plane.

For each N: a fresh cluster where a bare client server-side-applies the same children the operator would render
(the baseline: the API server, controllers and fake kubelets are the limit), then a fresh cluster where the operator
materializes N ModelServices. At the largest N also: writes during an idle window, repair of deleted children (beside
the ReplicaSet controller repairing deleted pods), peak RSS and CPU seconds.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Optional

from bench import profiler
from bench.cluster import Cluster, control_plane
from bench.stats import apiserver_requests, counter_delta, proc_cpu_seconds, proc_status_kib, summary
from bench.watch import Watch
from modelservice import GROUP, PLURAL, VERSION
from modelservice.api import validate_spec
from modelservice.apply import discover_versions
from modelservice.kube import ApiError, Kube, object_path
from modelservice.labels import MANAGED_BY, MANAGED_BY_VALUE, MODELSERVICE_LABEL
from modelservice.render import CHILD_KINDS, ApiVersions, Context, render
from modelservice.scaling import Activity, decide
from tests.cluster.podspec import STUB_IMAGE
from tests.integration.operator_process import OperatorProcess

log = logging.getLogger("bench")
NS = "bench"
BARE_MANAGER = "modelservice-bench-bare"
MS_PATH = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
OURS = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
# Resources the operator writes; the apiserver cannot tell us who wrote, so idle writes are counted on these.
OPERATOR_RESOURCES = (
    "modelservices",
    "services",
    "deployments",
    "horizontalpodautoscalers",
    "poddisruptionbudgets",
    "persistentvolumeclaims",
    "events",
)
API_RETRIES = 4


@dataclass
class OperatorConfig:
    sizes: list[int]
    work: Path
    concurrency: int = 4  # the operator's --workers and the bare client's / creator's concurrency
    idle_seconds: float = 300.0
    repair_samples: int = 20
    resync_seconds: float = 100.0
    seconds_per_object: float = 0.6  # materialization timeout: 120 s + this per object
    profile: bool = False
    extended_at: Optional[int] = None  # the N that gets idle/repair/RSS; default: the largest
    results: dict[str, Any] = field(default_factory=dict)


def name_of(i: int) -> str:
    return f"m{i:04d}"


def modelservice(name: str, namespace: str = NS) -> dict[str, Any]:
    """The benchmark's ModelService: one vLLM replica (a stub pod on the fake nodes), no GPU, no autoscaling."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"engine": "vllm", "model": {"uri": "hf://bench/tiny-model"}, "image": STUB_IMAGE},
    }


def bare_children(name: str, namespace: str, versions: ApiVersions) -> list[dict[str, Any]]:
    """What the operator's first pass applies for modelservice(name), rendered offline, in apply order.

    Owner references are dropped: they would name a ModelService that does not exist, and the garbage collector
    deletes children whose owner is missing.
    """
    body = modelservice(name, namespace)
    spec = validate_spec(body["spec"], gateway_enabled=False)
    decision = decide(spec, None, Activity(), None, 0)
    ctx = Context(
        name=name,
        namespace=namespace,
        uid="bench-bare",
        labels={},
        replicas=decision.apply_replicas,
        hpa_min_replicas=decision.hpa_floor,
        versions=versions,
    )
    desired = render(ctx, spec)
    out = []
    for kind in CHILD_KINDS:
        obj = desired.get(kind)
        if obj is not None:
            obj = copy.deepcopy(obj)
            obj["metadata"].pop("ownerReferences", None)
            out.append(obj)
    return out


def deployment_ready(obj: dict[str, Any]) -> bool:
    """Rolled out: the same test status.py uses for the ModelService's Ready."""
    spec, st, meta = obj.get("spec") or {}, obj.get("status") or {}, obj.get("metadata") or {}
    want = spec.get("replicas", 1)
    return (
        want > 0
        and (st.get("observedGeneration") or 0) >= meta.get("generation", 0)
        and (st.get("updatedReplicas") or 0) >= want
        and (st.get("readyReplicas") or 0) >= want
        and (st.get("replicas") or 0) == want
    )


def modelservice_ready(obj: dict[str, Any]) -> bool:
    st, meta = obj.get("status") or {}, obj.get("metadata") or {}
    if st.get("observedGeneration") != meta.get("generation"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def operator_resource_writes(writes: dict[str, float]) -> dict[str, float]:
    """The writes (keys "VERB resource[/subresource]") that land on what the operator writes: its children, Events,
    ModelService status and Deployment scale. Other controllers' status writes (deployments/status) are left out."""
    out = {}
    for key, value in writes.items():
        resource, _, sub = key.split(" ", 1)[1].partition("/")
        if resource in OPERATOR_RESOURCES and sub in (
            "",
            "status" if resource == "modelservices" else "",
            "scale" if resource == "deployments" else "",
        ):
            out[key] = value
    return out


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def with_retries(call: Callable[[], Awaitable[Any]], *, ok_status: tuple[int, ...] = ()) -> Any:
    """A write that survives a busy apiserver (429/5xx, timeouts); bounded."""
    for attempt in range(API_RETRIES):
        try:
            return await call()
        except ApiError as e:
            if e.status in ok_status:
                return None
            if e.status not in (429, 500, 503, 504) or attempt == API_RETRIES - 1:
                raise
        except (asyncio.TimeoutError, OSError):
            if attempt == API_RETRIES - 1:
                raise
        await asyncio.sleep(0.5 * 2**attempt)


async def run_workers(items: Iterable[Any], concurrency: int, fn: Callable[[Any], Awaitable[None]]) -> list[str]:
    """fn over items with `concurrency` workers; returns the error messages (a failed item does not stop the rest)."""
    it = iter(items)
    errors: list[str] = []

    async def worker() -> None:
        for item in it:
            try:
                await fn(item)
            except Exception as e:  # noqa: BLE001 - counted and reported
                errors.append(f"{item}: {e}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


def _latency_summary(start: dict[str, float], ready: dict[str, float]) -> dict[str, Any]:
    lat = [ready[k] - start[k] for k in ready if k in start]
    total = (max(ready.values()) - min(start.values())) if ready and start else None
    return {"total_seconds": total, "ready": len(ready), "latency": summary(lat)}


def _requests_per_object(delta: dict, n: int) -> dict[str, Any]:
    split = apiserver_requests(delta)
    writes, reads = sum(split["writes"].values()), sum(split["reads"].values())
    return {
        "writes_per_object": writes / n,
        "reads_per_object": reads / n,
        "requests_per_object": (writes + reads) / n,
        "writes": {k: v for k, v in sorted(split["writes"].items())},
        "reads": {k: v for k, v in sorted(split["reads"].items())},
    }


# ---- the baseline: a bare client applying the rendered children ------------------------------------------------
async def bare_phase(cluster: Cluster, n: int, cfg: OperatorConfig) -> dict[str, Any]:
    kube = cluster.kube
    await cluster.namespace(NS)
    versions = await discover_versions(kube)
    names = [name_of(i) for i in range(n)]
    children = {name: bare_children(name, NS, versions) for name in names}
    stuck: Optional[list[dict[str, Any]]] = None
    node_log: Optional[str] = None
    start: dict[str, float] = {}
    ready: dict[str, float] = {}
    done = asyncio.Event()

    def on_deployment(event: str, obj: dict[str, Any], t: float) -> None:
        name = obj["metadata"]["name"]
        if event != "DELETED" and name in start and name not in ready and deployment_ready(obj):
            ready[name] = t
            if len(ready) == n:
                done.set()

    async def apply_one(name: str) -> None:
        start[name] = time.monotonic()
        for obj in children[name]:
            await with_retries(lambda obj=obj: kube.apply(obj, field_manager=BARE_MANAGER))

    async with Watch(
        kube, f"/apis/apps/v1/namespaces/{NS}/deployments", on_deployment, label_selector=OURS
    ) as dep_watch:
        before, cpu0 = await cluster.api_metrics(), self_cpu()
        errors = await run_workers(names, cfg.concurrency, apply_one)
        written = time.monotonic()
        timeout = 120 + n * cfg.seconds_per_object
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("[bare N=%d] only %d/%d Deployments ready after %.0fs", n, len(ready), n, timeout)
            stuck = await _diagnose(kube, [x for x in names if x not in ready][:5])
            node_log = cluster.cp.log_tail("node-agent", 40)
        after, cpu1 = await cluster.api_metrics(), self_cpu()
    out = _latency_summary(start, ready)
    if stuck is not None:
        out.update(stuck=stuck, node_agent_log_tail=node_log)
    out.update(
        n=n,
        errors=errors[:5],
        error_count=len(errors),
        write_seconds=written - min(start.values()),
        client_cpu_seconds=cpu1 - cpu0,
        bench_watch_lists=dep_watch.lists,
        api=_requests_per_object(counter_delta(before, after), n),
    )
    return out


# ---- the operator ----------------------------------------------------------------------------------------------
def _op_writes(op: OperatorProcess) -> float:
    return op.counter("modelservice_api_writes_total")


def _op_writes_by(op: OperatorProcess) -> dict[str, float]:
    return {k: v for k, v in op.metrics().items() if k.startswith("modelservice_api_writes_total{")}


async def operator_phase(cluster: Cluster, n: int, cfg: OperatorConfig, extended: bool) -> dict[str, Any]:
    kube = cluster.kube
    await cluster.namespace(NS)
    log_path = cfg.work / f"operator-n{n}.log"
    op = OperatorProcess(
        cluster.kubeconfig,
        log_path,
        extra_args=["--workers", str(cfg.concurrency), "--resync-seconds", f"{cfg.resync_seconds:g}"],
    )
    await asyncio.to_thread(op.start)
    assert op.proc is not None
    pid = op.proc.pid
    out: dict[str, Any] = {"n": n, "operator_log": str(log_path)}
    try:
        await asyncio.sleep(2)  # let its startup lists settle before the empty-RSS reading
        out["rss_empty_mib"] = (proc_status_kib(pid, "VmRSS") or 0) / 1024
        names = [name_of(i) for i in range(n)]
        start: dict[str, float] = {}
        ready: dict[str, float] = {}
        done = asyncio.Event()

        def on_ms(event: str, obj: dict[str, Any], t: float) -> None:
            name = obj["metadata"]["name"]
            if event != "DELETED" and name in start and name not in ready and modelservice_ready(obj):
                ready[name] = t
                if len(ready) == n:
                    done.set()

        async def create_one(name: str) -> None:
            start[name] = time.monotonic()
            await with_retries(lambda: kube.create(MS_PATH, modelservice(name)), ok_status=(409,))

        async with Watch(kube, MS_PATH, on_ms) as ms_watch:
            before = await cluster.api_metrics()
            writes0, cpu0 = await asyncio.to_thread(_op_writes, op), proc_cpu_seconds(pid)
            timeout = 120 + n * cfg.seconds_per_object
            prof = profiler.start(pid, cfg.work / f"operator-n{n}.pyspy", timeout) if cfg.profile and extended else None
            errors = await run_workers(names, cfg.concurrency, create_one)
            written = time.monotonic()
            try:
                await asyncio.wait_for(done.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("[operator N=%d] only %d/%d ModelServices Ready after %.0fs", n, len(ready), n, timeout)
                out["stuck"] = await _diagnose(kube, [x for x in names if x not in ready][:5])
                out["node_agent_log_tail"] = cluster.cp.log_tail("node-agent", 40)
            cpu1 = proc_cpu_seconds(pid)
            if prof is not None:
                out["profile"] = await profiler.stop(prof)
            after, writes1 = await cluster.api_metrics(), await asyncio.to_thread(_op_writes, op)
        out.update(_latency_summary(start, ready))
        out.update(
            errors=errors[:5],
            error_count=len(errors),
            write_seconds=written - min(start.values()),
            cpu_seconds=(cpu1 or 0) - (cpu0 or 0),
            operator_writes=writes1 - writes0,
            operator_writes_per_object=(writes1 - writes0) / n,
            operator_writes_by=await asyncio.to_thread(_op_writes_by, op),
            bench_watch_lists=ms_watch.lists,
            api=_requests_per_object(counter_delta(before, after), n),
        )
        out["children"] = {
            "services": await cluster.count(f"/api/v1/namespaces/{NS}/services", OURS),
            "deployments": await cluster.count(f"/apis/apps/v1/namespaces/{NS}/deployments", OURS),
        }
        if extended:
            out["idle"] = await idle_phase(cluster, op, pid, cfg.idle_seconds)
            out["repair"] = await repair_phase(kube, n, cfg.repair_samples)
        out["rss_peak_mib"] = (proc_status_kib(pid, "VmHWM") or 0) / 1024
        out["rss_end_mib"] = (proc_status_kib(pid, "VmRSS") or 0) / 1024
        out["cpu_seconds_total"] = proc_cpu_seconds(pid)
    finally:
        await asyncio.to_thread(op.stop)
    return out


async def _diagnose(kube: Kube, names: list[str]) -> list[dict[str, Any]]:
    """What a ModelService that never turned Ready looks like: its conditions, its Deployment's and pods' status."""
    out = []
    for name in names:
        ms = await kube.get_or_none(f"{MS_PATH}/{name}") or {}
        dep = await kube.get_or_none(object_path("apps/v1", "Deployment", NS, name)) or {}
        pods = (await kube.get(f"/api/v1/namespaces/{NS}/pods", labelSelector=f"{MODELSERVICE_LABEL}={name}"))["items"]
        out.append(
            {
                "name": name,
                "generation": (ms.get("metadata") or {}).get("generation"),
                "status": ms.get("status"),
                "deployment": {
                    "generation": (dep.get("metadata") or {}).get("generation"),
                    "spec_replicas": (dep.get("spec") or {}).get("replicas"),
                    "status": dep.get("status"),
                },
                "pods": [
                    {
                        "name": p["metadata"]["name"],
                        "phase": (p.get("status") or {}).get("phase"),
                        "conditions": (p.get("status") or {}).get("conditions"),
                    }
                    for p in pods
                ],
            }
        )
    return out


async def idle_phase(cluster: Cluster, op: OperatorProcess, pid: int, seconds: float) -> dict[str, Any]:
    """Nothing changes for `seconds`: the operator should write nothing (resyncs included)."""
    await asyncio.sleep(min(10.0, seconds / 10))  # status writes for the last pods' Ready may still be in flight
    before = await cluster.api_metrics()
    w0, r0, cpu0 = (
        await asyncio.to_thread(_op_writes, op),
        await asyncio.to_thread(op.counter, "modelservice_reconcile_total"),
        proc_cpu_seconds(pid),
    )
    log.info("idle window: %.0fs", seconds)
    await asyncio.sleep(seconds)
    after = await cluster.api_metrics()
    w1, r1, cpu1 = (
        await asyncio.to_thread(_op_writes, op),
        await asyncio.to_thread(op.counter, "modelservice_reconcile_total"),
        proc_cpu_seconds(pid),
    )
    split = apiserver_requests(counter_delta(before, after))
    on_ours = operator_resource_writes(split["writes"])
    return {
        "seconds": seconds,
        "operator_writes": w1 - w0,
        "reconciles": r1 - r0,
        "cpu_seconds": (cpu1 or 0) - (cpu0 or 0),
        "apiserver_writes_on_operator_resources": sum(on_ours.values()),
        "apiserver_writes_on_operator_resources_by": on_ours,
        "apiserver_writes_all": sum(split["writes"].values()),
        "apiserver_writes_all_by": split["writes"],
    }


async def repair_phase(kube: Kube, n: int, samples: int) -> dict[str, Any]:
    """Delete Services and Deployments one at a time and time their re-creation; beside it, the ReplicaSet
    controller re-creating deleted pods (Kubernetes' own controller repairing its own child)."""
    samples = max(1, min(samples, n // 3))
    added: dict[tuple[str, str], tuple[str, float]] = {}  # (kind, name) → (uid, arrival) of the latest ADDED
    pods_by_owner: dict[str, set[str]] = {}  # ModelService name → pod uids seen
    new_pod: dict[str, float] = {}
    arrivals: dict[str, asyncio.Event] = {}

    def poke(key: str) -> None:
        ev = arrivals.get(key)
        if ev is not None:
            ev.set()

    def on(kind: str) -> Callable[[str, dict[str, Any], float], None]:
        def handler(event: str, obj: dict[str, Any], t: float) -> None:
            meta = obj["metadata"]
            if event == "ADDED":
                added[(kind, meta["name"])] = (meta["uid"], t)
                poke(f"{kind}/{meta['name']}")

        return handler

    def on_pod(event: str, obj: dict[str, Any], t: float) -> None:
        meta = obj["metadata"]
        owner = (meta.get("labels") or {}).get(MODELSERVICE_LABEL)
        if event != "ADDED" or not owner:
            return
        seen = pods_by_owner.setdefault(owner, set())
        if meta["uid"] not in seen:
            seen.add(meta["uid"])
            new_pod[owner] = t
            poke(f"Pod/{owner}")

    def recreated(kind: str, name: str) -> Callable[[], Optional[float]]:
        old_uid = added.get((kind, name), ("", 0.0))[0]

        def check() -> Optional[float]:
            uid, t = added.get((kind, name), ("", 0.0))
            return t if uid and uid != old_uid else None

        return check

    async def measure(kind: str, name: str, delete_path: str, fresh: Callable[[], Optional[float]]) -> Optional[float]:
        arrivals[f"{kind}/{name}"] = ev = asyncio.Event()
        t0 = time.monotonic()
        await with_retries(lambda: kube.delete(delete_path))
        deadline = t0 + 30
        while time.monotonic() < deadline:  # bounded: 30 s per sample
            t = fresh()
            if t is not None and t >= t0:
                return t - t0
            ev.clear()
            try:
                await asyncio.wait_for(ev.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
        log.warning("repair: %s %s not re-created within 30 s", kind, name)
        return None

    svc_t: list[float] = []
    dep_t: list[float] = []
    pod_t: list[float] = []
    missed = 0
    async with (
        Watch(kube, f"/api/v1/namespaces/{NS}/services", on("Service"), label_selector=OURS),
        Watch(kube, f"/apis/apps/v1/namespaces/{NS}/deployments", on("Deployment"), label_selector=OURS),
        Watch(kube, f"/api/v1/namespaces/{NS}/pods", on_pod, label_selector=OURS),
    ):
        pods = (await kube.get(f"/api/v1/namespaces/{NS}/pods", labelSelector=OURS))["items"]
        pod_of = {(p["metadata"].get("labels") or {}).get(MODELSERVICE_LABEL): p["metadata"]["name"] for p in pods}
        for i in range(samples):  # three disjoint sets of ModelServices, interleaved so all share the same noise
            svc, pod_owner, dep = name_of(3 * i), name_of(3 * i + 1), name_of(3 * i + 2)
            t = await measure("Service", svc, object_path("v1", "Service", NS, svc), recreated("Service", svc))
            if t is not None:
                svc_t.append(t)
            if pod_owner in pod_of:
                t = await measure(
                    "Pod",
                    pod_owner,
                    object_path("v1", "Pod", NS, pod_of[pod_owner]),
                    lambda o=pod_owner: new_pod.get(o),
                )
                if t is not None:
                    pod_t.append(t)
            t = await measure(
                "Deployment", dep, object_path("apps/v1", "Deployment", NS, dep), recreated("Deployment", dep)
            )
            if t is not None:
                dep_t.append(t)
            await asyncio.sleep(0.2)
    missed = 3 * samples - len(svc_t) - len(dep_t) - len(pod_t)
    return {
        "samples": samples,
        "service": summary(svc_t),
        "deployment": summary(dep_t),
        "both": summary(svc_t + dep_t),
        "pod_by_replicaset_controller": summary(pod_t),
        "missed": missed,
    }


async def run(cfg: OperatorConfig) -> dict[str, Any]:
    largest = cfg.extended_at or max(cfg.sizes)
    results: dict[str, Any] = {"concurrency": cfg.concurrency, "resync_seconds": cfg.resync_seconds, "sizes": {}}
    for n in cfg.sizes:
        entry: dict[str, Any] = {}
        log.info(
            "[N=%d] baseline: bare client applies %d Services + Deployments (concurrency %d)", n, n, cfg.concurrency
        )
        entry["bare"] = await _guard(f"bare N={n}", _in_cluster(cfg, f"bare-{n}", n, bare_phase, cfg))
        log.info("[N=%d] bare: %s s", n, _fmt(entry["bare"].get("total_seconds")))
        log.info("[N=%d] operator: %d ModelServices", n, n)
        entry["operator"] = await _guard(
            f"operator N={n}", _in_cluster(cfg, f"operator-{n}", n, operator_phase, cfg, n == largest)
        )
        log.info("[N=%d] operator: %s s", n, _fmt(entry["operator"].get("total_seconds")))
        results["sizes"][str(n)] = entry
    return results


async def _in_cluster(
    cfg: OperatorConfig, label: str, n: int, phase: Callable[..., Awaitable[dict[str, Any]]], *args: Any
) -> dict[str, Any]:
    async with control_plane(cfg.work, label, pods=n) as cluster:
        return await phase(cluster, n, *args)


async def _guard(what: str, coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """One failed phase is reported in the results; the others still run."""
    try:
        return await coro
    except Exception as e:  # noqa: BLE001
        log.exception("%s failed", what)
        return {"error": f"{type(e).__name__}: {e}"}


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}"
