"""The ModelService API (serving.modelservice.dev/v1alpha1) as pydantic models.

These models are the one source of truth: `make crds` turns them into the CRD's OpenAPI schema (crd.py), and the
operator validates every object with them before acting. What a structural schema cannot say (cross-field rules,
URI schemes per engine) lives in the validators below, and each message names the field and the fix.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelservice.corev1 import Affinity, EnvVarSource, Quantity, Toleration, TopologySpreadConstraint

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
URI_PATTERN = r"^(hf|s3|gs|pvc|oci|https?|ollama)://.+$"
# OpenAI model names are free-form; we keep them to characters that are safe in URLs, labels' neighbours and logs.
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
# An adapter's name is an OpenAI `model` too, but never namespace/name shaped: a "/" is how clients pick a namespace.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"
ADAPTER_URI_PATTERN = r"^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?/.+$"
# vLLM 0.32's --max-lora-rank accepts only these (vllm/config/lora.py MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class Engine(str, Enum):
    vllm = "vllm"
    sglang = "sglang"
    tgi = "tgi"
    triton = "triton"
    ollama = "ollama"
    llamacpp = "llamacpp"
    custom = "custom"


# Engines whose queue the gateway reads (gateway/engine_load.py NAMES; a test keeps the two equal).
QUEUE_ENGINES = (Engine.vllm, Engine.llamacpp)


class _Model(BaseModel):
    # Unknown fields are refused by the CRD's structural schema (pruned); refusing them here too keeps
    # `render -f` (offline, no API server) as strict as the cluster.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def parse_duration(text: str) -> float:
    """'1h30m' → 5400.0 seconds (the Go duration subset the schema admits)."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h30m")
    unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, _, u in re.findall(r"([0-9]+(\.[0-9]+)?)(ms|s|m|h)", text))


_QUANTITY_FACTORS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_quantity(value: Any) -> float:
    text = str(value)
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", text)
    if not m or m.group(2) not in _QUANTITY_FACTORS:
        raise ValueError(f"{text!r} is not a Kubernetes quantity like 500m, 2, 16Gi")
    return float(m.group(1)) * _QUANTITY_FACTORS[m.group(2)]


Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]
# Bounded so an oversized object is refused at admission (422) rather than failing in etcd (500).
LabelValue = Annotated[str, Field(max_length=63)]
AnnotationValue = Annotated[str, Field(max_length=65536)]


class ModelSource(_Model):
    uri: Optional[str] = Field(
        None,
        pattern=URI_PATTERN,
        max_length=2048,
        description="Where the weights come from: hf://org/repo, s3://bucket/path, gs://bucket/path, "
        "pvc://claim/path, oci://registry/image:tag, http(s)://…, ollama://tag. "
        "Optional for engine custom.",
    )
    servedName: Optional[str] = Field(
        None,
        pattern=SERVED_NAME_PATTERN,
        max_length=253,
        description="The OpenAI `model` name clients send. Defaults to metadata.name.",
    )


class Autoscaling(_Model):
    minReplicas: int = Field(
        1, ge=0, le=1000, description="Lower bound. 0 scales to zero when idle (needs the gateway)."
    )
    maxReplicas: int = Field(..., ge=1, le=1000, description="Upper bound.")
    targetInFlight: Optional[int] = Field(
        None, ge=1, le=100000, description="Concurrent requests per replica the gateway aims for (needs the gateway)."
    )
    targetQueue: Optional[int] = Field(
        None,
        ge=1,
        le=100000,
        description="Requests waiting in the engines' own queues per replica before scaling up (vLLM, llama.cpp; "
        "read by the gateway). With targetInFlight, the larger replica count wins.",
    )
    cpuUtilization: Optional[int] = Field(
        None, ge=1, le=100, description="Average CPU utilization (percent of requests.cpu) for a classic HPA."
    )
    scaleToZeroAfter: Duration = Field("300s", description="Idle time before scaling to zero (minReplicas 0 only).")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.minReplicas > self.maxReplicas:
            raise ValueError(
                f"minReplicas ({self.minReplicas}) is greater than maxReplicas ({self.maxReplicas}): "
                "lower minReplicas or raise maxReplicas"
            )
        return self


class RoutingPolicy(str, Enum):
    PrefixAffinity = "PrefixAffinity"
    LeastInFlight = "LeastInFlight"


LOAD_FACTOR = 1.25  # KubeAI's default; 1 would be plain least-loaded, a large factor plain hashing


