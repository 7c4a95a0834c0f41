"""The GPU-pool benchmark's own pieces (bench/gpu_pool_trace.py, bench/gpu_pool.py): the trace is the committed one
and reproducible from its seed, and the ledger counts idle GPU-seconds only as defined."""

from __future__ import annotations

from bench.gpu_pool import TRACE, Ledger, operator_args, pod_view, summarize
from bench.gpu_pool_sim import longest_idle, simulate
from bench.gpu_pool_trace import Trace, TraceSpec, generate, zipf_weights
from bench.report import gpu_pool_rows, table
from bench.stats import summary
from modelservice.labels import MODELSERVICE_LABEL
from tests.integration.operator_process import OPERATOR_FLAGS


def pod(uid: str, model: str, *, node: str | None = "n0", ready: bool = False, gpu_msg: str | None = None) -> dict:
    conds = [{"type": "Ready", "status": "True" if ready else "False"}]
    if gpu_msg is not None:
        conds.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": gpu_msg})
    return {
        "metadata": {"uid": uid, "labels": {MODELSERVICE_LABEL: model}},
        "spec": {"nodeName": node, "containers": [{"resources": {"requests": {"nvidia.com/gpu": "1"}}}]},
        "status": {"conditions": conds},
    }


def test_the_committed_trace_is_what_its_seed_generates():
    committed = Trace.from_json(TRACE.read_text())
    again = generate(committed.spec)
    assert committed.requests == again.requests and committed.model_names == again.model_names
    assert len(committed.requests) > 100 and len(committed.model_names) == 12
    counts = committed.counts()
    assert counts["model-01"] > counts["model-12"]  # Zipf: rank 1 is asked for most


def test_zipf_weights_sum_to_one_and_fall():
    w = zipf_weights(12, 1.1)
    assert abs(sum(w) - 1) < 1e-9 and all(a > b for a, b in zip(w, w[1:]))
    assert generate(TraceSpec(seed=2, duration=60)).requests != generate(TraceSpec(seed=3, duration=60)).requests


def test_pod_view_reads_gpus_binding_readiness_and_waiting():
    assert pod_view({"metadata": {"uid": "x", "labels": {}}, "spec": {}}) is None
    v = pod_view(pod("a", "m1", node=None, gpu_msg="0/2 nodes are available: 2 Insufficient nvidia.com/gpu."))
    assert (v.model, v.gpus, v.bound, v.ready, v.waiting_for_gpu) == ("m1", 1, False, False, True)
    v = pod_view(pod("a", "m1", node=None, gpu_msg="0/2 nodes are available: 2 Insufficient memory."))
    assert not v.waiting_for_gpu


def test_idle_gpu_seconds_count_ready_pods_without_requests_and_split_out_waiting():
    led = Ledger()
    led.on_pod("ADDED", pod("a", "m1", ready=True))
    led.on_pod("ADDED", pod("b", "m2", ready=False))  # loading: held, not idle
    led.sample(2.0)
    assert (led.gpu_held, led.gpu_idle, led.gpu_idle_while_waiting) == (4.0, 2.0, 0.0)
    led.in_flight["m1"] += 1  # serving: not idle
    led.sample(1.0)
    assert led.gpu_idle == 2.0
    led.in_flight["m1"] -= 1
    led.on_pod("ADDED", pod("c", "m3", node=None, gpu_msg="Insufficient nvidia.com/gpu"))
    led.sample(1.0)
    assert (led.gpu_idle, led.gpu_idle_while_waiting, led.waiting_seconds) == (3.0, 1.0, 1.0)
    led.on_pod("DELETED", pod("a", "m1", ready=True))
    led.sample(1.0)
    assert led.gpu_idle == 3.0 and led.created == 3


