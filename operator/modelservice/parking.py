"""Pure: who to park (scale to zero) so that a model a request waits for gets the GPUs it needs.

Input is the observed pool (nodes, the models' pods with their node and GPU count, each model's activity, priority,
minReplicas and idle-since) and the pods the scheduler could not place for lack of nvidia.com/gpu. Output is a Plan:
the models to park, each for whom, and for every waiting model the sentence its status and the gateway's 503 say.
No I/O and no clock: the controller observes, calls plan(), applies (controller.py).

Rules (docs/gpu-pool.md says why):
- Only a model that asked for a GPU makes room: one with requests held or in flight, or one whose floor
  (minReplicas >= 1, or manual replicas) says it must run. A new scale-to-zero model's first replica waits its turn,
  and is parked itself when room is made on a node its pod could take (it would take the freed GPUs first).
- A rollout whose surge pod lacks GPUs: a model in use makes room like any other; an idle one, or one whose other
  replicas keep serving when nothing can be parked, rolls out in place (Plan.in_place).
- A victim is idle (nothing held or in flight), Ready (a model still loading is never idle), scale-to-zero
  (minReplicas 0: parking never takes a model below its floor) and not waiting for GPUs itself.
- Who may take from whom: a victim's scheduler priority (its pods' PriorityClass value) and spec.priority are both
  at most the waiting model's. The scheduler's band first: parking a model the scheduler ranks higher would have it
  preempt its way back when it wakes, and the two would fight.
- Lowest (scheduler priority, spec.priority) first, then longest idle; only as many as the pending pod needs, on one
  node the pending pod can use (nodeSelector, required node affinity, taints vs tolerations, allocatable GPUs).
- GPUs already on their way back (pods terminating) count as freed: a pod that needs 2 GPUs never parks a second
  model while the first one's pods are still stopping.
- A pod the scheduler has nominated a node for is being made room for by preemption: we do not park for it too.
- First come, first served within a priority: waiters are planned oldest pending pod first, and the GPUs made room
  for one are reserved for it (Plan.reserve: the controller writes the pod's status.nominatedNodeName, which the
  scheduler holds for it against pods of equal or lower priority, as it does for a preemptor). Without it the freed
  GPUs go to whichever pending pod leaves the scheduler's backoff first, often the newest: kube-scheduler retries a
  pod that failed often after a longer backoff (up to 10 s), so the oldest waiter would come last.
- Once the GPUs reserved for a waiter are free, the waiter is nudged (Plan.nudge: the controller touches an
  annotation of its pod): an update to a pending pod makes kube-scheduler (v1.20) try it at once instead of after its
  backoff, which by then has grown to ~10 s: the freed GPUs would sit unused that long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional

from modelservice import GROUP

if TYPE_CHECKING:
    from modelservice import api

Key = tuple[str, str]  # (namespace, ModelService name)
GPU = "nvidia.com/gpu"
# On a parked model's Deployment, written with its scale to zero in one patch: "namespace/name" it made room for.
PARKED_FOR_ANNOTATION = f"{GROUP}/parked-for"
# On a waiting pod, written before its status.nominatedNodeName: the node we reserved for it. A nomination that
# matches it is ours (Plan.reserve); any other is the scheduler's own, for a preemption.
RESERVED_ON_ANNOTATION = f"{GROUP}/reserved-on"
# On a waiting pod whose reserved GPUs are free: when we last asked the scheduler to try it again (Plan.nudge).
RETRY_ANNOTATION = f"{GROUP}/scheduling-retry"


def label(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


@dataclass(frozen=True)
class Taint:
    key: str
    value: str = ""
    effect: str = "NoSchedule"


@dataclass(frozen=True)
class Toleration:
    key: str = ""
    operator: str = "Equal"
    value: str = ""
    effect: str = ""  # empty: every effect

    def tolerates(self, t: Taint) -> bool:
        if self.effect and self.effect != t.effect:
            return False
        if self.operator == "Exists":
            return not self.key or self.key == t.key
        return self.key == t.key and (self.value or "") == (t.value or "")


@dataclass(frozen=True)
class Requirement:
    """One matchExpressions (or matchFields) entry of a node selector term."""

    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist, Gt, Lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present, value = self.key in labels, labels.get(self.key)
        op = self.operator
        if op == "In":
            return present and value in self.values
        if op == "NotIn":
            return not present or value not in self.values
        if op == "Exists":
            return present
        if op == "DoesNotExist":
            return not present
        if op in ("Gt", "Lt") and present and len(self.values) == 1:
            try:
                a, b = int(value or ""), int(self.values[0])
            except ValueError:
                return False
            return a > b if op == "Gt" else a < b
        return False


@dataclass(frozen=True)
class Term:
    """A nodeSelectorTerm: every expression holds (and every field: only metadata.name exists)."""

    expressions: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()

    def matches(self, node: "Node") -> bool:
        if not self.expressions and not self.fields:
            return False  # the API says an empty term matches no objects
        return all(r.matches(node.labels) for r in self.expressions) and all(
            r.matches({"metadata.name": node.name}) for r in self.fields
        )


@dataclass(frozen=True)
class Node:
    name: str
    gpus: int  # allocatable nvidia.com/gpu
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False


@dataclass(frozen=True)
class Placement:
    """Where the pending pod may go (the rendered spec.placement of the waiting model)."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    terms: tuple[Term, ...] = ()  # required node affinity, ORed; empty: any node
    tolerations: tuple[Toleration, ...] = ()

    def allows(self, node: Node) -> bool:
        if node.unschedulable:
            return False
        if any(node.labels.get(k) != v for k, v in self.node_selector.items()):
            return False
        if self.terms and not any(t.matches(node) for t in self.terms):
            return False
        return all(
            any(tol.tolerates(t) for tol in self.tolerations)
            for t in node.taints
            if t.effect in ("NoSchedule", "NoExecute")
        )


