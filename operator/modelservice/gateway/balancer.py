"""Choosing a model's endpoint: least in-flight, and prefix affinity with bounded loads.

Least in-flight: LLM requests vary from milliseconds to minutes, so round-robin piles long generations onto one
replica; counting what each endpoint is serving right now follows the real load. Ties go to a random endpoint so that
many gateway replicas, each with its own counts, do not all pick the same "first" pod, after the endpoints whose
engine reports a shorter queue (engine_load.py: other gateways' traffic waits there; unknown counts as empty).

Prefix affinity (a request with an affinity key, affinity.py): rendezvous hashing with bounded loads. Each endpoint's
rank for a key is a hash of (key, endpoint); the request goes to the best-ranked endpoint whose in-flight count stays
within the model's spec.routing.loadFactor (default LOAD_FACTOR) times the mean (Mirrokni et al., "Consistent
Hashing with Bounded Loads": the bound is ceil(c · (total + 1) / n)), so the turns of one conversation reach the
replica that holds its prefix in its KV cache unless that replica is already busier than the others by the factor.
Rendezvous rather than a ring: no ring to keep per endpoint set, and an endpoint that goes away moves only its own
keys, each to its next-ranked endpoint (the next turn goes elsewhere, no error). The endpoint set of a model is small (its replicas), so ranking all of them is cheap.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Callable, Iterable, Optional, Sequence

from modelservice.api import LOAD_FACTOR
from modelservice.gateway.routes import Endpoint

__all__ = ["LOAD_FACTOR", "Balancer", "rank"]


class Balancer:
    def __init__(self, rng: Optional[random.Random] = None):
        self._in_flight: dict[Endpoint, int] = {}
        self._rng = rng or random.Random()
        self.waiting: Callable[[Endpoint], Optional[int]] = lambda ep: None  # the engines' queues (server.py)

    def in_flight(self, ep: Endpoint) -> int:
        return self._in_flight.get(ep, 0)

    def pick(
        self,
        endpoints: Sequence[Endpoint],
        exclude: Iterable[Endpoint] = (),
        key: Optional[bytes] = None,
        load_factor: float = LOAD_FACTOR,
    ) -> Optional[Endpoint]:
        skip = set(exclude)
        candidates = [ep for ep in endpoints if ep not in skip]
        if not candidates:
            return None
        if key is not None and len(candidates) > 1:
            return self._by_affinity(candidates, key, load_factor)
        low = min(self._in_flight.get(ep, 0) for ep in candidates)
        ties = [ep for ep in candidates if self._in_flight.get(ep, 0) == low]
        if len(ties) > 1:
            queue = {ep: self.waiting(ep) or 0 for ep in ties}
            ties = [ep for ep in ties if queue[ep] == min(queue.values())]
        return self._rng.choice(ties)

    def _by_affinity(self, candidates: list[Endpoint], key: bytes, load_factor: float) -> Endpoint:
        total = sum(self._in_flight.get(ep, 0) for ep in candidates)
        bound = math.ceil(load_factor * (total + 1) / len(candidates))
        ranked = sorted(candidates, key=lambda ep: rank(key, ep), reverse=True)
        # Some endpoint is at or below the mean, which is below the bound: the loop always returns.
        return next((ep for ep in ranked if self._in_flight.get(ep, 0) + 1 <= bound), ranked[0])

    def acquire(self, ep: Endpoint) -> None:
        self._in_flight[ep] = self._in_flight.get(ep, 0) + 1

    def release(self, ep: Endpoint) -> None:
        n = self._in_flight.get(ep, 0) - 1
        if n > 0:
            self._in_flight[ep] = n
        else:
            self._in_flight.pop(ep, None)  # pods come and go: don't keep a counter per dead IP forever


def rank(key: bytes, ep: Endpoint) -> bytes:
    """Rendezvous weight of an endpoint for a key: the same in every gateway process, so all agree on the owner."""
    return hashlib.blake2b(f"{ep.address}:{ep.port}".encode(), digest_size=8, key=key).digest()
