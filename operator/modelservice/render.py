"""Pure: a validated ModelService → the Kubernetes objects that serve it. No I/O, no clock.

Everything engine-specific comes from engines.ENGINES; everything here is the same for every engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from modelservice import GROUP, KIND, VERSION
from modelservice.api import Engine, ModelServiceSpec, parse_duration
from modelservice.engines import ADAPTERS_DIR, CACHE_DIR, ENGINES, MODELS_DIR, STORAGE_INITIALIZER_IMAGE, EngineSpec
from modelservice.labels import ENGINE_LABEL, MANAGED_BY, MANAGED_BY_VALUE, cache_pvc_name, child_name, selector_labels

# Labels a GitOps tool or kubectl uses to track the ModelService itself. Copied to children they would make Argo CD
# adopt (and prune) objects it did not create.
_NOT_PROPAGATED_LABEL_PREFIXES = (
    "app.kubernetes.io/instance",
    "argocd.argoproj.io/",
    "kopf.zalando.org/",
    "kubectl.kubernetes.io/",
)
# The startup probe's period is the largest part of what a cold start costs beyond the engine's own load: a kubelet
# notices a loaded model on the next probe, then runs the readiness probe at once. 1 s (the smallest a kubelet takes)
# costs 0.5 s on average for a load that ends at a random moment, a whole period for an engine up within the first
# (docs/benchmarks.md); an HTTP GET to /health a second is nothing next to loading weights.
STARTUP_PERIOD_SECONDS = 1
# A pod going away leaves its EndpointSlice at once, but the gateway (and kube-proxy) hear of it a moment later: the
# preStop hook holds the engine's SIGTERM that long, so no new request reaches an engine that has stopped accepting.
# Short on purpose: a parked model's GPUs are free only once its pod is gone, and a woken model waits for them.
# Only for clients that reach engines without the gateway: the gateway itself replays what a stopping engine refused
# or dropped unread. So by default (prestop_seconds below) there is none where the operator renders the NetworkPolicy
# that lets only the gateway in, and every park frees its GPU at once (docs/gpu-pool.md, "The release").
PRESTOP_SECONDS = 2


def prestop_seconds(setting: Optional[int], *, gateway_only: bool) -> int:
    """The preStop wait of model pods: the operator's --prestop-seconds if given; otherwise 0 where only the gateway
    may reach the engines (--gateway-enabled with --network-policy), PRESTOP_SECONDS elsewhere."""
    if setting is not None:
        return setting
    return 0 if gateway_only else PRESTOP_SECONDS


@dataclass(frozen=True)
class ApiVersions:
    """Chosen from discovery by apply.py; render only writes them down."""

    hpa: str = "autoscaling/v2"
    pdb: str = "policy/v1"


@dataclass(frozen=True)
class Context:
    """What render needs beyond the spec: the owner's identity and decisions made outside (replicas, versions)."""

    name: str
    namespace: str
    uid: str
    labels: dict[str, str]
    replicas: Optional[int]  # None: someone else (HPA) owns spec.replicas, so the apply leaves it out
    hpa_min_replicas: Optional[int] = None  # raised above minReplicas by gateway load (scaling.py)
    versions: ApiVersions = ApiVersions()
    surge: bool = True  # False: roll out in place, the pool has no GPU for a surge replica (parking.py)
    prestop_seconds: int = PRESTOP_SECONDS  # the operator's --prestop-seconds; 0: no preStop hook


def served_name(spec: ModelServiceSpec, name: str) -> str:
    return spec.model.servedName or name


def engine_of(spec: ModelServiceSpec) -> EngineSpec:
    return ENGINES[spec.engine]


def port_of(spec: ModelServiceSpec) -> int:
    return spec.port or engine_of(spec).port


def service_url(name: str, namespace: str, port: int) -> str:
    return f"http://{name}.{namespace}.svc.cluster.local:{port}"


def gateway_path(name: str, namespace: str) -> str:
    return f"/models/{namespace}/{name}/"


def base_labels(ctx: Context, spec: ModelServiceSpec) -> dict[str, str]:
    user = {k: v for k, v in ctx.labels.items() if not k.startswith(_NOT_PROPAGATED_LABEL_PREFIXES)}
    return {
        **user,
        "app.kubernetes.io/name": "modelservice",
        "app.kubernetes.io/instance": ctx.name,
        "app.kubernetes.io/component": "model-server",
        MANAGED_BY: MANAGED_BY_VALUE,
        ENGINE_LABEL: spec.engine.value,
        **selector_labels(ctx.name),
    }


