"""LoRA adapters on a running base: which replica has which adapter, loading on demand, LRU eviction (docs/lora.md).

The engine (vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING) loads adapters through its own API,
POST /v1/load_lora_adapter and /v1/unload_lora_adapter, called here directly on the pod: the gateway's path
allow-list (paths.py) keeps them away from clients. The gateway is the only one that loads, so its bookkeeping is
what a replica has (a replica that restarted leaves the ready set, and its set is dropped with it).

Pure parts: `name_conflicts` (who may use a name) and `Residency` (one replica's loaded set, LRU, in-flight counts).
`Adapters` does the I/O: one load per (replica, adapter) however many requests ask at once; the others await it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Optional, Sequence

from modelservice.gateway.balancer import LOAD_FACTOR
from modelservice.gateway.errors import GatewayError
from modelservice.gateway.routes import AdapterRef, Endpoint, Key, ModelEntry
from modelservice.gateway.upstream import NotSent

log = logging.getLogger("modelservice.gateway.adapters")
ADAPTERS_ANNOTATION = "serving.modelservice.dev/adapters"  # on the activity Lease: the gateway → the operator
MAX_ERROR = 512
# Outcomes of the engine calls counted in modelservice_gateway_adapter_loads_total: a load that worked, one that did
# not (refused or unreachable), an unload to make room (LRU), an unload because the spec dropped or moved it.
LOADED, FAILED, EVICTED, UNLOADED = "loaded", "failed", "evicted", "unloaded"
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # seconds a refused (replica, adapter, path) is not tried again; doubling


# -- names ---------------------------------------------------------------------------------------------------------
def name_conflicts(
    models: Iterable[ModelEntry],
) -> tuple[dict[str, tuple[Key, AdapterRef]], dict[tuple[Key, str], str]]:
    """(adapter name → (base key, adapter) for every routable adapter, (base key, name) → why it is not routed).

    A served model's name always wins over an adapter's (it was a model first, and clients of it must not be
    captured); between adapters of different bases the oldest ModelService wins (creation time, then namespace/name),
    so a new object can never take a name in use away."""
    entries = sorted(models, key=lambda e: (e.created, e.namespace, e.name))
    served = {e.served_name: e for e in entries}
    served.update({e.name: e for e in entries if e.name not in served})  # namespace/name is not a served name
    routes: dict[str, tuple[Key, AdapterRef]] = {}
    conflicts: dict[tuple[Key, str], str] = {}
    for e in entries:
        for a in e.adapters:
            holder = served.get(a.name)
            if holder is not None and (holder.served_name == a.name or holder.key == e.key):
                conflicts[(e.key, a.name)] = (
                    f"NameConflict: {a.name!r} is the served name of model {holder.label}: rename the adapter"
                )
            elif a.name in routes:
                conflicts[(e.key, a.name)] = (
                    f"NameConflict: adapter {a.name!r} is already served by "
                    f"{routes[a.name][0][0]}/{routes[a.name][0][1]} (older): rename it"
                )
            else:
                routes[a.name] = (e.key, a)
    return routes, conflicts


# -- one replica's loaded set ----------------------------------------------------------------------------------------
@dataclass
class Residency:
    """What one replica has loaded (least recently used first), what is loading, and what is in use."""

    capacity: int
    loaded: "OrderedDict[str, str]" = field(default_factory=OrderedDict)  # name → path it was loaded from
    loading: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    in_use: dict[str, int] = field(default_factory=dict)
    pinned: frozenset[str] = frozenset()  # preloaded adapters: kept, never evicted

    def has(self, name: str, path: str) -> bool:
        return self.loaded.get(name) == path

    def touch(self, name: str) -> None:
        self.loaded.move_to_end(name)

    def victim(self) -> Optional[str]:
        """The least recently used loaded adapter no request is using, when the set is full; None if none is
        needed. Raises LookupError when it is full of adapters in use (the request must wait)."""
        if len(self.loaded) + len(self.loading) < self.capacity:
            return None
        for name in self.loaded:
            if not self.in_use.get(name) and name not in self.pinned:
                return name
        raise LookupError("every loaded adapter has requests in flight or is preloaded")

    def acquire(self, name: str) -> None:
        self.in_use[name] = self.in_use.get(name, 0) + 1

    def release(self, name: str) -> None:
        n = self.in_use.get(name, 0) - 1
        if n > 0:
            self.in_use[name] = n
        else:
            self.in_use.pop(name, None)


@dataclass(frozen=True)
class LoadFailure:
    """The engine refused to load `path` on a replica: `tries` refusals in a row, the last answered with `error`; no
    load of the same path is sent there before `retry_at` (the gateway's clock)."""

    path: str
    error: GatewayError
    tries: int
    delay: float
    retry_at: float

    def after(self, path: str, error: GatewayError, now: float) -> "LoadFailure":
        """The next refusal: the window doubles up to BACKOFF_MAX; a refusal of another path starts over."""
        if path != self.path:
            return refused(path, error, now)
        delay = min(self.delay * 2, BACKOFF_MAX)
        return LoadFailure(path, error, self.tries + 1, delay, now + delay)

    def holds(self, path: str, now: float) -> bool:
        """Is a load of `path` still being held back? (A new uri is not: a spec change is tried at once.)"""
        return path == self.path and now < self.retry_at


def refused(path: str, error: GatewayError, now: float) -> LoadFailure:
    return LoadFailure(path, error, 1, BACKOFF_FIRST, now + BACKOFF_FIRST)


def prefer_loaded(
    endpoints: Sequence[Endpoint],
    exclude: Iterable[Endpoint],
    has: Callable[[Endpoint], bool],
    in_flight: Callable[[Endpoint], int] = lambda ep: 0,
    load_factor: float = LOAD_FACTOR,
) -> tuple[Endpoint, ...]:
    """Affinity with capacity: the replicas that already have the adapter and are within the load bound; else all
    (the balancer's least loaded then loads it). The bound is the prefix affinity's (balancer.py, consistent hashing
    with bounded loads): in flight + 1 <= ceil(load_factor x (all in flight + 1) / replicas). Without it every request
    for a hot adapter would queue on the one replica that loaded it first while the others idle."""
    skip = set(exclude)
    live = [ep for ep in endpoints if ep not in skip]
    warm = [ep for ep in live if has(ep)]
    if not warm:
        return tuple(endpoints)
    bound = math.ceil(load_factor * (sum(in_flight(ep) for ep in live) + 1) / len(live))
    return tuple(ep for ep in warm if in_flight(ep) + 1 <= bound) or tuple(endpoints)


# -- the engine's API ------------------------------------------------------------------------------------------------
# (endpoint, path, JSON body) → (HTTP status, body text); raises upstream.NotSent when the replica took nothing.
# Injected: the gateway's upstream pool, a fake in unit tests.
EngineCall = Callable[[Endpoint, str, dict[str, Any]], Awaitable[tuple[int, str]]]


def engine_message(text: str) -> str:
    """vLLM's error text from its JSON ({"error": {"message"}} or {"message"}), or the body as it is."""
    try:
        doc = json.loads(text)
    except ValueError:
        return text.strip()[:MAX_ERROR]
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:MAX_ERROR]
    return text.strip()[:MAX_ERROR]


