"""Never cut a stream: a replica that goes away (here: a scale-down to zero) finishes the stream it is serving within
the rendered grace period (spec.drainTimeout), and goes away as soon as it has, not at the end of the grace period.

Overlap by construction: the stub generates 2 tokens a second and the stream asks for 60 (30 s); the test checks
that the pod was already terminating while the stream was still open, so it cannot pass vacuously.
"""

from __future__ import annotations

import asyncio

import aiohttp

from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster.kube import pod_ready
from tests.cluster.wait import async_wait_for, wait_for
from tests.integration import ms
from tests.integration.gateway_client import chat, post, ready_endpoints, stub_successes

TOKENS = 60


async def test_a_stream_that_outlives_the_scale_down_finishes(kube, namespace, operator, fake_nodes, gateway):
    name = "drain"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"},
            drainTimeout="5m",
            podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "2"}},
        ),
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=90)
    (pod,) = kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items
    assert pod.spec.termination_grace_period_seconds == 300  # + the preStop wait: none here (--network-policy)

    def terminating() -> bool:
        p = kube.core.list_namespaced_pod(namespace, field_selector=f"metadata.name={pod.metadata.name}").items
        return bool(p and p[0].metadata.deletion_timestamp)

    async def scenario() -> tuple[bytes, bool, int, float]:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                gateway.url + "/v1/chat/completions", json=chat(name, stream=True, max_tokens=TOKENS)
            ) as r:
                assert r.status == 200
                body = await r.content.readline()
                await asyncio.to_thread(
                    kube.apps.patch_namespaced_deployment_scale, name, namespace, {"spec": {"replicas": 0}}
                )

                async def going_away() -> bool:
                    return await asyncio.to_thread(terminating)

                await async_wait_for(going_away, timeout=60, interval=0.2, message="the pod terminating")
                still_open = not r.content.at_eof()

                # The gateway learns it from the EndpointSlice, a moment later (a request routed in between finds the
                # engine not listening, or is dropped unread, and is replayed: the next test).
                async def dropped() -> bool:
                    return await asyncio.to_thread(ready_endpoints, gateway, namespace, name) == 0

                await async_wait_for(dropped, timeout=60, interval=0.2, message="the gateway to drop the pod")
                # From then on a new request is not sent to the pod going away: it wakes a new replica.
                status, _ = await post(s, gateway.url, chat(name, max_tokens=2))
                served_by_old = await asyncio.to_thread(stub_successes, pod.status.pod_ip)
                body += await r.read()
                return body, still_open, status, served_by_old

    body, still_open, status, served_by_old = await scenario()
    assert still_open, "the stream ended before the scale-down: the test proved nothing"
    assert status == 200 and served_by_old == 0
    chunks = [ln for ln in body.decode().splitlines() if ln.startswith("data: {")]
    assert body.rstrip().endswith(b"data: [DONE]"), body[-300:]
    assert len(chunks) >= TOKENS and '"finish_reason": "length"' in body.decode().replace('":"', '": "')
    # The replica went as soon as its stream was done, well before its 302 s grace period.
    wait_for(
        lambda: not kube.core.list_namespaced_pod(namespace, field_selector=f"metadata.name={pod.metadata.name}").items,
        timeout=60,
        message="pod gone",
    )


async def test_with_no_prestop_wait_requests_across_a_scale_down_are_all_answered(
    kube, namespace, operator, fake_nodes, gateway
):
    """The session's operator runs as the chart's default install does (the gateway, and the NetworkPolicy that lets
    only it reach the engines), so model pods get no preStop wait: a pod told to go is stopped at once (a parked
    model's GPU is free at once), possibly before the gateway has heard. Requests sent back to back across a
    scale-down to zero are all answered: one that reaches the stopping engine finds it not listening, or is dropped
    unread, and is replayed (here: it wakes the model again).

    The requests span the scale-down by construction: they run until the old pod is gone and a request has been
    answered after that, so the sequence covers the whole time the pod was going away. Whether one of them lands in
    the moment between the engine's stop and the gateway hearing of it is up to timing; the gateway's answer to that
    moment is forced in test_gateway_replay.py (dropped unread, not listening) and test_gateway_upstream.py."""
    name = "noprestop"
    ms.create(
        kube, namespace, ms.body(name, autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"})
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=90)
    (pod,) = kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items
    assert pod.spec.containers[0].lifecycle is None or pod.spec.containers[0].lifecycle.pre_stop is None

    def old_pod_gone() -> bool:
        return not kube.core.list_namespaced_pod(namespace, field_selector=f"metadata.name={pod.metadata.name}").items

    statuses: list[tuple[int, bytes]] = []
    after_gone = 0
    async with aiohttp.ClientSession() as s:
        statuses.append(await post(s, gateway.url, chat(name, max_tokens=2)))
        await asyncio.to_thread(kube.apps.patch_namespaced_deployment_scale, name, namespace, {"spec": {"replicas": 0}})
        for _ in range(2000):  # bounded: each is a few ms, or a wake of about a second
            gone = await asyncio.to_thread(old_pod_gone)
            statuses.append(await post(s, gateway.url, chat(name, max_tokens=2)))
            after_gone += gone
            if after_gone >= 3:
                break
    assert after_gone >= 3, f"the old pod never went away in {len(statuses)} requests"
    failed = [(st, body[:200]) for st, body in statuses if st != 200]
    assert not failed, failed
    pods = kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items
    assert any(pod_ready(p) for p in pods if p.metadata.name != pod.metadata.name)
