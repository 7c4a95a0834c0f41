"""The chargeback pipeline with a real Prometheus: it scrapes the gateway and the operator on the local cluster, two
tenants send traffic, and `modelservice-operator usage` reports what the test client counted itself (tokens and
requests exactly; GPU-seconds against the pod's own lifetime, within the operator's sampling bound). Every PromQL
query of the report and of the chart's Grafana dashboard runs against that Prometheus here."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from modelservice import gpuseconds, usage
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.gateway_process import TEST_FLAGS, GatewayProcess
from tests.integration.prometheus import SCRAPE_INTERVAL, PrometheusProcess, binary

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "charts/modelservice-operator/files/dashboards/modelservice-usage.json"
)
TENANT = "serving.modelservice.dev/tenant"


def _tenant(name: str, key: str, ns: str) -> dict:
    return {
        "metadata": {
            "name": name,
            "labels": {TENANT: name},
            "annotations": {"serving.modelservice.dev/namespaces": ns},
        },
        "data": {"keys": base64.b64encode(key.encode()).decode()},
    }


async def _traffic(url: str) -> dict[str, dict[str, int]]:
    """team-a: 3 answers, team-b: 2 streams that ask for usage; what the client saw, per tenant."""
    seen = {t: {"requests": 0, "prompt": 0, "completion": 0} for t in ("team-a", "team-b")}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        for tenant, key, stream, words in (
            ("team-a", "ka", False, 3),
            ("team-a", "ka", False, 5),
            ("team-a", "ka", False, 8),
            ("team-b", "kb", True, 2),
            ("team-b", "kb", True, 13),
        ):
            body = {
                "model": "gpu",
                "max_tokens": 4 + words,
                "stream": stream,
                "messages": [{"role": "user", "content": " ".join(["word"] * words)}],
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            async with s.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                raw = await r.read()
                assert r.status == 200, raw[:300]
            if stream:
                events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
                got = json.loads(events[-1])["usage"]
            else:
                got = json.loads(raw)["usage"]
            seen[tenant]["requests"] += 1
            seen[tenant]["prompt"] += got["prompt_tokens"]
            seen[tenant]["completion"] += got["completion_tokens"]
    return seen


def test_usage_report_from_a_real_prometheus(kube, namespace, operator, fake_nodes, tmp_path):
    if binary() is None:
        pytest.fail(
            "Debian's prometheus is not installed: `make deps` installs it (`make test` runs it first); "
            "a missing tool fails this test rather than skip it"
        )
    ns = namespace
    kube.core.create_namespaced_secret(ns, _tenant("team-a", "ka", ns))
    kube.core.create_namespaced_secret(ns, _tenant("team-b", "kb", ns))
    ms.create(kube, ns, ms.body("gpu", resources={"limits": {"nvidia.com/gpu": "1"}}))
    gw = GatewayProcess(
        kube.kubeconfig, tmp_path / "gateway.log", *TEST_FLAGS, "--namespace", ns, "--tenants", "--tenant-namespace", ns
    ).start()
    prom = PrometheusProcess(
        tmp_path / "prometheus",
        {"gateway": f"127.0.0.1:{gw.metrics_port}", "operator": f"127.0.0.1:{operator.metrics_port}"},
    ).start()
    try:
        wait_for(
            lambda: gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/gpu") == 1,
            timeout=90,
            message="the model's endpoint in the gateway",
        )
        seen = asyncio.run(_traffic(gw.url))
        prom.wait_scraped()
        # The operator has sampled the running pod at least twice (its first GPU-seconds are credited then).
        wait_for(
            lambda: prom.query(f'modelservice_gpu_seconds_total{{namespace="{ns}",modelservice="gpu"}}'),
            timeout=60,
            message="GPU-seconds of the model in Prometheus",
        )
        now = prom.wait_scraped() + 0.001
        scraped = float(prom.query('timestamp(up{job="operator"})', now)[0]["value"][1])
        doc = usage.report(usage.Prometheus(prom.url), since="1h", now=now)
        rows = {(r["tenant"], r["model"]): r for r in doc["tenants"]}
        for tenant, counted in seen.items():
            row = rows[(tenant, f"{ns}/gpu")]
            assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (
                counted["requests"],
                counted["prompt"],
                counted["completion"],
            ), (tenant, row, counted)
        model = doc["models"][f"{ns}/gpu"]
        held = model["serving"] + model["idle"] + model["loading"]
        pod = next(p for p in kube.core.list_namespaced_pod(ns).items if p.metadata.name.startswith("gpu-"))
        bound = next(c.last_transition_time for c in pod.status.conditions if c.type == "PodScheduled")
        lived = scraped - bound.timestamp()
        # Sampled every INTERVAL: the time before the first sample that saw the pod bound and after the last one
        # before the scrape is not credited; condition times have 1 s resolution.
        assert lived - 2 * gpuseconds.INTERVAL - 1 - SCRAPE_INTERVAL <= held <= lived + 1, (held, lived, model)
        shares = sum(r["serving_gpu_seconds_share"] for r in doc["tenants"] if r["model"] == f"{ns}/gpu")
        assert shares == pytest.approx(model["serving"])

        # The CLI, end to end, in CSV.
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "modelservice.cli",
                "usage",
                "--prometheus",
                prom.url,
                "--since",
                "1h",
                "--output",
                "csv",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        csv_rows = {(r["tenant"], r["model"]): r for r in csv.DictReader(io.StringIO(out.stdout))}
        assert int(csv_rows[("team-a", f"{ns}/gpu")]["completion_tokens"]) == seen["team-a"]["completion"]

        # Every dashboard query is valid PromQL here, and the per-tenant ones see both tenants (increase() needs two
        # samples of a series in its range: one more scrape after the report's).
        prom.wait_scraped(now + SCRAPE_INTERVAL)
        later = time.time()
        panels = json.loads(DASHBOARD.read_text())["panels"]
        for panel in panels:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__range", "1h").replace("$__rate_interval", "1m")
                result = prom.query(expr, later)  # asserts status success
                if "tenant" in target["legendFormat"] and "rate_limited" not in expr:
                    assert {r["metric"].get("tenant") for r in result} >= {"team-a", "team-b"}, (panel["title"], result)
    finally:
        prom.stop()
        gw.stop()
