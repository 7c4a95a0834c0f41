"""The GPU pool on the local control plane (2 fake nodes x 2 nvidia.com/gpu, the real kube-scheduler): a model woken
on a full pool gets the GPU of the idle, lowest-priority, longest-idle model; with nothing parkable the status and the
held request's 503 say "no GPU free" with the scheduler's message.

Each test first waits until no pod in the cluster holds a GPU (earlier tests' namespaces are torn down in the
background), so the pool it fills is exactly the one it counts.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from modelservice import parking
from modelservice.labels import IN_FLIGHT_NOW_ANNOTATION, MODELSERVICE_LABEL
from tests.cluster.kube import pod_ready
from tests.cluster.podspec import STUB_STARTUP_DELAY_ANNOTATION
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.gateway_client import chat, post
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import kubectl

GPU = {"limits": {"nvidia.com/gpu": 1}}
POOL = 4  # 2 nodes x 2 GPUs: the local control plane's default


def gpu_pods(kube) -> list:
    return [
        p
        for p in kube.core.list_pod_for_all_namespaces().items
        if p.spec.node_name
        and p.status.phase not in ("Succeeded", "Failed")
        and any((c.resources.limits or {}).get("nvidia.com/gpu") for c in p.spec.containers)
    ]


def wait_pool_empty(kube) -> None:
    wait_for(lambda: not gpu_pods(kube), timeout=180, interval=0.5, message="no pod holding a GPU in the cluster")


def create_ready(kube, ns: str, name: str, **spec) -> None:
    ms.create(kube, ns, ms.body(name, resources=GPU, **spec))
    ms.wait_condition(kube, ns, name, "Ready", "True", timeout=90)


def scale_to_zero_now(kube, ns: str, name: str) -> None:
    wait_for(lambda: kube.apps.read_namespaced_deployment(name, ns), timeout=30, message=f"Deployment {name}")
    kube.apps.patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": 0}})
    wait_for(
        lambda: not kube.core.list_namespaced_pod(ns, label_selector=f"{MODELSERVICE_LABEL}={name}").items,
        timeout=60,
        message=f"{name} has no pod",
    )


def replicas(kube, ns: str, name: str) -> int:
    return kube.apps.read_namespaced_deployment(name, ns).spec.replicas


def events(kube, ns: str, name: str, reason: str) -> list[str]:
    return [
        e.message
        for e in kube.core.list_namespaced_event(ns).items
        if e.involved_object.name == name and e.reason == reason
    ]


async def test_a_woken_model_gets_the_gpu_of_the_longest_idle_lowest_priority_one(
    kube, namespace, operator, fake_nodes, gateway, cluster
):
    wait_pool_empty(kube)
    idle = {"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"}}
    # w is asleep; the pool then fills with four idle models, one at a time so that their idle clocks (which
    # start at Ready) are ordered: a is idle longest. a and b have the lowest priority.
    ms.create(
        kube,
        namespace,
        ms.body(
            "w", resources=GPU, priority=3, **idle, podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "2"}}
        ),
    )
    scale_to_zero_now(kube, namespace, "w")
    for name, priority in (("a", 0), ("b", 0), ("c", 3), ("d", 3)):
        create_ready(kube, namespace, name, priority=priority, **idle)
    assert len(gpu_pods(kube)) == POOL

    status, body = await _post_once(gateway.url, "w")
    assert status == 200, body  # answered once a was parked and w loaded

    parked = ms.wait_condition(kube, namespace, "a", "Ready", "False", reason="Parked", timeout=30)
    assert f"to make room for {namespace}/w" in ms.condition(parked, "Ready")["message"]
    assert [replicas(kube, namespace, n) for n in "abcd"] == [0, 1, 1, 1]  # only as many as needed
    w = ms.wait_condition(kube, namespace, "w", "Ready", "True", timeout=30)
    assert w["status"]["gpus"] == 1
    wait_for(lambda: ms.get(kube, namespace, "a")["status"].get("gpus") == 0, timeout=30, message="a holds 0 GPUs")
    assert any(f"{namespace}/w" in m for m in events(kube, namespace, "a", "Parked"))
    assert any(f"{namespace}/a" in m for m in events(kube, namespace, "w", "MakingRoom"))
    # `kubectl get ms` says who holds how many GPUs.
    rows = [ln.split() for ln in kubectl(cluster.kubeconfig, "get", "ms", "-n", namespace).splitlines()]
    assert rows[0][:5] == ["NAME", "ENGINE", "MODEL", "READY", "GPUS"]
    assert {r[0]: (r[4], r[5]) for r in rows[1:]} == {
        "a": ("0", "Parked"),
        "b": ("1", "Available"),
        "c": ("1", "Available"),
        "d": ("1", "Available"),
        "w": ("1", "Available"),
    }


async def _post_once(url: str, model: str, timeout: float = 90) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        return await post(s, url, chat(model))


async def test_nothing_parkable_says_no_gpu_free_in_status_and_503(
    kube, namespace, operator, fake_nodes, cluster, tmp_path
):
    wait_pool_empty(kube)
    # A gateway of its own with a short activation timeout: the 503 comes from a held request that times out.
    gw = GatewayProcess(
        cluster.kubeconfig,
        tmp_path / "gateway.log",
        "--activation-timeout",
        "15s",
        "--activity-interval",
        "1s",
        env={"POD_NAME": "gateway-pool-test"},
    ).start()
    try:
        ms.create(kube, namespace, ms.body("w", resources=GPU, autoscaling={"minReplicas": 0, "maxReplicas": 1}))
        scale_to_zero_now(kube, namespace, "w")
        # The pool is full of models that must run (a floor of one replica): none may be parked.
        for name in "abcd":
            create_ready(kube, namespace, name, replicas=1)
        assert len(gpu_pods(kube)) == POOL

        first, _ = await _post_once(gw.url, "w")  # wakes w; its pod cannot be placed
        assert first == 503
        obj = ms.wait_condition(kube, namespace, "w", "Ready", "False", reason="AwaitingCapacity", timeout=30)
        said = ms.condition(obj, "Ready")["message"]
        assert said.startswith("no GPU free: ") and "Insufficient nvidia.com/gpu" in said

        # Held while the status says so: the 503 at the timeout repeats it.
        status, body = await _post_once(gw.url, "w")
        error = json.loads(body)["error"]
        assert status == 503 and error["code"] == "awaiting_capacity", error
        assert "no GPU free: " in error["message"] and "Insufficient nvidia.com/gpu" in error["message"]
        assert "nothing can be parked" in error["message"] and f"{namespace}/a has minReplicas 1" in error["message"]
        assert [replicas(kube, namespace, n) for n in "abcd"] == [1, 1, 1, 1]
    finally:
        gw.stop()


def _priority_class(kube, name: str, value: int):
    from kubernetes import client

    api = client.SchedulingV1Api(kube.api_client)
    api.create_priority_class(client.V1PriorityClass(metadata=client.V1ObjectMeta(name=name), value=value))
    return lambda: api.delete_priority_class(name)


async def test_scheduler_preemption_and_parking_do_not_fight(kube, namespace, operator, fake_nodes, gateway):
    """The scheduler's PriorityClass band ranks before spec.priority: the planner leaves a pod the scheduler preempts
    for to the scheduler (no double freeing), and never parks a model the scheduler ranks above the waiting one
    (it would preempt its way back when woken)."""
    from kubernetes.client.rest import ApiException

    # Why the operator cannot switch preemption off per pod: the API server takes preemptionPolicy from the class.
    try:
        kube.core.create_namespaced_pod(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "never"},
                "spec": {"preemptionPolicy": "Never", "containers": [{"name": "c", "image": "x"}]},
            },
        )
        refused = None
    except ApiException as e:
        refused = e
    assert refused is not None and refused.status == 403 and "PreemptionPolicy" in refused.body, refused

    wait_pool_empty(kube)
    high = f"{namespace}-high"[:253]
    delete_class = _priority_class(kube, high, 1000)
    try:
        idle = {"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"}}
        ms.create(kube, namespace, ms.body("w", resources=GPU, **idle, placement={"priorityClassName": high}))
        scale_to_zero_now(kube, namespace, "w")
        for name in "abcd":
            create_ready(kube, namespace, name, **idle)
        assert len(gpu_pods(kube)) == POOL

        # 1. w's class preempts: the scheduler evicts one pod for it; the planner parks no one on top.
        status, body = await _post_once(gateway.url, "w")
        assert status == 200, body
        ms.wait_condition(kube, namespace, "w", "Ready", "True", timeout=30)
        preempted = wait_for(
            lambda: [
                n
                for n in "abcd"
                if ms.condition(ms.get(kube, namespace, n), "Ready").get("reason") == "AwaitingCapacity"
            ],
            timeout=60,
            message="one preempted",
        )
        assert len(preempted) == 1
        # The preempted model does not park anyone back. Its first AwaitingCapacity (from its own reconcile) gives
        # the scheduler's words; the planner's pass, a moment later, says why it makes no room for it.
        wait_for(
            lambda: (
                "no request is waiting for it"
                in ms.condition(ms.get(kube, namespace, preempted[0]), "Ready").get("message", "")
            ),
            timeout=30,
            message="the planner to say why the preempted model waits",
        )
        # Several planning passes later (the operator resyncs every 3 s): still nobody parked, w keeps its GPU.
        w_pod = [p.metadata.uid for p in gpu_pods(kube) if p.metadata.labels.get(MODELSERVICE_LABEL) == "w"]
        seen = operator.counter("modelservice_reconcile_total")
        wait_for(
            lambda: operator.counter("modelservice_reconcile_total") >= seen + 15,
            timeout=60,
            message="three more resyncs",
        )
        assert [replicas(kube, namespace, n) for n in "abcdw"] == [1, 1, 1, 1, 1]
        assert not [e for e in kube.core.list_namespaced_event(namespace).items if e.reason == "Parked"]
        assert [p.metadata.uid for p in gpu_pods(kube) if p.metadata.labels.get(MODELSERVICE_LABEL) == "w"] == w_pod

        # 2. A model outside the class with the highest spec.priority and a floor of one (it must run): the
        #    scheduler may not preempt for it; the planner parks one idle model of its band for it (and the preempted
        #    one, whose pending pod would take the freed GPU first), never w, which the scheduler ranks above it.
        ms.create(kube, namespace, ms.body("low", resources=GPU, replicas=1, priority=1000))
        ms.wait_condition(kube, namespace, "low", "Ready", "True", timeout=90)
        assert replicas(kube, namespace, "w") == 1
        parked = sorted(n for n in "abcd" if replicas(kube, namespace, n) == 0)
        assert len(parked) == 2 and preempted[0] in parked, parked
        for n in parked:
            obj = ms.wait_condition(kube, namespace, n, "Ready", "False", reason="Parked", timeout=30)
            assert f"to make room for {namespace}/low" in ms.condition(obj, "Ready")["message"]
    finally:
        delete_class()


def _rolled_out(kube, ns: str, name: str, rollout: str) -> bool:
    """Every pod of the model runs the spec with ROLLOUT=rollout, is Ready, and no other pod is left (not even one
    terminating). Judged by the pods, not the Deployment's status: that can read "rolled out" for a moment while
    the controllers are between two writes of the same rollout."""
    d = kube.apps.read_namespaced_deployment(name, ns)
    pods = kube.core.list_namespaced_pod(ns, label_selector=f"{MODELSERVICE_LABEL}={name}").items

    def runs(pod) -> bool:
        env = {e.name: e.value for e in pod.spec.containers[0].env or []}
        return env.get("ROLLOUT") == rollout and pod_ready(pod) and not pod.metadata.deletion_timestamp

    return len(pods) == d.spec.replicas and all(runs(p) for p in pods)


def _new_spec(kube, ns: str, name: str, rollout: str) -> None:
    ms.patch(kube, ns, name, {"spec": {"env": [{"name": "ROLLOUT", "value": rollout}]}})


async def test_rollouts_on_a_full_pool(kube, namespace, operator, fake_nodes, gateway):
    """An idle model rolls out in place (no GPU for a surge replica, nothing relies on it: nobody is parked); a model
    serving a request gets its surge replica's GPU from the longest-idle model, and keeps serving throughout."""
    wait_pool_empty(kube)
    idle = {"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"}}
    for name in "abcr":
        create_ready(
            kube, namespace, name, **idle, podTemplate={"annotations": {"stub.modelservice.dev/tokens-per-second": "2"}}
        )
    assert len(gpu_pods(kube)) == POOL

    # 1. r is idle: in place.
    _new_spec(kube, namespace, "r", "2")
    wait_for(
        lambda: _rolled_out(kube, namespace, "r", "2"),
        timeout=120,
        interval=0.5,
        message="r rolled out",
    )
    assert [replicas(kube, namespace, n) for n in "abc"] == [1, 1, 1]
    assert not [e for e in kube.core.list_namespaced_event(namespace).items if e.reason == "Parked"]
    # Back to surging once done: the in-place strategy lasts one rollout.
    wait_for(
        lambda: kube.apps.read_namespaced_deployment("r", namespace).spec.strategy.rolling_update.max_surge == 1,
        timeout=30,
        message="r surges again",
    )

    # 2. r serves a stream (60 tokens at 2/s): its rollout parks a (idle longest) for the surge replica.
    async def scenario() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(gateway.url + "/v1/chat/completions", json=chat("r", stream=True, max_tokens=60)) as resp:
                assert resp.status == 200
                first = await resp.content.readline()

                def in_flight_seen() -> bool:  # the operator must know r is in use before its rollout starts
                    leases = kube.custom.list_namespaced_custom_object(
                        "coordination.k8s.io", "v1", namespace, "leases", label_selector=f"{MODELSERVICE_LABEL}=r"
                    )["items"]
                    # In flight now (what the planner goes by), not the interval's peak.
                    return any(
                        int((lease["metadata"].get("annotations") or {}).get(IN_FLIGHT_NOW_ANNOTATION, "0")) > 0
                        for lease in leases
                    )

                await asyncio.to_thread(wait_for, in_flight_seen, 30, 0.2, "r's in-flight Lease")
                await asyncio.to_thread(_new_spec, kube, namespace, "r", "3")
                await asyncio.to_thread(ms.wait_condition, kube, namespace, "a", "Ready", "False", "Parked", 60)
                return first + await resp.read()

    body = await scenario()
    assert body.rstrip().endswith(b"data: [DONE]")  # the serving replica finished its stream
    wait_for(lambda: _rolled_out(kube, namespace, "r", "3"), timeout=120, interval=0.5, message="r rolled out again")
    assert [replicas(kube, namespace, n) for n in "abc"] == [0, 1, 1]
    parked = ms.get(kube, namespace, "a")
    assert f"to make room for {namespace}/r" in ms.condition(parked, "Ready")["message"]


