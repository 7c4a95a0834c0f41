"""Engines' metrics re-exported by the gateway (engine_metrics.py): labelled per model and endpoint, families merged
into one valid exposition, an endpoint that does not answer left out and counted."""

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from modelservice.gateway.engine_metrics import EngineMetrics, merge, relabel
from modelservice.gateway.routes import RouteTable
from modelservice.gateway.testing import endpointslice, feed, modelservice, serving
from tests.cluster.controlplane import free_port
from tests.cluster.stub_server import make_app as stub_app

pytestmark = pytest.mark.unit

EXTRA = 'modelservice_namespace="ns",modelservice="m",modelservice_endpoint="1.2.3.4:8000"'


def test_relabel():
    assert relabel('a{b="c"} 1', EXTRA) == f'a{{{EXTRA},b="c"}} 1'
    assert relabel("a 1 1700000000", EXTRA) == f"a{{{EXTRA}}} 1 1700000000"
    assert relabel('a{b="c",} 1', EXTRA) == f'a{{{EXTRA},b="c"}} 1'
    assert relabel("", EXTRA) is None


def test_merge_groups_each_family_once():
    one = '# HELP x_total X.\n# TYPE x_total counter\nx_total{k="1"} 3\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_count 1\nh_sum 0.5\n'
    two = '# HELP x_total X.\n# TYPE x_total counter\nx_total{k="1"} 4\n'
    text = merge([('e="a"', one), ('e="b"', two)])
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert [(s.labels["e"], s.value) for s in fams["x"].samples] == [("a", 3.0), ("b", 4.0)]
    assert {s.name for s in fams["h"].samples} == {"h_bucket", "h_count", "h_sum"}
    assert text.count("# TYPE x_total counter") == 1


async def test_gateway_serves_every_ready_engines_metrics():
    async with (
        serving(stub_app("m", 100.0), host="127.0.0.1") as a,
        serving(stub_app("m", 100.0), host="127.0.0.2") as b,
    ):
        port_a, port_b = int(a.rsplit(":", 1)[1]), int(b.rsplit(":", 1)[1])
        table = RouteTable()
        dead = free_port()
        feed(
            table,
            modelservice("m", "ns"),
            modelservice("other", "ns"),
            modelservice("gone", "ns"),
            endpointslice("m", [("127.0.0.1", True)], port_a, "ns", name="m-a"),
            endpointslice("m", [("127.0.0.2", True)], port_b, "ns", name="m-b"),
            endpointslice("gone", [("127.0.0.3", True)], dead, "ns"),
        )
        reg = CollectorRegistry()
        app = web.Application()
        app.router.add_get("/engine-metrics", EngineMetrics(table, reg).handle)
        async with serving(app) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/engine-metrics") as r:
                assert r.status == 200
                text = await r.text()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        running = fams["vllm:num_requests_running"].samples
        assert {(x.labels["modelservice"], x.labels["modelservice_endpoint"]) for x in running} == {
            ("m", f"127.0.0.1:{port_a}"),
            ("m", f"127.0.0.2:{port_b}"),
        }
        assert all(x.labels["modelservice_namespace"] == "ns" for x in running)
        assert reg.get_sample_value("modelservice_gateway_engine_scrape_errors_total", {"model": "ns/gone"}) == 1
