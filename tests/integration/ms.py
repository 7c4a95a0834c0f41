"""Helpers for ModelService objects in integration tests (sync kubernetes client, waits with timeouts)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import yaml
from kubernetes.client.rest import ApiException

from tests.cluster.podspec import STUB_IMAGE
from tests.cluster.wait import wait_for

GROUP, VERSION, PLURAL = "serving.modelservice.dev", "v1alpha1", "modelservices"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def body(name: str, **spec: Any) -> dict[str, Any]:
    """A ModelService served by the stub model server, unless `image=None` asks for the engine's own image (which the
    node agent runs for real where the engine is installed: test_real_engines.py)."""
    spec.setdefault("engine", "vllm")
    spec.setdefault("model", {"uri": "hf://org/model"})
    if spec.setdefault("image", STUB_IMAGE) is None:
        del spec["image"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ModelService", "metadata": {"name": name}, "spec": spec}


# Examples whose engine runs for real here but whose flags are for a GPU (an 8B model, CUDA defaults): on the fake
# nodes they get the stub; test_real_engines.py runs the same engine with its CPU flags.
GPU_ONLY_EXAMPLES = {"vllm", "scale-to-zero"}


def example(name: str) -> dict[str, Any]:
    obj = yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())
    if name in GPU_ONLY_EXAMPLES:
        obj["spec"]["image"] = STUB_IMAGE
    return obj


def create(kube, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
    return kube.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, copy.deepcopy(obj))


def get(kube, ns: str, name: str) -> Optional[dict[str, Any]]:
    try:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def patch(kube, ns: str, name: str, patch_body: dict[str, Any]) -> dict[str, Any]:
    return kube.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, patch_body)


def delete(kube, ns: str, name: str) -> None:
    kube.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def condition(obj: Optional[dict[str, Any]], type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return {}


def wait_condition(
    kube, ns: str, name: str, type_: str, status: str, reason: Optional[str] = None, timeout: float = 60
) -> dict[str, Any]:
    def check():
        obj = get(kube, ns, name)
        c = condition(obj, type_)
        current = obj and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
        if current and c.get("status") == status and (reason is None or c.get("reason") == reason):
            return obj
        return None

    try:
        return wait_for(
            check, timeout=timeout, interval=0.25, message=f"{ns}/{name} condition {type_}={status} reason={reason}"
        )
    except AssertionError as e:  # say what the condition was at the end of the wait, not at its start
        raise AssertionError(f"{e}; finally {condition(get(kube, ns, name), type_)}") from None


def events_for(kube, ns: str, name: str, reason: Optional[str] = None) -> list[Any]:
    items = kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [e for e in items if e.involved_object.kind == "ModelService" and (reason is None or e.reason == reason)]
