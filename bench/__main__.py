"""python -m bench [--quick] [--sizes 100,500,1000] [--only operator|gateway] ...

Benchmarks of the operator and the gateway on private local control planes (never .cluster/). Every figure is
printed beside a baseline measured in the same run; ratios are what to compare across machines. Results go to
stdout as a table and to bench/results/<timestamp>.json. docs/benchmarks.md explains each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Optional

from bench import report
from bench.routing import POLICIES as ROUTING_POLICIES

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="N=100 only, 60 s idle window, fewer requests and cold starts (about 5 minutes)",
    )
    p.add_argument(
        "--only",
        choices=("operator", "gateway", "metering", "engine", "gpu-pool", "routing", "adapters"),
        help="run one part only",
    )
    p.add_argument(
        "--sizes", type=_ints, help="ModelService counts, e.g. 100,500,1000 (default: 100,500,1000; quick: 100)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="operator --workers, and the bare client's and the creator's concurrency (default 4)",
    )
    p.add_argument("--idle-seconds", type=float, help="idle window at the largest N (default 300; quick 60)")
    p.add_argument(
        "--resync-seconds",
        type=float,
        help="operator --resync-seconds (default: a third of the idle window, so it covers resyncs)",
    )
    p.add_argument("--repair-samples", type=int, help="Services and Deployments deleted each (default 20; quick 10)")
    p.add_argument("--latency-concurrency", type=_ints, default=[1, 64, 256], help="default 1,64,256")
    p.add_argument("--latency-seconds", type=float, help="length of each latency run (default 8; quick 4)")
    p.add_argument("--max-requests", type=int, default=500_000, help="cap on requests per latency run")
    p.add_argument(
        "--rounds",
        type=int,
        help="latency rounds over direct/nginx/gateway in rotated order, pooled (default 3; quick 1)",
    )
    p.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="latency client: wrk (Debian package, C) when installed, else the asyncio client",
    )
    p.add_argument("--streams", type=int, default=256, help="concurrent streams (default 256)")
    p.add_argument("--stream-tokens", type=int, default=200, help="tokens per stream (default 200)")
    p.add_argument("--stream-tps", type=float, default=100.0, help="stub tokens/s per stream (default 100)")
    p.add_argument("--cold-starts", type=int, help="scale-from-zero repetitions (default 20; quick 5)")
    p.add_argument(
        "--engine",
        choices=("vllm", "llamacpp"),
        default="vllm",
        help="the real engine of the engine part's scale-from-zero figure (default vllm)",
    )
    p.add_argument("--engine-cold-starts", type=int, default=5, help="real-engine cold starts (default 5)")
    p.add_argument(
        "--pool-seconds",
        type=float,
        help="GPU-pool part: replay only the first N seconds of the trace (default: all 600; quick: 180)",
    )
    p.add_argument(
        "--pool-policies",
        default="idle-timer,park",
        help="GPU-pool part: policies, in order; `park@N`: with the operator's --prestop-seconds N",
    )
    p.add_argument(
        "--gateway-latency-only",
        action="store_true",
        help="gateway part: only the proxy overhead comparison (direct, nginx, vllm-router, Envoy, gateway)",
    )
    p.add_argument(
        "--gateway-workers",
        type=_ints,
        default=[],
        help="gateway part: instead of its usual figures, compare gateways with these --workers counts "
        "(e.g. 1,2): CPU per request, the load generator's CPU, c=1 latency (docs/routing.md)",
    )
    p.add_argument(
        "--routing-policies",
        default=",".join(ROUTING_POLICIES),
        help="routing part: routers in order (rr, lif, prefix, prefix-session, vr-<vllm-router policy>, alone; "
        "ours take @F for spec.routing.loadFactor F, e.g. prefix-session@2)",
    )
    p.add_argument("--routing-requests", type=int, help="routing part: replay only the first N trace requests")
    p.add_argument(
        "--routing-rounds",
        type=int,
        default=3,
        help="routing part: replays of every router in rotated order, figures pooled (default 3)",
    )
    p.add_argument(
        "--adapters-requests", type=int, default=240, help="adapters part: requests per workload run (2 runs)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the operator (materialization at the largest N) and the gateway (latency at the "
        "highest concurrency, and streaming)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, profiles) instead of deleting it")
    p.add_argument("--out", type=Path, help="JSON results file (default bench/results/<timestamp>.json)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(
            next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1]
        )
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": os.getloadavg(),
    }


async def _guarded(name: str, part: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A part whose failure is a row of the table: the JSON keeps what the other parts measured."""
    t0 = time.monotonic()
    try:
        out = await part
    except Exception as e:  # noqa: BLE001 - reported in the table
        log.exception("%s benchmark failed", name)
        out = {"error": f"{type(e).__name__}: {e}"}
    out["seconds"] = time.monotonic() - t0
    return out


