"""Serverless on a fixed GPU pool: the committed trace (bench/traces/gpu-pool-seed1.json) replayed against the idle-timer
policy and the parking policy, each on a fresh local cluster, in the same run (issue #13's benchmark).

The pool: 2 fake nodes × 2 `nvidia.com/gpu` = 4 GPUs. 12 ModelServices of one GPU each, every one `minReplicas: 0`,
`scaleToZeroAfter: 5m`; 11 are the stub model server with a simulated load time (LOAD_SECONDS, the stub's startup
delay), one (the trace's `real_engine_rank`) is llama.cpp running for real. The gateway holds a request for a model at
zero for ACTIVATION_TIMEOUT, then answers 503. Requests are sent open-loop at the trace's times (streamed chat
completions, a few tokens each).

Per policy:
- requests that failed (non-200, or no first token) and why, in the gateway's words;
- time to first token, p50/p99, for requests sent while their model had no Ready replica ("cold"), and for all;
- cold starts: model pods created;
- GPU-seconds held idle (a Ready pod of a model with no request in flight from this client, which is the only one),
  in total and **while another model waited for a GPU** (some pod was Pending, unschedulable for lack of GPUs).
  Sampled every SAMPLE_SECONDS from a pod watch and the client's own in-flight counts: the accuracy is one sample.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import aiohttp

from bench.cluster import control_plane
from bench.gpu_pool_trace import Trace
from bench.stats import summary
from bench.watch import Watch
from modelservice import GROUP, PLURAL, VERSION
from modelservice.gateway.metrics import UNTOUCHED_REASONS
from modelservice.labels import MODELSERVICE_LABEL
from tests.cluster.podspec import STUB_IMAGE, STUB_STARTUP_DELAY_ANNOTATION
from tests.cluster.wait import async_wait_for
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import OPERATOR_FLAGS, OperatorProcess

log = logging.getLogger("bench")
TRACE = Path(__file__).resolve().parent / "traces" / "gpu-pool-seed1.json"
NS = "bench-pool"
LOAD_SECONDS = 20.0  # the stub's simulated model load (startup delay): "tens of seconds"
ACTIVATION_TIMEOUT = 180.0  # how long the gateway holds a request for a model at zero
SCALE_TO_ZERO_AFTER = "5m"
SAMPLE_SECONDS = 0.5
POLICIES = ("idle-timer", "park")


@dataclass
class GpuPoolConfig:
    work: Path
    trace: Path = TRACE
    duration: Optional[float] = None  # replay only the first N seconds of the trace (quick runs)
    policies: tuple[str, ...] = POLICIES


def model_spec(name: str, real: bool) -> dict[str, Any]:
    gpu = {"limits": {"nvidia.com/gpu": 1}, "requests": {"nvidia.com/gpu": 1}}
    auto = {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": SCALE_TO_ZERO_AFTER}
    if real:
        spec = {
            "engine": "llamacpp",
            "model": {"uri": "hf://org/model-GGUF:Q8_0", "servedName": name},
            "args": ["-t", "1", "-c", "2048", "-np", "2"],
        }
    else:
        spec = {
            "engine": "vllm",
            "model": {"uri": f"hf://org/{name}", "servedName": name},
            "image": STUB_IMAGE,
            "podTemplate": {"annotations": {STUB_STARTUP_DELAY_ANNOTATION: str(LOAD_SECONDS)}},
        }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelService",
        "metadata": {"name": name},
        "spec": {**spec, "resources": gpu, "autoscaling": auto},
    }


# ---- the ledger: pure bookkeeping of pods and requests over time ------------------------------------------------


@dataclass
class PodView:
    model: str
    gpus: int = 0
    bound: bool = False
    ready: bool = False
    waiting_for_gpu: bool = False  # Pending: the scheduler said Insufficient nvidia.com/gpu
    terminating: bool = False  # deletionTimestamp set: parked or scaled down, draining (preStop) and stopping


def pod_view(pod: dict[str, Any]) -> Optional[PodView]:
    labels = pod["metadata"].get("labels") or {}
    model = labels.get(MODELSERVICE_LABEL)
    if model is None:
        return None
    gpus = sum(
        int(((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu", 0))
        for c in pod["spec"].get("containers") or []
    )
    conds = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
    bound = bool(pod["spec"].get("nodeName"))
    sched = conds.get("PodScheduled") or {}
    waiting = not bound and sched.get("status") == "False" and "nvidia.com/gpu" in (sched.get("message") or "")
    return PodView(
        model,
        gpus,
        bound,
        (conds.get("Ready") or {}).get("status") == "True",
        waiting,
        bool(pod["metadata"].get("deletionTimestamp")),
    )


@dataclass
class PodTimes:
    """When the pod watch first saw each step of one pod's life (time.monotonic(), the replay's clock)."""

    model: str
    created: Optional[float] = None
    waited_for_gpu: bool = False
    bound: Optional[float] = None
    ready: Optional[float] = None
    terminating: Optional[float] = None
    deleted: Optional[float] = None


@dataclass
class Ledger:
    pods: dict[str, PodView] = field(default_factory=dict)  # by uid
    in_flight: Counter = field(default_factory=Counter)  # by model, from the client
    created: int = 0  # model pods created: cold starts
    gpu_idle: float = 0.0
    gpu_idle_while_waiting: float = 0.0
    # the part of it held by pods already going away (parked: preStop, the engine's stop, the kubelet's kill); the
    # rest is held by pods nobody has told to go yet (the planner has not seen them idle, or they may not be parked)
    gpu_idle_while_waiting_stopping: float = 0.0
    # at most as many idle GPUs as the waiting pods ask for: the rest of the idle ones could not have served a waiter
    # (parking them would free GPUs nobody waits for)
    gpu_idle_while_waiting_needed: float = 0.0
    gpu_held: float = 0.0
    waiting_seconds: float = 0.0  # time during which some model waited for a GPU
    # where a cold start's time goes (scheduler wait, start and load, a parked pod's stop), by pod uid
    times: dict[str, PodTimes] = field(default_factory=dict)

    def on_pod(self, event: str, pod: dict[str, Any], at: Optional[float] = None) -> None:
        uid = pod["metadata"]["uid"]
        if event == "DELETED":
            self.pods.pop(uid, None)
            if at is not None and uid in self.times and self.times[uid].deleted is None:
                self.times[uid].deleted = at
            return
        view = pod_view(pod)
        if view is None:
            return
        if uid not in self.pods and event == "ADDED":
            self.created += 1
        self.pods[uid] = view
        if at is not None:
            t = self.times.setdefault(uid, PodTimes(view.model, created=at))
            t.waited_for_gpu |= view.waiting_for_gpu
            for step, now in (("bound", view.bound), ("ready", view.ready), ("terminating", view.terminating)):
                if now and getattr(t, step) is None:
                    setattr(t, step, at)

    def phases(self) -> dict[str, Any]:
        """Percentiles of each step over the pods seen from their creation: the cluster's side of a cold start."""

        def gaps(a: str, b: str, only_waited: bool = False) -> list[float]:
            out = []
            for t in self.times.values():
                x, y = getattr(t, a), getattr(t, b)
                if x is not None and y is not None and (t.waited_for_gpu or not only_waited):
                    out.append(y - x)
            return out

        return {
            "created_to_bound": summary(gaps("created", "bound")),
            "created_to_bound_waited_for_gpu": summary(gaps("created", "bound", only_waited=True)),
            "bound_to_ready": summary(gaps("bound", "ready")),
            "terminating_to_deleted": summary(gaps("terminating", "deleted")),
        }

    def ready_models(self) -> set[str]:
        return {p.model for p in self.pods.values() if p.ready}

    def sample(self, dt: float) -> None:
        """Account `dt` seconds of the current state."""
        waiting = any(p.waiting_for_gpu for p in self.pods.values())
        idle_pods = [p for p in self.pods.values() if p.bound and p.ready and not self.in_flight[p.model]]
        idle = sum(p.gpus for p in idle_pods)
        self.gpu_held += dt * sum(p.gpus for p in self.pods.values() if p.bound)
        self.gpu_idle += dt * idle
        if waiting:
            self.waiting_seconds += dt
            self.gpu_idle_while_waiting += dt * idle
            self.gpu_idle_while_waiting_stopping += dt * sum(p.gpus for p in idle_pods if p.terminating)
            need = sum(p.gpus for p in self.pods.values() if p.waiting_for_gpu)
            self.gpu_idle_while_waiting_needed += dt * min(idle, need)


