"""GPU-seconds per model (gpuseconds.py): the split from cached pods, Deployments and Leases; time-weighted sums."""

from datetime import datetime, timezone

import pytest
from prometheus_client import CollectorRegistry

from modelservice.controller import Store
from modelservice.gpuseconds import GpuSeconds, observe, split
from modelservice.labels import IN_FLIGHT_ANNOTATION

pytestmark = pytest.mark.unit


def pod(name, gpus, node="n1"):
    return {"metadata": {"name": name}, "spec": {"nodeName": node} if node else {}, **({"gpus": gpus} if gpus else {})}


def test_split():
    pods = [pod("a", 2), pod("b", 2), pod("c", 2, node=None), pod("d", 0)]
    assert split(pods, ready_replicas=1, in_flight=0) == {"serving": 0, "idle": 2, "loading": 2}
    assert split(pods, ready_replicas=1, in_flight=3) == {"serving": 2, "idle": 0, "loading": 2}
    assert split(pods, ready_replicas=5, in_flight=0) == {"serving": 0, "idle": 4, "loading": 0}  # never above held
    assert split([], 0, 0) == {"serving": 0, "idle": 0, "loading": 0}


def sample(reg, state, ns="ns", name="m"):
    return (
        reg.get_sample_value("modelservice_gpu_seconds_total", {"namespace": ns, "modelservice": name, "state": state})
        or 0
    )


def test_time_weighted_sum_credits_each_sample_until_the_next():
    reg = CollectorRegistry()
    g = GpuSeconds(reg)
    g.sample(100.0, {("ns", "m"): {"serving": 0, "idle": 0, "loading": 2}})
    g.sample(130.0, {("ns", "m"): {"serving": 0, "idle": 2, "loading": 0}})  # loaded: 30 s x 2 GPUs loading
    g.sample(140.0, {("ns", "m"): {"serving": 2, "idle": 0, "loading": 0}})  # 10 s x 2 idle
    g.sample(145.0, {})  # 5 s x 2 serving; then gone
    assert (sample(reg, "loading"), sample(reg, "idle"), sample(reg, "serving")) == (60.0, 20.0, 10.0)
    assert reg.get_sample_value("modelservice_gpus", {"namespace": "ns", "modelservice": "m", "state": "idle"}) is None
    g.sample(145.0, {})  # no time passed: nothing added
    assert sample(reg, "serving") == 10.0


def test_observe_reads_the_controller_store():
    now = 1_800_000_000.0
    renew = datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    store = Store()
    store.modelservices[("ns", "m")] = {"metadata": {"name": "m"}}
    store.modelservices[("ns", "cpu")] = {"metadata": {"name": "cpu"}}
    store.pods[("ns", "m")] = {"a": pod("a", 1), "b": pod("b", 1)}
    store.children[("ns", "m")]["Deployment"] = {"status": {"readyReplicas": 1}}
    assert observe(store, now) == {("ns", "m"): {"serving": 0, "idle": 1, "loading": 1}}
    store.leases[("ns", "m")] = {
        "gw-0": {"metadata": {"annotations": {IN_FLIGHT_ANNOTATION: "2"}}, "spec": {"renewTime": renew}}
    }
    assert observe(store, now)[("ns", "m")] == {"serving": 1, "idle": 0, "loading": 1}
