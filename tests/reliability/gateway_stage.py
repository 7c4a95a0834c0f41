"""The stage of the gateway-abuse tests (test_gateway_abuse.py) and the chaos soak's abuse rounds: the operator and a
gateway with tight limits on the reliability suite's control plane, a few models, a misbehaving upstream, and the
clients that abuse them (slowloris, an RSS sampler, a warm request). The `stage` fixture (conftest.py) opens it once
per module."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import aiohttp

from tests.cluster.kube import Kube, create_namespace, delete_namespace
from tests.cluster.podspec import STUB_STARTUP_DELAY_ANNOTATION
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import OperatorProcess, kubectl
from tests.reliability.harness import PrivateControlPlane

# 5 s, not less: with 2 s, a burst of 1,200 new connections on a loaded 2-core machine had some *legitimate* request
# heads cut before the gateway got to parse them (ServerDisconnected on the client). Production default: 15 s.
HEADER_TIMEOUT, IDLE_TIMEOUT, UPSTREAM_TIMEOUT = 5, 2, 3
MAX_BODY = 64 * 1024
MAX_HELD = 1000
HELD_REQUESTS = 1200
GATE_CLOSED = "3600"  # the startup delay of "gated" while a test holds requests for it: longer than any test here
GATE_OPEN = "0"
WARM_DEADLINE = 30  # a warm request not answered by then fails the test (it is never a pass condition)
RSS_BOUND = 96 * 2**20  # bytes of RSS growth we accept for the whole abuse


# -- a misbehaving upstream ------------------------------------------------------------------------------------------
class _Rogue(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 65536:  # bounded
                chunk = sock.recv(4096)
                if not chunk:
                    return
                head += chunk
        except OSError:
            return
        path = head.split(b" ", 2)[1].decode(errors="replace")
        self.server.paths.append(path)  # type: ignore[attr-defined]
        # The misbehaviour is chosen by the query: the gateway forwards only client paths (gateway/paths.py).
        if path.endswith("mode=close"):
            sock.close()
        elif path.endswith("mode=garbage"):
            sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        elif path.endswith("mode=silent"):
            self.server.release.wait(30)  # type: ignore[attr-defined]
        elif path.endswith("mode=midstream"):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(3):
                data = f'data: {{"token": {i}}}\n\n'.encode()
                sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            sock.shutdown(socket.SHUT_RDWR)  # dies: no terminating chunk
        else:
            body = b'{"ok": true}'
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n"
                + body
            )


class RogueUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Rogue)
        self.paths: list[str] = []
        self.release = threading.Event()

    @property
    def port(self) -> int:
        return self.server_address[1]


# -- the stage: operator, gateway, models ----------------------------------------------------------------------------
@dataclass
class Stage:
    kube: Kube
    ns: str
    gw: GatewayProcess
    op: OperatorProcess
    rogue: RogueUpstream
    rss_baseline: int = 0
    figures: dict = field(default_factory=dict)

    def model_url(self, name: str, rest: str = "v1/chat/completions") -> str:
        return f"{self.gw.url}/models/{self.ns}/{name}/{rest}"


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **kw}


@contextlib.contextmanager
def open_stage(rcluster: PrivateControlPlane, kube: Kube, d: Path) -> Iterator[Stage]:
    """The operator and a gateway (with the limits above) for one namespace of models: warm, parked (spec.replicas
    0), rogue (our RogueUpstream) and gated, which scales to zero and whose woken replica is Ready when set_gate
    lets it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))  # 1,000 sockets each side
    ns = create_namespace(kube, "gateway-abuse")
    op = OperatorProcess(
        rcluster.kubeconfig,
        d / "operator.log",
        extra_args=["--namespace", ns, "--gateway-enabled", "--resync-seconds", "600"],
    )
    gw = GatewayProcess(
        rcluster.kubeconfig,
        d / "gateway.log",
        "--namespace",
        ns,
        "--header-timeout",
        f"{HEADER_TIMEOUT}s",
        "--idle-timeout",
        f"{IDLE_TIMEOUT}s",
        "--upstream-timeout",
        f"{UPSTREAM_TIMEOUT}s",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-held-per-model",
        str(MAX_HELD),
        "--activation-timeout",
        "60s",
        "--activity-interval",
        "1s",
    )
    rogue = RogueUpstream()
    threading.Thread(target=rogue.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    try:
        op.start()
        gw.start()
        ms.create(kube, ns, ms.body("warm"))
        ms.create(kube, ns, ms.body("parked", replicas=0))
        ms.create(kube, ns, ms.body("rogue", replicas=0))
        # Woken by the held-requests test and the soak's rounds, which decide when its replica may be Ready (set_gate).
        ms.create(
            kube,
            ns,
            ms.body(
                "gated",
                autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "2s"},
                podTemplate={"annotations": {STUB_STARTUP_DELAY_ANNOTATION: GATE_OPEN}},
            ),
        )
        version = kube.preferred_version("discovery.k8s.io")
        kubectl(
            rcluster.kubeconfig,
            "apply",
            "-f",
            "-",
            input=f"""
apiVersion: discovery.k8s.io/{version}
kind: EndpointSlice
metadata: {{name: rogue-manual, namespace: {ns}, labels: {{kubernetes.io/service-name: rogue}}}}
addressType: IPv4
ports: [{{name: http, port: {rogue.port}, protocol: TCP}}]
endpoints: [{{addresses: ["127.0.0.1"], conditions: {{ready: true}}}}]
""",
        )
        ms.wait_condition(kube, ns, "warm", "Ready", "True", timeout=60)
        for name in ("warm", "rogue"):
            wait_for(
                lambda n=name: gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/{n}") == 1,
                timeout=30,
                message=f"gateway endpoint of {name}",
            )
        st = Stage(kube, ns, gw, op, rogue)
        st.rss_baseline = gw.rss_bytes()
        yield st
    finally:
        rogue.release.set()
        rogue.shutdown()
        rogue.server_close()
        gw.stop()
        op.stop()
        delete_namespace(kube, ns)