class Routing(_Model):
    policy: RoutingPolicy = Field(
        RoutingPolicy.PrefixAffinity,
        description="How the gateway picks a replica (docs/routing.md). PrefixAffinity (default): the turns of one "
        "conversation (or one X-Session-Id) go to the same replica, whose engine holds their prefix in its "
        "KV cache, unless it is busier than loadFactor times the mean; least in-flight otherwise. "
        "LeastInFlight: the replica with the fewest requests in flight.",
    )
    loadFactor: float = Field(
        LOAD_FACTOR,
        ge=1.0,
        le=10.0,
        description="PrefixAffinity's load bound (docs/routing.md): a request goes to the replica that holds its "
        "prefix unless that replica's requests in flight would exceed loadFactor times the mean (consistent "
        "hashing with bounded loads). 1: plain least in-flight; larger: stickier, more cache hits, more "
        "hot-spotting. Also bounds LoRA adapter affinity. 1.25 is KubeAI's default.",
    )


class Resources(_Model):
    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="core/v1 resource requests, e.g. cpu, memory."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="core/v1 resource limits, e.g. nvidia.com/gpu: 1 (GPUs go here)."
    )


class Cache(_Model):
    size: Quantity = Field(..., description="Size of the PersistentVolumeClaim that keeps downloaded weights.")
    storageClassName: Optional[str] = Field(None, max_length=253, description="StorageClass; cluster default if unset.")
    accessMode: str = Field(
        "ReadWriteOnce",
        pattern="^(ReadWriteOnce|ReadWriteMany|ReadOnlyMany|ReadWriteOncePod)$",
        description="ReadWriteMany lets replicas on different nodes share one cache.",
    )


class Placement(_Model):
    nodeSelector: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="core/v1 nodeSelector."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64, description="core/v1 tolerations.")
    affinity: Optional[Affinity] = Field(None, description="core/v1 Affinity.")
    priorityClassName: Optional[str] = Field(None, max_length=253, description="PriorityClass of the model pods.")
    topologySpreadConstraints: list[TopologySpreadConstraint] = Field(
        default_factory=list, max_length=16, description="core/v1 topologySpreadConstraints."
    )


class ImagePullSecret(_Model):
    name: str = Field(..., min_length=1, max_length=253, description="Name of a Secret in the same namespace.")


class PodTemplate(_Model):
    annotations: dict[str, AnnotationValue] = Field(
        default_factory=dict, max_length=64, description="Extra annotations on model pods."
    )
    labels: dict[str, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Extra labels on model pods."
    )
    serviceAccountName: Optional[str] = Field(None, max_length=253, description="ServiceAccount of model pods.")
    imagePullSecrets: list[ImagePullSecret] = Field(default_factory=list, description="Pull secrets for the image.")


class Probes(_Model):
    readinessPath: Optional[str] = Field(
        None, pattern=r"^/", max_length=1024, description="HTTP path of the readiness probe; engine default if unset."
    )
    livenessPath: Optional[str] = Field(
        None, pattern=r"^/", max_length=1024, description="HTTP path of the liveness probe; engine default if unset."
    )
    metricsPath: Optional[str] = Field(
        None, pattern=r"^/", max_length=1024, description="Prometheus metrics path; engine default if unset."
    )


class SecretKeyRef(_Model):
    name: str = Field(..., min_length=1, max_length=253, description="Secret in the ModelService's namespace.")
    key: str = Field("keys", min_length=1, max_length=253, description="Key holding API keys, one per line.")


class EnvVar(_Model):
    name: str = Field(..., pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256, description="Variable name.")
    value: Optional[str] = Field(None, max_length=65536, description="Literal value.")
    valueFrom: Optional[EnvVarSource] = Field(None, description="core/v1 EnvVarSource (secretKeyRef, …).")


class LoraSupport(_Model):
    maxLoaded: int = Field(
        4,
        ge=1,
        le=64,
        description="Adapters one replica keeps loaded at once (vLLM --max-loras and "
        "--max-cpu-loras); the gateway unloads the least recently used beyond it.",
    )
    maxRank: int = Field(
        16,
        ge=1,
        le=512,
        description="Largest adapter rank the engine accepts (vLLM "
        "--max-lora-rank): 1, 8, 16, 32, 64, 128, 256, 320 or 512.",
    )
    claim: str = Field(
        ...,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        max_length=253,
        description="The PersistentVolumeClaim holding the adapters, mounted read-only in every "
        "replica at start: adapters added later are read from it with no restart.",
    )

    @field_validator("maxRank")
    @classmethod
    def _rank(cls, rank: int) -> int:
        if rank not in LORA_RANKS:
            raise ValueError(f"{rank} is not a rank vLLM accepts: use one of {', '.join(map(str, LORA_RANKS))}")
        return rank