def owner_reference(ctx: Context) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(ctx: Context, spec: ModelServiceSpec, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": base_labels(ctx, spec),
        "ownerReferences": [owner_reference(ctx)],
    }


def _fill(template: tuple[str, ...], **values: str) -> list[str]:
    return [part.format(**values) for part in template]


@dataclass
class _ModelMount:
    ref: Optional[str] = None  # what the engine is told to load
    hub: bool = False
    env: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)
    mounts: list[dict[str, Any]] = field(default_factory=list)
    init: list[dict[str, Any]] = field(default_factory=list)


def _model_mount(spec: ModelServiceSpec, eng: EngineSpec, models_volume: dict[str, Any]) -> _ModelMount:
    uri = spec.model.uri
    if uri is None:
        return _ModelMount()
    scheme, rest = uri.split("://", 1)
    out = _ModelMount()
    if spec.engine is Engine.custom:
        out.env.append({"name": "MODEL_URI", "value": uri})
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        out.volumes.append({"name": "model-source", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        out.mounts.append({"name": "model-source", "mountPath": MODELS_DIR, "readOnly": True})
        out.ref = f"{MODELS_DIR}/{path}".rstrip("/")
        return out
    if scheme in eng.native_schemes:
        out.ref, out.hub = (rest, True) if scheme in ("hf", "ollama") else (uri, False)
        return out
    # Downloaded before the engine starts, into the cache PVC when there is one (survives restarts).
    out.volumes.append(models_volume)
    out.mounts.append(
        {
            "name": models_volume["name"],
            "mountPath": MODELS_DIR,
            "readOnly": True,
            **({"subPath": "models"} if "persistentVolumeClaim" in models_volume else {}),
        }
    )
    init_mount = {
        "name": models_volume["name"],
        "mountPath": MODELS_DIR,
        **({"subPath": "models"} if "persistentVolumeClaim" in models_volume else {}),
    }
    if scheme == "oci":  # a "modelcar": an image whose /models holds the weights
        out.init.append(
            {
                "name": "model-fetch",
                "image": rest,
                "command": ["sh", "-c", f"cp -a /models/. {MODELS_DIR}/"],
                "volumeMounts": [init_mount],
                "securityContext": _security_context(True),
            }
        )
    else:
        out.init.append(
            {
                "name": "model-fetch",
                "image": STORAGE_INITIALIZER_IMAGE,
                "args": [uri, MODELS_DIR],
                "volumeMounts": [init_mount],
                "securityContext": _security_context(True),
            }
        )
    out.ref = MODELS_DIR
    return out


def _security_context(restricted: bool) -> dict[str, Any]:
    base: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if restricted:
        base.update({"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000})
    return base


def _probe(path: Optional[str], port: int, **timing: int) -> dict[str, Any]:
    action = {"httpGet": {"path": path, "port": port}} if path else {"tcpSocket": {"port": port}}
    return {**action, **timing}


def _resources(spec: ModelServiceSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("requests", "limits"):
        values = {k: str(v) for k, v in getattr(spec.resources, kind).items()}
        if values:
            out[kind] = values
    return out


def _plain(value: Any) -> Any:
    """Embedded core/v1 models as the API server stores them: unset fields and empty lists left out (omitempty), or
    compare-before-apply would see a difference on every pass."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.model_dump(exclude_defaults=True) if value is not None else None


def pod_template(ctx: Context, spec: ModelServiceSpec) -> dict[str, Any]:
    eng = engine_of(spec)
    port = port_of(spec)
    name = served_name(spec, ctx.name)
    cache_volume = (
        {"name": "cache", "persistentVolumeClaim": {"claimName": cache_pvc_name(ctx.name)}}
        if spec.cache
        else {"name": "cache", "emptyDir": {}}
    )
    model = _model_mount(spec, eng, cache_volume if spec.cache else {"name": "models", "emptyDir": {}})

    args = _fill(eng.args, name=name, port=str(port))
    if model.ref is not None:
        template = eng.model_args_hub if model.hub else eng.model_args_path
        args = _fill(template, model=model.ref, name=name, port=str(port)) + args
    # spec.lora only, never spec.adapters: adding or removing an adapter must not change the pod template (a restart).
    lora = spec.lora if eng.lora_args else None
    if lora is not None:
        args += _fill(eng.lora_args, max_loaded=str(lora.maxLoaded), max_rank=str(lora.maxRank))
    args += spec.args

    env = [
        {"name": k, "value": v.format(port=port)}
        for k, v in eng.cache_env + eng.extra_env + (eng.lora_env if lora else ())
    ]
    if spec.engine is Engine.custom:
        env += [{"name": "PORT", "value": str(port)}, {"name": "SERVED_MODEL_NAME", "value": name}]
    env += model.env or []
    user_env = [v.model_dump(exclude_none=True) for v in spec.env]
    user_names = {v["name"] for v in user_env}
    env = [v for v in env if v["name"] not in user_names] + user_env  # the user's value wins

    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if eng.cache_env or spec.cache:
        volumes.append(cache_volume)
        mounts.append({"name": "cache", "mountPath": CACHE_DIR})
    if eng.shm:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    for v in model.volumes or []:
        if v["name"] not in {x["name"] for x in volumes}:
            volumes.append(v)
    mounts += model.mounts or []
    if lora is not None:
        volumes.append({"name": "adapters", "persistentVolumeClaim": {"claimName": lora.claim, "readOnly": True}})
        mounts.append({"name": "adapters", "mountPath": ADAPTERS_DIR, "readOnly": True})

    readiness = spec.probes.readinessPath or eng.readiness_path
    liveness = spec.probes.livenessPath or eng.liveness_path
    startup_failures = max(1, math.ceil(parse_duration(spec.startupTimeout) / STARTUP_PERIOD_SECONDS))
    container: dict[str, Any] = {
        "name": "server",
        "image": spec.image or eng.image,
        **({"command": list(eng.command)} if eng.command else {}),
        "args": args,
        **({"workingDir": ADAPTERS_DIR} if lora is not None else {}),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        + ([{"name": "metrics", "containerPort": eng.metrics_port, "protocol": "TCP"}] if eng.metrics_port else []),
        "env": env,
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # Models load slowly: the startup probe holds off liveness until the weights are in (startupTimeout).
        "startupProbe": _probe(
            readiness, port, periodSeconds=STARTUP_PERIOD_SECONDS, failureThreshold=startup_failures, timeoutSeconds=5
        ),
        "readinessProbe": _probe(readiness, port, periodSeconds=5, failureThreshold=3, timeoutSeconds=5),
        "livenessProbe": _probe(liveness, port, periodSeconds=15, failureThreshold=4, timeoutSeconds=10),
        "securityContext": _security_context(eng.restricted),
        # An engine that exits with an error leaves its last log lines in the pod's status (lastState.terminated),
        # where the operator reads them into the ModelService's condition: no log access needed to see why.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    lifecycle: dict[str, Any] = {}
    if eng.pull_model_on_start and model.ref:
        # PostStart holds the container out of Ready until the pull is done, so no request hits an empty server.
        lifecycle["postStart"] = {
            "exec": {
                "command": [
                    "/bin/sh",
                    "-c",
                    f"until ollama list >/dev/null 2>&1; do sleep 1; done; ollama pull '{model.ref}'",
                ]
            }
        }
    if ctx.prestop_seconds and spec.engine is not Engine.custom:  # engines' images have sleep; custom may not
        lifecycle["preStop"] = {"exec": {"command": ["sleep", str(ctx.prestop_seconds)]}}
    if lifecycle:
        container["lifecycle"] = lifecycle

    metrics_path = spec.probes.metricsPath or eng.metrics_path
    annotations = dict(spec.podTemplate.annotations)
    if metrics_path:
        annotations.setdefault("prometheus.io/scrape", "true")
        annotations.setdefault("prometheus.io/port", str(eng.metrics_port or port))
        annotations.setdefault("prometheus.io/path", metrics_path)

    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # Service links inject <SERVICE>_PORT variables; vLLM reads VLLM_PORT and breaks on a Service named vllm.
        "enableServiceLinks": False,
        "securityContext": {
            "seccompProfile": {"type": "RuntimeDefault"},
            **({"runAsNonRoot": True, "fsGroup": 1000} if eng.restricted else {}),
        },
        # Drain, not the 30 s default: SIGTERM makes the engines stop accepting and finish what they are generating
        # (a long stream takes minutes), and the kubelet kills them only when this has passed.
        "terminationGracePeriodSeconds": int(parse_duration(spec.drainTimeout)) + ctx.prestop_seconds,
    }
    if model.init:
        pod_spec["initContainers"] = model.init
    pl, pt = spec.placement, spec.podTemplate
    for key, value in (
        ("nodeSelector", pl.nodeSelector),
        ("tolerations", _plain(pl.tolerations)),
        ("affinity", _plain(pl.affinity)),
        ("priorityClassName", pl.priorityClassName),
        ("topologySpreadConstraints", _plain(pl.topologySpreadConstraints)),
        ("serviceAccountName", pt.serviceAccountName),
        ("imagePullSecrets", [s.model_dump() for s in pt.imagePullSecrets]),
    ):
        if value:
            pod_spec[key] = value
    if not pt.serviceAccountName:
        pod_spec["automountServiceAccountToken"] = False  # model servers do not talk to the API server

    labels = {**pt.labels, **base_labels(ctx, spec)}
    return {"metadata": {"labels": labels, **({"annotations": annotations} if annotations else {})}, "spec": pod_spec}


def deployment(ctx: Context, spec: ModelServiceSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(ctx, spec, child_name(ctx.name)),
        "spec": {
            "selector": {"matchLabels": selector_labels(ctx.name)},
            # Never take a serving replica away before its replacement is Ready; but on a full GPU pool, when the
            # planner found no GPU for the surge replica and none to free, replace one at a time (docs/gpu-pool.md).
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": (
                    {"maxSurge": 1, "maxUnavailable": 0} if ctx.surge else {"maxSurge": 0, "maxUnavailable": 1}
                ),
            },
            "revisionHistoryLimit": 3,
            # Beyond startupTimeout a rollout that has not progressed is stuck (crash loop, bad image): say Stalled.
            "progressDeadlineSeconds": int(parse_duration(spec.startupTimeout)) + 300,
            "template": pod_template(ctx, spec),
        },
    }
    if ctx.replicas is not None:
        body["spec"]["replicas"] = ctx.replicas
    return body


def service(ctx: Context, spec: ModelServiceSpec) -> dict[str, Any]:
    eng = engine_of(spec)
    ports = [{"name": "http", "port": port_of(spec), "targetPort": "http", "protocol": "TCP"}]
    if eng.metrics_port:
        ports.append({"name": "metrics", "port": eng.metrics_port, "targetPort": "metrics", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ctx, spec, child_name(ctx.name)),
        "spec": {"type": "ClusterIP", "selector": selector_labels(ctx.name), "ports": ports},
    }


def hpa(ctx: Context, spec: ModelServiceSpec) -> Optional[dict[str, Any]]:
    a = spec.autoscaling
    if a is None or a.cpuUtilization is None:
        return None  # without a CPU target the operator scales from gateway load itself (scaling.py)
    floor = max(1, a.minReplicas, ctx.hpa_min_replicas or 0)  # an HPA cannot go to 0; scale-to-zero is ours
    return {
        "apiVersion": ctx.versions.hpa,
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(ctx, spec, child_name(ctx.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": child_name(ctx.name)},
            "minReplicas": min(floor, a.maxReplicas),
            "maxReplicas": a.maxReplicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": a.cpuUtilization},
                    },
                }
            ],
            # Loading a model costs minutes: do not give a replica back on a short dip.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def pdb(ctx: Context, spec: ModelServiceSpec) -> Optional[dict[str, Any]]:
    replicas = spec.autoscaling.minReplicas if spec.autoscaling else spec.replicas
    if replicas <= 1:
        return None  # a PDB on one replica would block node drains forever
    return {
        "apiVersion": ctx.versions.pdb,
        "kind": "PodDisruptionBudget",
        "metadata": _meta(ctx, spec, child_name(ctx.name)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ctx.name)}},
    }


def cache_pvc(ctx: Context, spec: ModelServiceSpec) -> Optional[dict[str, Any]]:
    if spec.cache is None:
        return None
    pvc_spec: dict[str, Any] = {
        "accessModes": [spec.cache.accessMode],
        "resources": {"requests": {"storage": str(spec.cache.size)}},
    }
    if spec.cache.storageClassName:
        pvc_spec["storageClassName"] = spec.cache.storageClassName
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(ctx, spec, cache_pvc_name(ctx.name)),
        "spec": pvc_spec,
    }


# Kinds in apply order: the PVC exists before pods mount it, the Service before the Deployment's pods are Ready.
CHILD_KINDS = ("PersistentVolumeClaim", "Service", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget")


def render(ctx: Context, spec: ModelServiceSpec) -> dict[str, Optional[dict[str, Any]]]:
    """kind → desired object, or None where the spec asks for none (apply deletes what exists)."""
    return {
        "PersistentVolumeClaim": cache_pvc(ctx, spec),
        "Service": service(ctx, spec),
        "Deployment": deployment(ctx, spec),
        "HorizontalPodAutoscaler": hpa(ctx, spec),
        "PodDisruptionBudget": pdb(ctx, spec),
    }
