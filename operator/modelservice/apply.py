"""I/O: bring the children in line with what render() wants, with as few writes as possible.

Server-side apply with one field manager, force=True (we are the controller of the fields we set; a conflict is
drift to undo). Before applying we compare with what the watch cache already holds: when every field we set is
already there, no request is made at all — idle resyncs and child events that change nothing cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from modelservice.kube import ApiError, Kube, object_path
from modelservice.labels import MANAGED_BY, MANAGED_BY_VALUE
from modelservice.render import ApiVersions

_IGNORED_TOP = {"apiVersion", "kind"}


async def discover_versions(kube: Kube) -> ApiVersions:
    """autoscaling/v2 else v2beta2, policy/v1 else v1beta1: what the cluster serves (v1.20 has only the betas)."""
    autoscaling = await kube.api_versions("autoscaling")
    policy = await kube.api_versions("policy")
    hpa = next((v for v in ("autoscaling/v2", "autoscaling/v2beta2") if v in autoscaling), "autoscaling/v2")
    pdb = next((v for v in ("policy/v1", "policy/v1beta1") if v in policy), "policy/v1")
    return ApiVersions(hpa=hpa, pdb=pdb)


def contains(observed: Any, desired: Any) -> bool:
    """True when every field of `desired` is present, equal, in `observed` (server defaults may add more)."""
    if isinstance(desired, dict):
        return isinstance(observed, dict) and all(
            k in observed and contains(observed[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(contains(o, d) for o, d in zip(observed, desired))
        )
    if (
        isinstance(desired, (int, float))
        and isinstance(observed, str)
        or isinstance(desired, str)
        and isinstance(observed, (int, float))
    ):
        return str(desired) == str(observed)
    return bool(observed == desired)


def needs_apply(desired: dict[str, Any], observed: Optional[dict[str, Any]]) -> bool:
    if observed is None or observed.get("metadata", {}).get("deletionTimestamp"):
        return True
    return not contains(observed, {k: v for k, v in desired.items() if k not in _IGNORED_TOP})


def owned_by_us(obj: dict[str, Any], owner_uid: str) -> bool:
    meta = obj.get("metadata", {})
    if meta.get("labels", {}).get(MANAGED_BY) != MANAGED_BY_VALUE:
        return False
    return any(ref.get("uid") == owner_uid and ref.get("controller") for ref in meta.get("ownerReferences", []) or [])


@dataclass
class ApplyResult:
    created: list[str]
    updated: list[str]
    deleted: list[str]
    error: Optional[ApiError] = None  # a permanent refusal (422 etc.), reported as Stalled
    error_kind: Optional[str] = None


async def sync_children(
    kube: Kube,
    desired: dict[str, Optional[dict[str, Any]]],
    observed: dict[str, dict[str, Any]],
    owner_uid: str,
    order: tuple[str, ...],
) -> ApplyResult:
    result = ApplyResult([], [], [])
    for kind in order:
        want, have = desired.get(kind), observed.get(kind)
        try:
            if want is None:
                if have is not None and owned_by_us(have, owner_uid):
                    m = have["metadata"]
                    await kube.delete(object_path(have["apiVersion"], kind, m["namespace"], m["name"]))
                    result.deleted.append(kind)
            elif needs_apply(want, have):
                await kube.apply(want)
                (result.updated if have is not None else result.created).append(kind)
        except ApiError as e:
            if e.permanent:
                result.error, result.error_kind = e, kind
                return result
            raise
    return result
