"""The routing table: ModelServices, their ready endpoints and their Deployments' replicas, kept from watch events.

Pure and synchronous: watchers.py feeds it events, the request path reads it. Nothing here does I/O, so a request
never waits on the API server to find its backend.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Optional

from pydantic import ValidationError

from modelservice.api import LOAD_FACTOR, ModelServiceSpec, RoutingPolicy, _format_error
from modelservice.engines import ENGINES
from modelservice.gateway.errors import GatewayError
from modelservice.labels import child_name
from modelservice.render import served_name

log = logging.getLogger("modelservice.gateway.routes")
Key = tuple[str, str]  # (namespace, ModelService name)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "http"


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    pod: str = field(default="", compare=False)  # the EndpointSlice's targetRef: names a replica in status

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class ModelEntry:
    """What the gateway needs of one ModelService, derived from the operator's own model of it (api.py) with the
    operator's own helpers (render.py, labels.py, engines.py): a default or a name changed there changes here."""

    namespace: str
    name: str
    uid: str
    served_name: str
    engine: str
    upstream_model: Optional[str]  # rewrite the JSON `model` to this (ollama's own tag); None: forward unchanged
    api_key_ref: Optional[tuple[str, str]]  # (Secret name, data key) in the model's namespace
    autoscaled: bool  # only then may the gateway wake it from zero (manual replicas: 0 is the user's choice)
    wake_replicas: int
    child: str  # the name of its Deployment and Service
    created: int  # epoch seconds, for /v1/models
    # The operator's word when the model cannot come up without a person (status Stalled=True: a crash-looping engine
    # with its last log lines, a bad image, a refused spec): held requests get it at once, not after a timeout.
    stalled: Optional[str] = None
    # The operator's word when its pod waits for GPUs (Ready=False, AwaitingCapacity: whom it waits for, or "no GPU
    # free" and why nothing can be parked): a held request that times out says the same.
    capacity: Optional[str] = None
    prefix_affinity: bool = True  # spec.routing.policy: route a conversation's turns to the replica that has its prefix
    load_factor: float = LOAD_FACTOR  # spec.routing.loadFactor: the affinity's load bound (balancer.py)
    adapters: tuple["AdapterRef", ...] = ()  # LoRA adapters declared on this base (spec.adapters)
    lora_max_loaded: int = 0  # spec.lora.maxLoaded: adapters one replica keeps loaded

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: str  # relative to the engine's working directory, the adapter claim's mount (engines.ADAPTERS_DIR)
    preload: bool = False


def _adapters(spec: ModelServiceSpec) -> tuple[AdapterRef, ...]:
    if spec.lora is None:
        return ()
    # "./": vLLM resolves a relative path against its cwd, and would take a bare "org/name" that is missing there
    # for a Hugging Face repository to download.
    return tuple(
        AdapterRef(a.name, "./" + a.uri.split("://", 1)[1].split("/", 1)[1], a.preload)
        for a in spec.adapters
        if a.uri.split("://", 1)[1].split("/", 1)[0] == spec.lora.claim
    )  # others: Stalled (api.py)


def model_entry(obj: dict[str, Any]) -> ModelEntry:
    """Raises pydantic's ValidationError for a spec the operator refuses too (it reports it as Stalled). Cross-field
    problems (api.cross_field_problems) are routed: the operator's Stalled condition then answers the requests."""
    return entry_of(obj, ModelServiceSpec.model_validate(obj.get("spec") or {}))


def entry_of(obj: dict[str, Any], spec: ModelServiceSpec) -> ModelEntry:
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    a, ref = spec.autoscaling, spec.apiKeySecretRef
    return ModelEntry(
        namespace=meta.get("namespace", ""),
        name=name,
        uid=meta.get("uid", ""),
        served_name=served_name(spec, name),
        engine=spec.engine.value,
        upstream_model=_upstream_model(spec),
        api_key_ref=(ref.name, ref.key) if ref else None,
        autoscaled=a is not None,
        # What the operator keeps once the model is awake (scaling.decide's floor), so it does not scale it again.
        wake_replicas=max(1, a.minReplicas) if a else 1,
        child=child_name(name),
        created=_epoch(meta.get("creationTimestamp")),
        stalled=_stalled(obj),
        capacity=_awaiting_capacity(obj),
        prefix_affinity=spec.routing.policy == RoutingPolicy.PrefixAffinity,
        load_factor=spec.routing.loadFactor,
        adapters=_adapters(spec),
        lora_max_loaded=spec.lora.maxLoaded if spec.lora else 0,
    )