async def test_an_operator_restart_in_the_middle_of_making_room_finishes_it(
    kube, namespace, operator, fake_nodes, gateway
):
    """w needs both GPUs of one node. The operator parked a (node 0) and died before parking b: the operator that
    starts next parks b only (not c or d on the other node), and w's held request is answered."""
    wait_pool_empty(kube)
    n0, n1 = sorted(fake_nodes)[:2]
    idle = {"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"}}
    ms.create(kube, namespace, ms.body("w", resources={"limits": {"nvidia.com/gpu": 2}}, priority=5, **idle))
    scale_to_zero_now(kube, namespace, "w")
    for name, node, priority in (("a", n0, 0), ("b", n0, 0), ("c", n1, 5), ("d", n1, 5)):
        create_ready(
            kube,
            namespace,
            name,
            priority=priority,
            **idle,
            placement={"nodeSelector": {"kubernetes.io/hostname": node}},
        )
    assert len(gpu_pods(kube)) == POOL

    operator.stop()
    try:
        # What a park that was cut short leaves: a at zero, with for whom; nothing else.
        kube.apps.patch_namespaced_deployment(
            "a",
            namespace,
            {
                "metadata": {"annotations": {"serving.modelservice.dev/parked-for": f"{namespace}/w"}},
                "spec": {"replicas": 0},
            },
        )

        async def scenario() -> tuple[int, bytes]:
            request = asyncio.ensure_future(_post_once(gateway.url, "w", timeout=150))

            def w_pending() -> bool:
                pods = kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}=w").items
                return any(
                    c.type == "PodScheduled" and c.status == "False" for p in pods for c in (p.status.conditions or [])
                )

            await asyncio.to_thread(wait_for, w_pending, 60, 0.2, "w's pod waiting for GPUs")
            await asyncio.to_thread(operator.start)
            return await request

        status, body = await scenario()
    finally:
        if operator.proc is None or operator.proc.poll() is not None:  # the session's later tests need it running
            operator.start()
    assert status == 200, body
    assert [replicas(kube, namespace, n) for n in "abcd"] == [0, 0, 1, 1]
    obj = ms.wait_condition(kube, namespace, "b", "Ready", "False", reason="Parked", timeout=30)
    assert f"to make room for {namespace}/w" in ms.condition(obj, "Ready")["message"]
    assert ms.condition(ms.get(kube, namespace, "a"), "Ready")["reason"] == "Parked"