@dataclass(frozen=True)
class Pod:
    """A model's pod that holds (or will hold, or is giving back) GPUs on a node."""

    node: str
    gpus: int
    terminating: bool = False


@dataclass(frozen=True)
class Pending:
    """A pod of the model that the scheduler could not place for lack of GPUs."""

    gpus: int
    message: str  # the scheduler's, verbatim
    nominated: bool = False  # status.nominatedNodeName: the scheduler is preempting for it
    pod: str = ""  # its name, for the reservation
    since: float = 0.0  # its creation time: the oldest waiter is served first
    reserved_on: Optional[str] = None  # the node our reservation nominated it for (not the scheduler's nomination)


@dataclass(frozen=True)
class Model:
    key: Key
    replicas: int  # the Deployment's spec.replicas
    min_replicas: int  # the floor: autoscaling.minReplicas, or spec.replicas when not autoscaled
    scale_to_zero: bool  # autoscaling with minReplicas 0: the only kind we may park
    in_flight: int = 0  # held or proxied requests now (the activity Leases' in-flight-now, written at once on idle)
    ready_since: Optional[float] = None  # None: loading (or asleep): not idle
    last_request: Optional[float] = None
    priority: int = 0  # spec.priority
    pod_priority: int = 0  # the scheduler's priority of its pods (PriorityClass value)
    placement: Placement = field(default_factory=Placement)
    pods: tuple[Pod, ...] = ()  # bound to a node
    pending: Optional[Pending] = None
    rolling: bool = False  # a rollout is under way: old pods remain, and the pending pod is its surge
    ready: int = 0  # ready replicas

    @property
    def wanted(self) -> bool:
        """Someone relies on it now: requests held or in flight, or a floor of one replica or more. Only then may
        its pending pod make room (a rollout of such a model too: its owner asked for the new version)."""
        return self.in_flight > 0 or self.min_replicas >= 1

    @property
    def idle_since(self) -> float:
        return max(self.last_request or 0.0, self.ready_since or 0.0)

    def gpus_on(self, node: str) -> int:
        """GPUs it holds on `node` and keeps holding (not on their way back)."""
        if self.replicas == 0:
            return 0  # scaled to zero: its pods are about to terminate
        return sum(p.gpus for p in self.pods if p.node == node and not p.terminating)

    def leaving_on(self, node: str) -> int:
        """GPUs on `node` on their way back: pods terminating, or of a model scaled to zero."""
        return sum(p.gpus for p in self.pods if p.node == node and (p.terminating or self.replicas == 0))