@dataclass
class _State:
    loaded_on: dict[str, set[str]] = field(default_factory=dict)  # adapter → pods (or addresses)
    errors: dict[str, str] = field(default_factory=dict)
    failed_paths: dict[str, str] = field(default_factory=dict)  # adapter → the path whose load failed last


class Adapters:
    """Loads adapters where requests need them. `changed(key)` tells the activity flusher the base's Lease is due."""

    def __init__(
        self,
        call: EngineCall,
        *,
        changed: Callable[[Key], None] = lambda key: None,
        wait_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        affinity: bool = True,
        count: Callable[[Key, str, str], None] = lambda key, adapter, outcome: None,
        in_flight: Callable[[Endpoint], int] = lambda ep: 0,
    ):
        self.call, self.changed, self.wait_timeout, self.clock = call, changed, wait_timeout, clock
        self.affinity = affinity  # off only to measure what it buys (bench/adapters.py); not a spec field
        self.count = count  # (base, adapter, outcome) per engine call: the loads metric (server.py, metrics.py)
        self.in_flight = in_flight  # the balancer's view, for the load bound (the base's spec.routing.loadFactor)
        self._replicas: dict[Endpoint, Residency] = {}
        self._owner: dict[Endpoint, Key] = {}
        self._freed: dict[Endpoint, asyncio.Event] = {}
        self._state: dict[Key, _State] = {}
        self._preloading: set[tuple[Endpoint, str]] = set()
        self._failures: dict[tuple[Endpoint, str], LoadFailure] = {}  # (replica, adapter) → back-off (docs/lora.md)
        self.loads = 0  # load calls made, for tests

    # -- queries --------------------------------------------------------------------------------------------------
    def has(self, ep: Endpoint, adapter: AdapterRef) -> bool:
        r = self._replicas.get(ep)
        return r is not None and r.has(adapter.name, adapter.path)

    def report(
        self, key: Key, declared: Iterable[str], conflicts: dict[tuple[Key, str], str]
    ) -> dict[str, dict[str, Any]]:
        """The Lease annotation's content: per declared adapter, where it is loaded and its last error."""
        st = self._state.get(key, _State())
        out = {}
        for name in sorted(declared):
            item: dict[str, Any] = {"loadedOn": sorted(st.loaded_on.get(name, ()))}
            error = conflicts.get((key, name)) or st.errors.get(name)
            if error:
                item["error"] = error
            out[name] = item
        return out

    # -- the request path -----------------------------------------------------------------------------------------
    async def acquire(self, entry: ModelEntry, ep: Endpoint, adapter: AdapterRef) -> Callable[[], None]:
        """Make sure `ep` has the adapter loaded (loading it first, evicting the LRU one if full), and hold it there
        until the returned release is called (the request finished): an adapter in use is never unloaded."""
        r = self._replica(entry, ep)
        deadline = self.clock() + self.wait_timeout
        while True:
            if r.has(adapter.name, adapter.path):
                r.touch(adapter.name)
                r.acquire(adapter.name)
                return lambda: self._release(ep, r, adapter.name)
            pending = r.loading.get(adapter.name)
            if pending is None:
                self._check_backoff(entry, ep, adapter)
                try:
                    victim = r.victim()
                except LookupError:
                    await self._wait_freed(entry, ep, adapter, deadline)
                    continue
                pending = r.loading[adapter.name] = asyncio.get_running_loop().create_future()
                # Out of the set now, not when the load task starts: a second load must not pick the same victim,
                # and a request must not take the victim up again in between.
                evicted = None if victim is None else (victim, r.loaded.pop(victim))
                asyncio.ensure_future(self._load(entry, ep, r, adapter, evicted, pending))
            await asyncio.shield(pending)  # raises the load's error for every request that waited on it

    def _check_backoff(self, entry: ModelEntry, ep: Endpoint, adapter: AdapterRef) -> None:
        """A load of this path that the engine refused here a moment ago is not sent again until its window ends: the
        request gets the same error at once, saying when the next try is (no engine call for each request)."""
        failure = self._failures.get((ep, adapter.name))
        now = self.clock()
        if failure is None or not failure.holds(adapter.path, now):
            return
        left = failure.retry_at - now
        raise GatewayError(
            failure.error.status,
            f"{failure.error.message} (backing off after {failure.tries} failed load(s) on replica "
            f"{ep.pod or ep.address}: the next try is in {left:.1f} s, on the first request after that, or at once "
            "when the adapter's uri changes)",
            failure.error.code,
            retry_after=max(1, math.ceil(left)),
        )

    def _release(self, ep: Endpoint, r: Residency, name: str) -> None:
        r.release(name)
        event = self._freed.get(ep)
        if event is not None and not r.in_use.get(name):
            event.set()

    async def _wait_freed(self, entry: ModelEntry, ep: Endpoint, adapter: AdapterRef, deadline: float) -> None:
        left = deadline - self.clock()
        event = self._freed.setdefault(ep, asyncio.Event())
        event.clear()
        try:
            if left <= 0:
                raise asyncio.TimeoutError
            await asyncio.wait_for(event.wait(), left)
        except asyncio.TimeoutError:
            replica = ep.pod or ep.address
            raise GatewayError(
                429,
                f"adapter {adapter.name!r}: every adapter slot of model {entry.label}'s replica ({replica}) is "
                "in use by requests in flight (spec.lora.maxLoaded); retry later",
                "adapter_capacity_exceeded",
                retry_after=5,
            ) from None

    async def _load(
        self,
        entry: ModelEntry,
        ep: Endpoint,
        r: Residency,
        adapter: AdapterRef,
        evicted: Optional[tuple[str, str]],
        done: asyncio.Future[None],
    ) -> None:
        try:
            if evicted is not None:
                await self._unload(entry, ep, *evicted, EVICTED)
            old = r.loaded.pop(adapter.name, None)
            if old is not None:  # declared again with another URI: the engine refuses a second load of a name
                await self._unload(entry, ep, adapter.name, old, UNLOADED)
            self.loads += 1
            # In place: a name an earlier gateway process registered (or one whose unload is still on its way) is
            # replaced by this path instead of refused with "already been loaded".
            try:
                status, text = await self.call(
                    ep,
                    "/v1/load_lora_adapter",
                    {"lora_name": adapter.name, "lora_path": adapter.path, "load_inplace": True},
                )
            except BaseException:
                self.count(entry.key, adapter.name, FAILED)
                raise
            self.count(entry.key, adapter.name, LOADED if status == 200 else FAILED)
            if status != 200:
                message = engine_message(text)
                self._error(entry.key, adapter, f"{ep.pod or ep.address}: {message}")
                error = GatewayError(
                    503 if status >= 500 else 502,
                    f"adapter {adapter.name!r} could not be loaded on model {entry.label} "
                    f"(engine answered {status}): {message}",
                    "adapter_load_failed",
                )
                last = self._failures.get((ep, adapter.name))
                now = self.clock()
                failure = self._failures[(ep, adapter.name)] = (
                    refused(adapter.path, error, now) if last is None else last.after(adapter.path, error, now)
                )
                error.retry_after = max(1, math.ceil(failure.delay))
                raise error
            self._failures.pop((ep, adapter.name), None)
            r.loaded[adapter.name] = adapter.path
            self._loaded(entry.key, adapter.name, ep, True)
            st = self._state.setdefault(entry.key, _State())
            st.errors.pop(adapter.name, None)
            st.failed_paths.pop(adapter.name, None)
            done.set_result(None)
        except (NotSent, GatewayError) as e:
            done.set_exception(e)
        except Exception as e:  # noqa: BLE001 - every waiter must hear of it, not hang
            log.exception("adapter %s load on %s failed", adapter.name, ep.base_url)
            done.set_exception(
                GatewayError(502, f"adapter {adapter.name!r}: load failed ({type(e).__name__})", "adapter_load_failed")
            )
        finally:
            r.loading.pop(adapter.name, None)
            if not done.done():
                done.set_exception(
                    GatewayError(502, f"adapter {adapter.name!r}: load cancelled", "adapter_load_failed")
                )

    async def _unload(self, entry: ModelEntry, ep: Endpoint, name: str, path: str, outcome: str) -> None:
        self._loaded(entry.key, name, ep, False)
        self.count(entry.key, name, outcome)
        try:
            status, text = await self.call(ep, "/v1/unload_lora_adapter", {"lora_name": name})
        except NotSent:
            return
        if status not in (200, 404):  # 404: not there (a restarted engine): the same outcome
            log.warning("unload of adapter %s on %s: %d %s", name, ep.base_url, status, engine_message(text))

    def forget_lost(self, ep: Endpoint, adapter: AdapterRef) -> None:
        """The engine said it does not know an adapter we loaded there (it restarted): load it again next time."""
        r = self._replicas.get(ep)
        if r is not None and r.loaded.pop(adapter.name, None) is not None:
            key = self._owner.get(ep)
            if key is not None:
                self._loaded(key, adapter.name, ep, False)

    # -- the table's changes --------------------------------------------------------------------------------------
    def sync(self, key: Key, entry: Optional[ModelEntry], ready: Sequence[Endpoint]) -> list[Awaitable[None]]:
        """Drop replicas that left the ready set (a restarted pod starts empty); the unloads that adapters no longer
        declared (or moved to another URI) need, and the loads of preloaded adapters a ready replica lacks, for the
        caller to run in the background. Called on every change of the model (status writes too): a preload whose
        last load of that path failed waits for a change of its URI or a request, or it would retry in a loop."""
        live = set(ready)
        for ep in [ep for ep, k in self._owner.items() if k == key and ep not in live]:
            r = self._replicas.pop(ep)
            self._owner.pop(ep, None)
            self._freed.pop(ep, None)
            for failed in [f for f in self._failures if f[0] == ep]:  # a new pod there starts with a clean slate
                del self._failures[failed]
            for name in r.loaded:
                self._loaded(key, name, ep, False)
        if entry is None:
            self._state.pop(key, None)
            return []
        declared = {a.name: a.path for a in entry.adapters}
        for failed, failure in list(self._failures.items()):
            if self._owner.get(failed[0]) == key and declared.get(failed[1]) != failure.path:
                del self._failures[failed]  # removed, or a new uri: its back-off is over
        st = self._state.setdefault(key, _State())
        for name in list(st.errors):
            if name not in declared:
                del st.errors[name]
                st.failed_paths.pop(name, None)
        preload = [a for a in entry.adapters if a.preload][: entry.lora_max_loaded]
        work: list[Awaitable[None]] = []
        for ep in ready:
            replica = self._replica(entry, ep) if preload else self._replicas.get(ep)
            if replica is None:
                continue
            replica.capacity = entry.lora_max_loaded or replica.capacity
            replica.pinned = frozenset(a.name for a in preload)
            for name, path in list(replica.loaded.items()):
                if declared.get(name) != path and not replica.in_use.get(name):
                    del replica.loaded[name]
                    work.append(self._unload(entry, ep, name, path, UNLOADED))
            for a in preload:
                if (
                    not replica.has(a.name, a.path)
                    and (ep, a.name) not in self._preloading
                    and st.failed_paths.get(a.name) != a.path
                ):
                    self._preloading.add((ep, a.name))
                    work.append(self._preload(entry, ep, a))
        return work

    async def _preload(self, entry: ModelEntry, ep: Endpoint, adapter: AdapterRef) -> None:
        try:
            (await self.acquire(entry, ep, adapter))()
        except (GatewayError, NotSent) as e:  # in status (a refusal) or the replica is going away
            log.info("preload of adapter %s on %s: %s", adapter.name, ep.base_url, e)
        finally:
            self._preloading.discard((ep, adapter.name))

    def _replica(self, entry: ModelEntry, ep: Endpoint) -> Residency:
        r = self._replicas.get(ep)
        if r is None:
            r = self._replicas[ep] = Residency(capacity=entry.lora_max_loaded or 1)
            self._owner[ep] = entry.key
        return r

    def _loaded(self, key: Key, name: str, ep: Endpoint, on: bool) -> None:
        pods = self._state.setdefault(key, _State()).loaded_on.setdefault(name, set())
        (pods.add if on else pods.discard)(ep.pod or ep.address)
        if not pods:
            self._state[key].loaded_on.pop(name, None)
        self.changed(key)

    def _error(self, key: Key, adapter: AdapterRef, message: str) -> None:
        st = self._state.setdefault(key, _State())
        st.errors[adapter.name] = message[:MAX_ERROR]
        st.failed_paths[adapter.name] = adapter.path
        self.changed(key)


@dataclass
class AdapterUse:
    """One request's adapter, as the proxy's retry loop sees it (proxy.forward's `adapter`)."""

    manager: Adapters
    entry: ModelEntry
    adapter: AdapterRef

    def candidates(self, endpoints: Sequence[Endpoint], tried: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
        if not self.manager.affinity:
            return tuple(endpoints)
        m = self.manager
        return prefer_loaded(endpoints, tried, lambda ep: m.has(ep, self.adapter), m.in_flight, self.entry.load_factor)

    async def acquire(self, ep: Endpoint) -> Callable[[], None]:
        return await self.manager.acquire(self.entry, ep, self.adapter)

    replayed: bool = False

    def lost(self, ep: Endpoint, status: int) -> bool:
        """The engine answered 404 for an adapter we had loaded there: it restarted in place, or another gateway
        unloaded it. It did no work, so the request may go again once, after a new load (True)."""
        if status != 404:
            return False
        self.manager.forget_lost(ep, self.adapter)
        if self.replayed:
            return False
        self.replayed = True
        return True
