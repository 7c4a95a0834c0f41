"""Pure: how many replicas a ModelService should have, from its spec and the gateway's activity Leases.

Who writes Deployment.spec.replicas:
- no autoscaling: the operator's server-side apply (spec.replicas);
- autoscaling with cpuUtilization: the HPA (min >= 1); the operator only raises the HPA's floor from gateway load
  and takes the Deployment to 0 when idle (an HPA is inert at 0 replicas, as with KEDA);
- autoscaling without cpuUtilization: the operator, from gateway load (targetInFlight, targetQueue), through the scale
  subresource;
- waking from 0: the gateway, through the scale subresource.
Replicas never travel in the operator's apply when autoscaling is on: a field dropped from a server-side apply is
reset to its default (1), which would undo every scale decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Optional

from modelservice.api import ModelServiceSpec, parse_duration
from modelservice.labels import (
    IN_FLIGHT_ANNOTATION,
    IN_FLIGHT_NOW_ANNOTATION,
    LAST_REQUEST_ANNOTATION,
    WAITING_ANNOTATION,
)

LEASE_FRESH_SECONDS = 30  # three gateway heartbeats: older in-flight figures are stale


@dataclass(frozen=True)
class Activity:
    last_request: Optional[float] = None  # epoch seconds, newest over all gateway replicas
    in_flight: int = 0  # sum of fresh peaks over gateway replicas
    # Sum of fresh in-flight-now figures (a peak where a gateway writes none): whether it is busy at this moment,
    # which the GPU pool planner asks (parking.py); the peak over an interval is load, for scaling.
    in_flight_now: int = 0
    # Requests waiting in the engines' queues: the largest fresh figure (every gateway reads the same engines, so
    # summing would count one queue once per gateway); None when no fresh Lease carries one.
    waiting: Optional[int] = None


@dataclass(frozen=True)
class Decision:
    apply_replicas: Optional[int]  # in the server-side apply (no autoscaling), else None
    scale_to: Optional[int] = None  # write through /scale, when it differs from the current value
    hpa_floor: Optional[int] = None
    requeue_after: Optional[float] = None  # check again then (idle timer)


def parse_time(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def activity_from_leases(leases: list[dict[str, Any]], now: float) -> Activity:
    last: Optional[float] = None
    in_flight = now_total = 0
    waiting: Optional[int] = None
    for lease in leases:
        ann = lease.get("metadata", {}).get("annotations", {}) or {}
        t = parse_time(ann.get(LAST_REQUEST_ANNOTATION))
        if t is not None:
            last = t if last is None else max(last, t)
        renewed = parse_time(lease.get("spec", {}).get("renewTime"))
        if renewed is not None and now - renewed <= LEASE_FRESH_SECONDS:
            try:
                peak = max(0, int(ann.get(IN_FLIGHT_ANNOTATION, "0")))
            except ValueError:
                peak = 0
            in_flight += peak
            try:
                now_total += max(0, int(ann[IN_FLIGHT_NOW_ANNOTATION]))
            except (KeyError, ValueError):
                now_total += peak
            try:
                w = max(0, int(ann[WAITING_ANNOTATION]))
                waiting = w if waiting is None else max(waiting, w)
            except (KeyError, ValueError):
                pass
    return Activity(last_request=last, in_flight=in_flight, in_flight_now=now_total, waiting=waiting)


def queue_replicas(waiting: Optional[int], current: int, target: Optional[int]) -> int:
    """Replicas the engines' queue asks for (0: no opinion). A queue above target per replica scales up to
    ceil(waiting / target); a queue within target holds the current count (more replicas would have emptied it, so
    a short queue is no sign of spare capacity); an empty or unknown queue leaves the decision to targetInFlight and
    minReplicas, which is how a model scales down."""
    if not target or not waiting:
        return 0
    if waiting > target * current:
        return math.ceil(waiting / target)
    return current


def decide(
    spec: ModelServiceSpec, current: Optional[int], activity: Activity, ready_since: Optional[float], now: float
) -> Decision:
    """`ready_since`: when the operator first saw a ready replica since the model last woke (None: not yet). A model
    that is still loading is never idle: weights take minutes, a node may take longer to appear, and the first
    replica of a new scale-to-zero model is there to prove that it loads. The idle clock starts at Ready."""
    a = spec.autoscaling
    if a is None:
        return Decision(apply_replicas=spec.replicas)
    base = max(1, a.minReplicas)
    load = math.ceil(activity.in_flight / a.targetInFlight) if a.targetInFlight else 0
    queue = queue_replicas(activity.waiting, current or 0, a.targetQueue)
    wanted = min(max(base, load, queue), a.maxReplicas)  # the signal that asks for more wins
    hpa = a.cpuUtilization is not None
    if current is None:  # the Deployment is being created: it starts at its default (1) and is checked next pass
        return Decision(apply_replicas=None, hpa_floor=wanted if hpa else None)
    if a.minReplicas == 0:
        if current == 0:  # asleep: only the gateway wakes it
            return Decision(apply_replicas=None, hpa_floor=wanted if hpa else None)
        if ready_since is None:  # loading: not idle; the pod turning Ready triggers the next pass
            return Decision(apply_replicas=None, hpa_floor=wanted if hpa else None)
        window = parse_duration(a.scaleToZeroAfter)
        since = max(activity.last_request or 0.0, ready_since)
        idle = now - since
        if idle >= window and activity.in_flight == 0:
            return Decision(apply_replicas=None, scale_to=0, hpa_floor=wanted if hpa else None)
        requeue = max(1.0, window - idle)
    else:
        requeue = None
    if hpa:
        return Decision(apply_replicas=None, hpa_floor=wanted, requeue_after=requeue)
    return Decision(apply_replicas=None, scale_to=wanted if wanted != current else None, requeue_after=requeue)