def _upstream_model(spec: ModelServiceSpec) -> Optional[str]:
    """The name the engine serves the model under, when it is not the served name we give it (ollama: its tag)."""
    if not ENGINES[spec.engine].serves_by_reference or not spec.model.uri:
        return None
    return spec.model.uri.split("://", 1)[1]


def _awaiting_capacity(obj: dict[str, Any]) -> Optional[str]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("reason") == "AwaitingCapacity":
            return c.get("message") or "waiting for a GPU"
    return None


def _stalled(obj: dict[str, Any]) -> Optional[str]:
    status = obj.get("status") or {}
    if status.get("observedGeneration") != (obj.get("metadata") or {}).get("generation"):
        return None  # said of an older spec: the operator has not judged this one yet
    for c in status.get("conditions") or []:
        if c.get("type") == "Stalled" and c.get("status") == "True":
            return f"{c.get('reason', 'Stalled')}: {c.get('message', '')}".rstrip(": ")
    return None


def _epoch(ts: Optional[str]) -> int:
    try:
        return int(datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def slice_endpoints(obj: dict[str, Any]) -> tuple[Optional[str], tuple[Endpoint, ...]]:
    """(Service name, ready endpoints on the port named http) of one EndpointSlice (discovery v1 or v1beta1)."""
    service = ((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL)
    if obj.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return service, ()  # FQDN slices: we route to pod IPs only
    port = next((p.get("port") for p in obj.get("ports") or [] if p.get("name") == PORT_NAME), None)
    if not port:
        return service, ()
    out: list[Endpoint] = []
    for ep in obj.get("endpoints") or []:
        pod = (ep.get("targetRef") or {}).get("name", "")
        cond = ep.get("conditions") or {}
        # The API says a missing `ready` means unknown and consumers should treat it as ready.
        if cond.get("ready") is False or cond.get("terminating") is True:
            continue
        for addr in ep.get("addresses") or []:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                continue
            out.append(Endpoint(addr, int(port), pod))
    return service, tuple(out)


class RouteTable:
    """on_change(key) is called after anything that may change a model's routability (endpoints, replicas, spec).

    Models are keyed by (namespace, ModelService name); their Service and Deployment by (namespace, child name), as
    labels.child_name names them, so the two can differ without a change here."""

    def __init__(self, on_change: Optional[Callable[[Key], None]] = None):
        self.on_change = on_change
        self.models: dict[Key, ModelEntry] = {}
        self.invalid: dict[Key, str] = {}  # ModelServices whose spec the operator's model refuses: not routed
        self._by_served: dict[str, set[Key]] = {}
        self._owner: dict[Key, Key] = {}  # (ns, child name) → model key
        self._parsed: dict[Key, tuple[str, Any, ModelServiceSpec]] = {}  # key → (uid, generation, spec)
        self._slices: dict[tuple[str, str], tuple[str, tuple[Endpoint, ...]]] = {}  # (ns, slice) → (svc, eps)
        self._service_slices: dict[Key, set[str]] = {}
        self._ready: dict[Key, tuple[Endpoint, ...]] = {}  # by (ns, Service name)
        self._replicas: dict[Key, int] = {}  # by (ns, Deployment name)
        self._refused: dict[Key, frozenset[Endpoint]] = {}  # refused a connection; dropped at the next slice change

    # -- events ------------------------------------------------------------------------------------------------
    def apply_modelservice(self, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        old = self.models.pop(key, None)
        if old is not None:
            self._by_served.get(old.served_name, set()).discard(key)
            if not self._by_served.get(old.served_name):
                self._by_served.pop(old.served_name, None)
            self._owner.pop((key[0], old.child), None)
        if event == "DELETED":
            self._parsed.pop(key, None)
            self.invalid.pop(key, None)
        entry = None if event == "DELETED" else self._entry(key, meta, obj)
        if entry is not None:
            self.models[key] = entry
            self._by_served.setdefault(entry.served_name, set()).add(key)
            self._owner[(key[0], entry.child)] = key
        self._changed(key)

    def _entry(self, key: Key, meta: dict[str, Any], obj: dict[str, Any]) -> Optional[ModelEntry]:
        """The entry, parsed once per spec generation: the operator's status writes are most of the events."""
        uid, generation = meta.get("uid", ""), meta.get("generation")
        parsed = self._parsed.get(key)
        if parsed is None or parsed[:2] != (uid, generation) or generation is None:
            try:
                spec = ModelServiceSpec.model_validate(obj.get("spec") or {})
            except ValidationError as e:
                self._parsed.pop(key, None)
                reason = "; ".join(_format_error(err) for err in e.errors()[:3])
                if self.invalid.get(key) != reason:
                    log.warning(
                        "ModelService %s/%s not routed: its spec is invalid (%s); the operator reports it as Stalled",
                        key[0],
                        key[1],
                        reason,
                    )
                self.invalid[key] = reason
                return None
            parsed = self._parsed[key] = (uid, generation, spec)
        self.invalid.pop(key, None)
        return entry_of(obj, parsed[2])

    def apply_slice(self, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        ns, slice_name = meta.get("namespace", ""), meta.get("name", "")
        service, eps = slice_endpoints(obj)
        old = self._slices.pop((ns, slice_name), None)
        if old is not None:
            self._service_slices.get((ns, old[0]), set()).discard(slice_name)
            if old[0] != service:
                self._recompute((ns, old[0]))
        if event != "DELETED" and service:
            self._slices[(ns, slice_name)] = (service, eps)
            self._service_slices.setdefault((ns, service), set()).add(slice_name)
        if service:
            self._recompute((ns, service))

    def apply_deployment(self, event: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        child = (meta.get("namespace", ""), meta.get("name", ""))
        if event == "DELETED":
            self._replicas.pop(child, None)
        else:
            replicas = (obj.get("spec") or {}).get("replicas")
            self._replicas[child] = 1 if replicas is None else int(replicas)  # the API's default
        self._changed_child(child)

    def _recompute(self, service: Key) -> None:
        seen: dict[Endpoint, None] = {}
        for name in sorted(self._service_slices.get(service, ())):
            for ep in self._slices[(service[0], name)][1]:
                seen[ep] = None
        new = tuple(seen)
        self._refused.pop(service, None)  # the slice moved on: judge its endpoints afresh
        if not self._service_slices.get(service):
            self._service_slices.pop(service, None)
        if new != self._ready.get(service, ()):
            if new:
                self._ready[service] = new
            else:
                self._ready.pop(service, None)
            self._changed_child(service)

    def _changed_child(self, child: Key) -> None:
        key = self._owner.get(child)
        if key is not None:
            self._changed(key)

    def _changed(self, key: Key) -> None:
        if self.on_change is not None:
            self.on_change(key)

    # -- queries (by model key) --------------------------------------------------------------------------------
    def get(self, namespace: str, name: str) -> Optional[ModelEntry]:
        return self.models.get((namespace, name))

    def ready(self, key: Key) -> tuple[Endpoint, ...]:
        service = (key[0], child_name(key[1]))
        eps = self._ready.get(service, ())
        refused = self._refused.get(service)
        return tuple(e for e in eps if e not in refused) if refused else eps

    def refused(self, key: Key, endpoints: frozenset[Endpoint]) -> None:
        """Endpoints that refused a connection are not ready until their EndpointSlice changes (a pod that is going
        away stops listening before the slice drops it)."""
        if endpoints:
            service = (key[0], child_name(key[1]))
            self._refused[service] = self._refused.get(service, frozenset()) | endpoints

    def replicas(self, key: Key) -> Optional[int]:
        """The Deployment's spec.replicas; None when we have not seen the Deployment."""
        return self._replicas.get((key[0], child_name(key[1])))

    def resolve(self, model: str) -> ModelEntry:
        """The OpenAI `model` field → a ModelService: its served name, or `namespace/name`."""
        keys = self._by_served.get(model)
        if keys and len(keys) == 1:
            return self.models[next(iter(keys))]
        if keys:
            choices = ", ".join(sorted(f"{ns}/{n}" for ns, n in keys))
            raise GatewayError(
                400,
                f"model {model!r} is served in more than one namespace; send the model as "
                f"namespace/name, one of: {choices}",
                "ambiguous_model",
            )
        if model.count("/") == 1:
            ns, name = model.split("/")
            entry = self.models.get((ns, name))
            if entry is not None:
                return entry
        raise GatewayError(
            404, f"The model {model!r} does not exist; GET /v1/models lists the models you can use", "model_not_found"
        )

    def listing(self) -> list[tuple[str, ModelEntry]]:
        """(OpenAI id, entry) for every model: the served name, or namespace/name where that name is ambiguous."""
        out = []
        for key in sorted(self.models):
            entry = self.models[key]
            unique = len(self._by_served.get(entry.served_name, ())) == 1
            out.append((entry.served_name if unique else entry.label, entry))
        return out
