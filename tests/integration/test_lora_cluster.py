"""LoRA adapters end to end on the local cluster, on a real vLLM (CPU build): declared on a ModelService, loaded by
the gateway into the running base on demand, routed by name, reported in status (issue #15, docs/lora.md).

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
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
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
