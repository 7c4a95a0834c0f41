"""A gateway pod with two worker processes (--workers 2, docs/routing.md) on the local control plane: the rules that
are per gateway hold across workers. One wake-up's effect per episode, in-flight from both workers summed by the
operator, /metrics as the sum, the held cap split between the workers, and SIGTERM draining every worker.

Which worker takes a connection is the kernel's choice (SO_REUSEPORT hashes the connection), so the tests read each
worker's own registry on its Unix socket (the gateway's TMPDIR is the test's) and never assume a spread: where a
test needs both workers busy, it opens more connections until both are, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelservice.labels import IN_FLIGHT_ANNOTATION, MODELSERVICE_LABEL
from tests.cluster.podspec import STUB_STARTUP_DELAY_ANNOTATION
from tests.cluster.wait import async_wait_for, wait_for
from tests.integration import ms
from tests.integration.gateway_client import (
    ReplicasHistory,
    chat,
    open_stream,
    pod_ips,
    post,
)
from tests.integration.gateway_process import HELD_LIMIT, TEST_FLAGS, GatewayProcess

POD = "gateway-workers-0"
WORKERS = (f"{POD}-w0", f"{POD}-w1")


class Workers:
    """The worker processes' own registries, read straight from their Unix sockets."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def sockets(self) -> list[Path]:
        return sorted(self.tmp.glob("modelservice-gateway-*/w*.sock"))

    def page(self, sock: Path) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(sock))
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: worker\r\n\r\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
        assert head.split()[1] == b"200", head
        return body.decode()

    def metric(self, name: str, **labels: str) -> list[float]:
        """One value per worker (the sum of its matching series); a worker without the series reads None."""
        out = []
        for sock in self.sockets():
            found = [
                s.value
                for f in text_string_to_metric_families(self.page(sock))
                for s in f.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
            ]
            out.append(sum(found) if found else None)
        return out


@pytest.fixture(scope="module")
def gw2(cluster, crds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-workers")
    gw = GatewayProcess(
        cluster.kubeconfig,
        tmp / "gateway.log",
        *TEST_FLAGS,
        "--workers",
        "2",
        env={"POD_NAME": POD, "TMPDIR": str(tmp)},
    ).start()
    gw.workers = Workers(tmp)
    wait_for(lambda: len(gw.workers.sockets()) == 2, timeout=10, message="two worker metrics sockets")
    yield gw
    gw.stop()


def known_to_both(gw: GatewayProcess, ns: str, name: str, endpoints: int) -> bool:
    return gw.workers.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/{name}") == [endpoints] * 2


def leases(kube, ns: str, name: str) -> dict[str, dict]:
    items = kube.custom.list_namespaced_custom_object(
        "coordination.k8s.io", "v1", ns, "leases", label_selector=f"{MODELSERVICE_LABEL}={name}"
    )["items"]
    return {lease["spec"]["holderIdentity"]: lease for lease in items}


async def test_two_workers_wake_a_model_from_zero_with_one_scale_up(kube, namespace, operator, fake_nodes, gw2):
    name = "sleepy2"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            autoscaling={"minReplicas": 0, "maxReplicas": 3},
            podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "3"}},
        ),
    )
    wait_for(lambda: kube.apps.read_namespaced_deployment(name, namespace), timeout=30, message="Deployment")
    kube.apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    wait_for(
        lambda: not pod_ips(kube, namespace, name) and known_to_both(gw2, namespace, name, 0),
        timeout=60,
        message="model asleep: no pods, no endpoints in either worker",
    )
    history = ReplicasHistory(kube, namespace, name)
    wait_for(lambda: history.values, timeout=10, message="replicas watch listed")

    async def scenario():
        # 20 connections (aiohttp opens one per concurrent request): each worker holds some with near certainty,
        # and each that holds one may send its own scale call.
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(post(s, gw2.url, chat(name, stream=True)) for _ in range(20)))

    results = await scenario()
    assert [r[0] for r in results] == [200] * 20, results[:3]
    wait_for(lambda: history.values[-1:] == [1], timeout=10, message="the scale-up seen by the watch")
    assert history.changes() == [0, 1]  # one scale-up: the workers' calls are the same idempotent write
    per_worker = gw2.workers.metric("modelservice_gateway_scale_requests_total", model=f"{namespace}/{name}")
    assert all(v in (None, 1.0) for v in per_worker), per_worker  # at most one call per worker per episode
    summed = gw2.metric("modelservice_gateway_scale_requests_total", model=f"{namespace}/{name}")
    assert summed == sum(v or 0 for v in per_worker) >= 1
    assert set(leases(kube, namespace, name)) <= set(WORKERS)
    # Counted once the handler has returned, which can be just after the client read its last byte.
    wait_for(
        lambda: gw2.metric("modelservice_gateway_requests_total", model=f"{namespace}/{name}", code="200") == 20,
        timeout=10,
        message="20 answered requests in the summed metrics",
    )


