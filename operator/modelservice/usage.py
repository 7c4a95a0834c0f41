"""`modelservice-operator usage --prometheus URL [--since 24h] [--output table|json|csv]`: the chargeback report.

Per tenant and model: requests, prompt and completion tokens (the gateway's counters); per model: GPU-seconds
serving, idle and loading (the operator's); and each tenant's share of each model's serving GPU-seconds, by tokens:

    share(tenant, model) = serving_gpu_seconds(model) x tokens(tenant, model) / tokens(all tenants, model)

where tokens = prompt + completion. (By tokens, not by in-flight time: a long stream that waits on a slow client holds
a slot, not the GPU's compute; tokens are what the GPU produced for whom.) A model served with no metered tokens in
the window leaves its serving GPU-seconds unattributed (the `_unattributed` row).

Counts are exact over the window: the report reads each counter's raw samples in the window (`metric[W]`) and its
value at the window's start (`metric @ start`, absent: born inside the window, so 0), and adds the increases,
counting a drop (a restarted gateway or operator) as a reset, like Prometheus's increase() but without its
extrapolation to the window's edges. What a gateway counted after its last scrape before a restart is lost.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from typing import Any, Optional

TOKENS = ("modelservice_gateway_prompt_tokens_total", "modelservice_gateway_completion_tokens_total")
REQUESTS = "modelservice_gateway_tenant_requests_total"
GPU_SECONDS = "modelservice_gpu_seconds_total"
UNATTRIBUTED = "_unattributed"


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """A Prometheus duration (1h30m, 24h, 7d) in seconds."""
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a Prometheus duration like 30m, 24h or 7d")
    return sum(int(n) * _UNITS[u] for n, u in parts)


def queries(metric: str, window: str) -> tuple[str, str]:
    """The two PromQL queries per counter: raw samples in the window, and the value at its start."""
    return f"{metric}[{window}]", metric


class Prometheus:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        qs = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=self.timeout) as r:
            doc = json.loads(r.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {promql!r}: {doc.get('error')}")
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result


def _series_key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def increases(prom: Prometheus, metric: str, window: str, now: float) -> dict[tuple[tuple[str, str], ...], float]:
    """Per series (all its labels): the counter's increase over [now - window, now], resets counted."""
    raw_q, base_q = queries(metric, window)
    start = now - parse_duration(window)
    base = {_series_key(s["metric"]): float(s["value"][1]) for s in prom.query(base_q, start)}
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for s in prom.query(raw_q, now):
        key = _series_key(s["metric"])
        prev = base.get(key, 0.0)
        total = 0.0
        for _, v in s.get("values") or []:
            v = float(v)
            total += v - prev if v >= prev else v  # a drop: the process restarted and counted v since
            prev = v
        out[key] = total
    return out


def _by(series: dict[tuple[tuple[str, str], ...], float], *names: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for key, v in series.items():
        labels = dict(key)
        out[tuple(labels.get(n, "") for n in names)] += v
    return out


def report(prom: Prometheus, since: str = "24h", now: Optional[float] = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    requests = _by(increases(prom, REQUESTS, since, now), "tenant", "model")
    prompt = _by(increases(prom, TOKENS[0], since, now), "tenant", "model")
    completion = _by(increases(prom, TOKENS[1], since, now), "tenant", "model")
    gpu = _by(increases(prom, GPU_SECONDS, since, now), "namespace", "modelservice", "state")
    models: dict[str, dict[str, float]] = defaultdict(
        lambda: {"serving": 0.0, "idle": 0.0, "loading": 0.0, "tokens": 0.0}
    )
    for (ns, name, state), v in gpu.items():
        models[f"{ns}/{name}"][state] += v
    pairs = set(requests) | set(prompt) | set(completion)
    for tenant, model in pairs:
        models[model]["tokens"] += prompt.get((tenant, model), 0.0) + completion.get((tenant, model), 0.0)
    rows = []
    for tenant, model in sorted(pairs):
        tokens = prompt.get((tenant, model), 0.0) + completion.get((tenant, model), 0.0)
        m = models[model]
        rows.append(
            {
                "tenant": tenant,
                "model": model,
                "requests": round(requests.get((tenant, model), 0.0)),
                "prompt_tokens": round(prompt.get((tenant, model), 0.0)),
                "completion_tokens": round(completion.get((tenant, model), 0.0)),
                "serving_gpu_seconds_share": m["serving"] * tokens / m["tokens"] if m["tokens"] else 0.0,
            }
        )
    for model, m in sorted(models.items()):
        if m["serving"] and not m["tokens"]:
            rows.append(
                {
                    "tenant": UNATTRIBUTED,
                    "model": model,
                    "requests": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "serving_gpu_seconds_share": m["serving"],
                }
            )
    return {
        "since": since,
        "at": now,
        "models": {k: {s: v[s] for s in ("serving", "idle", "loading")} for k, v in sorted(models.items())},
        "tenants": rows,
    }


def render(doc: dict[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(doc, indent=1)
    if output == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(
            [
                "tenant",
                "model",
                "requests",
                "prompt_tokens",
                "completion_tokens",
                "serving_gpu_seconds_share",
                "model_serving_gpu_seconds",
                "model_idle_gpu_seconds",
                "model_loading_gpu_seconds",
            ]
        )
        for r in doc["tenants"]:
            m = doc["models"].get(r["model"], {})
            w.writerow(
                [
                    r["tenant"],
                    r["model"],
                    r["requests"],
                    r["prompt_tokens"],
                    r["completion_tokens"],
                    f"{r['serving_gpu_seconds_share']:.3f}",
                    *(f"{m.get(s, 0.0):.3f}" for s in ("serving", "idle", "loading")),
                ]
            )
        return buf.getvalue()
    lines = [
        f"usage over the last {doc['since']}",
        "",
        f"{'MODEL':40} {'SERVING GPU-s':>14} {'IDLE GPU-s':>12} {'LOADING GPU-s':>14}",
    ]
    for model, m in doc["models"].items():
        lines.append(f"{model:40} {m['serving']:14.1f} {m['idle']:12.1f} {m['loading']:14.1f}")
    lines += [
        "",
        f"{'TENANT':20} {'MODEL':40} {'REQUESTS':>9} {'TOKENS IN':>10} {'TOKENS OUT':>10} {'SERVING GPU-s SHARE':>20}",
    ]
    for r in doc["tenants"]:
        lines.append(
            f"{r['tenant']:20} {r['model']:40} {r['requests']:9d} {r['prompt_tokens']:10d} "
            f"{r['completion_tokens']:10d} {r['serving_gpu_seconds_share']:20.1f}"
        )
    return "\n".join(lines)


def main(url: str, since: str, output: str) -> int:
    import sys

    try:
        parse_duration(since)  # a bad window fails before any query
        doc = report(Prometheus(url), since)
    except ValueError as e:
        print(f"usage: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"usage: could not query Prometheus at {url}: {e}", file=sys.stderr)
        return 1
    print(render(doc, output))
    return 0