# ---- the replay -------------------------------------------------------------------------------------------------


async def _request(url: str, model: str, cold: bool, ledger: Ledger, results: list[dict[str, Any]]) -> None:
    body = {
        "model": model,
        "stream": True,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hello"}],
    }
    sent, first, status, error = time.monotonic(), None, 0, ""
    ledger.in_flight[model] += 1
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ACTIVATION_TIMEOUT + 120)) as s:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                status = r.status
                if r.status != 200:
                    error = (await r.text())[:300]
                else:
                    async for line in r.content:
                        if first is None and line.startswith(b"data: {") and b'"content"' in line:
                            first = time.monotonic()
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        ledger.in_flight[model] -= 1
    results.append(
        {
            "model": model,
            "sent": sent,
            "ended": time.monotonic(),
            "cold": cold,
            "status": status,
            "ttft": (first - sent) if first else None,
            "error": error if not first else "",
        }
    )


async def _replay(trace: Trace, url: str, ledger: Ledger, duration: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    for req in trace.requests:
        if req["t"] >= duration:
            break
        delay = start + req["t"] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        cold = req["model"] not in ledger.ready_models()
        tasks.append(asyncio.create_task(_request(url, req["model"], cold, ledger, results)))
    await asyncio.gather(*tasks)
    return results


async def _sampler(ledger: Ledger, stop: asyncio.Event) -> None:
    last = time.monotonic()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)
        except asyncio.TimeoutError:
            pass
        now = time.monotonic()
        ledger.sample(now - last)
        last = now