async def test_operator_sums_in_flight_from_both_workers_and_metrics_show_the_sum(
    kube, namespace, operator, fake_nodes, gw2
):
    """Endless streams until both workers hold some; then targetInFlight is set to the larger worker's count, so
    the operator asks for 2 replicas only if it adds the two Leases (either alone would give 1)."""
    name = "busy2"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetInFlight": 1000},
            podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "1"}},
        ),
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=60)
    wait_for(lambda: known_to_both(gw2, namespace, name, 1), timeout=60, message="both workers route to the replica")
    model = f"{namespace}/{name}"
    # The engines' own metrics come through the parent too (from one worker: each routes to every endpoint).
    with urllib.request.urlopen(f"http://127.0.0.1:{gw2.metrics_port}/engine-metrics", timeout=10) as r:
        assert r.status == 200 and f'modelservice="{name}"' in r.read().decode()

    def lease_counts() -> dict[str, int]:
        return {
            who: int(lease["metadata"]["annotations"].get(IN_FLIGHT_ANNOTATION, "0"))
            for who, lease in leases(kube, namespace, name).items()
        }

    async def load():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            streams = []
            try:
                for _ in range(5):  # bounded: all of 8k connections on one worker is a 2^(1-8k) event
                    streams += await asyncio.gather(*(open_stream(s, gw2.url, name) for _ in range(8)))
                    per_worker = await asyncio.to_thread(
                        gw2.workers.metric, "modelservice_gateway_in_flight", model=model
                    )
                    if all(per_worker):
                        break
                assert all(per_worker), per_worker
                n = len(streams)
                assert await asyncio.to_thread(gw2.metric, "modelservice_gateway_in_flight", model=model) == n

                async def leased() -> dict[str, int] | None:
                    counts = await asyncio.to_thread(lease_counts)
                    return counts if sum(counts.values()) == n and all(counts.get(w) for w in WORKERS) else None

                counts = await async_wait_for(
                    leased, timeout=30, interval=0.25, message=f"both workers' Leases adding up to {n} in flight"
                )
                target = max(counts.values())  # < n: each worker holds some
                await asyncio.to_thread(
                    ms.patch, kube, namespace, name, {"spec": {"autoscaling": {"targetInFlight": target}}}
                )

                async def scaled() -> bool:
                    dep = await asyncio.to_thread(kube.apps.read_namespaced_deployment, name, namespace)
                    return dep.spec.replicas == math.ceil(n / target)

                await async_wait_for(
                    scaled,
                    timeout=60,
                    interval=0.25,
                    message=f"{math.ceil(n / target)} replicas for {counts} at targetInFlight {target}",
                )
                return [(r.status, first) for r, first in streams]
            finally:
                for r, _ in streams:
                    r.close()

    opened = await load()
    assert all(status == 200 and first.startswith(b"data: ") for status, first in opened), opened[:3]
    wait_for(
        lambda: gw2.metric("modelservice_gateway_in_flight", model=model) == 0,
        timeout=30,
        message="in flight back to 0 in every worker",
    )


