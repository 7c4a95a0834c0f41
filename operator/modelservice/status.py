"""Pure: what the children say → the ModelService's status. kstatus conventions, conditions keyed by type.

Ready, Reconciling and Stalled are always present, so `kubectl wait --for=condition=Ready` and Argo CD both have
something definite to read. lastTransitionTime moves only when a condition's status flips.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

from modelservice.labels import selector_string

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
MAX_MESSAGE = 2048
# Pod problems worth surfacing verbatim: they need a person (a wrong image, a crashing server).
_WAITING_PROBLEMS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "InvalidImageName",
    "CreateContainerError",
)


@dataclass
class Observed:
    """What the operator saw this pass. Built by the controller from its watch caches."""

    generation: int
    name: str
    namespace: str
    deployment: Optional[dict[str, Any]] = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    url: Optional[str] = None
    endpoint: Optional[str] = None
    scale_to_zero: bool = False  # spec.autoscaling.minReplicas == 0
    invalid_spec: Optional[str] = None  # message from validation
    apply_error: Optional[str] = None  # the API server refused a child (permanent)
    first_pass: bool = False  # nothing applied yet for this generation
    gpus: Optional[int] = None  # nvidia.com/gpu held by its pods on nodes
    awaiting: Optional[str] = None  # the pool planner's word on its unschedulable pod (parking.py)
    parked_for: Optional[str] = None  # "ns/name" it was parked for, while at zero replicas
    adapters: Optional[list[dict[str, Any]]] = None  # status.adapters (adapters_from_leases); None: none declared


# The gateways hand adapter state over on their activity Leases (gateway/adapters.py writes it), as they hand over
# activity: the operator stays the one writer of status.
ADAPTERS_ANNOTATION = "serving.modelservice.dev/adapters"


def adapters_from_leases(declared: list[str], leases: list[dict[str, Any]], pods: set[str]) -> list[dict[str, Any]]:
    """Per declared adapter: the replicas any gateway loaded it on (still existing pods only: a Lease may outlive
    its news), and the last error a gateway saw. An unreadable annotation counts as no news."""
    loaded: dict[str, set[str]] = {n: set() for n in declared}
    errors: dict[str, str] = {}
    for lease in sorted(leases, key=lambda x: (x.get("spec") or {}).get("renewTime") or ""):
        ann = (lease.get("metadata") or {}).get("annotations") or {}
        try:
            report = json.loads(ann.get(ADAPTERS_ANNOTATION) or "{}")
        except ValueError:
            continue
        if not isinstance(report, dict):
            continue
        for name, item in report.items():
            if name not in loaded or not isinstance(item, dict):
                continue
            loaded[name] |= {p for p in item.get("loadedOn") or [] if p in pods}
            if item.get("error"):
                errors[name] = str(item["error"])[:MAX_MESSAGE]  # the newest Lease's word wins
            else:
                errors.pop(name, None)
    out = []
    for name in declared:
        row: dict[str, Any] = {"name": name, "loadedOn": sorted(loaded[name])}
        if name in errors:
            row["error"] = errors[name]
        out.append(row)
    return out


def _cond(type_: str, status: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    c = {"type": type_, "status": "True" if status else "False", "reason": reason, "observedGeneration": generation}
    if message:  # no empty strings: the v1.20 apiserver built here decodes "" in custom resources as null
        # Cut: an API server refusal may echo a huge invalid value, and three copies would not fit in etcd.
        c["message"] = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"
    return c


def _unschedulable(pods: list[dict[str, Any]]) -> Optional[str]:
    for pod in pods:
        for c in pod.get("status", {}).get("conditions", []) or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return f"pod {pod['metadata']['name']} cannot be scheduled: {c.get('message', '')}".strip()
    return None


def exited_unready(cs: dict[str, Any]) -> bool:
    """A container that stopped and is not Ready again (restarting, or crash-looping). Any exit code: a model server
    never exits on its own, and one killed by its startup probe may well exit 0 on the SIGTERM."""
    return bool(cs.get("restartCount")) and not cs.get("ready") and bool((cs.get("lastState") or {}).get("terminated"))


def _pod_problem(pods: list[dict[str, Any]]) -> Optional[tuple[str, str]]:
    """(reason, message) of the first pod whose container cannot start or keeps failing, with the engine's last words
    (lastState.terminated.message: its last log lines, as the rendered FallbackToLogsOnError policy puts them)."""
    for pod in pods:
        for cs in (pod.get("status", {}).get("containerStatuses") or []) + (
            pod.get("status", {}).get("initContainerStatuses") or []
        ):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") not in _WAITING_PROBLEMS and not exited_unready(cs):
                continue
            reason = str(waiting["reason"]) if waiting.get("reason") in _WAITING_PROBLEMS else "ContainerRestarting"
            msg = f"pod {pod['metadata']['name']}: {reason}: {waiting.get('message', '')}".strip(": ")
            if last:
                msg += (
                    f"; the engine exited with code {last.get('exitCode')} after {cs.get('restartCount', 0)} restart(s)"
                )
                if last.get("message"):
                    msg += ", its last log lines:\n" + _tail(last["message"], MAX_MESSAGE // 2)
            return reason, msg
    return None


def _tail(text: str, limit: int) -> str:
    # The end of a log says why it stopped; the cut keeps room for the rest of the message within MAX_MESSAGE.
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _deployment_stalled(dep: dict[str, Any]) -> Optional[str]:
    for c in dep.get("status", {}).get("conditions", []) or []:
        if c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded":
            return (
                f"Deployment {dep['metadata']['name']} made no progress within startupTimeout: {c.get('message', '')}"
            )
    return None


def conditions_for(o: Observed) -> list[dict[str, Any]]:
    g = o.generation
    if o.invalid_spec:
        msg = o.invalid_spec
        return [
            _cond(READY, False, "InvalidSpec", msg, g),
            _cond(RECONCILING, False, "InvalidSpec", msg, g),
            _cond(STALLED, True, "InvalidSpec", msg, g),
        ]
    if o.apply_error:
        msg = o.apply_error
        return [
            _cond(READY, False, "ApplyFailed", msg, g),
            _cond(RECONCILING, False, "ApplyFailed", msg, g),
            _cond(STALLED, True, "ApplyFailed", msg, g),
        ]
    dep = o.deployment
    if o.first_pass or dep is None:
        msg = "Creating the model server"
        return [
            _cond(READY, False, "Reconciling", msg, g),
            _cond(RECONCILING, True, "Reconciling", msg, g),
            _cond(STALLED, False, "Reconciling", "", g),
        ]
    spec, st = dep.get("spec", {}), dep.get("status", {})
    desired = spec.get("replicas", 1)
    ready = st.get("readyReplicas", 0) or 0
    updated = st.get("updatedReplicas", 0) or 0
    current_gen = (st.get("observedGeneration") or 0) >= dep["metadata"].get("generation", 0)
    stalled = _deployment_stalled(dep)
    if stalled:
        return [
            _cond(READY, ready >= desired > 0, "ProgressDeadlineExceeded", stalled, g),
            _cond(RECONCILING, False, "ProgressDeadlineExceeded", stalled, g),
            _cond(STALLED, True, "ProgressDeadlineExceeded", stalled, g),
        ]
    if desired == 0:
        if o.parked_for:
            reason, msg = "Parked", f"Parked to make room for {o.parked_for}; the first request wakes it"
        elif o.scale_to_zero:
            reason, msg = "ScaledToZero", "Scaled to zero while idle; the first request wakes it"
        else:
            reason, msg = "ScaledDown", "spec.replicas is 0"
        return [
            _cond(READY, False, reason, msg, g),
            _cond(RECONCILING, False, reason, "", g),
            _cond(STALLED, False, reason, "", g),
        ]
    rolled_out = current_gen and updated >= desired and ready >= desired and st.get("replicas", 0) == desired
    if rolled_out:
        msg = f"{ready}/{desired} replicas ready"
        return [
            _cond(READY, True, "Available", msg, g),
            _cond(RECONCILING, False, "Available", "", g),
            _cond(STALLED, False, "Available", "", g),
        ]
    capacity = _unschedulable(o.pods)
    problem = _pod_problem(o.pods)
    if capacity:
        reason, msg = "AwaitingCapacity", o.awaiting or capacity
    elif problem:
        reason, msg = problem
    elif o.scale_to_zero and ready == 0:
        reason, msg = "Activating", f"Waking from zero: 0/{desired} replicas ready (loading the model)"
    else:
        reason, msg = "Progressing", f"{ready}/{desired} replicas ready, {updated}/{desired} updated"
    # A rollout with old replicas still serving is Ready for traffic while it progresses.
    serving = ready >= desired and reason == "Progressing" and not problem
    if problem:
        # A container that cannot start or keeps failing needs a person (a bad image, bad args, a model it cannot
        # load): Stalled, with the engine's own words. Ready stays True while older replicas still serve.
        up = ready >= desired
        return [
            _cond(READY, up, "Available" if up else reason, msg, g),
            _cond(RECONCILING, False, reason, msg, g),
            _cond(STALLED, True, reason, msg, g),
        ]
    return [
        _cond(READY, serving, "Available" if serving else reason, msg, g),
        _cond(RECONCILING, True, reason, msg, g),
        _cond(STALLED, False, reason, "", g),
    ]


def merge_transition_times(new: list[dict[str, Any]], old: list[dict[str, Any]], now: str) -> list[dict[str, Any]]:
    previous = {c.get("type"): c for c in old or []}
    out = []
    for c in new:
        before = previous.get(c["type"])
        same = before is not None and before.get("status") == c["status"] and before.get("lastTransitionTime")
        out.append({**c, "lastTransitionTime": before["lastTransitionTime"] if same and before else now})
    return out


def compute_status(o: Observed, old_status: dict[str, Any], now: str) -> dict[str, Any]:
    dep = o.deployment or {}
    desired = dep.get("spec", {}).get("replicas", 0) if dep else 0
    ready = (dep.get("status", {}) or {}).get("readyReplicas", 0) or 0
    status: dict[str, Any] = {
        "observedGeneration": o.generation,
        "replicas": (dep.get("status", {}) or {}).get("replicas", 0) or 0,
        "readyReplicas": ready,
        "ready": f"{ready}/{desired}",
        "selector": selector_string(o.name),
        "conditions": merge_transition_times(conditions_for(o), old_status.get("conditions", []), now),
    }
    if o.gpus is not None:
        status["gpus"] = o.gpus
    if o.adapters:
        status["adapters"] = o.adapters
        status["adaptersLoaded"] = f"{sum(1 for a in o.adapters if a['loadedOn'])}/{len(o.adapters)}"
    if o.url:
        status["url"] = o.url
    if o.endpoint:
        status["endpoint"] = o.endpoint
    return status


def status_changed(new: dict[str, Any], old: dict[str, Any]) -> bool:
    keys = set(new) | set(old)
    return any(new.get(k) != old.get(k) for k in keys if k != "kopf")