async def test_the_gpu_made_room_for_the_oldest_waiter_goes_to_it(kube, namespace, operator, fake_nodes, gateway):
    """First come, first served: zed and then amy wait for a GPU while the only model that could give one back (a)
    is still loading. When a is Ready it is parked for zed, the older waiter (not for amy, first by name), and zed's
    pod is nominated for a's node: amy's pod, which the scheduler would often try first (it has failed fewer times,
    so its backoff is shorter), cannot take that GPU. zed is answered; amy still waits, and says why."""
    wait_pool_empty(kube)
    idle = {"autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "1h"}}
    for name in ("zed", "amy"):
        ms.create(kube, namespace, ms.body(name, resources=GPU, **idle))
        scale_to_zero_now(kube, namespace, name)
    for name in "bcd":  # a floor of one replica each: not parkable
        create_ready(kube, namespace, name, replicas=1)
    # a takes the last GPU and loads for 20 s: while it loads, nothing can be parked.
    ms.create(
        kube,
        namespace,
        ms.body("a", resources=GPU, **idle, podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: "20"}}),
    )
    wait_for(lambda: len(gpu_pods(kube)) == POOL, timeout=60, interval=0.2, message="a's pod bound")

    def pending_pod(name: str):
        for p in kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}={name}").items:
            if any(c.type == "PodScheduled" and c.status == "False" for c in p.status.conditions or []):
                return p
        return None

    zed_request = asyncio.ensure_future(_post_once(gateway.url, "zed", timeout=150))
    amy_request = None
    try:
        zed = await asyncio.to_thread(wait_for, lambda: pending_pod("zed"), 60, 0.2, "zed's pod waiting for a GPU")
        # Pods' creation times have whole seconds: amy's pod is created in a later second than zed's.
        created = zed.metadata.creation_timestamp.timestamp()
        await asyncio.to_thread(wait_for, lambda: time.time() >= created + 1.1, 5, 0.05, "the next second")
        amy_request = asyncio.ensure_future(_post_once(gateway.url, "amy", timeout=150))
        await asyncio.to_thread(wait_for, lambda: pending_pod("amy"), 60, 0.2, "amy's pod waiting for a GPU")
        a = ms.get(kube, namespace, "a")
        assert (ms.condition(a, "Ready") or {}).get("status") != "True", "a was Ready before both waited"

        status, body = await zed_request
        assert status == 200, body
        parked = ms.wait_condition(kube, namespace, "a", "Ready", "False", reason="Parked", timeout=30)
        assert f"to make room for {namespace}/zed" in ms.condition(parked, "Ready")["message"]
        zed_pod = kube.core.read_namespaced_pod(zed.metadata.name, namespace)
        assert zed_pod.metadata.annotations.get(parking.RESERVED_ON_ANNOTATION) == zed_pod.spec.node_name
        assert pending_pod("amy") is not None  # still waiting: the GPU went to zed
        amy = ms.wait_condition(kube, namespace, "amy", "Ready", "False", reason="AwaitingCapacity", timeout=30)
        assert "nothing can be parked" in ms.condition(amy, "Ready")["message"]
    finally:
        for r in (zed_request, amy_request):
            if r is not None and not r.done():
                r.cancel()
