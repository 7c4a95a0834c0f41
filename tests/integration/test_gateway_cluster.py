"""The gateway on the local control plane, with the operator and fake nodes: scale from zero with one wake-up,
least in-flight over real replicas, a pod deleted mid-run, bad input and API keys.

The gateway runs as the real subprocess (`python -m modelservice.cli gateway`), so these tests also cover flag
parsing, watches, discovery (discovery.k8s.io/v1beta1 on 1.20) and the Lease/scale calls against RBAC-free admin.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.request

import aiohttp
from kubernetes import watch as kwatch
from prometheus_client.parser import text_string_to_metric_families

from modelservice.labels import MODELSERVICE_LABEL, STUB_STARTUP_DELAY_ANNOTATION
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.gateway_process import HELD_LIMIT, GatewayProcess

def chat(model: str, stream: bool = False, max_tokens: int = 8) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream,
            "max_tokens": max_tokens}


async def _post(session, url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url + "/v1/chat/completions", data=data, headers=headers) as r:
        return r.status, await r.read()


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ready_endpoints(gw: GatewayProcess, ns: str, name: str) -> float:
    return gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/{name}")


def pod_ips(kube, ns: str, name: str) -> list[str]:
    pods = kube.core.list_namespaced_pod(ns, label_selector=f"{MODELSERVICE_LABEL}={name}").items
    return [p.status.pod_ip for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp]


def stub_successes(ip: str, port: int = 8000) -> float:
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as r:
        return sum(s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples
                   if s.name == "vllm:request_success_total")


class ReplicasHistory:
    """spec.replicas of one Deployment as the API server reports it, from a watch in a thread."""

    def __init__(self, kube, ns: str, name: str):
        self.values: list[int] = []
        self._watch = kwatch.Watch()
        self._thread = threading.Thread(target=self._run, args=(kube, ns, name), daemon=True)
        self._thread.start()

    def _run(self, kube, ns, name):
        try:
            for event in self._watch.stream(kube.apps.list_namespaced_deployment, ns,
                                            field_selector=f"metadata.name={name}", timeout_seconds=120):
                self.values.append(event["object"].spec.replicas)
        except Exception:  # noqa: BLE001 - the namespace is torn down under the watch at the end of the test
            pass

    def changes(self) -> list[int]:
        self._watch.stop()
        out: list[int] = []
        for v in self.values:
            if not out or out[-1] != v:
                out.append(v)
        return out


def test_twenty_first_requests_wake_a_model_from_zero_once(kube, namespace, operator, fake_nodes, gateway):
    name = "sleepy"
    ms.create(kube, namespace, ms.body(name, autoscaling={"minReplicas": 0, "maxReplicas": 3},
                                       podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "3"}}))
    wait_for(lambda: kube.apps.read_namespaced_deployment(name, namespace), timeout=30, message="Deployment")
    kube.apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    wait_for(lambda: not pod_ips(kube, namespace, name) and ready_endpoints(gateway, namespace, name) == 0,
             timeout=60, message="model asleep: no pods, no endpoints in the gateway")
    history = ReplicasHistory(kube, namespace, name)
    wait_for(lambda: history.values, timeout=10, message="replicas watch listed")

    async def scenario():
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            results = await asyncio.gather(*(_post(s, gateway.url, chat(name, stream=True)) for _ in range(20)))
            return results, time.monotonic() - t0

    results, took = run(scenario())
    assert [r[0] for r in results] == [200] * 20, results[:3]
    assert all(r[1].rstrip().endswith(b"data: [DONE]") for r in results)
    assert took >= 3  # the startup delay was really waited out
    assert gateway.metric("modelservice_gateway_scale_requests_total", model=f"{namespace}/{name}") == 1
    assert gateway.metric("modelservice_gateway_activation_seconds_count") >= 1
    wait_for(lambda: history.values[-1:] == [1], timeout=10, message="the scale-up seen by the watch")
    assert history.changes() == [0, 1]
    leases = kube.custom.list_namespaced_custom_object("coordination.k8s.io", "v1", namespace, "leases",
                                                       label_selector=f"{MODELSERVICE_LABEL}={name}")["items"]
    assert [lease["spec"]["holderIdentity"] for lease in leases] == ["gateway-test-0"]


def _three_replicas(kube, namespace, gateway, name):
    ms.create(kube, namespace, ms.body(name, replicas=3,
                                       podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "100"}}))
    wait_for(lambda: ready_endpoints(gateway, namespace, name) == 3, timeout=90, message="3 endpoints in gateway")
    return pod_ips(kube, namespace, name)


def test_least_in_flight_spreads_load_over_three_replicas(kube, namespace, operator, fake_nodes, gateway):
    ips = _three_replicas(kube, namespace, gateway, "spread")
    assert len(ips) == 3

    async def scenario():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(_post(s, gateway.url, chat("spread", max_tokens=50)) for _ in range(30)))

    assert [r[0] for r in run(scenario())] == [200] * 30
    counts = sorted(stub_successes(ip) for ip in ips)
    assert counts[0] >= 7 and counts[-1] <= 13, counts  # 10 each when all 30 overlap


def test_deleting_a_backend_pod_mid_run_fails_no_new_request(kube, namespace, operator, fake_nodes, gateway):
    name = "churn"
    _three_replicas(kube, namespace, gateway, name)
    victim = kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items[0]

    async def scenario():
        results: list[tuple[float, int]] = []  # (start time, status)
        deleted_at: list[float] = []

        async def worker(s):
            for _ in range(15):  # bounded
                t = time.monotonic()
                status, _ = await _post(s, gateway.url, chat(name, max_tokens=10))
                results.append((t, status))

        async def killer():
            await asyncio.sleep(0.5)
            await asyncio.to_thread(kube.core.delete_namespaced_pod, victim.metadata.name, namespace,
                                    grace_period_seconds=0)
            deleted_at.append(time.monotonic())

        async with aiohttp.ClientSession() as s:
            await asyncio.gather(killer(), *(worker(s) for _ in range(6)))
        return results, deleted_at[0]

    results, deleted_at = run(scenario())
    after = [status for t, status in results if t >= deleted_at]
    assert len(after) > 20 and all(status == 200 for status in after), after
    assert all(status == 200 for _, status in results)


def test_bad_input_and_api_keys(kube, namespace, operator, fake_nodes, gateway):
    kube.core.create_namespaced_secret(namespace, {"metadata": {"name": "keys"},
                                                   "data": {"keys": base64.b64encode(b"alpha\nbeta\n").decode()}})
    ms.create(kube, namespace, ms.body("open"))
    ms.create(kube, namespace, ms.body("locked", apiKeySecretRef={"name": "keys"}))
    ms.create(kube, namespace, ms.body("loading", podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "60"}}))
    for n in ("open", "locked"):
        wait_for(lambda n=n: ready_endpoints(gateway, namespace, n) == 1, timeout=90, message=f"{n} endpoint")
    locked_ip = pod_ips(kube, namespace, "locked")[0]

    async def scenario():
        url = gateway.url
        async with aiohttp.ClientSession() as s:
            assert (await _post(s, url, b"{nope"))[0] == 400
            assert (await _post(s, url, {"messages": []}))[0] == 400
            assert (await _post(s, url, chat("no-such-model")))[0] == 404
            assert (await _post(s, url, {"model": "open", "pad": "x" * 70_000}))[0] == 413
            assert (await _post(s, url, chat(f"{namespace}/open")))[0] == 200
            assert (await _post(s, url, chat("locked")))[0] == 401
            assert (await _post(s, url, chat("locked"), {"Authorization": "Bearer gamma"}))[0] == 401
            assert stub_successes(locked_ip) == 0  # refused requests never reached the model
            assert (await _post(s, url, chat("locked"), {"Authorization": "Bearer beta"}))[0] == 200
            async with s.get(f"{url}/models/{namespace}/open/v1/models") as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "open"
            # "loading" has a replica that is not Ready for 60 s: requests wait, and past the limit get 429.
            held = [asyncio.create_task(_post(s, url, chat("loading"))) for _ in range(HELD_LIMIT)]
            for _ in range(100):
                await asyncio.sleep(0.1)
                if gateway.metric("modelservice_gateway_held_requests", model=f"{namespace}/loading") == HELD_LIMIT:
                    break
            status, body = await _post(s, url, chat("loading"))
            assert status == 429, body
            await asyncio.to_thread(ms.delete, kube, namespace, "loading")
            released = await asyncio.gather(*held)
            assert {r[0] for r in released} == {503}  # deleted: answered at once, not at the activation timeout

    run(scenario())
    assert stub_successes(locked_ip) == 1


def test_idle_model_goes_to_zero_and_the_next_request_wakes_it(kube, namespace, operator, fake_nodes, gateway):
    """The whole serverless loop with no hand-scaling: warm start, idle → zero, request → one, idle → zero again."""
    name = "loop"
    ms.create(kube, namespace, ms.body(name, autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfter": "4s"},
                                       podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "1"}}))
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=60)  # a new model starts warm (proves it loads)
    asleep = ms.wait_condition(kube, namespace, name, "Ready", "False", "ScaledToZero", timeout=60)
    assert ms.condition(asleep, "Stalled")["status"] == "False"
    assert kube.apps.read_namespaced_deployment(name, namespace).spec.replicas == 0
    assert ms.events_for(kube, namespace, name, "ScaledToZero")

    status, body = run(_stream_once(gateway.url, name))
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    awake = ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=30)
    assert awake["status"]["readyReplicas"] == 1
    ms.wait_condition(kube, namespace, name, "Ready", "False", "ScaledToZero", timeout=60)
    # The second sleep is counted on the same Event, as Kubernetes aggregates repeats.
    wait_for(lambda: [e.count for e in ms.events_for(kube, namespace, name, "ScaledToZero")] == [2], timeout=10,
             message="ScaledToZero Event counted twice")


async def _stream_once(url: str, name: str):
    async with aiohttp.ClientSession() as s:
        return await _post(s, url, chat(name, stream=True))


def test_in_flight_load_adds_replicas_and_quiet_removes_them(kube, namespace, operator, fake_nodes, gateway):
    """targetInFlight without an HPA: the operator sizes replicas from the gateway's in-flight Leases."""
    name = "busy"
    ms.create(kube, namespace, ms.body(name, autoscaling={"minReplicas": 1, "maxReplicas": 3, "targetInFlight": 2},
                                       podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "10"}}))
    ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=60)

    async def load():
        async with aiohttp.ClientSession() as s:  # 6 streams of 80 tokens at 10 tokens/s: ~8 s of in-flight 6
            return await asyncio.gather(*(_post(s, gateway.url, chat(name, stream=True, max_tokens=80))
                                          for _ in range(6)))

    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(results=run(load(), timeout=60)), daemon=True)
    worker.start()
    wait_for(lambda: kube.apps.read_namespaced_deployment(name, namespace).spec.replicas == 3, timeout=30,
             message="3 replicas for 6 in-flight requests at targetInFlight 2")
    worker.join(timeout=60)
    assert [r[0] for r in box["results"]] == [200] * 6
    wait_for(lambda: kube.apps.read_namespaced_deployment(name, namespace).spec.replicas == 1, timeout=60,
             message="back to minReplicas once the load is gone")