async def amain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.only in (None, "operator"):
        from bench.operator_bench import OperatorConfig
        from bench.operator_bench import run as run_operator

        idle = args.idle_seconds if args.idle_seconds is not None else (60.0 if args.quick else 300.0)
        cfg = OperatorConfig(
            sizes=args.sizes or ([100] if args.quick else [100, 500, 1000]),
            work=work,
            concurrency=args.concurrency,
            idle_seconds=idle,
            repair_samples=args.repair_samples or (10 if args.quick else 20),
            resync_seconds=args.resync_seconds or max(10.0, idle / 3),
            profile=args.profile,
        )
        t0 = time.monotonic()
        results["operator"] = await run_operator(cfg)
        results["operator"]["seconds"] = time.monotonic() - t0
    if args.only in (None, "gateway"):
        from bench.gateway_bench import GatewayConfig
        from bench.gateway_bench import run as run_gateway

        gcfg = GatewayConfig(
            work=work,
            concurrencies=args.latency_concurrency,
            latency_seconds=args.latency_seconds or (4.0 if args.quick else 8.0),
            max_requests=args.max_requests,
            rounds=args.rounds or (1 if args.quick else 3),
            loadgen=args.loadgen,
            streams=args.streams,
            stream_tokens=args.stream_tokens,
            stream_tps=args.stream_tps,
            cold_starts=args.cold_starts or (5 if args.quick else 20),
            profile=args.profile,
            workers=args.gateway_workers,
            latency_only=args.gateway_latency_only,
        )
        t0 = time.monotonic()
        results["gateway"] = await run_gateway(gcfg)
        results["gateway"]["seconds"] = time.monotonic() - t0
    if args.only in (None, "metering"):
        from bench.metering_bench import MeteringConfig
        from bench.metering_bench import run as run_metering

        t0 = time.monotonic()
        results["metering"] = await run_metering(
            MeteringConfig(
                work,
                rounds=max(5, args.rounds or 5),
                latency_seconds=args.latency_seconds or 6.0,
                max_requests=args.max_requests,
                loadgen=args.loadgen,
                streams=args.streams,
                stream_tokens=args.stream_tokens,
                stream_tps=args.stream_tps,
            )
        )
        results["metering"]["seconds"] = time.monotonic() - t0
    if args.only in (None, "engine"):
        from bench.engine_cold import EngineColdConfig
        from bench.engine_cold import run as run_engine

        results["engine"] = await _guarded(
            "engine", run_engine(EngineColdConfig(work, args.engine, args.engine_cold_starts))
        )
    if args.only in (None, "gpu-pool"):
        from bench.gpu_pool import GpuPoolConfig
        from bench.gpu_pool import run as run_pool

        pcfg = GpuPoolConfig(
            work,
            duration=args.pool_seconds or (180.0 if args.quick else None),
            policies=tuple(args.pool_policies.split(",")),
        )
        results["gpu_pool"] = await _guarded("GPU pool", run_pool(pcfg))
    if args.only == "routing":  # real vLLM replicas: minutes; run on its own (docs/routing.md)
        from bench.routing import RoutingConfig
        from bench.routing import run as run_routing

        rcfg = RoutingConfig(
            work,
            policies=tuple(args.routing_policies.split(",")),
            requests=args.routing_requests,
            rounds=args.routing_rounds,
        )
        results["routing"] = await _guarded("routing", run_routing(rcfg))
    if args.only == "adapters":  # real vLLM replicas with LoRA: minutes; run on its own (docs/lora.md)
        from bench.adapters import AdaptersConfig
        from bench.adapters import run as run_adapters

        results["adapters"] = await _guarded(
            "adapters", run_adapters(AdaptersConfig(work, requests=args.adapters_requests))
        )
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    started = datetime.now(timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="modelservice-bench-"))
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    doc: dict[str, Any] = {
        "command": command.strip(),
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "work_dir": str(work) if args.keep else None,
    }
    t0 = time.monotonic()
    try:
        doc["results"] = asyncio.run(amain(args, work))
    except KeyboardInterrupt:
        print("interrupted; clusters and processes were stopped", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    doc["seconds"] = round(time.monotonic() - t0, 1)
    doc["machine"]["loadavg_end"] = os.getloadavg()
    out = args.out or RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(report.table(doc))
    print(f"\nresults: {out}   ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
