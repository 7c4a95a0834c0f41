"""API keys: per model (spec.apiKeySecretRef) and/or global (--api-key-secret), one key per line in a Secret; and
tenant keys (tenants.py), which also say whose request it is.

Keys are compared with hmac.compare_digest against every allowed key (no early exit) so timing does not reveal a
prefix. Keys are never logged: nothing here formats a key into a message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from modelservice.gateway.routes import ModelEntry

if TYPE_CHECKING:
    from modelservice.gateway.kubeops import ClusterOps
    from modelservice.gateway.tenants import TenantStore

log = logging.getLogger("modelservice.gateway.auth")

SecretRef = tuple[str, str]  # (namespace, name)
# Who a request is billed to when no tenant key was used. Not DNS labels, so no tenant can be named like them.
ANONYMOUS = "_anonymous"  # the model needs no key
MODEL_KEY = "_model-key"  # a per-model or global key: it belongs to no tenant


def bearer_token(header: Optional[str]) -> Optional[str]:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def parse_keys(text: str) -> tuple[str, ...]:
    """One key per line; blank lines and '#' comments ignored (so a Secret can say whose key is whose)."""
    return tuple(k for k in (line.strip() for line in text.splitlines()) if k and not k.startswith("#"))


def key_matches(presented: Optional[str], keys: Iterable[str]) -> bool:
    if presented is None:
        return False
    given = presented.encode()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())  # no short-circuit: constant in the number of keys
    return ok


def secret_keys(secret: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """data key → parsed API keys of one Secret object."""
    out: dict[str, tuple[str, ...]] = {}
    for k, v in (secret.get("data") or {}).items():
        try:
            out[k] = parse_keys(base64.b64decode(v).decode())
        except (binascii.Error, UnicodeDecodeError, ValueError):
            out[k] = ()
    for k, v in (secret.get("stringData") or {}).items():  # not returned by the API, but fakes in tests use it
        out[k] = parse_keys(str(v))
    return out


class KeyStore:
    """What keys each model accepts. Filled by a background refresher (watchers.py); read on the request path."""

    def __init__(self, global_ref: Optional[tuple[str, str, str]] = None, tenants: Optional["TenantStore"] = None):
        self.global_ref = global_ref  # (namespace, name, data key)
        self.tenants = tenants  # set: tenant keys are on, and every model needs a key
        self._secrets: dict[SecretRef, dict[str, tuple[str, ...]]] = {}  # absent Secret: {}
        self._loaded: dict[SecretRef, asyncio.Event] = {}
        self._kick: Optional[asyncio.Event] = None
        # Why a Secret could not be read (e.g. "403 Forbidden: ..." when the chart's gateway.apiKeys is off), until
        # a read succeeds: a refused key is then the gateway's problem, and the client is told so (503), not 401.
        self.errors: dict[SecretRef, str] = {}

    def required(self, entry: ModelEntry) -> bool:
        return self.tenants is not None or entry.api_key_ref is not None or self.global_ref is not None

    def wanted(self, entries: Iterable[ModelEntry]) -> set[SecretRef]:
        refs = {(e.namespace, e.api_key_ref[0]) for e in entries if e.api_key_ref}
        if self.global_ref:
            refs.add(self.global_ref[:2])
        return refs

    def update(self, ref: SecretRef, secret: Optional[dict[str, Any]]) -> None:
        self._secrets[ref] = secret_keys(secret) if secret else {}
        self.errors.pop(ref, None)
        self._event(ref).set()

    def failed(self, ref: SecretRef, error: str) -> None:
        """A read of this Secret failed; the keys we had (if any) stay in use."""
        self.errors[ref] = error
        self._event(ref).set()  # nothing to wait for: the request is answered with the reason

    def unreadable(self, entry: ModelEntry) -> Optional[str]:
        """Why this model's keys cannot be checked: a Secret it needs was never read and its last read failed."""
        refs = [(entry.namespace, entry.api_key_ref[0])] if entry.api_key_ref else []
        if self.global_ref:
            refs.append(self.global_ref[:2])
        for ref in refs:
            if ref in self.errors and ref not in self._secrets:
                return f"the gateway cannot read the API key Secret {ref[0]}/{ref[1]}: {self.errors[ref]}"
        return None

    def forget(self, keep: set[SecretRef]) -> None:
        for ref in [r for r in self._secrets if r not in keep]:
            del self._secrets[ref]
            self._loaded.pop(ref, None)
        for ref in [r for r in self.errors if r not in keep]:
            del self.errors[ref]

    def _event(self, ref: SecretRef) -> asyncio.Event:
        if ref not in self._loaded:
            self._loaded[ref] = asyncio.Event()
        return self._loaded[ref]

    async def wait_loaded(self, entry: ModelEntry, timeout: float) -> None:
        """Right after a ModelService appears its Secret may not be fetched yet: wait briefly, not 401 at once."""
        refs = [(entry.namespace, entry.api_key_ref[0])] if entry.api_key_ref else []
        if self.global_ref:
            refs.append(self.global_ref[:2])
        for ref in refs:
            if ref not in self._secrets:
                try:
                    await asyncio.wait_for(self._event(ref).wait(), timeout)
                except asyncio.TimeoutError:
                    return

    def missing(self, entry: ModelEntry) -> bool:
        """A Secret this model needs has never been fetched."""
        return entry.api_key_ref is not None and (entry.namespace, entry.api_key_ref[0]) not in self._secrets

    def global_keys(self) -> tuple[str, ...]:
        if not self.global_ref:
            return ()
        ns, name, data_key = self.global_ref
        return self._secrets.get((ns, name), {}).get(data_key, ())

    def allowed(self, entry: ModelEntry) -> tuple[str, ...]:
        keys: tuple[str, ...] = ()
        if entry.api_key_ref:
            keys += self._secrets.get((entry.namespace, entry.api_key_ref[0]), {}).get(entry.api_key_ref[1], ())
        return keys + self.global_keys()

    def permits(self, entry: ModelEntry, authorization: Optional[str]) -> bool:
        return self.identify(entry, authorization) is not None

    def identify(self, entry: ModelEntry, authorization: Optional[str]) -> Optional[str]:
        """Whom to bill a request to this model (a tenant's name, ANONYMOUS or MODEL_KEY), or None: refuse it."""
        token = bearer_token(authorization)
        if self.tenants is not None:
            tenant = self.tenants.identify(token)
            if tenant is not None:
                return tenant.name if tenant.may_use(entry) else None
        if not self.required(entry):
            return ANONYMOUS
        return MODEL_KEY if key_matches(token, self.allowed(entry)) else None

    def known_tenant(self, authorization: Optional[str]) -> bool:
        """A valid tenant key: a refusal is then about the model (404), not the key (401)."""
        return self.tenants is not None and self.tenants.identify(bearer_token(authorization)) is not None

    def kick(self) -> None:
        """A model now references a Secret we have not fetched: fetch now rather than at the next refresh."""
        if self._kick is not None:
            self._kick.set()

    async def run(self, ops: "ClusterOps", models: Callable[[], Iterable[ModelEntry]], interval: float) -> None:
        """Fetch the referenced Secrets every interval (rotation) and when kicked, until cancelled.

        Point GETs of the Secrets in use, not a watch of all Secrets: the gateway reads no Secret it has no use for.
        """
        self._kick = asyncio.Event()
        while True:
            wanted = self.wanted(list(models()))
            self.forget(wanted)
            for ref in sorted(wanted):
                try:
                    self.update(ref, await ops.get_secret(*ref))
                except Exception as e:  # noqa: BLE001 - keep the keys we had; retry next round
                    error = str(e)[:300] or type(e).__name__
                    if self.errors.get(ref) != error:  # once per new reason, not every round
                        log.warning("API key Secret %s/%s not read: %s", ref[0], ref[1], error)
                    self.failed(ref, error)
            try:
                await asyncio.wait_for(self._kick.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
