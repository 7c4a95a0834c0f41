"""Our gateway in front of fixed endpoints, for the routing benchmark: `python -m bench.routing_gateway --policy P
[--load-factor F] --backend HOST:PORT ...` prints its URL on stdout, then serves until SIGTERM.

The gateway is the product's own (server.Gateway with its proxy and balancer); only its view of the cluster is fed by
hand (one ModelService with spec.routing.policy, one EndpointSlice per backend), as the unit tests' harness does, so
the benchmark needs no control plane: what is measured is the routing, not Kubernetes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any, Optional

from modelservice.gateway.testing import endpointslice, gateway_with, modelservice


def backend_slices(model: str, backends: list[str]) -> list[dict[str, Any]]:
    """One EndpointSlice per fixed backend ("HOST:PORT" or "http://HOST:PORT"), each with its one ready endpoint."""
    return [
        endpointslice(model, [(h, True)], int(p), name=f"{model}-{i}")
        for i, (h, p) in enumerate(b.removeprefix("http://").rsplit(":", 1) for b in backends)
    ]


async def serve(model: str, policy: str, backends: list[str], load_factor: Optional[float] = None) -> None:
    ms = modelservice(model, routing=policy)
    if load_factor is not None:
        ms["spec"]["routing"]["loadFactor"] = load_factor
    slices = backend_slices(model, backends)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with gateway_with(ms, *slices) as (_, url):
        print(url, flush=True)
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.routing_gateway")
    p.add_argument("--model", default="bench")
    p.add_argument("--policy", choices=("PrefixAffinity", "LeastInFlight"), required=True)
    p.add_argument("--backend", action="append", required=True)
    p.add_argument("--load-factor", type=float, help="spec.routing.loadFactor (default: the spec's)")
    a = p.parse_args()
    asyncio.run(serve(a.model, a.policy, a.backend, a.load_factor))


if __name__ == "__main__":
    main()