@dataclass(frozen=True)
class Park:
    victim: Key
    waiter: Key
    node: str
    gpus: int  # freed on that node
    competing: bool = False  # held no GPU: its own pending pod would have taken the ones freed for the waiter

    @property
    def message(self) -> str:
        if self.competing:
            return (
                f"parked to make room for {label(self.waiter)}: this model waited for GPUs with no request "
                f"for it, and its pod would have taken the ones freed on node {self.node}"
            )
        return (
            f"parked to make room for {label(self.waiter)}: it needs GPUs on node {self.node}, "
            f"and this model was the idle one to give {self.gpus} back"
        )


@dataclass(frozen=True)
class Reservation:
    pod: str
    node: str
    gpus: int


@dataclass
class Plan:
    parks: list[Park] = field(default_factory=list)
    # waiting model → the node whose GPUs are made room for it (or free now): its pending pod is nominated there.
    reserve: dict[Key, Reservation] = field(default_factory=dict)
    # waiting model → its pending pod, already reserved on a node whose GPUs are now free: ask for a retry now.
    nudge: dict[Key, str] = field(default_factory=dict)
    # waiting model → what it waits for (AwaitingCapacity). Also set for models we park for.
    waiting: dict[Key, str] = field(default_factory=dict)
    # Rollouts to do in place (maxSurge 0, maxUnavailable 1): no GPU for a surge replica, and replacing one replica
    # at a time takes nothing from anyone (the model is idle, or others of its replicas keep serving).
    in_place: set[Key] = field(default_factory=set)


def _rank(m: Model) -> tuple[int, int, float]:
    """Who goes first: lowest scheduler priority, then lowest spec.priority, then longest idle."""
    return (m.pod_priority, m.priority, m.idle_since)


def _why_not(victim: Model, waiter: Model) -> Optional[str]:
    """None if `victim` may be parked for `waiter`, else why not (for the waiting model's status)."""
    if victim.pending is not None and victim.wanted:
        return "is waiting for GPUs itself"
    if not victim.scale_to_zero:
        return f"has minReplicas {victim.min_replicas}"
    if victim.in_flight > 0:
        return f"is busy ({victim.in_flight} request(s) in flight)"
    if victim.ready_since is None:
        return "is still loading"
    if (victim.pod_priority, victim.priority) > (waiter.pod_priority, waiter.priority):
        return "has a higher priority"
    return None


def plan(models: list[Model], nodes: list[Node]) -> Plan:
    out = Plan()
    by_key = {m.key: m for m in models}
    parked: set[Key] = set()
    # Highest first: when two models wait, the more important one picks its victims first; then the oldest.
    waiters = sorted(
        (m for m in models if m.pending is not None),
        key=lambda m: (-m.pod_priority, -m.priority, m.pending.since if m.pending else 0.0, m.key),
    )
    for w in waiters:
        p = w.pending
        assert p is not None
        if w.rolling and not w.wanted:
            out.in_place.add(w.key)
            out.waiting[w.key] = (
                f"rolling out in place, one replica at a time: no GPU free for a surge replica "
                f"({p.message}), and nothing relies on this model now"
            )
            continue
        if not w.wanted:
            out.waiting[w.key] = (
                f"no GPU free: {p.message}; no request is waiting for it, so it parks no one "
                "and starts when GPUs free up"
            )
            continue
        if p.nominated:
            out.waiting[w.key] = (
                f"no GPU free: {p.message}; the scheduler is preempting lower-priority pods "
                "for it (spec.placement.priorityClassName)"
            )
            continue
        before = len(out.parks)
        said = _make_room(w, by_key, nodes, parked, out)
        if w.rolling and len(out.parks) == before and said.startswith("no GPU free") and w.ready > 1:
            out.in_place.add(w.key)  # nothing to park: replace one of its replicas, the others keep serving
            said = f"rolling out in place, one replica at a time (other replicas keep serving): {said}"
        out.waiting[w.key] = said
    return out


