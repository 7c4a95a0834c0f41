"""Tenants: API keys that belong to a named tenant, kept in Secrets of the gateway's namespace and watched.

A tenant Secret carries the label `serving.modelservice.dev/tenant: <tenant>` and its keys under the data key `keys`,
one per line (blank lines and `#` comments ignored). Which models the tenant may use is said on the same Secret:
`serving.modelservice.dev/namespaces` (comma list, `*` for all) and/or `serving.modelservice.dev/models` (comma
list of namespace/name). The platform team that runs the gateway grants access; a model's owner cannot grant other
tenants access to someone else's model by editing a ModelService (docs/tenants.md: why).

Keys are held only as SHA-256 digests, looked up in a dict: the lookup's timing depends on a digest of the presented
key, which says nothing useful about a real key, and no key string stays in memory. Nothing here formats a key,
a digest or a Secret's data into a message; messages name the Secret and the tenant.

Bad Secrets are refused with a Warning Event on the Secret, never a crash: a tenant name that is not a DNS label, no
keys, undecodable data, an unreadable access annotation, and a key claimed by two tenants (refused for both: serving
it as either would bill the wrong one).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from modelservice import GROUP
from modelservice.gateway.auth import parse_keys

if TYPE_CHECKING:
    from modelservice.gateway.routes import ModelEntry
    from modelservice.kube import Kube

log = logging.getLogger("modelservice.gateway.tenants")

TENANT_LABEL = f"{GROUP}/tenant"
NAMESPACES_ANNOTATION = f"{GROUP}/namespaces"
MODELS_ANNOTATION = f"{GROUP}/models"
RPM_ANNOTATION = f"{GROUP}/requests-per-minute"  # quotas.py
TPM_ANNOTATION = f"{GROUP}/tokens-per-minute"
MODEL_QUOTAS_ANNOTATION = f"{GROUP}/model-quotas"  # "ns/name:rpm=60,tpm=10000; ns/other:rpm=5"
KEYS_DATA_KEY = "keys"
EVENT_SOURCE = "modelservice-gateway"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
SecretRef = tuple[str, str]


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Tenant:
    name: str
    namespaces: frozenset[str] = frozenset()  # "*" in it: every namespace
    models: frozenset[str] = frozenset()  # "namespace/name"
    rpm: Optional[int] = None  # requests per minute, all gateway replicas together (None: no limit)
    tpm: Optional[int] = None  # tokens (prompt + completion) per minute
    model_limits: tuple[tuple[str, Optional[int], Optional[int]], ...] = ()  # (namespace/name, rpm, tpm)

    def limits_on(self, model: str) -> tuple[Optional[int], Optional[int]]:
        return next(((rpm, tpm) for m, rpm, tpm in self.model_limits if m == model), (None, None))

    def may_use(self, entry: "ModelEntry") -> bool:
        return "*" in self.namespaces or entry.namespace in self.namespaces or entry.label in self.models


@dataclass(frozen=True)
class TenantSecret:
    ref: SecretRef
    tenant: Tenant
    digests: frozenset[bytes]


@dataclass(frozen=True)
class Problem:
    """A Warning Event to post on a Secret: reason and message name no key."""

    secret: dict[str, Any]  # apiVersion/kind/metadata of the Secret, enough for involvedObject
    reason: str
    message: str


def _list(text: str) -> frozenset[str]:
    return frozenset(p.strip() for p in text.split(",") if p.strip())


def parse_secret(obj: dict[str, Any]) -> tuple[Optional[TenantSecret], Optional[str]]:
    """(the tenant Secret, None) or (None, what is wrong with it)."""
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(TENANT_LABEL, "")
    if not _DNS_LABEL.fullmatch(name):
        return None, (
            f"label {TENANT_LABEL}={name!r} is not a tenant name: use a DNS label (lower-case letters, "
            "digits and '-', at most 63)"
        )
    raw = (obj.get("data") or {}).get(KEYS_DATA_KEY)
    if raw is None:
        return None, f"no data key {KEYS_DATA_KEY!r}: put the tenant's API keys there, one per line"
    try:
        keys = parse_keys(base64.b64decode(raw, validate=True).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, f"data key {KEYS_DATA_KEY!r} is not base64 of UTF-8 text"
    if not keys:
        return None, f"data key {KEYS_DATA_KEY!r} holds no key (one per line; '#' starts a comment)"
    notes = meta.get("annotations") or {}
    namespaces = _list(notes.get(NAMESPACES_ANNOTATION, ""))
    models = _list(notes.get(MODELS_ANNOTATION, ""))
    bad = sorted(n for n in namespaces if n != "*" and not _DNS_LABEL.fullmatch(n))
    bad += sorted(
        m
        for m in models
        if m.count("/") != 1
        or not (_DNS_LABEL.fullmatch(m.split("/")[0]) and _DNS_SUBDOMAIN.fullmatch(m.split("/")[1]))
    )
    if bad:
        return None, (
            f"{NAMESPACES_ANNOTATION} / {MODELS_ANNOTATION}: {', '.join(bad)!s} is not a namespace or namespace/name"
        )
    limits: dict[str, Optional[int]] = {}
    for field_, note in (("rpm", RPM_ANNOTATION), ("tpm", TPM_ANNOTATION)):
        text = notes.get(note, "").strip()
        if text and (not text.isdigit() or int(text) < 1):
            return None, f"{note}={text!r} is not a whole number of at least 1"
        limits[field_] = int(text) if text else None
    try:
        model_limits = _model_limits(notes.get(MODEL_QUOTAS_ANNOTATION, ""))
    except ValueError as e:
        return None, f"{MODEL_QUOTAS_ANNOTATION}: {e}"
    if not namespaces and not models:
        return None, (
            f"the tenant may use no model: annotate the Secret with {NAMESPACES_ANNOTATION} "
            f"(namespaces, or *) and/or {MODELS_ANNOTATION} (namespace/name, comma-separated)"
        )
    return TenantSecret(
        (meta.get("namespace", ""), meta.get("name", "")),
        Tenant(name, namespaces, models, limits["rpm"], limits["tpm"], model_limits),
        frozenset(digest(k) for k in keys),
    ), None


def _model_limits(text: str) -> tuple[tuple[str, Optional[int], Optional[int]], ...]:
    """'ns/name:rpm=60,tpm=10000; ns/other:rpm=5' → ((model, rpm, tpm), ...)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        model, sep, spec = part.partition(":")
        model = model.strip()
        if (
            not sep
            or model.count("/") != 1
            or not _DNS_LABEL.fullmatch(model.split("/")[0])
            or not _DNS_SUBDOMAIN.fullmatch(model.split("/")[1])
        ):
            raise ValueError(f"{part!r} is not namespace/name:rpm=N,tpm=N")
        values: dict[str, Optional[int]] = {"rpm": None, "tpm": None}
        for item in filter(None, (i.strip() for i in spec.split(","))):
            k, eq, v = item.partition("=")
            if k.strip() not in values or not eq or not v.strip().isdigit() or int(v) < 1:
                raise ValueError(f"{item!r} in {part!r}: use rpm=N and/or tpm=N, whole numbers of at least 1")
            values[k.strip()] = int(v)
        if values["rpm"] is None and values["tpm"] is None:
            raise ValueError(f"{part!r} sets no limit")
        out.append((model, values["rpm"], values["tpm"]))
    return tuple(out)


