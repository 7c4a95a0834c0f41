"""What a pod's spec asks of its stub model server: model name, rate, startup delay, ports and probes."""

from __future__ import annotations

from dataclasses import dataclass

from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster.native import flag_value

TPS_ANNOTATION = "stub.modelservice.dev/tokens-per-second"
# Seconds the stub takes to turn Ready (simulated weight loading), set through spec.podTemplate.annotations.
STUB_STARTUP_DELAY_ANNOTATION = "stub.modelservice.dev/startup-delay"
# Requests the stub runs at once (vLLM's max_num_seqs); more wait and show in vllm:num_requests_waiting.
STUB_MAX_CONCURRENCY_ANNOTATION = "stub.modelservice.dev/max-concurrency"
# An image no node runs for real: tests and benchmarks that are not about engines name it to get the stub model
# server (cheap, 1000 per process). Engine images run the real engine where it is installed (native.py).
STUB_IMAGE = "stub.modelservice.dev/model-server:v1"
DEFAULT_PORT = 8000


@dataclass
class StubConfig:
    model: str
    tokens_per_second: float
    startup_delay: float
    ports: list[int]
    probes: list[tuple[int, str]]  # (port, path) that must answer 2xx/3xx before Ready
    max_concurrency: int = 256


def stub_config(pod: dict, default_tps: float) -> StubConfig:
    meta, c0 = pod["metadata"], pod["spec"]["containers"][0]
    ann, env = meta.get("annotations") or {}, {e["name"]: e.get("value", "") for e in c0.get("env") or []}
    args = [str(a) for a in (c0.get("command") or []) + (c0.get("args") or [])]
    model = (
        flag_value(args, "--served-model-name")
        or flag_value(args, "--model", "--model-path", "--model-id")
        or env.get("SERVED_MODEL_NAME")
        or env.get("MODEL_NAME")
        or env.get("MODEL_ID")
        or (meta.get("labels") or {}).get(MODELSERVICE_LABEL)
        or meta["name"]
    )

    def number(raw, default: float) -> float:
        try:
            return max(0.0, float(raw))
        except (TypeError, ValueError):
            return default

    delay = number(ann.get(STUB_STARTUP_DELAY_ANNOTATION, env.get("STUB_STARTUP_DELAY")), 0.0)
    tps = number(ann.get(TPS_ANNOTATION), default_tps)
    named = {p.get("name"): p["containerPort"] for p in c0.get("ports") or [] if p.get("name")}
    port = (c0.get("ports") or [{}])[0].get("containerPort", DEFAULT_PORT)
    probes: list[tuple[int, str]] = []
    for kind in ("startupProbe", "readinessProbe"):
        probe = c0.get(kind)
        if not probe:
            continue
        http = probe.get("httpGet")
        if http:
            p = http.get("port", port)
            probes.append(
                (named.get(p, port) if isinstance(p, str) and not p.isdigit() else int(p), http.get("path", "/"))
            )
        elif not probe.get("tcpSocket"):  # exec/grpc: stand in with the stub's own health, so the delay still counts
            probes.append((port, "/health"))
    ports = sorted({port, *(p for p, _ in probes)})
    return StubConfig(
        model, tps, delay, ports, probes, max(1, int(number(ann.get(STUB_MAX_CONCURRENCY_ANNOTATION), 256)))
    )