def test_idle_while_waiting_splits_out_pods_already_going_away():
    led = Ledger()
    led.on_pod("ADDED", pod("a", "m1", ready=True))
    led.on_pod("ADDED", pod("c", "m3", node=None, gpu_msg="Insufficient nvidia.com/gpu"))
    led.sample(1.0)  # m1 idle, nobody told it to go yet
    going = pod("a", "m1", ready=True)
    going["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    led.on_pod("MODIFIED", going)
    led.sample(2.0)  # parked: stopping
    assert (led.gpu_idle_while_waiting, led.gpu_idle_while_waiting_stopping) == (3.0, 2.0)
    led.on_pod("ADDED", pod("d", "m4", ready=True))  # a second idle GPU, with one pod waiting for one GPU
    led.sample(1.0)
    assert (led.gpu_idle_while_waiting, led.gpu_idle_while_waiting_needed) == (5.0, 4.0)


def test_the_pool_model_parks_only_idle_models_and_a_later_idle_signal_costs_waiting():
    trace = Trace(
        TraceSpec(models=3),
        ["a", "b", "c"],
        [{"t": 0.0, "model": "a"}, {"t": 1.0, "model": "b"}, {"t": 30.0, "model": "c"}],
    )
    quick = simulate(trace, longest_idle, detect=1.0, release=1.0, seconds=100)
    assert (quick["cold_starts"], quick["parks"]) == (3, 0)  # 4 GPUs: room for all three, nobody parked
    committed = Trace.from_json(TRACE.read_text())
    fast = simulate(committed, longest_idle, detect=1.0, release=1.0, seconds=300)
    slow = simulate(committed, longest_idle, detect=10.0, release=1.0, seconds=300)
    assert 0 < fast["parks_with_a_choice"] <= fast["parks"]
    assert fast["gpu_seconds_idle_while_waiting"] < slow["gpu_seconds_idle_while_waiting"]


def test_the_ledger_times_each_step_of_a_pod_for_the_cold_start_breakdown():
    led = Ledger()
    led.on_pod("ADDED", pod("a", "m1", node=None), at=10.0)
    led.on_pod("MODIFIED", pod("a", "m1", node=None, gpu_msg="0/2 nodes: 2 Insufficient nvidia.com/gpu."), at=10.1)
    led.on_pod("MODIFIED", pod("a", "m1"), at=14.0)  # bound
    led.on_pod("MODIFIED", pod("a", "m1", ready=True), at=35.0)
    led.on_pod("MODIFIED", pod("a", "m1", ready=True), at=36.0)  # a later event moves nothing
    going = pod("a", "m1", ready=True)
    going["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    led.on_pod("MODIFIED", going, at=50.0)
    led.on_pod("DELETED", going, at=51.5)
    led.on_pod("ADDED", pod("b", "m2"), at=20.0)  # bound at once: no wait for a GPU
    led.on_pod("ADDED", pod("c", "m3", node=None), at=30.0)  # never bound
    ph = led.phases()
    assert ph["created_to_bound"]["n"] == 2 and ph["created_to_bound"]["max"] == 4.0
    assert ph["created_to_bound_waited_for_gpu"]["n"] == 1 and ph["created_to_bound_waited_for_gpu"]["p50"] == 4.0
    assert ph["bound_to_ready"]["p50"] == 21.0 and ph["terminating_to_deleted"]["p50"] == 1.5
    results = [
        {"model": "m1", "sent": 9.0, "ended": 36.0, "cold": True, "status": 200, "ttft": 26.5, "error": ""},
        {"model": "m1", "sent": 40.0, "ended": 46.5, "cold": False, "status": 200, "ttft": 0.1, "error": ""},
        {"model": "m1", "sent": 52.0, "ended": 53.0, "cold": False, "status": 200, "ttft": 0.1, "error": ""},
        {"model": "m2", "sent": 8.0, "ended": 8.5, "cold": False, "status": 200, "ttft": 0.1, "error": ""},
    ]
    out = summarize("park", results, led, 60.0, 60.0)
    tl = out["timeline"]
    assert [r["t"] for r in tl["requests"]] == [0.0, 1.0, 32.0, 44.0]  # from the first request sent
    first = tl["pods"][0]
    assert (first["model"], first["waited_for_gpu"], first["created"], first["bound"], first["deleted"]) == (
        "m1",
        True,
        2.0,
        6.0,
        43.5,
    )
    assert tl["pods"][2]["bound"] is None
    # m1's pod was told to go at 50.0, 3.5 s after the last request it served ended (46.5; the one at 53.0 came after)
    assert out["pod_phases"] == {**ph, "last_request_to_told_to_go": summary([3.5])}


def test_a_policy_at_n_runs_the_operator_with_that_prestop_and_is_reported_beside_the_idle_timer():
    assert operator_args("park") == [*OPERATOR_FLAGS, "--gpu-pool-policy", "park"]  # as the chart installs it
    assert operator_args("park@2") == [*OPERATOR_FLAGS, "--gpu-pool-policy", "park", "--prestop-seconds", "2"]
    pol = {"failed": 0, "ttft_cold": {"p50": 20.0, "p99": 21.0}, "cold_starts": 10, "gpu_seconds_idle_while_waiting": 1}
    res = {"load_seconds": 20.0, "policies": {"idle-timer": {"cold_starts": 10}, "park": {}, "park@0": pol}}
    rows = {r[0]: r for r in gpu_pool_rows(res, "park@0")}
    assert rows["TTFT of requests to a model at zero p50/p99"][-1] == "yes"  # 21 s <= 20 s + 2 s
    assert rows["cold starts (model pods created)"][-1] == "yes"
    pol["gateway_untouched_tries"] = {"not_sent": 2.0, "unread": 1.0, "refused": 0.0}
    assert gpu_pool_rows(res, "park@0")[-1][1:3] == ("2 | 1 | 0", "-")
    text = table({"results": {"gpu_pool": res}})
    assert "value = park@0," in text and "value = park," in text
