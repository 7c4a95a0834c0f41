"""LoRA adapters end to end on the local cluster, on a real vLLM (CPU build): declared on a ModelService, loaded by
the gateway into the running base on demand, routed by name, reported in status (issue #15, docs/lora.md); and the
faults: an engine refusal, a missing adapter directory, more adapters at once than maxLoaded, an engine that lost
its adapters.

The adapters lie on a PersistentVolumeClaim bound to a hostPath PersistentVolume, which the fake node mounts as a
kubelet would (tests/cluster/node_agent.py claim_dirs). One vLLM start for the whole module (minutes on this machine).
Base answers are compared only with no adapter request in flight: the CPU build applies an adapter to base requests
batched beside adapter requests (docs/lora.md, fault 2).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import tiny_lora
from tests.cluster.models_offline import OfflineModels
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.engine_client import SCALE_TO_ZERO, VLLM_ARGS, VLLM_ENV, VLLM_LOAD, asleep, assert_native, pods
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import kubectl

NAME, SERVED, CLAIM = "lora-base", "lora-base", "adapters"
LORA = {"maxLoaded": 2, "maxRank": 8, "claim": CLAIM}


def adapter(name: str) -> dict:
    return {"name": name, "uri": f"pvc://{CLAIM}/{name}/v1"}


async def complete(url: str, model: str, path: str = "/v1/completions") -> tuple[int, dict]:
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=VLLM_LOAD + 60)) as s:
        async with s.post(url + path, json=body) as r:
            return r.status, json.loads(await r.read() or b"{}")


def loads(gw: GatewayProcess, ns: str, outcome: str, adapter: str | None = None) -> float:
    """modelservice_gateway_adapter_loads_total of the base, summed over adapters unless one is named."""
    labels = {"model": f"{ns}/{NAME}", "outcome": outcome, **({"adapter": adapter} if adapter else {})}
    return gw.metric("modelservice_gateway_adapter_loads_total", **labels)


def text(url: str, model: str) -> str:
    status, body = asyncio.run(complete(url, model))
    assert status == 200, (model, status, body)
    assert body["model"] == model, body
    return body["choices"][0]["text"]


def adapter_status(kube, ns: str) -> dict:
    return {a["name"]: a for a in ((ms.get(kube, ns, NAME) or {}).get("status") or {}).get("adapters") or []}


def apply(kubeconfig: str, tmp: Path, ns: str, adapters: list[dict]) -> None:
    obj = ms.body(
        NAME,
        engine="vllm",
        image=None,
        model={"uri": "hf://meta-llama/Llama-3.2-1B-Instruct"},
        args=VLLM_ARGS,
        env=VLLM_ENV,
        startupTimeout="15m",
        lora=LORA,
        adapters=adapters,
        autoscaling={**SCALE_TO_ZERO, "scaleToZeroAfter": "30m"},
    )
    obj["metadata"]["namespace"] = ns
    f = tmp / "ms.json"
    f.write_text(json.dumps(obj))
    kubectl(kubeconfig, "apply", "-f", str(f))


@pytest.mark.timeout(VLLM_LOAD + 600)
def test_two_adapters_on_one_base_loaded_on_demand_added_and_removed_without_a_restart(
    kube, namespace, operator, fake_nodes, engines, tmp_path
):
    gw = GatewayProcess(
        kube.kubeconfig, tmp_path / "gateway.log", "--activation-timeout", f"{VLLM_LOAD}s", "--activity-interval", "1s"
    ).start()
    try:
        _scenario(kube, namespace, gw, tmp_path)
    finally:
        gw.stop()


def _scenario(kube, ns: str, gw: GatewayProcess, tmp: Path) -> None:
    store = tmp / "adapter-volume"
    base_dir = OfflineModels.build().model.dir
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):  # ("gone": declared, never written: no adapter there)
        tiny_lora.build(store / name / "v1", base_dir, seed=seed, rank=8)
    tiny_lora.build(store / "big" / "v1", base_dir, seed=4, rank=16)  # over maxRank: vLLM refuses it
    pv = f"{ns}-adapters"
    kube.core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "hostPath": {"path": str(store)},
                "claimRef": {"namespace": ns, "name": CLAIM},
            },
        }
    )
    try:
        # Bound as the PV binder binds (the local control plane runs none: tests/cluster/controlplane.py): the
        # scheduler takes a claim with a volumeName and this annotation as bound.
        kube.core.create_namespaced_persistent_volume_claim(
            ns,
            {
                "metadata": {"name": CLAIM, "annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        _serve(kube, ns, gw, tmp)
    finally:
        kube.core.delete_persistent_volume(pv)


def _serve(kube, ns: str, gw: GatewayProcess, tmp: Path) -> None:
    apply(kube.kubeconfig, tmp, ns, [adapter("a"), adapter("b")])
    wait_for(lambda: kube.apps.read_namespaced_deployment(NAME, ns), timeout=30, message="Deployment")
    asleep(kube, gw, ns, NAME)  # the one vLLM start is the wake-up by an adapter's request

    # An adapter's request wakes its base from zero, loads the adapter, and is answered under the adapter's name.
    a = text(gw.url, "a")
    pod = assert_native(kube, ns, NAME, "vllm")
    uid = pod.metadata.uid
    b = text(gw.url, "b")
    base = text(gw.url, SERVED)  # alone: no adapter request in flight
    assert len({a, b, base}) == 3, (a, b, base)  # each adapter is really applied, and they differ
    assert text(gw.url, "a") == a  # greedy: the same answer again, from the adapter now loaded

    # Added by kubectl apply: served within seconds, same pod, no restart. The replica holds two (maxLoaded): the
    # least recently used one (b) is unloaded for it.
    apply(kube.kubeconfig, tmp, ns, [adapter("a"), adapter("b"), adapter("c")])
    wait_for(lambda: asyncio.run(complete(gw.url, "c"))[0] == 200, timeout=60, message="adapter c served")
    c = text(gw.url, "c")
    assert c not in (a, b, base), (a, b, c, base)
    now = pods(kube, ns, NAME)
    assert [p.metadata.uid for p in now] == [uid], "the base pod was replaced"
    assert (now[0].status.container_statuses[0].restart_count or 0) == 0
    pod_name = now[0].metadata.name
    wait_for(
        lambda: (
            {k: v["loadedOn"] for k, v in adapter_status(kube, ns).items()}
            == {"a": [pod_name], "b": [], "c": [pod_name]}
        ),
        timeout=60,
        message="status.adapters: a and c loaded on the pod, b unloaded (LRU)",
    )
    assert ms.get(kube, ns, NAME)["status"]["adaptersLoaded"] == "2/3"
    assert "2/3" in kubectl(kube.kubeconfig, "get", "modelservices", "-n", ns, NAME)  # the Adapters column
    assert text(gw.url, "b") == b  # loaded again on demand: the same answer

    # An adapter the engine refuses: the client gets the engine's reason, status keeps it, the rest keeps serving.
    apply(kube.kubeconfig, tmp, ns, [adapter("a"), adapter("b"), adapter("big")])
    wait_for(lambda: asyncio.run(complete(gw.url, "big"))[0] != 404, timeout=60, message="adapter big routed")
    status, body = asyncio.run(complete(gw.url, "big"))
    assert status == 503 and body["error"]["code"] == "adapter_load_failed", body
    assert "max_lora_rank" in body["error"]["message"], body
    wait_for(
        lambda: "max_lora_rank" in (adapter_status(kube, ns).get("big") or {}).get("error", ""),
        timeout=60,
        message="status.adapters[big].error has vLLM's message",
    )
    assert text(gw.url, "a") == a and text(gw.url, SERVED) == base

    # Removed: 404 in OpenAI's shape, from the gateway, at once; still no restart.
    status, body = asyncio.run(complete(gw.url, "c"))
    assert status == 404 and body["error"]["code"] == "model_not_found" and "'c'" in body["error"]["message"], body
    assert [p.metadata.uid for p in pods(kube, ns, NAME)] == [uid]

    # The engine's own adapter API is not a client path.
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        status, body = asyncio.run(complete(gw.url, "a", path=f"/models/{ns}/{NAME}{path}"))
        assert status == 404 and body["error"]["code"] == "not_found", (path, body)

    _faults(kube, ns, gw, tmp, {"a": a, "b": b, "c": c}, uid)


def _faults(kube, ns: str, gw: GatewayProcess, tmp: Path, answers: dict[str, str], uid: str) -> None:
    # An adapter whose directory holds nothing: vLLM's refusal in the answer and in status; the others keep serving.
    apply(kube.kubeconfig, tmp, ns, [adapter("a"), adapter("b"), adapter("c"), adapter("gone")])
    wait_for(lambda: asyncio.run(complete(gw.url, "gone"))[0] != 404, timeout=60, message="adapter gone routed")
    status, body = asyncio.run(complete(gw.url, "gone"))  # inside the back-off window, or a second refusal
    assert status == 502 and body["error"]["code"] == "adapter_load_failed", body  # the engine's 404: not ours
    assert "No adapter found" in body["error"]["message"], body
    wait_for(
        lambda: "No adapter found" in (adapter_status(kube, ns).get("gone") or {}).get("error", ""),
        timeout=60,
        message="status.adapters[gone].error has vLLM's message",
    )
    assert loads(gw, ns, "failed", "gone") >= 1

    # More distinct adapters with requests at once than maxLoaded (2): the third waits for a slot (or would get a
    # 429 past the activation timeout), it never evicts an adapter in use, so no adapter is loaded twice on the
    # replica over the burst. Every request of one adapter is sent at once and lasts long enough (32 tokens) to
    # still be in flight when its siblings arrive.
    before = {name: loads(gw, ns, "loaded", name) for name in answers}
    evicted = loads(gw, ns, "evicted")

    async def burst() -> list[tuple[str, int, dict]]:
        async def one(name: str) -> tuple[str, int, dict]:
            body = {"model": name, "prompt": "The quick brown fox", "max_tokens": 32, "temperature": 0}
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=VLLM_LOAD + 60)) as s:
                async with s.post(gw.url + "/v1/completions", json=body) as r:
                    return name, r.status, json.loads(await r.read() or b"{}")

        return await asyncio.gather(*(one(name) for name in answers for _ in range(2)))

    results = asyncio.run(burst())
    for name, status, body in results:
        if status == 200:
            assert body["model"] == name and body["choices"][0]["text"], body
        else:
            assert status == 429 and body["error"]["code"] == "adapter_capacity_exceeded", (name, status, body)
            assert body["error"]["type"] == "rate_limit_error" and body["error"]["message"], body
    assert any(status == 200 for _, status, _ in results), results
    new_loads = {name: loads(gw, ns, "loaded", name) - before[name] for name in answers}
    assert all(n <= 1 for n in new_loads.values()), new_loads  # one replica: at most one load per adapter
    assert sum(new_loads.values()) >= 1 and loads(gw, ns, "evicted") > evicted, new_loads  # it was over capacity

    # The engine loses an adapter the gateway had loaded there (what a restart of the engine in the pod does, minus
    # the minutes of a vLLM start; another gateway replica unloading it is the same): the next request gets the
    # engine's 404, the gateway loads the adapter again and replays the request, and the client sees a 200.
    assert text(gw.url, "a") == answers["a"]  # a is loaded now, in the gateway's view and the engine's
    pod = pods(kube, ns, NAME)[0]
    port = pod.spec.containers[0].ports[0].container_port
    status, said = asyncio.run(_engine_unload(f"http://{pod.status.pod_ip}:{port}", "a"))
    assert status == 200, said
    loaded = loads(gw, ns, "loaded", "a")
    assert text(gw.url, "a") == answers["a"]  # 200, the adapter's own answer
    assert loads(gw, ns, "loaded", "a") == loaded + 1  # loaded again after the engine's 404
    assert [p.metadata.uid for p in pods(kube, ns, NAME)] == [uid]


async def _engine_unload(engine_url: str, name: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async with s.post(engine_url + "/v1/unload_lora_adapter", json={"lora_name": name}) as r:
            return r.status, await r.text()
