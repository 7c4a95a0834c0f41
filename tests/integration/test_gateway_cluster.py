"""The gateway on the local control plane, with the operator and fake nodes: scale from zero with one wake-up,
least in-flight over real replicas, a pod deleted mid-run, bad input and API keys.

The gateway runs as the real subprocess (`python -m modelservice.cli gateway`), so these tests also cover flag
parsing, watches, discovery (discovery.k8s.io/v1beta1 on 1.20) and the Lease/scale calls against RBAC-free admin.

No test here is judged by a wall-clock window. Overlap is made by construction (streams that cannot end before the
test closes them, a model whose replica cannot be Ready during the test), runs last until a condition the product
must reach (the gateway routing to a replacement pod, the operator's scale-up), short-lived states are read from a
watch's record rather than caught by polling, and every wait that reaches its deadline fails.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import socket
import time

import aiohttp

from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster.podspec import STUB_MAX_CONCURRENCY_ANNOTATION, STUB_STARTUP_DELAY_ANNOTATION
from tests.cluster.wait import async_wait_for, wait_for
from tests.integration import ms
from tests.integration.gateway_client import (
    ReplicasHistory,
    chat,
    modelservice_history,
    open_stream,
    pod_ips,
    post,
    ready_endpoints,
    ready_state,
    stub_metric,
    stub_successes,
)
from tests.integration.gateway_process import HELD_LIMIT, TEST_FLAGS, GatewayProcess


async def test_twenty_first_requests_wake_a_model_from_zero_once(kube, namespace, operator, fake_nodes, gateway):
    name = "sleepy"
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
        lambda: not pod_ips(kube, namespace, name) and ready_endpoints(gateway, namespace, name) == 0,
        timeout=60,
        message="model asleep: no pods, no endpoints in the gateway",
    )
    history = ReplicasHistory(kube, namespace, name)
    wait_for(lambda: history.values, timeout=10, message="replicas watch listed")

    async def scenario():
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            results = await asyncio.gather(*(post(s, gateway.url, chat(name, stream=True)) for _ in range(20)))
            return results, time.monotonic() - t0

    results, took = await scenario()
    assert [r[0] for r in results] == [200] * 20, results[:3]
    assert all(r[1].rstrip().endswith(b"data: [DONE]") for r in results)
    assert took >= 3  # the startup delay was really waited out
    assert gateway.metric("modelservice_gateway_scale_requests_total", model=f"{namespace}/{name}") == 1
    assert gateway.metric("modelservice_gateway_activation_seconds_count") >= 1
    wait_for(lambda: history.values[-1:] == [1], timeout=10, message="the scale-up seen by the watch")
    assert history.changes() == [0, 1]
    leases = kube.custom.list_namespaced_custom_object(
        "coordination.k8s.io", "v1", namespace, "leases", label_selector=f"{MODELSERVICE_LABEL}={name}"
    )["items"]
    assert [lease["spec"]["holderIdentity"] for lease in leases] == ["gateway-test-0"]


def _three_replicas(kube, namespace, gateway, name, tokens_per_second: str = "100", **spec):
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            replicas=3,
            podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": tokens_per_second}},
            **spec,
        ),
    )
    wait_for(lambda: ready_endpoints(gateway, namespace, name) == 3, timeout=90, message="3 endpoints in gateway")
    return pod_ips(kube, namespace, name)


async def test_least_in_flight_spreads_load_over_three_replicas(kube, namespace, operator, fake_nodes, gateway):
    """30 requests over three replicas, all in flight at once by construction: each is a stream that cannot end
    before the test closes it (1 token/s up to the stub's limit), and none is closed before all 30 have their first
    event. Every pick therefore sees every earlier request still in flight, and least in-flight gives exactly 10
    each, read from the replicas' own running-requests gauges while all 30 are open (random picks would hit 10/10/10
    about one time in 65; a pile-up never)."""
    n = 30
    # LeastInFlight: the default policy (PrefixAffinity) would send 30 identical prompts to one replica up to its
    # load bound (test_gateway_affinity.py covers it).
    ips = _three_replicas(
        kube, namespace, gateway, "spread", tokens_per_second="1", routing={"policy": "LeastInFlight"}
    )
    assert len(ips) == 3

    async def scenario():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            streams = []
            try:
                streams = await asyncio.gather(*(open_stream(s, gateway.url, "spread") for _ in range(n)))
                running = await asyncio.to_thread(
                    lambda: sorted(stub_metric(ip, "vllm:num_requests_running") for ip in ips)
                )
            finally:
                for r, _ in streams:
                    r.close()
            return [(r.status, first) for r, first in streams], running

    opened, running = await scenario()
    assert all(status == 200 and first.startswith(b"data: ") for status, first in opened), opened[:3]
    assert running == [n / 3] * 3, running
    # The hang-ups reach the gateway: nothing stays counted in flight once the clients are gone.
    wait_for(
        lambda: gateway.metric("modelservice_gateway_in_flight", model=f"{namespace}/spread") == 0,
        timeout=30,
        message="the gateway's in-flight count back to 0 after the clients closed their streams",
    )


async def test_deleting_a_backend_pod_mid_run_fails_no_new_request(kube, namespace, operator, fake_nodes, gateway):
    """Six clients send requests back to back while one of three pods is deleted. The run is not timed: the deletion
    comes once it is under way, and it goes on until the gateway routes to the pod that replaced the deleted one (so
    its routing table holds an EndpointSlice without the dead pod: the whole window in which it could have sent a
    request to a dead address is inside the run) and at least 30 requests started after the deletion have been
    answered. Not one request may fail."""
    name, clients, after_wanted = "churn", 6, 30
    _three_replicas(kube, namespace, gateway, name)
    pods = kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items
    original = {p.metadata.name for p in pods}
    victim = pods[0]

    def replacement_served() -> bool:
        for p in kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items:
            if p.metadata.name not in original and p.status.pod_ip and not p.metadata.deletion_timestamp:
                try:
                    if stub_successes(p.status.pod_ip) >= 1:
                        return True
                except OSError:
                    pass  # not listening yet
        return False

    async def scenario():
        results: list[tuple[float, int]] = []  # (start time, status), in order of answer
        deleted_at: list[float] = []
        stop = asyncio.Event()

        sessions = itertools.count()

        async def client(s):
            for _ in range(5000):  # bounded in count; the run ends on `stop`
                if stop.is_set():
                    return
                t = time.monotonic()
                # A new session per request: under the default policy (PrefixAffinity) identical prompts rank the
                # replicas in one fixed order, and the replacement pod, ranked last, might never be picked while the
                # others are under their load bound. Distinct keys hash over all three, the replacement included.
                headers = {"X-Session-Id": f"churn-{next(sessions)}"}
                status, _ = await post(s, gateway.url, chat(name, max_tokens=10), headers=headers)
                results.append((t, status))

        async def conductor():
            try:

                async def under_way() -> bool:
                    return len(results) >= 2 * clients

                await async_wait_for(under_way, timeout=60, interval=0.05, message="the run under way")
                await asyncio.to_thread(
                    kube.core.delete_namespaced_pod, victim.metadata.name, namespace, grace_period_seconds=0
                )
                deleted_at.append(time.monotonic())

                async def over() -> bool:
                    after = sum(1 for t, _ in results if t >= deleted_at[0])
                    return after >= after_wanted and await asyncio.to_thread(replacement_served)

                await async_wait_for(
                    over,
                    timeout=120,
                    interval=0.2,
                    message=f"the gateway routing to the replacement pod, and {after_wanted} "
                    "requests answered since the deletion",
                )
            finally:
                stop.set()

        async with aiohttp.ClientSession() as s:
            await asyncio.gather(conductor(), *(client(s) for _ in range(clients)))
        return results, deleted_at[0]

    results, deleted_at = await scenario()
    after = [status for t, status in results if t >= deleted_at]
    failed = [(round(t - deleted_at, 2), status) for t, status in results if status != 200]
    assert len(after) >= after_wanted
    assert failed == [], f"{len(failed)} of {len(results)} requests failed (seconds after the deletion, status)"


async def test_bad_input_and_api_keys(kube, namespace, operator, fake_nodes, gateway):
    kube.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "keys"}, "data": {"keys": base64.b64encode(b"alpha\nbeta\n").decode()}}
    )
    ms.create(kube, namespace, ms.body("open"))
    ms.create(kube, namespace, ms.body("locked", apiKeySecretRef={"name": "keys"}))
    # Never Ready during the test (an hour's startup delay): requests for it can only be held.
    ms.create(kube, namespace, ms.body("loading", podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "3600"}}))
    for n in ("open", "locked"):
        wait_for(lambda n=n: ready_endpoints(gateway, namespace, n) == 1, timeout=90, message=f"{n} endpoint")
    locked_ip = pod_ips(kube, namespace, "locked")[0]

    async def scenario():
        url = gateway.url
        async with aiohttp.ClientSession() as s:
            assert (await post(s, url, b"{nope"))[0] == 400
            assert (await post(s, url, {"messages": []}))[0] == 400
            assert (await post(s, url, chat("no-such-model")))[0] == 404
            assert (await post(s, url, {"model": "open", "pad": "x" * 70_000}))[0] == 413
            assert (await post(s, url, chat(f"{namespace}/open")))[0] == 200
            assert (await post(s, url, chat("locked")))[0] == 401
            assert (await post(s, url, chat("locked"), {"Authorization": "Bearer gamma"}))[0] == 401
            assert stub_successes(locked_ip) == 0  # refused requests never reached the model
            assert (await post(s, url, chat("locked"), {"Authorization": "Bearer beta"}))[0] == 200
            async with s.get(f"{url}/models/{namespace}/open/v1/models") as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "open"
            # "loading" has a replica that cannot be Ready: requests wait, and past the limit get 429.
            held = [asyncio.create_task(post(s, url, chat("loading"))) for _ in range(HELD_LIMIT)]

            async def all_held() -> bool:
                return (
                    await asyncio.to_thread(
                        gateway.metric, "modelservice_gateway_held_requests", model=f"{namespace}/loading"
                    )
                    == HELD_LIMIT
                )

            await async_wait_for(all_held, timeout=60, interval=0.1, message=f"{HELD_LIMIT} requests held")
            status, body = await post(s, url, chat("loading"))
            assert status == 429, body
            assert not any(t.done() for t in held)
            await asyncio.to_thread(ms.delete, kube, namespace, "loading")
            released = await asyncio.gather(*held)
            # Deleted: answered by the deletion (not by the activation timeout, which says something else).
            assert {r[0] for r in released} == {503}
            assert all(b"was deleted" in r[1] for r in released), released[0]

    await scenario()
    assert stub_successes(locked_ip) == 1


async def test_idle_model_goes_to_zero_and_the_next_request_wakes_it(kube, namespace, operator, fake_nodes, gateway):
    """The whole serverless loop with no hand-scaling: warm start, idle → zero, request → one, idle → zero again.

    Each awake spell lasts only scaleToZeroAfter (4 s) past the last request, so the states are read from a watch's
    record of the ModelService (from its creation on), not caught by polling."""
    name = "loop"
    created = ms.create(
        kube,
        namespace,
        ms.body(
            name,
            autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfter": "4s"},
            podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "1"}},
        ),
    )
    history = modelservice_history(kube, namespace, name, created["metadata"]["resourceVersion"])
    try:
        awake_steps = (("Ready", ready_state()), ("ScaledToZero", ready_state("ScaledToZero")))
        # A new model starts warm (proves it loads), then goes to sleep.
        _, asleep = history.wait_sequence(*awake_steps, timeout=60)
        assert ms.condition(asleep, "Stalled")["status"] == "False"
        assert kube.apps.read_namespaced_deployment(name, namespace).spec.replicas == 0
        wait_for(
            lambda: ms.events_for(kube, namespace, name, "ScaledToZero"), timeout=10, message="a ScaledToZero Event"
        )

        status, body = await _stream_once(gateway.url, name)
        assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
        *_, awake, _ = history.wait_sequence(
            *awake_steps,
            ("Ready with 1 replica", ready_state(ready_replicas=1)),
            ("ScaledToZero again", ready_state("ScaledToZero")),
            timeout=90,
        )
        assert awake["status"]["readyReplicas"] == 1
    finally:
        history.stop()
    # The second sleep is counted on the same Event, as Kubernetes aggregates repeats.
    wait_for(
        lambda: [e.count for e in ms.events_for(kube, namespace, name, "ScaledToZero")] == [2],
        timeout=10,
        message="ScaledToZero Event counted twice",
    )


async def _stream_once(url: str, name: str):
    async with aiohttp.ClientSession() as s:
        return await post(s, url, chat(name, stream=True))


async def test_in_flight_load_adds_replicas_and_quiet_removes_them(kube, namespace, operator, fake_nodes, gateway):
    """targetInFlight without an HPA: the operator sizes replicas from the gateway's in-flight Leases.

    The load is six streams that stay in flight until the test has seen the scale-up (endless at the stub's token
    limit), not streams of a fixed length that a slow operator could outlast."""
    name = "busy"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetInFlight": 2},
            podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "10"}},
        ),
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=60)

    def replicas() -> int:
        return kube.apps.read_namespaced_deployment(name, namespace).spec.replicas

    async def load():
        async with aiohttp.ClientSession() as s:
            streams = []
            try:
                streams = await asyncio.gather(*(open_stream(s, gateway.url, name) for _ in range(6)))

                async def scaled_up() -> bool:
                    return await asyncio.to_thread(replicas) == 3

                await async_wait_for(
                    scaled_up,
                    timeout=60,
                    interval=0.25,
                    message="3 replicas for 6 in-flight requests at targetInFlight 2",
                )
            finally:
                for r, _ in streams:
                    r.close()
            return [(r.status, first) for r, first in streams]

    opened = await load()
    assert all(status == 200 and first.startswith(b"data: ") for status, first in opened), opened
    wait_for(lambda: replicas() == 1, timeout=60, message="back to minReplicas once the load is gone")


async def test_the_engines_queue_adds_replicas_through_the_leases(kube, namespace, operator, fake_nodes, gateway):
    """targetQueue: the gateway reads the engine's waiting requests (the stub's vllm:num_requests_waiting, one slot),
    carries them on its activity Lease, and the operator sizes replicas from them: 5 waiting at targetQueue 2 ask for
    ceil(5 / 2) = 3 replicas; an empty queue leaves it to minReplicas. No targetInFlight: the queue alone scales."""
    name = "queued"
    ms.create(
        kube,
        namespace,
        ms.body(
            name,
            autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetQueue": 2},
            podTemplate={
                "annotations": {"stub.modelservice.dev/tokens-per-second": "10", STUB_MAX_CONCURRENCY_ANNOTATION: "1"}
            },
        ),
    )
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=60)

    def replicas() -> int:
        return kube.apps.read_namespaced_deployment(name, namespace).spec.replicas

    async def load():
        async with aiohttp.ClientSession() as s:
            running, queued = None, []
            try:
                running = await open_stream(s, gateway.url, name)  # takes the one slot
                # These wait in the engine's queue (no first byte until the slot frees): not awaited here.
                queued = [asyncio.ensure_future(open_stream(s, gateway.url, name)) for _ in range(5)]

                async def scaled_up() -> bool:
                    return await asyncio.to_thread(replicas) == 3

                await async_wait_for(
                    scaled_up, timeout=90, interval=0.25, message="3 replicas for 5 waiting requests at targetQueue 2"
                )
            finally:
                for task in queued:
                    task.cancel()
                await asyncio.gather(*queued, return_exceptions=True)
                if running is not None:
                    running[0].close()
            return running

    r, first = await load()
    assert r.status == 200 and first.startswith(b"data: ")
    wait_for(lambda: replicas() == 1, timeout=60, message="back to minReplicas once the queue is empty")


def test_a_gateway_whose_chosen_port_was_taken_starts_on_another(cluster, crds, tmp_path):
    """The harness picks free ports, and one can be taken before the process binds it (a process starting beside it,
    an outgoing connection's ephemeral port): the gateway then exits with "address already in use", and start()
    chooses again instead of waiting out its timeout for a process that is gone."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    gw = GatewayProcess(cluster.kubeconfig, tmp_path / "gateway.log", *TEST_FLAGS)
    gw.metrics_port = taken.getsockname()[1]
    try:
        gw.start()
        assert gw.metrics_port != taken.getsockname()[1] and gw.healthy()
        assert "address already in use" in (tmp_path / "gateway.log").read_text()
    finally:
        gw.stop()
        taken.close()