async def test_held_cap_is_split_between_the_workers(kube, namespace, operator, fake_nodes, gw2):
    """HELD_LIMIT per pod is HELD_LIMIT // 2 per worker: the pod never holds more than HELD_LIMIT; requests past a
    worker's share get 429 even if the other worker has room (the documented tolerance)."""
    name = "loading2"
    ms.create(kube, namespace, ms.body(name, podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "3600"}}))
    wait_for(
        lambda: known_to_both(gw2, namespace, name, 0) and pod_ips(kube, namespace, name),
        timeout=60,
        message="both workers know the model, whose pod cannot be Ready",
    )
    model, share = f"{namespace}/{name}", HELD_LIMIT // 2
    sent = HELD_LIMIT + 10

    async def scenario():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            held = [asyncio.create_task(post(s, gw2.url, chat(name))) for _ in range(sent)]

            async def settled():  # every request either held or answered
                per_worker = await asyncio.to_thread(
                    gw2.workers.metric, "modelservice_gateway_held_requests", model=model
                )
                answered = [t.result() for t in held if t.done()]
                return (per_worker, answered) if sum(v or 0 for v in per_worker) + len(answered) == sent else None

            per_worker, answered = await async_wait_for(
                settled, timeout=60, interval=0.1, message=f"{sent} requests held or refused"
            )
            await asyncio.to_thread(ms.delete, kube, namespace, name)
            released = await asyncio.gather(*held)
            return per_worker, answered, released

    per_worker, answered, released = await scenario()
    assert all(v is None or v <= share for v in per_worker), per_worker
    assert sum(v or 0 for v in per_worker) <= HELD_LIMIT
    assert max(v or 0 for v in per_worker) == share  # 40 requests over 2 workers: one of them has 20 or more
    assert answered and {status for status, _ in answered} == {429}
    assert sorted({status for status, _ in released}) == [429, 503]


async def test_sigterm_drains_every_worker(kube, namespace, operator, fake_nodes, cluster, tmp_path):
    """A stream in flight on each worker when the pod is told to stop: both finish, then every process exits."""
    name = "draining"
    ms.create(
        kube,
        namespace,
        ms.body(name, replicas=1, podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "10"}}),
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=60)
    gw = GatewayProcess(
        cluster.kubeconfig,
        tmp_path / "gateway.log",
        *TEST_FLAGS,
        "--workers",
        "2",
        env={"POD_NAME": "gateway-drain-0", "TMPDIR": str(tmp_path)},
    ).start()
    workers = Workers(tmp_path)
    try:
        wait_for(
            lambda: (
                len(workers.sockets()) == 2
                and workers.metric("modelservice_gateway_ready_endpoints", model=f"{namespace}/{name}") == [1, 1]
            ),
            timeout=60,
            message="both workers route to the replica",
        )
        children = [int(p) for p in Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()]
        assert len(children) == 2

        async def scenario():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                streams = []
                try:
                    for _ in range(5):  # bounded: until each worker has a stream in flight
                        streams += await asyncio.gather(
                            *(
                                s.post(gw.url + "/v1/chat/completions", json=chat(name, stream=True, max_tokens=30))
                                for _ in range(8)
                            )
                        )
                        per = await asyncio.to_thread(
                            workers.metric, "modelservice_gateway_in_flight", model=f"{namespace}/{name}"
                        )
                        if all(per):
                            break
                    assert all(per), per
                    os.kill(gw.proc.pid, signal.SIGTERM)
                    return [(r.status, await r.read()) for r in streams]
                finally:
                    for r in streams:
                        r.close()

        done = await scenario()
        assert all(status == 200 and body.rstrip().endswith(b"data: [DONE]") for status, body in done), done[:2]
        assert gw.proc.wait(timeout=30) == 0
        for pid in children:
            wait_for(
                lambda pid=pid: (
                    not Path(f"/proc/{pid}").exists()
                    or Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
                ),
                timeout=10,
                message=f"worker {pid} exited",
            )
    finally:
        gw.stop()


def test_workers_do_not_outlive_a_killed_parent(cluster, crds, tmp_path):
    """SIGKILL (an OOM kill) gives the parent no chance to stop its workers: the kernel does (PR_SET_PDEATHSIG)."""
    gw = GatewayProcess(
        cluster.kubeconfig,
        tmp_path / "gateway.log",
        *TEST_FLAGS,
        "--workers",
        "2",
        env={"POD_NAME": "gateway-killed-0", "TMPDIR": str(tmp_path)},
    ).start()
    try:
        children = [int(p) for p in Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read_text().split()]
        assert len(children) == 2
        gw.proc.kill()
        gw.proc.wait(timeout=10)

        def gone(pid: int) -> bool:
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # exited, not reaped
            except OSError:
                return True

        for pid in children:
            wait_for(lambda pid=pid: gone(pid), timeout=30, message=f"worker {pid} exited after its parent")
    finally:
        gw.stop()
