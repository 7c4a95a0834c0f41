"""The core/v1 shapes a ModelService embeds (placement, env sources), typed as Kubernetes types them.

They used to pass through the CRD unchecked (x-kubernetes-preserve-unknown-fields). Typed, the CRD refuses a wrong
type at `kubectl apply` (422, naming the field), prunes unknown keys as it does in a Pod, and bounds how deep an
object can nest: garbage nested 20 levels deep in `affinity` used to cost the API server seconds of CPU per request
(docs/reliability.md, finding 4). Only types and enums are checked here; the rest (a toleration's value with
operator Exists, maxSkew ≥ 1, …) is the API server's Deployment validation, reported as Stalled/ApplyFailed.
Fields are those of Kubernetes 1.20, the oldest version we support, and namespaceSelector (1.21+; a 1.20 API server
refuses the Deployment that carries one, which the ModelService reports as Stalled).
"""

from __future__ import annotations

from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# YAML users write `nvidia.com/gpu: 1` as often as `"1"`: int-or-string, as core/v1 Quantity is.
Quantity = Annotated[
    Union[int, Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
Strings = list[str]


class _Core(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _opt(description: str, **kw: Any) -> Any:
    return Field(None, description=description, **kw)


def _req(description: str, **kw: Any) -> Any:
    return Field(..., description=description, **kw)


def _many(description: str) -> Any:
    return Field(default_factory=list, description=description)


class Toleration(_Core):
    """A taint this model's pods tolerate."""

    key: Optional[str] = _opt("Taint key; empty with operator Exists matches every taint.")
    operator: Optional[str] = _opt("Exists or Equal (default).", pattern="^(Exists|Equal)$")
    value: Optional[str] = _opt("Taint value, for operator Equal.")
    effect: Optional[str] = _opt(
        "NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
        pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$",
    )
    tolerationSeconds: Optional[int] = _opt("How long a NoExecute taint is tolerated.")


class LabelSelectorRequirement(_Core):
    key: str = _req("Label key.")
    operator: str = _req("In, NotIn, Exists or DoesNotExist.", pattern="^(In|NotIn|Exists|DoesNotExist)$")
    values: Strings = _many("Values, for In and NotIn.")


class LabelSelector(_Core):
    """Selects pods by label."""

    matchLabels: dict[str, str] = Field(default_factory=dict, description="Labels that must all match.")
    matchExpressions: list[LabelSelectorRequirement] = _many("Requirements that must all hold.")


class NodeSelectorRequirement(_Core):
    key: str = _req("Node label (or field) key.")
    operator: str = _req("In, NotIn, Exists, DoesNotExist, Gt or Lt.", pattern="^(In|NotIn|Exists|DoesNotExist|Gt|Lt)$")
    values: Strings = _many("Values; one integer for Gt and Lt.")


class NodeSelectorTerm(_Core):
    """Node requirements that must all hold."""

    matchExpressions: list[NodeSelectorRequirement] = _many("Requirements on node labels.")
    matchFields: list[NodeSelectorRequirement] = _many("Requirements on node fields.")


class NodeSelector(_Core):
    """Nodes that match any of the terms."""

    nodeSelectorTerms: list[NodeSelectorTerm] = _req("Terms, ORed.")


class PreferredSchedulingTerm(_Core):
    """A weighted node preference."""

    weight: int = _req("1-100.")
    preference: NodeSelectorTerm = _req("Nodes preferred.")


class NodeAffinity(_Core):
    """Which nodes the pods may or should run on."""

    requiredDuringSchedulingIgnoredDuringExecution: Optional[NodeSelector] = _opt("Nodes the pods must run on.")
    preferredDuringSchedulingIgnoredDuringExecution: list[PreferredSchedulingTerm] = _many("Nodes preferred.")


class PodAffinityTerm(_Core):
    """Pods (by labels, in namespaces) to run near or away from, per topology domain."""

    labelSelector: Optional[LabelSelector] = _opt("The other pods.")
    namespaceSelector: Optional[LabelSelector] = _opt("Namespaces of the other pods (Kubernetes 1.21+).")
    namespaces: Strings = _many("Namespaces of the other pods; this one if empty.")
    topologyKey: str = _req("Node label that defines the domain, e.g. kubernetes.io/hostname.")


class WeightedPodAffinityTerm(_Core):
    """A weighted pod (anti-)affinity preference."""

    weight: int = _req("1-100.")
    podAffinityTerm: PodAffinityTerm = _req("The term.")


class PodAffinity(_Core):
    """Pod (anti-)affinity."""

    requiredDuringSchedulingIgnoredDuringExecution: list[PodAffinityTerm] = _many("Terms that must hold.")
    preferredDuringSchedulingIgnoredDuringExecution: list[WeightedPodAffinityTerm] = _many("Terms preferred.")


class Affinity(_Core):
    """core/v1 Affinity."""

    nodeAffinity: Optional[NodeAffinity] = _opt("Node affinity.")
    podAffinity: Optional[PodAffinity] = _opt("Run near these pods.")
    podAntiAffinity: Optional[PodAffinity] = _opt("Run away from these pods.")


class TopologySpreadConstraint(_Core):
    """How evenly the pods spread over a topology."""

    maxSkew: int = _req("Largest allowed difference in pod count between domains (>= 1).")
    topologyKey: str = _req("Node label that defines the domains.")
    whenUnsatisfiable: str = _req("DoNotSchedule or ScheduleAnyway.", pattern="^(DoNotSchedule|ScheduleAnyway)$")
    labelSelector: Optional[LabelSelector] = _opt("The pods counted.")


class KeyRef(_Core):
    """A key of a Secret or ConfigMap in the ModelService's namespace."""

    name: Optional[str] = _opt("Secret or ConfigMap name.")
    key: str = _req("The key.")
    optional: Optional[bool] = _opt("Start the pod even if it is missing.")


class FieldRef(_Core):
    """A field of the pod."""

    apiVersion: Optional[str] = _opt("Schema version of fieldPath, v1 by default.")
    fieldPath: str = _req("e.g. metadata.name, status.podIP.")


class ResourceFieldRef(_Core):
    """A resource request or limit of a container."""

    containerName: Optional[str] = _opt("Container; the one the variable is in by default.")
    resource: str = _req("e.g. limits.cpu, requests.memory.")
    divisor: Optional[Quantity] = _opt("Unit of the value, 1 by default.")


class EnvVarSource(_Core):
    """Where an environment variable's value comes from: one of these."""

    secretKeyRef: Optional[KeyRef] = _opt("A Secret key.")
    configMapKeyRef: Optional[KeyRef] = _opt("A ConfigMap key.")
    fieldRef: Optional[FieldRef] = _opt("A pod field.")
    resourceFieldRef: Optional[ResourceFieldRef] = _opt("A container resource.")