def operator_args(policy: str) -> list[str]:
    """The operator as the chart installs it by default (the gateway, and the NetworkPolicy that lets only it reach
    the engines, hence no preStop wait), with `park` or `idle-timer`; `@N`: with --prestop-seconds N instead."""
    name, at, prestop = policy.partition("@")
    return [*OPERATOR_FLAGS, "--gpu-pool-policy", name, *(["--prestop-seconds", prestop] if at else [])]


async def run_policy(cfg: GpuPoolConfig, policy: str, trace: Trace) -> dict[str, Any]:
    duration = min(cfg.duration or trace.spec.duration, trace.spec.duration)
    real = trace.model_names[trace.spec.real_engine_rank - 1]
    label = f"pool-{policy.replace('@', '-prestop')}"
    async with control_plane(cfg.work, label, pods=50, engines=("llamacpp",)) as cluster:
        kube = cluster.kube
        await cluster.namespace(NS)
        op = OperatorProcess(cluster.kubeconfig, cfg.work / f"{label}-operator.log", extra_args=operator_args(policy))
        gw = GatewayProcess(
            cluster.kubeconfig,
            cfg.work / f"{label}-gateway.log",
            "--activation-timeout",
            f"{ACTIVATION_TIMEOUT:.0f}s",
            "--activity-interval",
            "2s",
        )
        await asyncio.to_thread(op.start)
        await asyncio.to_thread(gw.start)
        ledger, stop = Ledger(), asyncio.Event()
        try:
            for name in trace.model_names:
                await kube.create(f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}", model_spec(name, name == real))

            deps = f"/apis/apps/v1/namespaces/{NS}/deployments"

            async def all_created() -> bool:
                return len((await kube.get(deps))["items"]) == len(trace.model_names)

            async def all_at_zero() -> bool:
                pods = (await kube.get(f"/api/v1/namespaces/{NS}/pods"))["items"]
                return not pods and all((d["spec"].get("replicas") or 0) == 0 for d in (await kube.get(deps))["items"])

            # A new model starts one replica to prove it loads; the trace starts from a pool with every model at
            # zero (as after a quiet night), so put them there, as engine_cold.py does.
            await async_wait_for(all_created, 120, 0.5, "every model's Deployment")
            for name in trace.model_names:
                await kube.merge_patch(f"{deps}/{name}/scale", {"spec": {"replicas": 0}})
            await async_wait_for(all_at_zero, 300, 0.5, "every model at zero")
            async with Watch(kube, f"/api/v1/namespaces/{NS}/pods", lambda ev, obj, t: ledger.on_pod(ev, obj, t)):
                sampler = asyncio.create_task(_sampler(ledger, stop))
                t0 = time.monotonic()
                results = await _replay(trace, gw.url, ledger, duration)
                replay_seconds = time.monotonic() - t0
                stop.set()
                await sampler
            # Tries the gateway sent elsewhere because the pod provably did nothing with them: with no preStop wait,
            # "unread" and "not_sent" count requests that met an engine stopping before the gateway heard of it.
            untouched = {
                why: await asyncio.to_thread(gw.metric, "modelservice_gateway_untouched_tries_total", reason=why)
                for why in UNTOUCHED_REASONS
            }
        finally:
            await asyncio.to_thread(gw.stop)
            await asyncio.to_thread(op.stop)
    return {**summarize(policy, results, ledger, replay_seconds, duration), "gateway_untouched_tries": untouched}