class RssSampler:
    """Peak RSS of the gateway while a scenario runs (sampled every 50 ms, bounded by the scenario's own end)."""

    def __init__(self, gw: GatewayProcess):
        self.gw, self.peak, self._stop = gw, gw.rss_bytes(), asyncio.Event()

    async def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.gw.rss_bytes())
            try:
                await asyncio.wait_for(self._stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    def stop(self) -> None:
        self._stop.set()


async def warm_request(st: Stage) -> int:
    return await warm_request_to(st.gw.url)


async def warm_request_to(url: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/v1/chat/completions", json=chat("warm")) as r:
            await r.read()
            return r.status


async def warm_request_within_deadline(url: str, what: str) -> int:
    try:
        return await asyncio.wait_for(warm_request_to(url), WARM_DEADLINE)
    except asyncio.TimeoutError:
        raise AssertionError(f"the warm model was not served within {WARM_DEADLINE}s {what}") from None


# -- raw HTTP clients -------------------------------------------------------------------------------------------------
HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b"User-Agent: slowloris\r\nX-Padding: " + b"p" * 120 + b"\r\n\r\n"
)


async def slowloris(port: int, gap: float, connected: list, stop: Optional[asyncio.Event] = None) -> tuple[int, bool]:
    """Send HEAD one byte per `gap` seconds until the server hangs up (or `stop` is set: then the client hangs up).
    Returns (bytes sent, cut by the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    connected.append(1)
    sent = 0
    try:
        for i in range(len(HEAD) - 4):  # never completes the head
            if stop is not None and stop.is_set():
                return sent, False
            writer.write(HEAD[i : i + 1])
            await writer.drain()
            sent += 1
            try:
                data = await asyncio.wait_for(reader.read(1024), gap)  # the pacing *is* waiting for a hang-up
            except asyncio.TimeoutError:
                continue
            return sent, data == b"" or data.startswith(b"HTTP/1.1 4")
        return sent, False
    except (ConnectionResetError, BrokenPipeError):
        return sent, True
    finally:
        writer.close()


async def held_is(gw: GatewayProcess, label: str, want: int) -> bool:
    return await asyncio.to_thread(gw.metric, "modelservice_gateway_held_requests", model=label) == want


def set_gate(st: Stage, delay: str) -> None:
    """Set the startup delay of "gated"'s stub and wait until the Deployment controller has seen the new template,
    so the next replica it starts has that delay. While the model is at zero this starts no pod; while a replica is
    up it rolls out a new one."""
    ms.patch(
        st.kube, st.ns, "gated", {"spec": {"podTemplate": {"annotations": {STUB_STARTUP_DELAY_ANNOTATION: delay}}}}
    )

    def rolled() -> bool:
        dep = st.kube.apps.read_namespaced_deployment("gated", st.ns)
        ann = dep.spec.template.metadata.annotations or {}
        return (
            ann.get(STUB_STARTUP_DELAY_ANNOTATION) == delay
            and dep.status.observed_generation == dep.metadata.generation
        )

    wait_for(rolled, timeout=60, message=f"gated's Deployment with startup delay {delay} seen by its controller")