ModelLimits = tuple[tuple[str, Optional[int], Optional[int]], ...]  # (namespace/name, rpm, tpm)


def _merge_limits(a: ModelLimits, b: ModelLimits) -> ModelLimits:
    """Per-model limits of two Secrets of one tenant: every model of either; the lower value where both set one."""
    merged: dict[str, tuple[Optional[int], Optional[int]]] = {}
    for model, rpm, tpm in (*a, *b):
        old = merged.get(model, (None, None))
        merged[model] = (_least(old[0], rpm), _least(old[1], tpm))
    return tuple((m, r, t) for m, (r, t) in sorted(merged.items()))


def _least(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """Two Secrets of one tenant that both set a limit: the lower one holds."""
    return b if a is None else a if b is None else min(a, b)


def _involved(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion")},
    }


class TenantStore:
    """Keys → tenants, from watch events of the tenant Secrets (watch(): the loop; apply(): one event)."""

    def __init__(self) -> None:
        self._secrets: dict[SecretRef, TenantSecret] = {}
        self._objs: dict[SecretRef, dict[str, Any]] = {}  # involvedObject of each valid Secret, for conflicts
        self._index: dict[bytes, Tenant] = {}
        self._said: dict[SecretRef, tuple[str, str]] = {}  # last problem posted per Secret (no repeats)
        self.problems: asyncio.Queue[Problem] | None = None
        self.tenants: dict[str, Tenant] = {}  # name → access, merged over the tenant's Secrets

    # -- events ------------------------------------------------------------------------------------------------
    def apply(self, event: str, obj: dict[str, Any]) -> list[Problem]:
        meta = obj.get("metadata") or {}
        ref = (meta.get("namespace", ""), meta.get("name", ""))
        problems: list[Problem] = []
        self._secrets.pop(ref, None)
        self._objs.pop(ref, None)
        if event == "DELETED":
            self._said.pop(ref, None)
        else:
            parsed, wrong = parse_secret(obj)
            if parsed is None:
                problems.append(Problem(_involved(obj), "InvalidTenantSecret", f"tenant Secret refused: {wrong}"))
            else:
                self._secrets[ref] = parsed
                self._objs[ref] = _involved(obj)
        problems += self._rebuild()
        return [p for p in problems if self._new(p)]

    def _rebuild(self) -> list[Problem]:
        owners: dict[bytes, dict[str, SecretRef]] = {}
        for ref, ts in sorted(self._secrets.items()):
            for d in ts.digests:
                owners.setdefault(d, {}).setdefault(ts.tenant.name, ref)
        index: dict[bytes, Tenant] = {}
        problems: list[Problem] = []
        clashes: dict[SecretRef, set[str]] = {}
        tenants: dict[str, Tenant] = {}
        for ts in self._secrets.values():
            t = tenants.get(ts.tenant.name)
            tenants[ts.tenant.name] = (
                ts.tenant
                if t is None
                else Tenant(
                    t.name,
                    t.namespaces | ts.tenant.namespaces,
                    t.models | ts.tenant.models,
                    _least(t.rpm, ts.tenant.rpm),
                    _least(t.tpm, ts.tenant.tpm),
                    _merge_limits(t.model_limits, ts.tenant.model_limits),
                )
            )
        for d, by_tenant in owners.items():
            if len(by_tenant) == 1:
                index[d] = tenants[next(iter(by_tenant))]
                continue
            for tenant, ref in by_tenant.items():
                clashes.setdefault(ref, set()).update(set(by_tenant) - {tenant})
        for ref, others in sorted(clashes.items()):
            problems.append(
                Problem(
                    self._objs[ref],
                    "DuplicateTenantKey",
                    f"a key of tenant {self._secrets[ref].tenant.name} is also a key of tenant(s) "
                    f"{', '.join(sorted(others))}: it is refused for all of them until one "
                    "Secret drops it",
                )
            )
        self._index, self.tenants = index, tenants
        return problems

    def _new(self, p: Problem) -> bool:
        meta = p.secret["metadata"]
        ref = (meta["namespace"], meta["name"])
        said = (p.reason, f"{meta.get('resourceVersion')}:{p.message}")
        if self._said.get(ref) == said:
            return False
        self._said[ref] = said
        return True

    # -- the request path --------------------------------------------------------------------------------------
    def identify(self, token: Optional[str]) -> Optional[Tenant]:
        return self._index.get(digest(token)) if token else None

    # -- I/O ---------------------------------------------------------------------------------------------------
    def watch(self, kube: "Kube", namespace: str, on_synced: Callable[[], None]) -> list[asyncio.Task[None]]:
        """The label-selected watch of tenant Secrets in the gateway's namespace, and the Event poster."""
        from modelservice import watching
        from modelservice.kube import object_path

        problems: asyncio.Queue[Problem] = asyncio.Queue(maxsize=1000)
        self.problems = problems

        def apply(event: str, obj: dict[str, Any]) -> None:
            for p in self.apply(event, obj):
                log.warning(
                    "Secret %s/%s: %s", p.secret["metadata"]["namespace"], p.secret["metadata"]["name"], p.message
                )
                if not problems.full():
                    problems.put_nowait(p)

        tasks = watching.start(kube, [(object_path("v1", "Secret", namespace), TENANT_LABEL, apply)], on_synced)
        tasks.append(asyncio.create_task(post_events(kube, problems), name="tenant-secret-events"))
        return tasks


async def post_events(kube: "Kube", problems: "asyncio.Queue[Problem]") -> None:
    """Post each problem as a Warning Event on its Secret, until cancelled. Named after the Secret's uid and the
    message, so every gateway replica posting the same problem makes one Event (the others get 409)."""
    from modelservice.events import now_rfc3339
    from modelservice.kube import ApiError

    while True:
        p = await problems.get()
        meta = p.secret["metadata"]
        ts = now_rfc3339()
        suffix = hashlib.sha1(f"{meta.get('uid')}{p.reason}{p.message}".encode()).hexdigest()[:10]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{suffix}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Secret", **meta},
            "type": "Warning",
            "reason": p.reason,
            "message": p.message[:1024],
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        try:
            await kube.create(f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except ApiError as e:
            if e.status != 409:
                log.warning(
                    "could not post Event %s on Secret %s/%s: HTTP %s",
                    p.reason,
                    meta["namespace"],
                    meta["name"],
                    e.status,
                )
        except Exception as e:  # noqa: BLE001 - an Event is best effort
            log.warning("could not post Event on Secret %s/%s: %s", meta["namespace"], meta["name"], type(e).__name__)