def summarize(
    policy: str, results: list[dict[str, Any]], ledger: Ledger, replay_seconds: float, duration: float
) -> dict[str, Any]:
    failed = [r for r in results if r["ttft"] is None]
    reasons = Counter((r["status"], r["error"][:160]) for r in failed)
    cold = [r["ttft"] for r in results if r["cold"] and r["ttft"] is not None]
    per_model: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        per_model[r["model"]]["ok" if r["ttft"] is not None else "failed"] += 1
    return {
        "policy": policy,
        "trace_seconds": duration,
        "replay_seconds": replay_seconds,
        "requests": len(results),
        "failed": len(failed),
        "failure_reasons": [{"status": s, "error": e, "count": n} for (s, e), n in reasons.most_common()],
        "ttft_cold": summary(cold),
        "ttft_all": summary([r["ttft"] for r in results if r["ttft"] is not None]),
        "cold_requests": sum(1 for r in results if r["cold"]),
        "cold_starts": ledger.created,
        "gpu_seconds_held": ledger.gpu_held,
        "gpu_seconds_idle": ledger.gpu_idle,
        "gpu_seconds_idle_while_waiting": ledger.gpu_idle_while_waiting,
        "gpu_seconds_idle_while_waiting_stopping": ledger.gpu_idle_while_waiting_stopping,
        "gpu_seconds_idle_while_waiting_needed": ledger.gpu_idle_while_waiting_needed,
        "seconds_someone_waited_for_a_gpu": ledger.waiting_seconds,
        "per_model": {m: dict(c) for m, c in sorted(per_model.items())},
        # where the time of a cold start goes, and every request and pod on one clock (seconds from the first
        # request sent), to explain a cold p99 afterwards: a request's wait = its model's pod's created..bound
        # (the scheduler, GPUs, backoff) + bound..ready (start, load) + ready..first token
        "pod_phases": {
            **ledger.phases(),
            "last_request_to_told_to_go": summary(last_request_to_told_to_go(results, ledger)),
        },
        "timeline": timeline(results, ledger),
    }


def last_request_to_told_to_go(results: list[dict[str, Any]], ledger: Ledger) -> list[float]:
    """Per pod told to go (parked or scaled down) after serving: from the end of its model's last request before
    that to the moment: how soon an idle model is seen idle and given back (the gateway's Lease, the operator's
    watch, the planner)."""
    ends: dict[str, list[float]] = defaultdict(list)
    for r in results:
        ends[r["model"]].append(r["ended"])
    out = []
    for pod in ledger.times.values():
        if pod.terminating is None or pod.ready is None:
            continue
        before = [e for e in ends[pod.model] if pod.ready <= e <= pod.terminating]
        if before:
            out.append(pod.terminating - max(before))
    return out


def timeline(results: list[dict[str, Any]], ledger: Ledger) -> dict[str, Any]:
    t0 = min((r["sent"] for r in results if "sent" in r), default=0.0)
    rel = lambda x: None if x is None else round(x - t0, 3)  # noqa: E731
    return {
        "requests": [
            {"t": rel(r.get("sent")), "model": r["model"], "cold": r["cold"], "ttft": r["ttft"], "status": r["status"]}
            for r in sorted(results, key=lambda r: r.get("sent", 0.0))
        ],
        "pods": [
            {
                "model": p.model,
                "waited_for_gpu": p.waited_for_gpu,
                **{k: rel(getattr(p, k)) for k in ("created", "bound", "ready", "terminating", "deleted")},
            }
            for p in sorted(ledger.times.values(), key=lambda p: p.created or 0.0)
        ],
    }


async def run(cfg: GpuPoolConfig) -> dict[str, Any]:
    trace = Trace.from_json(cfg.trace.read_text())
    out: dict[str, Any] = {
        "trace": str(cfg.trace.name),
        "models": len(trace.model_names),
        "gpus": 4,
        "load_seconds": LOAD_SECONDS,
        "activation_timeout": ACTIVATION_TIMEOUT,
        "scale_to_zero_after": SCALE_TO_ZERO_AFTER,
        "real_engine_model": trace.model_names[trace.spec.real_engine_rank - 1],
        "policies": {},
    }
    for policy in cfg.policies:
        log.info("GPU pool: replaying %s with the %s policy", cfg.trace.name, policy)
        out["policies"][policy] = await run_policy(cfg, policy, trace)
        p = out["policies"][policy]
        log.info(
            "GPU pool [%s]: %d/%d failed; cold TTFT p50 %s p99 %s; cold starts %d; idle GPU-s %.0f, "
            "while someone waited %.0f",
            policy,
            p["failed"],
            p["requests"],
            p["ttft_cold"]["p50"],
            p["ttft_cold"]["p99"],
            p["cold_starts"],
            p["gpu_seconds_idle"],
            p["gpu_seconds_idle_while_waiting"],
        )
    return out
