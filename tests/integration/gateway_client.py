"""Helpers for tests of the gateway on the local control plane: a small OpenAI client, the gateway's and stubs'
figures, and watch-recorded histories of replicas and conditions (test_gateway_cluster.py, test_drain.py,
test_gpu_pool.py, test_gateway_workers.py)."""

from __future__ import annotations

import json
import threading
import urllib.request
from typing import Any, Callable

import aiohttp
from kubernetes import watch as kwatch
from prometheus_client.parser import text_string_to_metric_families

from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.gateway_process import GatewayProcess


def chat(model: str, stream: bool = False, max_tokens: int = 8) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": stream,
        "max_tokens": max_tokens,
    }


async def post(session, url, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(url + "/v1/chat/completions", data=data, headers=headers) as r:
        return r.status, await r.read()


def ready_endpoints(gw: GatewayProcess, ns: str, name: str) -> float:
    return gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/{name}")


def pod_ips(kube, ns: str, name: str) -> list[str]:
    pods = kube.core.list_namespaced_pod(ns, label_selector=f"{MODELSERVICE_LABEL}={name}").items
    return [p.status.pod_ip for p in pods if p.status.pod_ip and not p.metadata.deletion_timestamp]


def stub_metric(ip: str, name: str, port: int = 8000) -> float:
    with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as r:
        return sum(
            s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples if s.name == name
        )


def stub_successes(ip: str, port: int = 8000) -> float:
    return stub_metric(ip, "vllm:request_success_total", port)


class History:
    """Every version of one object as a watch (in a thread) delivers them: a state that lasts a moment is on the
    record however late the test looks at it, where a poll on a busy machine could miss it. From resource_version
    on if given (nothing after it is missed), else from the object's current version."""

    def __init__(self, list_fn, *args, name: str, value=lambda obj: obj, resource_version: str | None = None):
        self.values: list = []
        self._value = value
        self._watch = kwatch.Watch()
        kw = {"resource_version": resource_version} if resource_version else {}
        self._thread = threading.Thread(target=self._run, args=(list_fn, args, name, kw), daemon=True)
        self._thread.start()

    def _run(self, list_fn, args, name, kw):
        try:
            for event in self._watch.stream(
                list_fn, *args, field_selector=f"metadata.name={name}", timeout_seconds=300, **kw
            ):
                self.values.append(self._value(event["object"]))
        except Exception:  # noqa: BLE001 - the namespace is torn down under the watch at the end of the test
            pass

    def stop(self) -> None:
        self._watch.stop()

    def wait_sequence(self, *steps: tuple[str, Callable[[Any], bool]], timeout: float = 60) -> list:
        """Wait until the record holds versions matching steps[0], then steps[1], ... in that order; returns them."""

        def matched():
            found: list = []
            for v in list(self.values):
                if len(found) < len(steps) and steps[len(found)][1](v):
                    found.append(v)
            return found if len(found) == len(steps) else None

        return wait_for(
            matched,
            timeout=timeout,
            interval=0.25,
            message=" then ".join(what for what, _ in steps) + " in the watch's record",
        )


class ReplicasHistory(History):
    """spec.replicas of one Deployment as the API server reports it."""

    def __init__(self, kube, ns: str, name: str):
        super().__init__(kube.apps.list_namespaced_deployment, ns, name=name, value=lambda d: d.spec.replicas)

    def changes(self) -> list[int]:
        self.stop()
        out: list[int] = []
        for v in self.values:
            if not out or out[-1] != v:
                out.append(v)
        return out


def modelservice_history(kube, ns: str, name: str, resource_version: str) -> History:
    return History(
        kube.custom.list_namespaced_custom_object,
        ms.GROUP,
        ms.VERSION,
        ns,
        ms.PLURAL,
        name=name,
        resource_version=resource_version,
    )


def ready_state(reason: str | None = None, ready_replicas: int | None = None) -> Callable[[dict], bool]:
    """A ModelService version whose status is current and says Ready=True, or Ready=False for `reason`."""

    def check(obj: dict) -> bool:
        status = obj.get("status") or {}
        cond = ms.condition(obj, "Ready")
        return (
            status.get("observedGeneration") == obj["metadata"]["generation"]
            and cond.get("status") == ("False" if reason else "True")
            and (reason is None or cond.get("reason") == reason)
            and (ready_replicas is None or status.get("readyReplicas") == ready_replicas)
        )

    return check


ENDLESS = 100_000  # the stub's token limit: at 1-10 tokens/s such a stream outlasts any test; only its client ends it


async def open_stream(session, url: str, model: str) -> tuple[aiohttp.ClientResponse, bytes]:
    """A streaming request that stays in flight until the caller closes it; returns it with its first line."""
    r = await session.post(url + "/v1/chat/completions", json=chat(model, stream=True, max_tokens=ENDLESS))
    return r, await r.content.readline()