class Adapter(_Model):
    name: str = Field(
        ...,
        pattern=ADAPTER_NAME_PATTERN,
        max_length=253,
        description="The OpenAI `model` clients send to use this adapter on this base.",
    )
    uri: str = Field(
        ...,
        pattern=ADAPTER_URI_PATTERN,
        max_length=2048,
        description="pvc://<spec.lora.claim>/<directory>: a PEFT adapter directory "
        "(adapter_config.json + weights). Never change or remove the files while the "
        "adapter is declared: publish a new version in a new directory.",
    )
    preload: bool = Field(False, description="Load it on every ready replica, not only on its first request.")


class ModelServiceSpec(_Model):
    engine: Engine = Field(..., description="Serving engine: vllm, sglang, tgi, triton, ollama, llamacpp or custom.")
    model: ModelSource = Field(default_factory=ModelSource, description="The model to serve.")
    image: Optional[str] = Field(
        None, min_length=1, max_length=1024, description="Container image; a pinned default per engine."
    )
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=200, description="Extra engine arguments, appended."
    )
    env: list[EnvVar] = Field(default_factory=list, max_length=200, description="Extra environment (core/v1 EnvVar).")
    port: Optional[int] = Field(None, ge=1, le=65535, description="Port the engine listens on; default per engine.")
    resources: Resources = Field(
        default_factory=Resources, description="core/v1 ResourceRequirements of the engine container."
    )
    replicas: int = Field(1, ge=0, le=1000, description="Replicas when autoscaling is off (scale subresource).")
    autoscaling: Optional[Autoscaling] = Field(None, description="Autoscaling; when set, it owns the replica count.")
    routing: Routing = Field(default_factory=Routing, description="How the gateway spreads requests over replicas.")
    cache: Optional[Cache] = Field(
        None, description="A PersistentVolumeClaim for weights (mounted where the engine caches)."
    )
    startupTimeout: Duration = Field(
        "30m", description="How long a replica may take to load the model before it is restarted."
    )
    drainTimeout: Duration = Field(
        "5m",
        description="How long a replica that is going away (scale-down, parking, a rollout) may go on "
        "generating for the requests it already has, long streams included, before its engine is "
        "stopped. Sizes the pod's terminationGracePeriodSeconds.",
    )
    placement: Placement = Field(default_factory=Placement, description="Where model pods may run.")
    podTemplate: PodTemplate = Field(default_factory=PodTemplate, description="Extra pod metadata and identity.")
    probes: Probes = Field(default_factory=Probes, description="Probe and metrics paths (custom engines).")
    apiKeySecretRef: Optional[SecretKeyRef] = Field(
        None, description="API keys the gateway requires for this model (Secret, one key per line)."
    )
    lora: Optional[LoraSupport] = Field(
        None,
        description="Start the engine with LoRA adapter support (vLLM only). Changing it restarts the "
        "replicas; adding or removing spec.adapters does not.",
    )
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=256,
        description="LoRA adapters served on this base, each under its own model name (docs/lora.md). Needs spec.lora.",
        # A map keyed by name for server-side apply: each pipeline (field manager) owns only its own entries, so two
        # of them adding adapters to one base merge instead of replacing each other's list (docs/lora.md).
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    priority: int = Field(
        0,
        ge=0,
        le=1000,
        description="Who gives GPUs back first on a full pool (0-1000, default 0): an idle scale-to-zero model is "
        "parked for a woken model of equal or higher priority, lowest priority first, then longest "
        "idle. spec.placement.priorityClassName, if set, ranks first (docs/gpu-pool.md).",
    )

    @field_validator("env")
    @classmethod
    def _unique_env(cls, env: list[EnvVar]) -> list[EnvVar]:
        seen: set[str] = set()
        for var in env:
            if var.name in seen:
                raise ValueError(f"variable {var.name!r} is set twice: keep one entry")
            seen.add(var.name)
            if var.value is not None and var.valueFrom is not None:
                raise ValueError(f"variable {var.name!r} has both value and valueFrom: keep one")
        return env

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, adapters: list[Adapter]) -> list[Adapter]:
        seen: set[str] = set()
        for a in adapters:
            if a.name in seen:
                raise ValueError(f"adapter {a.name!r} is declared twice: keep one entry")
            seen.add(a.name)
        return adapters

    @field_validator("args")
    @classmethod
    def _no_port_arg(cls, args: list[str]) -> list[str]:
        for a in args:
            if a in ("--port", "--http-port") or a.startswith(("--port=", "--http-port=")):
                raise ValueError(f"{a!r} sets the port behind the operator's back: set spec.port instead")
        return args

    @field_validator("resources")
    @classmethod
    def _resources(cls, res: Resources) -> Resources:
        for kind in ("requests", "limits"):
            for q in getattr(res, kind).values():
                parse_quantity(q)
        for name, q in res.requests.items():
            if name in res.limits and parse_quantity(q) > parse_quantity(res.limits[name]):
                raise ValueError(f"requests.{name} ({q}) is more than limits.{name} ({res.limits[name]})")
        gpu_req, gpu_lim = res.requests.get("nvidia.com/gpu"), res.limits.get("nvidia.com/gpu")
        if gpu_req is not None and gpu_lim is not None and parse_quantity(gpu_req) != parse_quantity(gpu_lim):
            raise ValueError(
                "nvidia.com/gpu must be equal in requests and limits (extended resources cannot "
                "overcommit): set it in limits only"
            )
        for name, q in {**res.requests, **res.limits}.items():
            if name == "nvidia.com/gpu" and parse_quantity(q) != int(parse_quantity(q)):
                raise ValueError(f"nvidia.com/gpu must be a whole number, not {q}")
        return res


