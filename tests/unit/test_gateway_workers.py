"""workers.py's pure parts: identity, shares, the CPU limit, and summing the workers' metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from modelservice.gateway import workers
from modelservice.gateway.cli import config_from, parser, worker_count
from modelservice.gateway.config import Config
from modelservice.gateway.metrics import Metrics


def test_identity_is_the_pod_with_one_worker_and_suffixed_with_several():
    assert workers.worker_identity("gw-abc", 0, 1) == "gw-abc"  # the Leases of a single gateway stay the same
    assert [workers.worker_identity("gw-abc", i, 3) for i in range(3)] == ["gw-abc-w0", "gw-abc-w1", "gw-abc-w2"]


def test_shares_never_add_up_past_the_pod_cap_and_never_reach_zero():
    assert workers.share(256, 2) == 128
    assert workers.share(30, 4) == 7 and 4 * 7 <= 30
    assert workers.share(1, 4) == 1  # each worker can still hold one request


def test_worker_config_divides_the_held_cap_and_multiplies_the_quota_share():
    base = Config(pod_name="gw-0", max_held_per_model=30, quota_share=2, metrics_port=9090)
    assert workers.worker_config(base, 0, 1) is base
    w1 = workers.worker_config(base, 1, 2)
    assert (w1.pod_name, w1.max_held_per_model, w1.quota_share, w1.metrics_port) == ("gw-0-w1", 15, 4, 0)
    assert base.pod_name == "gw-0"  # the parent's stays


@pytest.mark.parametrize(
    "text,cpus", [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("garbage", None)]
)
def test_cpu_limit_from_cgroup_v2(text, cpus):
    assert workers.cpus_from_cgroup(text) == cpus


def test_cpu_limit_from_cgroup_v1():
    assert workers.cpus_from_cgroup(None, "-1\n", "100000\n") is None
    assert workers.cpus_from_cgroup(None, "50000\n", "100000\n") == 0.5


@pytest.mark.parametrize("cpus,n", [(None, 1), (0.5, 1), (1.0, 1), (1.5, 2), (2.0, 2), (4.0, 4)])
def test_auto_workers_round_the_limit_up(cpus, n):
    assert workers.auto_workers(cpus) == n


def test_workers_flag():
    assert parser().parse_args([]).workers == 1
    assert worker_count(parser().parse_args(["--workers", "3"]).workers) == 3
    assert parser().parse_args(["--workers", "auto"]).workers == "auto"
    assert worker_count("auto") >= 1
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            parser().parse_args(["--workers", bad])
    config_from(parser().parse_args(["--workers", "2"]))  # not a Config field: the parent decides per worker


def _page(requests: int, in_flight: int, endpoints: int, latencies: list[float]) -> str:
    m = Metrics(CollectorRegistry())
    m.requests.labels("ns/a", "200").inc(requests)
    m.in_flight.labels("ns/a").set(in_flight)
    m.ready_endpoints.labels("ns/a").set(endpoints)
    for x in latencies:
        m.upstream_latency.labels("ns/a").observe(x)
    return generate_latest(m.registry).decode()


def _samples(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_merged_metrics_sum_worker_state_and_keep_one_copy_of_cluster_state():
    a, b = _page(5, 2, 3, [0.003, 0.2]), _page(7, 1, 3, [0.003])
    merged = _samples(workers.render(workers.merge_expositions([a, b])).decode())
    one = (("model", "ns/a"),)
    assert merged[("modelservice_gateway_requests_total", (("code", "200"), ("model", "ns/a")))] == 12
    assert merged[("modelservice_gateway_in_flight", one)] == 3
    assert merged[("modelservice_gateway_ready_endpoints", one)] == 3  # both workers see the same 3, not 6
    assert merged[("modelservice_gateway_upstream_latency_seconds_count", one)] == 3
    assert merged[("modelservice_gateway_upstream_latency_seconds_bucket", (("le", "0.005"), ("model", "ns/a")))] == 2
    assert merged[("modelservice_gateway_upstream_latency_seconds_sum", one)] == pytest.approx(0.206)
    created = ("modelservice_gateway_requests_created", (("code", "200"), ("model", "ns/a")))
    assert merged[created] == min(_samples(a)[created], _samples(b)[created])


def test_merged_metrics_keep_series_only_one_worker_has():
    a, b = _page(1, 0, 1, []), Metrics(CollectorRegistry())
    b.requests.labels("ns/b", "429").inc()
    merged = _samples(workers.render(workers.merge_expositions([a, generate_latest(b.registry).decode()])).decode())
    assert merged[("modelservice_gateway_requests_total", (("code", "429"), ("model", "ns/b")))] == 1
    assert merged[("modelservice_gateway_requests_total", (("code", "200"), ("model", "ns/a")))] == 1


def test_gauges_that_every_worker_sees_alike_are_all_known_metrics():
    names = {f.name for f in Metrics(CollectorRegistry()).registry.collect()}
    from modelservice.gateway.metering import Metering

    reg = CollectorRegistry()
    Metering(reg)
    names |= {f.name for f in reg.collect()}
    assert workers.SAME_IN_EVERY_WORKER <= names  # a renamed gauge would silently be summed


async def test_healthz_is_ready_only_once_every_worker_has_synced():
    import multiprocessing

    import aiohttp

    from tests.unit.gateway_harness import gateway

    flags = multiprocessing.get_context("fork").Array("b", 2, lock=False)  # as the parent shares them
    slot = workers.Slot(0, 2, "/nonexistent", flags)

    async with gateway() as (gw, url), aiohttp.ClientSession() as s:
        gw.synced, gw.peers_synced = True, slot.all_synced
        slot.mark_synced()  # this worker; its sibling has not listed yet
        async with s.get(url + "/healthz") as r:
            assert r.status == 503 and "another worker" in (await r.json())["status"]
        flags[1] = 1
        async with s.get(url + "/healthz") as r:
            assert r.status == 200


def test_bench_pairs_rounds_side_by_side():
    from bench.gateway_bench import _median, paired_ratios

    # The machine's load doubles from round to round; within each round the 2-worker run costs 1.2x its neighbour.
    one, two = [1.0, 2.0, 4.0], [1.2, 2.4, 4.8]
    assert [round(r, 6) for r in paired_ratios(two, one)] == [1.2, 1.2, 1.2]
    assert _median(paired_ratios(two, one)) == pytest.approx(1.2)
    assert paired_ratios([1.0, 2.0], [0.0, 1.0]) == [2.0]  # a round with no requests has no ratio
