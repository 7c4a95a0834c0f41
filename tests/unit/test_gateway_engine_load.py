"""Engine load signals (engine_load.py): the engines' queue figures, polled off the request path, and what happens
when a metrics endpoint hangs, lies or answers garbage (no figures for it, a counter says why, nothing blocks).
The real engines' metric names are pinned in tests/integration/test_engine_load_real.py."""

import asyncio
import math

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from modelservice.api import Engine
from modelservice.gateway.engine_load import MAX_BODY, NAMES, STALE_INTERVALS, BadMetrics, EngineLoad, Load, parse_load
from modelservice.gateway.routes import Endpoint, RouteTable
from modelservice.gateway.testing import endpointslice, feed, modelservice, serving
from tests.unit.loop_clock import FrozenLoopClock, until

pytestmark = pytest.mark.unit
VLLM, LLAMA = NAMES[Engine.vllm], NAMES[Engine.llamacpp]


def vllm_page(running: float, waiting: float, kv: float = 0.25) -> str:
    # As vLLM exposes them: one series per model and engine index (data parallel ranks are summed).
    lines = []
    for name, v in ((VLLM.running, running), (VLLM.waiting, waiting), (VLLM.kv_cache, kv)):
        lines += [
            f"# HELP {name} x",
            f"# TYPE {name} gauge",
            f'{name}{{engine="0",model_name="m"}} {v}',
            f'{name}{{engine="1",model_name="m"}} 0.0',
        ]
    return "\n".join(lines) + "\n"


def test_parse_vllm_sums_engines():
    assert parse_load(vllm_page(3, 7), VLLM, 1.0) == Load(running=3, waiting=7, kv_cache=0.25, at=1.0)


def test_parse_llamacpp_has_no_kv_figure():
    text = (
        "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n"
        "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 4\n"
    )
    assert parse_load(text, LLAMA, 0.0) == Load(running=1, waiting=4, kv_cache=None, at=0.0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<html>nope</html>",
        "\x00\x01garbage {{{",
        vllm_page(1, -1),
        vllm_page(1, math.nan),
        vllm_page(1, 1e12),
        vllm_page(1, 2, kv=7.0),
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n",
    ],
)
def test_parse_refuses_garbage_and_lies(text):
    with pytest.raises(BadMetrics):
        parse_load(text, VLLM, 0.0)


def scripted(behaviour: str, release: asyncio.Event, entered: asyncio.Event) -> web.Application:
    async def metrics(_: web.Request) -> web.StreamResponse:
        if behaviour == "hang":
            entered.set()
            await release.wait()
        if behaviour == "500":
            return web.Response(status=500)
        if behaviour == "garbage":
            return web.Response(body=b"\xff\xfe not metrics")
        if behaviour == "lie":
            return web.Response(text=vllm_page(2, -5))
        if behaviour == "huge":
            return web.Response(text="# " + "x" * (MAX_BODY + 10) + "\n" + vllm_page(0, 0))
        if behaviour == "llamacpp":
            return web.Response(text="llamacpp:requests_processing 2\nllamacpp:requests_deferred 3\n")
        return web.Response(text=vllm_page(4, 5))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


BEHAVIOURS = ("ok", "hang", "500", "garbage", "lie", "huge")


