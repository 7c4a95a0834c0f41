"""Least in-flight balancing across a model's ready endpoints.

LLM requests vary from milliseconds to minutes, so round-robin piles long generations onto one replica; counting
what each endpoint is serving right now follows the real load. Ties go to a random endpoint so that many gateway
replicas, each with its own counts, do not all pick the same "first" pod.
"""

from __future__ import annotations

import random
from typing import Iterable, Optional, Sequence

from modelservice.gateway.routes import Endpoint


class Balancer:
    def __init__(self, rng: Optional[random.Random] = None):
        self._in_flight: dict[Endpoint, int] = {}
        self._rng = rng or random.Random()

    def in_flight(self, ep: Endpoint) -> int:
        return self._in_flight.get(ep, 0)

    def pick(self, endpoints: Sequence[Endpoint], exclude: Iterable[Endpoint] = ()) -> Optional[Endpoint]:
        skip = set(exclude)
        candidates = [ep for ep in endpoints if ep not in skip]
        if not candidates:
            return None
        low = min(self._in_flight.get(ep, 0) for ep in candidates)
        return self._rng.choice([ep for ep in candidates if self._in_flight.get(ep, 0) == low])

    def acquire(self, ep: Endpoint) -> None:
        self._in_flight[ep] = self._in_flight.get(ep, 0) + 1

    def release(self, ep: Endpoint) -> None:
        n = self._in_flight.get(ep, 0) - 1
        if n > 0:
            self._in_flight[ep] = n
        else:
            self._in_flight.pop(ep, None)  # pods come and go: don't keep a counter per dead IP forever