def _make_room(w: Model, by_key: dict[Key, Model], nodes: list[Node], parked: set[Key], out: Plan) -> str:
    p = w.pending
    assert p is not None
    usable = [n for n in nodes if w.placement.allows(n) and n.gpus >= p.gpus]
    if not usable:
        return f"no GPU free: {p.message}; no node matches its placement with {p.gpus} GPU(s)"
    reasons: dict[Key, str] = {}
    stats = []
    for n in sorted(usable, key=lambda n: n.name):
        others = [m for m in by_key.values() if m.key not in parked]
        used = sum(m.gpus_on(n.name) for m in others)  # the waiter's own running replicas included
        # GPUs on their way back, less those reserved earlier in this plan for an older (or higher) waiter.
        reserved = sum(r.gpus for r in out.reserve.values() if r.node == n.name)
        leaving = max(0, sum(m.leaving_on(n.name) for m in by_key.values()) - reserved)
        # GPUs of models parked earlier in this plan (for another waiter) are spoken for.
        spoken = sum(m.gpus_on(n.name) for m in by_key.values() if m.key in parked)
        free = n.gpus - used - leaving - spoken - reserved
        stats.append((n, others, free, leaving))
    for n, _, free, _ in stats:
        if free >= p.gpus:  # by our count it fits: the scheduler has not retried yet, or pods not ours hold GPUs
            if p.reserved_on == n.name and p.pod:
                out.nudge[w.key] = p.pod  # reserved and free: the scheduler only has to try it
            _reserve(w, n, out)
            return f"no GPU free: {p.message}; node {n.name} looks free now: waiting for the scheduler to retry"
    for n, _, free, leaving in stats:
        if leaving and free + leaving >= p.gpus:
            _reserve(w, n, out)
            _park_competitors(w, n, by_key, parked, out)
            going = sorted(label(m.key) for m in by_key.values() if m.leaving_on(n.name))
            return f"waiting for {', '.join(going)} to give back GPUs on node {n.name} (no GPU free: {p.message})"
    best: Optional[tuple[tuple[Any, ...], Node, list[Model]]] = None
    for n, others, free, leaving in stats:
        candidates = []
        for m in others:
            if m.key == w.key or not m.gpus_on(n.name):
                continue
            why = _why_not(m, w)
            if why is None:
                candidates.append(m)
            else:
                reasons.setdefault(m.key, why)
        chosen: list[Model] = []
        gained = free + leaving
        for m in sorted(candidates, key=_rank):
            if gained >= p.gpus:
                break
            chosen.append(m)
            gained += m.gpus_on(n.name)
        if gained < p.gpus or not chosen:
            continue
        # The cheapest node: whose most important victim ranks lowest, then the fewest victims, then fewest GPUs.
        cost = (max(_rank(m) for m in chosen), len(chosen), sum(m.gpus_on(n.name) for m in chosen), n.name)
        if best is None or cost < best[0]:
            best = (cost, n, chosen)
    if best is None:
        if not reasons:
            return f"no GPU free: {p.message}; nothing can be parked: no model of ours holds GPUs it can use"
        listed = "; ".join(f"{label(k)} {r}" for k, r in sorted(reasons.items())[:8])
        more = f" (and {len(reasons) - 8} more)" if len(reasons) > 8 else ""
        return f"no GPU free: {p.message}; nothing can be parked: {listed}{more}"
    _, node, chosen = best
    for m in chosen:
        parked.add(m.key)
        out.parks.append(Park(victim=m.key, waiter=w.key, node=node.name, gpus=m.gpus_on(node.name)))
    _reserve(w, node, out)
    _park_competitors(w, node, by_key, parked, out)
    names = ", ".join(label(m.key) for m in chosen)
    return f"waiting for GPUs on node {node.name}: parking {names} to make room (no GPU free: {p.message})"


