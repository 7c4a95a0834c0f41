"""A background list+watch whose callback gets each event with its arrival time (time.monotonic()).

Arrival time at the benchmark is what "observed via a watch" means in the figures: it includes the apiserver's
watch fan-out, as a user's `kubectl wait` would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

from modelservice.kube import Kube

log = logging.getLogger("bench")
OnEvent = Callable[[str, dict[str, Any], float], None]


class Watch:
    def __init__(self, kube: Kube, path: str, on_event: OnEvent, *, label_selector: Optional[str] = None):
        self.kube, self.path, self.on_event, self.selector = kube, path, on_event, label_selector
        self.synced = asyncio.Event()
        self.events = 0
        self.lists = 0  # 1 normally; more means the apiserver expired our watch (410) and we relisted
        self._task: Optional[asyncio.Task[None]] = None

    async def __aenter__(self) -> "Watch":
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self.synced.wait(), 60)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:  # Kube.watch relists on expiry; a failed list (apiserver busy) is retried here
            try:
                async for event, obj in self.kube.watch(self.path, label_selector=self.selector):
                    if event == "LISTING":
                        continue
                    if event == "SYNCED":
                        self.lists += 1
                        self.synced.set()
                        continue
                    self.events += 1
                    self.on_event(event, obj, time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - report and retry; the phase's own timeout bounds us
                log.warning("watch %s: %s; retrying", self.path, e)
                await asyncio.sleep(1)
