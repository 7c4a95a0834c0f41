"""List-then-watch loops, shared by the operator (its children, pods, activity Leases) and the gateway (routes).

Kube.watch lists, streams, and relists after a 410 Gone, but a relist reports only what exists: a Mirror remembers
what it has reported and, at the SYNCED that ends each list, reports DELETED for whatever that list (LISTING to
SYNCED) did not contain. So an object deleted while a watch was down (an API server restart, a long gap) is not
kept forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable, Optional, Sequence

from modelservice.kube import Kube

log = logging.getLogger("modelservice.watch")
MAX_BACKOFF = 30.0
Apply = Callable[[str, dict[str, Any]], None]  # (event type, object)


class Mirror:
    def __init__(self, apply: Apply):
        self.apply = apply
        self.known: dict[tuple[str, str], dict[str, Any]] = {}  # key → just enough metadata to report a DELETED
        self.seen: set[tuple[str, str]] = set()
        self.listed = False

    def feed(self, event: str, obj: dict[str, Any]) -> None:
        if event == "LISTING":
            self.seen = set()  # from here to SYNCED, seen = what the list holds (plus what the list races with)
            return
        if event == "SYNCED":
            if self.listed:
                for key in set(self.known) - self.seen:
                    self.apply("DELETED", self.known.pop(key))
            self.listed = True
            return
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event == "DELETED":
            self.known.pop(key, None)
            self.seen.discard(key)
        else:
            self.known[key] = {"metadata": {"namespace": key[0], "name": key[1], "labels": meta.get("labels") or {}}}
            self.seen.add(key)
        self.apply(event, obj)


async def keep_watching(
    kube: Kube,
    path: str,
    selector: Optional[str],
    mirror: Mirror,
    synced: Callable[[], None],
    on_alive: Optional[Callable[[], None]] = None,
) -> None:
    """Until cancelled. synced() after every complete list. Failures (a CRD not installed yet, an API server
    restarting, a Role not bound yet) back off up to MAX_BACKOFF and are logged, never raised."""
    backoff = 1.0
    while True:
        try:
            async for event, obj in kube.watch(path, label_selector=selector, on_alive=on_alive):
                try:
                    mirror.feed(event, obj)
                except Exception:  # noqa: BLE001 - one odd object must not stop the watch for all
                    log.exception("watch %s: event %s not applied", path, event)
                if event == "SYNCED":
                    synced()
                    backoff = 1.0
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001
            log.warning("watch %s failed (%s); retrying in %.0fs", path, e, backoff)
        await asyncio.sleep(backoff)
        backoff = min(MAX_BACKOFF, backoff * 2)


def start(
    kube: Kube,
    watches: Sequence[tuple[str, Optional[str], Apply]],
    on_synced: Callable[[], None],
    on_alive: Optional[Callable[[], None]] = None,
    on_relist: Optional[Callable[[], None]] = None,
) -> list[asyncio.Task[None]]:
    """One task per (path, label selector, apply); on_synced() once every watch has listed once; on_relist() each
    time a watch has listed again (a 410 after a gap: other watches of this API server had the same gap). Cancel to
    stop."""
    pending = set(range(len(watches)))

    def synced(i: int) -> None:
        if i in pending:
            pending.discard(i)
            if not pending:
                on_synced()
        elif on_relist is not None:
            on_relist()

    return [
        asyncio.create_task(
            keep_watching(kube, path, selector, Mirror(apply), functools.partial(synced, i), on_alive),
            name=f"watch {path}",
        )
        for i, (path, selector, apply) in enumerate(watches)
    ]