class Condition(_Model):
    type: str = Field(..., description="Ready, Reconciling or Stalled.")
    status: str = Field(..., pattern="^(True|False|Unknown)$", description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="What a person should know or do.")
    lastTransitionTime: Optional[str] = Field(None, description="When status last changed (RFC 3339).")
    observedGeneration: Optional[int] = Field(None, description="The generation this condition describes.")


class AdapterStatus(_Model):
    name: str = Field(..., description="The adapter's name (spec.adapters[].name).")
    loadedOn: list[str] = Field(default_factory=list, description="Replicas (pods) that have it loaded now.")
    error: Optional[str] = Field(
        None, description="Why it last failed to load or cannot be routed, in the engine's or the gateway's words."
    )


class ModelServiceStatus(_Model):
    observedGeneration: Optional[int] = Field(None, description="The generation the operator last acted on.")
    replicas: Optional[int] = Field(None, description="Replicas that exist (scale subresource).")
    readyReplicas: Optional[int] = Field(None, description="Replicas ready to serve.")
    ready: Optional[str] = Field(None, description="ready/desired, for kubectl get.")
    selector: Optional[str] = Field(None, description="Label selector of the model pods (scale subresource).")
    url: Optional[str] = Field(None, description="In-cluster URL of the model's Service.")
    endpoint: Optional[str] = Field(None, description="Path of this model on the gateway.")
    gpus: Optional[int] = Field(None, description="nvidia.com/gpu held by the model's pods on nodes now.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Reconciling, Stalled (kstatus).")
    adapters: list[AdapterStatus] = Field(
        default_factory=list, description="Each declared LoRA adapter, as the gateways report it."
    )
    adaptersLoaded: Optional[str] = Field(None, description="loaded on some replica/declared, for kubectl get.")


