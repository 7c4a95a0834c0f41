"""The reconcile loop: watch caches in, one idempotent reconcile per ModelService key, writes out.

Kopf delivers watch events (handlers.py); this module keeps the latest object of each kind in memory, turns events
into keys on a work queue, and reconciles a key with: validate → decide replicas → render → apply → status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import aiohttp

from modelservice import GROUP, VERSION, gpuseconds, parking, watching
from modelservice.api import InvalidSpec, ModelServiceSpec, validate_spec
from modelservice.apply import discover_versions, sync_children
from modelservice.events import EventRecorder, now_rfc3339
from modelservice.kube import ApiError, Kube, object_path
from modelservice.labels import ACTIVITY_LABEL, MANAGED_BY, MANAGED_BY_VALUE, MODELSERVICE_LABEL
from modelservice.metrics import API_WRITES, MANAGED, RECONCILE_TIME, RECONCILE_TOTAL, WORKQUEUE_DEPTH
from modelservice.netpol import API_VERSION as NETPOL_API_VERSION
from modelservice.netpol import NetworkPolicyConfig, network_policy
from modelservice.render import (
    CHILD_KINDS,
    PRESTOP_SECONDS,
    ApiVersions,
    Context,
    gateway_path,
    port_of,
    render,
    service_url,
)
from modelservice.scaling import Activity, activity_from_leases, decide, parse_time
from modelservice.status import Observed, adapters_from_leases, compute_status, exited_unready, status_changed
from modelservice.workqueue import WorkQueue

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
MANAGED_SELECTOR = f"{MANAGED_BY}={MANAGED_BY_VALUE}"
# Workers wait this long at start for the first list of every owned kind: reconciling against an empty cache
# would re-apply every child once per operator restart. A watch that can't list (RBAC) must not stall us forever.
SYNC_WAIT = 30.0


@dataclass
class Store:
    modelservices: dict[Key, dict[str, Any]] = field(default_factory=dict)
    children: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    pods: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    leases: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _key(obj: dict[str, Any]) -> Key:
    return obj["metadata"]["namespace"], obj["metadata"]["name"]


def _owner_key(obj: dict[str, Any]) -> Optional[Key]:
    name = (obj.get("metadata", {}).get("labels") or {}).get(MODELSERVICE_LABEL)
    return (obj["metadata"]["namespace"], name) if name else None


def _rv(obj: dict[str, Any]) -> int:
    """resourceVersions are opaque to clients, but etcd3's are increasing integers: enough to order cache entries."""
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


# A burst of pod and Lease events (a model coming up) is one planning pass, not one per event.
PLAN_DEBOUNCE = 0.2
NUDGE_EVERY = 2.0  # seconds between two scheduling retries we ask for, per waiting pod (_nudge)

# What reconcile reads of leases; of other kinds except pods it reads most fields.
SLIM_KEEP = {"Lease": ("spec",)}
POD_META = ("name", "namespace", "labels", "resourceVersion", "uid", "deletionTimestamp", "creationTimestamp")