async def test_poll_takes_good_figures_and_refuses_the_rest_without_waiting_on_a_hang():
    release, entered = asyncio.Event(), asyncio.Event()
    hosts = {b: f"127.0.0.{i + 1}" for i, b in enumerate(BEHAVIOURS)}
    async with (
        serving(scripted("ok", release, entered), host=hosts["ok"]) as ok,
        serving(scripted("hang", release, entered), host=hosts["hang"]) as hang,
        serving(scripted("500", release, entered), host=hosts["500"]) as e500,
        serving(scripted("garbage", release, entered), host=hosts["garbage"]) as garbage,
        serving(scripted("lie", release, entered), host=hosts["lie"]) as lie,
        serving(scripted("huge", release, entered), host=hosts["huge"]) as huge,
        serving(scripted("llamacpp", release, entered), host="127.0.0.9") as llama,
    ):
        table = RouteTable()
        slices = [
            endpointslice("m", [(hosts[b], True)], int(url.rsplit(":", 1)[1]), "ns", name=f"m-{b}")
            for b, url in zip(BEHAVIOURS, (ok, hang, e500, garbage, lie, huge))
        ]
        feed(
            table,
            modelservice("m", "ns"),
            modelservice("l", "ns", engine="llamacpp"),
            modelservice("t", "ns", engine="triton"),
            *slices,
            endpointslice("l", [("127.0.0.9", True)], int(llama.rsplit(":", 1)[1]), "ns"),
            endpointslice("t", [("127.0.0.10", True)], 1, "ns"),
        )
        eps = {
            b: Endpoint(hosts[b], int(url.rsplit(":", 1)[1]))
            for b, url in zip(BEHAVIOURS, (ok, hang, e500, garbage, lie, huge))
        }
        reg = CollectorRegistry()
        clock = FrozenLoopClock()  # the hang's timeout fires when the test says, not after a wall-clock wait
        try:
            load = EngineLoad(table, reg, interval=1.0, timeout=0.5, clock=lambda: clock.now)
            async with aiohttp.ClientSession() as session:
                poll = asyncio.create_task(load.poll(session))
                await until(
                    lambda: (
                        entered.is_set()
                        and load.fresh(eps["ok"])
                        and load.waiting(Endpoint("127.0.0.9", int(llama.rsplit(":", 1)[1]))) == 3
                        and reg.get_sample_value(
                            "modelservice_gateway_engine_load_errors_total", {"model": "ns/m", "reason": "garbage"}
                        )
                        == 3
                    )
                )
                assert not poll.done()  # only the hanging endpoint is still out
                await clock.advance(0.6)
                await asyncio.wait_for(poll, 30)
                release.set()

            def errors(reason):
                return reg.get_sample_value(
                    "modelservice_gateway_engine_load_errors_total", {"model": "ns/m", "reason": reason}
                )

            assert (errors("timeout"), errors("http"), errors("garbage")) == (1, 1, 3)  # garbage, lie, huge
            assert load.waiting(eps["ok"]) == 5 and load.get(eps["ok"]).kv_cache == 0.25
            assert all(load.waiting(eps[b]) is None and not load.fresh(eps[b]) for b in BEHAVIOURS[1:])
            assert load.model_waiting(("ns", "m")) == 5
            assert load.model_waiting(("ns", "t")) is None  # triton: no names known, in-flight only
            assert reg.get_sample_value("modelservice_gateway_engine_load_unknown_endpoints", {"model": "ns/m"}) == 5
            assert reg.get_sample_value("modelservice_gateway_engine_load_unknown_endpoints", {"model": "ns/l"}) == 0

            # Figures age out: after STALE_INTERVALS intervals without a successful poll they are not used.
            await clock.advance(STALE_INTERVALS * 1.0 + 0.1)
            assert load.waiting(eps["ok"]) is None and load.model_waiting(("ns", "m")) is None

            # An endpoint that leaves the table leaves the figures, and a model that goes, its gauge series.
            feed(table, modelservice("l", "ns", engine="llamacpp"), event="DELETED")
            feed(table, *slices[1:], event="DELETED")
            async with aiohttp.ClientSession() as session:
                await asyncio.wait_for(load.poll(session), 30)
            assert set(load._loads) == {eps["ok"]}
            assert reg.get_sample_value("modelservice_gateway_engine_load_unknown_endpoints", {"model": "ns/l"}) is None
            assert reg.get_sample_value("modelservice_gateway_engine_load_unknown_endpoints", {"model": "ns/m"}) == 0
        finally:
            release.set()
            clock.release()


def test_the_api_allows_targetqueue_for_the_engines_whose_queue_is_read():
    from modelservice.api import QUEUE_ENGINES

    assert set(QUEUE_ENGINES) == set(NAMES)


def test_least_in_flight_ties_go_to_the_shorter_engine_queue():
    import random

    from modelservice.gateway.balancer import Balancer

    eps = [Endpoint(f"127.0.3.{i}", 8000) for i in range(1, 4)]
    b = Balancer(random.Random(3))
    queue = {eps[0]: 9, eps[1]: 0}  # eps[2]: no figures (counts as empty)
    b.waiting = queue.get
    assert {b.pick(eps) for _ in range(50)} == {eps[1], eps[2]}
    b.acquire(eps[1])
    b.acquire(eps[2])
    assert b.pick(eps) == eps[0]  # in-flight first: the queue only breaks ties


async def test_many_endpoints_stretch_the_interval_to_bound_the_fetch_rate():
    from modelservice.gateway.engine_load import MAX_RATE
    from tests.cluster.controlplane import free_port

    table = RouteTable()
    closed = free_port()  # nothing listens: each fetch fails at once (refused), counted as http
    feed(
        table,
        modelservice("m", "ns"),
        endpointslice("m", [(f"127.0.4.{i}", True) for i in range(1, 121)], closed, "ns"),
    )
    reg = CollectorRegistry()
    load = EngineLoad(table, reg, interval=1.0, timeout=0.5)
    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(load.poll(session), 60)
    assert load.period == pytest.approx(120 / MAX_RATE)  # 2.4 s between polls: 50 fetches a second
    assert (
        reg.get_sample_value("modelservice_gateway_engine_load_errors_total", {"model": "ns/m", "reason": "http"})
        == 120
    )