# Cross-field rules the structural schema cannot express. Each takes the spec (and the operator's config) and
# returns a (field, message) pair for the first problem, so the Stalled condition names the field and the fix.
def cross_field_problems(spec: ModelServiceSpec, *, gateway_enabled: bool) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    uri = spec.model.uri
    scheme = uri.split("://", 1)[0] if uri else None
    if spec.engine is Engine.custom:
        if not spec.image:
            problems.append(("spec.image", "engine custom needs an image: set spec.image"))
    elif uri is None:
        problems.append(
            (
                "spec.model.uri",
                f"engine {spec.engine.value} needs a model: set spec.model.uri (for example hf://org/repo)",
            )
        )
    if scheme == "ollama" and spec.engine is not Engine.ollama:
        problems.append(
            (
                "spec.model.uri",
                f"ollama:// models are served by engine ollama, not {spec.engine.value}: change spec.engine or the URI",
            )
        )
    if spec.engine is Engine.ollama and scheme not in (None, "ollama"):
        problems.append(
            ("spec.model.uri", "engine ollama pulls models by tag: use ollama://<tag>, e.g. ollama://llama3.2:1b")
        )
    if spec.engine is Engine.triton and scheme == "hf":
        problems.append(
            (
                "spec.model.uri",
                "triton serves a model repository, not a Hugging Face repo: use pvc://, s3://, gs:// or oci://",
            )
        )
    if scheme == "pvc" and not re.fullmatch(r"pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/.*)?", uri or ""):
        problems.append(("spec.model.uri", "pvc:// URIs are pvc://<claim-name>/<path>, with a DNS-1123 claim name"))
    a = spec.autoscaling
    if a is not None:
        if a.minReplicas == 0 and not gateway_enabled:
            problems.append(
                (
                    "spec.autoscaling.minReplicas",
                    "minReplicas=0 needs the gateway: install the chart with gateway.enabled=true, "
                    "or set minReplicas to 1 or more",
                )
            )
        if a.targetInFlight is not None and not gateway_enabled:
            problems.append(
                (
                    "spec.autoscaling.targetInFlight",
                    "targetInFlight is measured by the gateway: install the chart with gateway.enabled=true, "
                    "or use cpuUtilization",
                )
            )
        if a.targetQueue is not None and not gateway_enabled:
            problems.append(
                (
                    "spec.autoscaling.targetQueue",
                    "targetQueue is read from the engines by the gateway: install the chart with "
                    "gateway.enabled=true, or use cpuUtilization",
                )
            )
        if a.targetQueue is not None and spec.engine not in QUEUE_ENGINES:
            problems.append(
                (
                    "spec.autoscaling.targetQueue",
                    f"engine {spec.engine.value} exports no queue figures the gateway reads: use targetInFlight "
                    f"(targetQueue works with {', '.join(e.value for e in QUEUE_ENGINES)})",
                )
            )
        if a.cpuUtilization is not None and "cpu" not in spec.resources.requests:
            problems.append(
                (
                    "spec.autoscaling.cpuUtilization",
                    "cpuUtilization is a percentage of requests.cpu: set spec.resources.requests.cpu",
                )
            )
    problems += adapter_problems(spec, gateway_enabled=gateway_enabled)
    if spec.apiKeySecretRef is not None and not gateway_enabled:
        problems.append(
            (
                "spec.apiKeySecretRef",
                "API keys are checked by the gateway: install the chart with "
                "gateway.enabled=true, or remove apiKeySecretRef",
            )
        )
    return problems


def adapter_problems(spec: ModelServiceSpec, *, gateway_enabled: bool) -> list[tuple[str, str]]:
    if spec.lora is None and not spec.adapters:
        return []
    if spec.engine is not Engine.vllm:
        return [
            (
                "spec.lora",
                f"LoRA adapters are loaded at run time by engine vllm only, not "
                f"{spec.engine.value}: remove spec.lora and spec.adapters, or use engine vllm",
            )
        ]
    if spec.lora is None:
        return [
            (
                "spec.adapters",
                "adapters need spec.lora (the claim they are read from and the engine's limits): set spec.lora.claim",
            )
        ]
    problems: list[tuple[str, str]] = []
    if not gateway_enabled:
        problems.append(
            ("spec.adapters", "adapters are loaded by the gateway: install the chart with gateway.enabled=true")
        )
    preloaded = sum(1 for a in spec.adapters if a.preload)
    if preloaded > spec.lora.maxLoaded:
        problems.append(
            (
                "spec.adapters",
                f"{preloaded} adapters are preloaded but a replica holds "
                f"spec.lora.maxLoaded={spec.lora.maxLoaded}: preload fewer or raise it",
            )
        )
    served = spec.model.servedName
    for i, a in enumerate(spec.adapters):
        claim = a.uri.split("://", 1)[1].split("/", 1)[0]
        if claim != spec.lora.claim:
            problems.append(
                (
                    f"spec.adapters[{i}].uri",
                    f"claim {claim!r} is not mounted by this model: put the "
                    f"adapter on spec.lora.claim ({spec.lora.claim!r})",
                )
            )
        if served is not None and a.name == served:
            problems.append(
                (f"spec.adapters[{i}].name", f"{a.name!r} is the base model's served name: rename the adapter")
            )
    return problems


class InvalidSpec(Exception):
    """A permanent spec error: retrying will not help, only an edit of the ModelService will."""


def validate_spec(raw: dict[str, Any], *, gateway_enabled: bool) -> ModelServiceSpec:
    try:
        spec = ModelServiceSpec.model_validate(raw or {})
    except ValidationError as e:
        raise InvalidSpec("; ".join(_format_error(err) for err in e.errors()[:5])) from None
    problems = cross_field_problems(spec, gateway_enabled=gateway_enabled)
    if problems:
        raise InvalidSpec("; ".join(f"{field}: {msg}" for field, msg in problems))
    return spec


def _format_error(err: Mapping[str, Any]) -> str:
    path = "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{path}: {msg}"