def slim(obj: Mapping[str, Any], kind: Optional[str] = None) -> dict[str, Any]:
    """The cache keeps what reconcile reads: at 1,000 models with their pods, Deployments and Services, the rest
    (managedFields above all, often half an object) would be most of the operator's memory."""
    if kind == "Pod":
        return _slim_pod(obj)
    keep = SLIM_KEEP.get(kind or "")
    out = {k: v for k, v in obj.items() if keep is None or k in keep}
    out["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    return out


def _slim_pod(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Of a pod, status.py reads failed conditions (Unschedulable) and waiting containers (CrashLoopBackOff,
    ImagePullBackOff); a healthy pod shrinks to its name and labels. Pods are the most numerous objects we cache."""
    st = obj.get("status") or {}

    def waiting(statuses: Optional[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        # A container that waits, or that runs unready after exiting (its last words are in lastState.terminated).
        return [
            {k: cs[k] for k in ("state", "lastState", "restartCount", "ready") if k in cs}
            for cs in statuses or []
            if (cs.get("state") or {}).get("waiting") or exited_unready(cs)
        ]

    status = {
        "conditions": [c for c in st.get("conditions") or [] if c.get("status") == "False"],
        "containerStatuses": waiting(st.get("containerStatuses")),
        "initContainerStatuses": waiting(st.get("initContainerStatuses")),
        "nominatedNodeName": st.get("nominatedNodeName"),
    }
    out: dict[str, Any] = {
        "metadata": {k: v for k, v in obj["metadata"].items() if k in POD_META},
        "status": {k: v for k, v in status.items() if v},
    }
    # The GPU pool planner's view (parking.py): where the pod runs, its scheduler priority and its GPU count (a
    # derived field of this cache only: the containers themselves are not kept).
    spec = {k: v for k, v in (obj.get("spec") or {}).items() if k in ("nodeName", "priority") and v}
    if spec:
        out["spec"] = spec
    gpus = parking.pod_gpus(obj)
    if gpus:
        out["gpus"] = gpus
    reserved = (obj["metadata"].get("annotations") or {}).get(parking.RESERVED_ON_ANNOTATION)
    if reserved:
        out["reservedOn"] = reserved  # the planner's reservation (parking.Plan.reserve); other annotations not kept
    return out


def _slim_node(obj: dict[str, Any]) -> dict[str, Any]:
    """Of a node, the planner reads labels, taints, cordon and allocatable GPUs."""
    spec = obj.get("spec") or {}
    return {
        "metadata": {"name": obj["metadata"]["name"], "labels": obj["metadata"].get("labels") or {}},
        "spec": {k: spec[k] for k in ("taints", "unschedulable") if spec.get(k)},
        "status": {
            "allocatable": {
                k: v for k, v in ((obj.get("status") or {}).get("allocatable") or {}).items() if k == parking.GPU
            }
        },
    }


def _rolling(dep: Optional[dict[str, Any]]) -> bool:
    """A rollout is under way: pods of an older template remain beside the updated ones."""
    st = (dep or {}).get("status") or {}
    return (st.get("replicas") or 0) > (st.get("updatedReplicas") or 0)


def _essence(body: dict[str, Any]) -> tuple[Any, ...]:
    """What can change a reconcile's outcome; a status-only change (our own write) is not worth a pass."""
    m = body.get("metadata", {})
    return m.get("generation"), m.get("uid"), tuple(sorted((m.get("labels") or {}).items())), m.get("deletionTimestamp")


class Controller:
    def __init__(
        self,
        kube: Kube,
        *,
        gateway_enabled: bool = False,
        workers: int = 4,
        resync_seconds: float = 600,
        namespaces: Optional[list[str]] = None,
        network_policy: Optional[NetworkPolicyConfig] = None,
        parking: bool = True,
        prestop_seconds: int = PRESTOP_SECONDS,
    ):
        self.kube = kube
        self.prestop_seconds = prestop_seconds  # rendered into every model's pods (render.PRESTOP_SECONDS)
        self.parking = parking  # False: no GPU pool planner, only each model's idle timer (bench comparison)
        self.network_policy = network_policy  # None: no NetworkPolicy per model (and ours are deleted)
        self.gateway_enabled = gateway_enabled
        self.store = Store()
        self.queue: WorkQueue[Key] = WorkQueue()
        self.events = EventRecorder(kube)
        self.versions = ApiVersions()
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.namespaces: list[Optional[str]] = [*namespaces] if namespaces else [None]  # [None]: all namespaces
        self._ready_since: dict[Key, float] = {}  # first seen with a ready replica since it last woke
        # The GPU pool planner (parking.py): validated specs of the models it weighs, the pods the scheduler could
        # not place for lack of GPUs, and what each waiting model was last told.
        self._specs: dict[Key, ModelServiceSpec] = {}
        self._gpu_pending: dict[Key, set[str]] = {}
        self._waiting: dict[Key, str] = {}
        self._in_place: set[Key] = set()  # rolling out without a surge replica until the rollout is done
        self._nudged: dict[str, float] = {}  # waiting pod → when we last asked the scheduler to retry it
        self.clock: Callable[[], float] = time.monotonic
        self._pool_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._relisting: Optional[asyncio.Task[None]] = None
        self.synced = asyncio.Event()  # every owned kind has been listed once

    async def start(self, on_alive: Optional[Callable[[], None]] = None) -> None:
        """on_alive(): called whenever one of our watches hears from the API server (liveness)."""
        self.versions = await discover_versions(self.kube)
        log.info("API versions: HPA %s, PDB %s", self.versions.hpa, self.versions.pdb)
        log.info("model pods wait %d s (preStop) before their engine stops", self.prestop_seconds)
        self._tasks = self._watch_owned(on_alive)
        self._tasks += [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._resync()))
        # Nodes are cluster-scoped: their watch stays out of `synced`, so an install that may not read them still
        # reconciles at once (and parks no one: without nodes the planner cannot tell where a pod fits).
        self._tasks += watching.start(self.kube, [("/api/v1/nodes", None, self.on_node)], lambda: None, on_alive)
        if self.parking:
            self._tasks.append(asyncio.create_task(self._plan_loop()))
        self._tasks.append(asyncio.create_task(gpuseconds.run(self.store), name="gpu-seconds"))  # gpuseconds.py

    def _watch_owned(self, on_alive: Optional[Callable[[], None]]) -> list[asyncio.Task[None]]:
        """Our own list-then-watch of children, pods and activity Leases; kopf watches only ModelServices. These
        kinds carry 10-20 events per ModelService as it comes up (every pod status change), and through kopf each
        cost a per-object worker task, a Body and a handler call: a third of the operator's CPU at N=1000 in
        `make bench`, and most of its memory."""

        def child(kind: str, api_version: str) -> Callable[[str, dict[str, Any]], None]:
            # LIST items carry no apiVersion/kind, and deleting a child that is no longer wanted needs both.
            return lambda event, obj: self.on_child(kind, event, slim(dict(obj, apiVersion=api_version, kind=kind)))

        kinds = [
            (kind, api_version, MANAGED_SELECTOR, child(kind, api_version))
            for kind, api_version in (
                ("Deployment", "apps/v1"),
                ("Service", "v1"),
                ("PersistentVolumeClaim", "v1"),
                ("HorizontalPodAutoscaler", self.versions.hpa),
                ("PodDisruptionBudget", self.versions.pdb),
                ("NetworkPolicy", NETPOL_API_VERSION),
            )
        ]
        kinds += [
            ("Pod", "v1", MANAGED_SELECTOR, lambda event, obj: self.on_pod(event, slim(obj, "Pod"))),
            (
                "Lease",
                "coordination.k8s.io/v1",
                f"{ACTIVITY_LABEL}=true",
                lambda event, obj: self.on_lease(event, slim(obj, "Lease")),
            ),
        ]
        watches = [
            (object_path(api_version, kind, ns), selector, apply)
            for ns in self.namespaces
            for kind, api_version, selector, apply in kinds
        ]
        return watching.start(self.kube, watches, self.synced.set, on_alive, on_relist=self._relist_soon)

    def _relist_soon(self) -> None:
        """One of our watches had to list again (410 Gone after a gap, an API server restart): kopf's ModelService
        watch had the same gap, and its relist reports what exists, not what was deleted meanwhile. One relist at a
        time: one that starts after the gap has ended sees everything the gap hid, so the others' calls are moot."""
        if self._relisting is None or self._relisting.done():
            self._relisting = asyncio.create_task(self._relist_logged(), name="relist modelservices")

    async def _relist_logged(self) -> None:
        try:
            await self.relist()
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            log.warning("relist after a watch gap failed (the next resync retries): %s", e)

    async def stop(self) -> None:
        tasks = self._tasks + ([self._relisting] if self._relisting is not None else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- events in -------------------------------------------------------------------------------------------
    def on_modelservice(self, event_type: Optional[str], body: dict[str, Any]) -> None:
        key = _key(body)
        if event_type == "DELETED":
            self.store.modelservices.pop(key, None)
            for d in (self.store.children, self.store.pods, self.store.leases):
                d.pop(key, None)
            self._ready_since.pop(key, None)
            self._specs.pop(key, None)
            self._waiting.pop(key, None)
            self._in_place.discard(key)
            self._gpu_pending.pop(key, None)
            self.events.forget(body["metadata"].get("uid", ""))
        else:
            old = self.store.modelservices.get(key)
            self.store.modelservices[key] = body
            if old is None or _essence(old) != _essence(body):
                self.queue.add(key)
        MANAGED.set(len(self.store.modelservices))
        WORKQUEUE_DEPTH.set(len(self.queue))

    def _on_owned(
        self, table: dict[Key, dict[str, dict[str, Any]]], slot: str, event_type: Optional[str], body: dict[str, Any]
    ) -> None:
        key = _owner_key(body)
        if key is None:
            return
        if event_type == "DELETED":
            table[key].pop(slot, None)
        else:
            table[key][slot] = body
        if key in self.store.modelservices:
            self.queue.add(key)

    def on_child(self, kind: str, event_type: Optional[str], body: dict[str, Any]) -> None:
        self._on_owned(self.store.children, kind, event_type, body)

    def on_pod(self, event_type: Optional[str], body: dict[str, Any]) -> None:
        self._on_owned(self.store.pods, body["metadata"]["name"], event_type, body)
        key = _owner_key(body)
        if key is None:
            return
        name = body["metadata"]["name"]
        pending = self._gpu_pending.setdefault(key, set())
        was = name in pending
        if (
            event_type != "DELETED"
            and not (body.get("spec") or {}).get("nodeName")
            and parking.pending_gpu_message(body) is not None
        ):
            pending.add(name)
        else:
            pending.discard(name)
        if not pending:
            del self._gpu_pending[key]
        if was or self._gpu_pending:
            self._pool_changed.set()  # a pod lacks GPUs, or stopped lacking them, or one may have freed some

    def on_lease(self, event_type: Optional[str], body: dict[str, Any]) -> None:
        self._on_owned(self.store.leases, body["metadata"]["name"], event_type, body)
        if self._gpu_pending:
            self._pool_changed.set()  # a model turning busy or idle changes who may be parked

    def on_node(self, event_type: str, body: dict[str, Any]) -> None:
        name = body["metadata"]["name"]
        if event_type == "DELETED":
            self.store.nodes.pop(name, None)
        else:
            self.store.nodes[name] = _slim_node(body)
        if self._gpu_pending:
            self._pool_changed.set()

    # ---- the loop ----------------------------------------------------------------------------------------------
    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            try:
                await self.relist()
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                log.warning("relist failed, resyncing from the cache: %s", e)
            for key in list(self.store.modelservices):
                self.queue.add(key)
            self._pool_changed.set()

    async def relist(self) -> None:
        """Rebuild the ModelService cache from a fresh LIST. Kopf resumes a watch that expired (410 Gone) with a new
        list, which replays what exists but says nothing of what was deleted meanwhile: without this, a ModelService
        deleted in the gap would be reconciled forever. (Children, pods and Leases come from our own watches, whose
        Mirror does the same at every relist.) Reads only; called on every resync and when one of our watches relisted
        (_relist_soon)."""
        api_version = f"{GROUP}/{VERSION}"
        items: list[dict[str, Any]] = []
        list_rv: Optional[int] = None  # the oldest of the lists: only what predates all of them can be stale
        for ns in self.namespaces:
            async for listing in self.kube.pages(object_path(api_version, "ModelService", ns)):
                items += [slim(dict(i, apiVersion=api_version, kind="ModelService")) for i in listing.get("items", [])]
                rv = int(listing["metadata"].get("resourceVersion") or 0)
                list_rv = rv if list_rv is None else min(list_rv, rv)
        listed = {_key(i) for i in items}
        for key, body in list(self.store.modelservices.items()):
            if key not in listed and _rv(body) <= (list_rv or 0):  # unless the cache saw it after the LIST
                self.on_modelservice("DELETED", body)
        for body in items:
            cached = self.store.modelservices.get(_key(body))
            if cached is None or _rv(cached) < _rv(body):
                self.on_modelservice("MODIFIED", body)

    # ---- the GPU pool planner: one loop over the whole pool (parking.py decides, this applies) ------------------
    async def _plan_loop(self) -> None:
        try:
            await asyncio.wait_for(self.synced.wait(), SYNC_WAIT)
        except asyncio.TimeoutError:
            pass
        while True:
            await self._pool_changed.wait()
            await asyncio.sleep(PLAN_DEBOUNCE)
            self._pool_changed.clear()
            try:
                await self.plan_pool()
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                log.warning("GPU pool: planning failed, retrying: %s", e)
                await asyncio.sleep(1.0)
                self._pool_changed.set()
            except Exception:  # a bug must not end planning; the next change or resync tries again
                log.exception("GPU pool: planning crashed")

    def pool_models(self, now: float) -> list[parking.Model]:
        """The planner's view of every model that holds GPUs or waits for them, from the watch caches."""
        out = []
        for key, pods in self.store.pods.items():
            spec = self._specs.get(key)
            dep = self.store.children.get(key, {}).get("Deployment")
            if spec is None or dep is None:
                continue
            bound, pending, pod_priority = [], None, 0
            for pod in pods.values():
                gpus = pod.get("gpus") or 0
                node = (pod.get("spec") or {}).get("nodeName")
                pod_priority = max(pod_priority, (pod.get("spec") or {}).get("priority") or 0)
                if node and gpus:
                    bound.append(parking.Pod(node, gpus, terminating=bool(pod["metadata"].get("deletionTimestamp"))))
                elif not node and gpus and pending is None and not pod["metadata"].get("deletionTimestamp"):
                    msg = parking.pending_gpu_message(pod)
                    if msg is not None:
                        nominated = (pod.get("status") or {}).get("nominatedNodeName")
                        reserved = pod.get("reservedOn")
                        pending = parking.Pending(
                            gpus,
                            msg,
                            nominated=bool(nominated) and nominated != reserved,  # the scheduler's, not ours
                            pod=pod["metadata"]["name"],
                            since=parse_time(pod["metadata"].get("creationTimestamp")) or 0.0,
                            reserved_on=reserved if nominated == reserved else None,
                        )
            if not bound and pending is None:
                continue
            a = spec.autoscaling
            replicas = dep.get("spec", {}).get("replicas")
            st = dep.get("status") or {}
            activity = activity_from_leases(list(self.store.leases.get(key, {}).values()), now) if a else Activity()
            out.append(
                parking.Model(
                    key=key,
                    replicas=1 if replicas is None else replicas,
                    min_replicas=a.minReplicas if a else spec.replicas,
                    scale_to_zero=bool(a and a.minReplicas == 0),
                    # Busy now, not the peak of the gateway's last interval: a model idle since a second ago gives its
                    # GPUs back at once rather than an interval or two later (the gateway writes the drop to idle at once).
                    in_flight=activity.in_flight_now,
                    ready_since=self._ready_since.get(key),
                    last_request=activity.last_request,
                    priority=spec.priority,
                    pod_priority=pod_priority,
                    placement=parking.placement_from(spec.placement),
                    pods=tuple(bound),
                    pending=pending,
                    rolling=_rolling(dep),
                    ready=st.get("readyReplicas") or 0,
                )
            )
        return out

    async def plan_pool(self) -> None:
        if not self.store.nodes:
            return  # not listed yet (or not readable): nowhere to tell a fit from a misfit
        result = parking.plan(self.pool_models(time.time()), [parking.node_from(n) for n in self.store.nodes.values()])
        for park in result.parks:
            await self._park(park)
        for key, reservation in result.reserve.items():
            await self._reserve(key, reservation)
        for key, pod in result.nudge.items():
            await self._nudge(key, pod)
        in_place = {
            k for k in self._in_place | result.in_place if _rolling(self.store.children.get(k, {}).get("Deployment"))
        }
        for key in in_place ^ self._in_place:
            self.queue.add(key)  # its Deployment's strategy changes
        self._in_place = in_place
        old, self._waiting = self._waiting, result.waiting
        for key in set(old) | set(result.waiting):
            if old.get(key) != result.waiting.get(key):
                self.queue.add(key)  # its AwaitingCapacity message changed
                body = self.store.modelservices.get(key)
                if body is not None and key in result.waiting:
                    await self.events.record(body, "Normal", "AwaitingCapacity", result.waiting[key])

    async def _reserve(self, key: Key, r: parking.Reservation) -> None:
        """Nominate the waiting pod for the node made room for it: the scheduler then keeps those GPUs from pods of
        equal or lower priority (parking.py: first come, first served). The annotation first, so that a restart
        between the two writes finds an annotation without a nomination (nothing reserved), never a nomination it
        would take for the scheduler's preemption."""
        pod = self.store.pods.get(key, {}).get(r.pod)
        if pod is None:
            return
        if pod.get("reservedOn") == r.node and (pod.get("status") or {}).get("nominatedNodeName") == r.node:
            return  # already so
        if await self._patch_pod(
            key[0],
            r.pod,
            ("", {"metadata": {"annotations": {parking.RESERVED_ON_ANNOTATION: r.node}}}),
            ("/status", {"status": {"nominatedNodeName": r.node}}),
        ):
            log.info("GPU pool: reserved node %s for %s/%s (pod %s)", r.node, key[0], key[1], r.pod)

    async def _nudge(self, key: Key, pod: str) -> None:
        """Touch an annotation of a waiting pod whose reserved GPUs are free: kube-scheduler v1.20 moves an updated
        pending pod straight to its active queue, so it is tried now rather than at the end of a backoff that has
        grown to ~10 s by the time its GPUs free up. At most once per NUDGE_EVERY per pod: if it still does not fit
        (GPUs held by pods not ours), the nudges stay as rare as the scheduler's own retries."""
        now = self.clock()
        if now - self._nudged.get(pod, -NUDGE_EVERY) < NUDGE_EVERY:
            return
        self._nudged[pod] = now
        for stale in [p for p, t in self._nudged.items() if now - t > 10 * NUDGE_EVERY]:
            del self._nudged[stale]  # pods come and go: no entry per dead pod forever
        if await self._patch_pod(
            key[0], pod, ("", {"metadata": {"annotations": {parking.RETRY_ANNOTATION: now_rfc3339()}}})
        ):
            log.info("GPU pool: asked the scheduler to retry %s/%s (pod %s): its reserved GPUs are free", *key, pod)

    async def _patch_pod(self, ns: str, pod: str, *patches: tuple[str, dict[str, Any]]) -> bool:
        """Merge-patch a waiting pod (each patch: subresource suffix, body), in order. False if the pod is gone (bound
        and replaced, or deleted) meanwhile: a reservation or a retry for it means nothing then."""
        path = object_path("v1", "Pod", ns, pod)
        try:
            for suffix, body in patches:
                await self.kube.merge_patch(path + suffix, body)
                API_WRITES.labels(verb="patch", kind="Pod").inc()
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def _park(self, park: parking.Park) -> None:
        """Scale the victim to zero and say for whom, in one write: a restart finds either both or neither."""
        (ns, name), waiter = park.victim, parking.label(park.waiter)
        dep = self.store.children.get(park.victim, {}).get("Deployment")
        if dep is None or dep.get("spec", {}).get("replicas") == 0:
            return
        await self.kube.merge_patch(
            object_path("apps/v1", "Deployment", ns, name),
            {"metadata": {"annotations": {parking.PARKED_FOR_ANNOTATION: waiter}}, "spec": {"replicas": 0}},
        )
        API_WRITES.labels(verb="scale", kind="Deployment").inc()
        log.info("GPU pool: parked %s/%s (%d GPU(s) on %s) for %s", ns, name, park.gpus, park.node, waiter)
        victim = self.store.modelservices.get(park.victim)
        if victim is not None:
            await self.events.record(victim, "Normal", "Parked", park.message)
        body = self.store.modelservices.get(park.waiter)
        if body is not None:
            await self.events.record(
                body,
                "Normal",
                "MakingRoom",
                f"parked {ns}/{name} ({park.gpus} GPU(s) on node {park.node}) to make room",
            )
        self.queue.add(park.victim)

    async def _worker(self, n: int) -> None:
        try:
            await asyncio.wait_for(self.synced.wait(), SYNC_WAIT)
        except asyncio.TimeoutError:
            if n == 0:
                log.warning("some owned kinds have not been listed after %.0fs (RBAC?); reconciling anyway", SYNC_WAIT)
        while True:
            key = await self.queue.get()
            WORKQUEUE_DEPTH.set(len(self.queue))
            started = time.monotonic()
            try:
                result = await self.reconcile(key)
                self.queue.forget(key)
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                delay = self.queue.retry(key)
                result = "error"
                log.warning("reconcile %s/%s failed (retry in %.1fs): %s", *key, delay, e)
            except Exception:  # a bug must not kill the worker; back off so it cannot hot-loop either
                delay = self.queue.retry(key)
                result = "error"
                log.exception("reconcile %s/%s crashed (retry in %.1fs)", *key, delay)
            finally:
                self.queue.done(key)
            RECONCILE_TOTAL.labels(result=result).inc()
            RECONCILE_TIME.observe(time.monotonic() - started)

    async def reconcile(self, key: Key) -> str:
        body = self.store.modelservices.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return "success"  # the garbage collector removes the children through their owner references
        ns, name = key
        meta = body["metadata"]
        old_status = body.get("status") or {}
        children = self.store.children.get(key, {})
        dep = children.get("Deployment")
        base = dict(generation=meta.get("generation", 1), name=name, namespace=ns)
        try:
            spec = validate_spec(body.get("spec") or {}, gateway_enabled=self.gateway_enabled)
        except InvalidSpec as e:
            self._specs.pop(key, None)
            await self._write_status(body, Observed(**base, deployment=dep, invalid_spec=str(e)))
            await self.events.record(body, "Warning", "InvalidSpec", str(e))
            return "invalid"

        if key in self._gpu_pending and key not in self._specs:
            self._pool_changed.set()  # a waiting model the planner could not weigh yet (just after a restart)
        self._specs[key] = spec
        now = time.time()
        current = (dep or {}).get("spec", {}).get("replicas") if dep else None
        ready = (dep or {}).get("status", {}).get("readyReplicas") or 0
        if current and ready:  # first seen Ready now (or at operator start): the idle clock starts no earlier
            self._ready_since.setdefault(key, now)
        elif not current:
            self._ready_since.pop(key, None)
        activity = activity_from_leases(list(self.store.leases.get(key, {}).values()), now)
        decision = decide(spec, current, activity, self._ready_since.get(key), now)
        if key in self._in_place and not _rolling(dep):
            self._in_place.discard(key)  # rolled out: surge again next time
        ctx = Context(
            name=name,
            namespace=ns,
            uid=meta["uid"],
            labels=meta.get("labels") or {},
            replicas=decision.apply_replicas,
            hpa_min_replicas=decision.hpa_floor,
            versions=self.versions,
            surge=key not in self._in_place,
            prestop_seconds=self.prestop_seconds,
        )
        pods = list(self.store.pods.get(key, {}).values())
        # In every status this pass writes, the first one included: a field that appeared only in the later one
        # would make it differ, and cost a status write per model at creation (make bench counts them).
        gpus = sum(p.get("gpus") or 0 for p in pods if (p.get("spec") or {}).get("nodeName"))
        facts = dict(
            base,
            url=service_url(name, ns, port_of(spec)),
            endpoint=gateway_path(name, ns) if self.gateway_enabled else None,
            scale_to_zero=bool(spec.autoscaling and spec.autoscaling.minReplicas == 0),
            gpus=gpus,
            adapters=adapters_from_leases(
                [a.name for a in spec.adapters],
                list(self.store.leases.get(key, {}).values()),
                {p["metadata"]["name"] for p in pods},
            )
            if spec.adapters
            else None,
        )
        if not old_status:  # tell GitOps tools we are on it before the first child exists
            await self._write_status(body, Observed(**facts, first_pass=True))

        desired = {**render(ctx, spec), "NetworkPolicy": network_policy(ctx, spec, self.network_policy)}
        # The policy first: the pods are never reachable around the gateway, not even while it is being created.
        result = await sync_children(self.kube, desired, children, meta["uid"], ("NetworkPolicy",) + CHILD_KINDS)
        for verb, kinds in (("apply", result.created + result.updated), ("delete", result.deleted)):
            for kind in kinds:
                API_WRITES.labels(verb=verb, kind=kind).inc()
        if result.created or result.updated or result.deleted:
            parts = [
                f"{verb} {', '.join(kinds)}"
                for verb, kinds in (
                    ("created", result.created),
                    ("updated", result.updated),
                    ("deleted", result.deleted),
                )
                if kinds
            ]
            await self.events.record(body, "Normal", "Reconciled", "; ".join(parts))
        if result.error is not None:
            msg = f"the API server refused the {result.error_kind}: {result.error.message}"
            await self._write_status(body, Observed(**facts, deployment=dep, apply_error=msg))
            await self.events.record(body, "Warning", "ApplyFailed", msg)
            return "invalid"

        parked_for = ((dep or {}).get("metadata", {}).get("annotations") or {}).get(parking.PARKED_FOR_ANNOTATION)
        if decision.scale_to is not None and dep is not None and current != decision.scale_to:
            if decision.scale_to == 0 and parked_for:  # idle this time, not parked: the old "for whom" goes
                await self.kube.merge_patch(
                    object_path("apps/v1", "Deployment", ns, name),
                    {"metadata": {"annotations": {parking.PARKED_FOR_ANNOTATION: None}}, "spec": {"replicas": 0}},
                )
            else:
                await self.kube.merge_patch(
                    object_path("apps/v1", "Deployment", ns, name, "scale"), {"spec": {"replicas": decision.scale_to}}
                )
            API_WRITES.labels(verb="scale", kind="Deployment").inc()
            reason = "ScaledToZero" if decision.scale_to == 0 else "Scaled"
            await self.events.record(body, "Normal", reason, f"scaled from {current} to {decision.scale_to} replicas")
        if decision.requeue_after is not None:
            self.queue.add_after(key, decision.requeue_after)

        await self._write_status(
            body,
            Observed(
                **facts,
                deployment=dep,
                pods=pods,
                first_pass=dep is None,
                awaiting=self._waiting.get(key),
                parked_for=parked_for if current == 0 else None,
            ),
        )
        return "success"

    async def _write_status(self, body: dict[str, Any], observed: Observed) -> None:
        old = body.get("status") or {}
        new = compute_status(observed, old, now_rfc3339())
        if not status_changed(new, old):
            return
        patch = {**{k: None for k in old if k not in new and k != "kopf"}, **new}
        meta = body["metadata"]
        path = object_path(f"{GROUP}/{VERSION}", "ModelService", meta["namespace"], meta["name"], "status")
        try:
            updated = await self.kube.merge_patch(path, {"status": patch})
        except ApiError as e:
            if e.status == 404:
                return  # deleted meanwhile
            raise
        API_WRITES.labels(verb="status", kind="ModelService").inc()
        body["status"] = updated.get("status", new)  # the next pass compares against what we wrote