def _reserve(w: Model, node: Node, out: Plan) -> None:
    p = w.pending
    if p is not None and p.pod:
        out.reserve[w.key] = Reservation(p.pod, node.name, p.gpus)


# ---- from the API's objects (the controller's slim caches) -----------------------------------------------------


def pod_gpus(pod: Mapping[str, Any]) -> int:
    """nvidia.com/gpu a pod asks for: the sum over its containers (GPUs cannot overcommit: limits equal requests)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU, (res.get("requests") or {}).get(GPU, 0))
        try:
            total += int(str(value))
        except ValueError:
            pass
    return total


def pending_gpu_message(pod: Mapping[str, Any]) -> Optional[str]:
    """The scheduler's message if it could not place the pod for lack of GPUs (PodScheduled=False, Unschedulable)."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if (
            c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
            and GPU in (c.get("message") or "")
        ):
            return c.get("message") or ""
    return None


def node_from(obj: Mapping[str, Any]) -> Node:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    try:
        gpus = int(str((status.get("allocatable") or {}).get(GPU, 0)))
    except ValueError:
        gpus = 0
    taints = tuple(Taint(t.get("key", ""), t.get("value") or "", t.get("effect", "")) for t in spec.get("taints") or [])
    return Node(
        name=obj["metadata"]["name"],
        gpus=gpus,
        labels=dict(obj["metadata"].get("labels") or {}),
        taints=taints,
        unschedulable=bool(spec.get("unschedulable")),
    )


def placement_from(pl: api.Placement) -> Placement:
    """spec.placement (api.Placement) → what the scheduler will hold the pending pod to."""
    terms: list[Term] = []
    na = pl.affinity.nodeAffinity if pl.affinity else None
    required = na.requiredDuringSchedulingIgnoredDuringExecution if na else None
    for t in required.nodeSelectorTerms if required else []:
        terms.append(
            Term(
                expressions=tuple(Requirement(r.key, r.operator, tuple(r.values)) for r in t.matchExpressions),
                fields=tuple(Requirement(r.key, r.operator, tuple(r.values)) for r in t.matchFields),
            )
        )
    tolerations = tuple(
        Toleration(t.key or "", t.operator or "Equal", t.value or "", t.effect or "") for t in pl.tolerations
    )
    return Placement(node_selector=dict(pl.nodeSelector), terms=tuple(terms), tolerations=tolerations)


def _park_competitors(w: Model, node: Node, by_key: dict[Key, Model], parked: set[Key], out: Plan) -> None:
    """GPUs freed for `w` go to whichever pending pod the scheduler takes first (higher priority, then older): a
    scale-to-zero model that waits with no request for it (a new model's first replica, a pod the scheduler
    preempted) would take them, and the planner would park another victim for `w`. Such a model is parked too,
    if it ranks no higher than `w` (one the scheduler ranks higher gets the GPUs first, as its band says)."""
    for m in sorted(by_key.values(), key=lambda m: m.key):
        if (
            m.key != w.key
            and m.key not in parked
            and m.pending is not None
            and not m.wanted
            and m.scale_to_zero
            and m.replicas > 0
            and (m.pod_priority, m.priority) <= (w.pod_priority, w.priority)
            and m.placement.allows(node)
            and m.pending.gpus <= node.gpus
        ):
            parked.add(m.key)
            out.parks.append(Park(victim=m.key, waiter=w.key, node=node.name, gpus=0, competing=True))
