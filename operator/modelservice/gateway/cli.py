"""`modelservice-operator gateway`: flags → Config → the gateway on --port, metrics on --metrics-port."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from typing import Optional

from aiohttp import web

from modelservice.gateway import watchers, workers
from modelservice.gateway.config import Config, seconds, secret_ref, size
from modelservice.gateway.engine_metrics import EngineMetrics
from modelservice.gateway.kubeops import KubeOps
from modelservice.gateway.server import Gateway
from modelservice.gateway.workers import Slot
from modelservice.kube import Kube

log = logging.getLogger("modelservice.gateway")
LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn


def parser() -> argparse.ArgumentParser:
    d = Config(pod_name="-")
    p = argparse.ArgumentParser(
        prog="modelservice-operator gateway",
        description="Serverless gateway: OpenAI routing, scale from zero, least in-flight.",
    )
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics (0: off)")
    p.add_argument(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="watch only this namespace (repeatable); default: all namespaces",
    )
    p.add_argument(
        "--activation-timeout",
        type=seconds,
        default="10m",
        help="how long a request waits for a model to wake from zero",
    )
    p.add_argument("--max-body-bytes", type=size, default=d.max_body_bytes, help="e.g. 10Mi")
    p.add_argument(
        "--max-held-per-model",
        type=int,
        default=d.max_held_per_model,
        help="requests held per model while it wakes; more get 429",
    )
    p.add_argument(
        "--header-timeout",
        type=seconds,
        default=f"{d.header_timeout:g}s",
        help="time for a complete request head, from connect or the previous response",
    )
    p.add_argument(
        "--idle-timeout",
        type=seconds,
        default=f"{d.idle_timeout:g}s",
        help="longest silence while reading a request body or writing a response",
    )
    p.add_argument(
        "--upstream-timeout",
        type=seconds,
        default=f"{d.upstream_timeout:g}s",
        help="longest silence from a model server",
    )
    p.add_argument("--kubeconfig", default=None)
    p.add_argument(
        "--api-key-secret",
        default=None,
        metavar="[NS/]NAME[:KEY]",
        help="global API keys (one per line) accepted for every model; NS defaults to POD_NAMESPACE",
    )
    p.add_argument(
        "--tenants",
        action="store_true",
        help="tenant API keys from Secrets labelled serving.modelservice.dev/tenant in --tenant-namespace "
        "(watched: rotation within seconds); every model then needs a key (docs/tenants.md)",
    )
    p.add_argument(
        "--no-metering",
        dest="metering",
        action="store_false",
        help="no token metering (to measure what it costs; quotas then charge their reservations)",
    )
    p.add_argument(
        "--max-metered-tenants",
        type=int,
        default=d.max_metered_tenants,
        help="tenants with their own label in the token metrics; more are summed as tenant=_other",
    )
    p.add_argument(
        "--quota-replicas",
        type=int,
        default=d.quota_share,
        help="gateway replicas: each enforces this share of a tenant's quota (docs/tenants.md)",
    )
    p.add_argument(
        "--quota-default-max-tokens",
        type=int,
        default=d.quota_default_max_tokens,
        help="tokens reserved for an answer whose request sets no max_tokens",
    )
    p.add_argument("--tenant-namespace", default=None, metavar="NS", help="default: POD_NAMESPACE")
    p.add_argument(
        "--activity-interval",
        type=seconds,
        default=f"{d.activity_interval:g}s",
        help="at most one activity Lease write per model per interval",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N|auto",
        help="gateway processes in this pod, sharing the port (SO_REUSEPORT); auto: the container's CPU "
        "limit rounded up, 1 without a limit. The held cap and quota share are split between them "
        "(docs/routing.md)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _workers(text: str) -> int | str:
    try:
        return workers.parse_workers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def worker_count(value: int | str) -> int:
    return workers.auto_workers(workers.read_cpu_limit()) if value == "auto" else int(value)


def config_from(args: argparse.Namespace) -> Config:
    keys = secret_ref(args.api_key_secret, os.environ.get("POD_NAMESPACE", "")) if args.api_key_secret else None
    tenant_ns = (args.tenant_namespace or os.environ.get("POD_NAMESPACE")) if args.tenants else None
    if args.tenants and not tenant_ns:
        raise ValueError("--tenants needs --tenant-namespace (or POD_NAMESPACE): where the tenant Secrets are")
    return Config(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        namespaces=args.namespaces,
        activation_timeout=args.activation_timeout,
        max_body_bytes=args.max_body_bytes,
        max_held_per_model=args.max_held_per_model,
        header_timeout=args.header_timeout,
        idle_timeout=args.idle_timeout,
        upstream_timeout=args.upstream_timeout,
        kubeconfig=args.kubeconfig,
        api_key_secret=keys,
        activity_interval=args.activity_interval,
        tenant_namespace=tenant_ns,
        max_metered_tenants=args.max_metered_tenants,
        metering=args.metering,
        quota_share=args.quota_replicas,
        quota_default_max_tokens=args.quota_default_max_tokens,
    )


async def serve(config: Config, stop: Optional[asyncio.Event] = None, *, slot: Optional[Slot] = None) -> None:
    """One gateway; with `slot`, one worker of several (workers.py): the port shared, metrics to the parent."""
    kube = Kube.from_env(config.kubeconfig, user_agent="modelservice-gateway")
    gateway = Gateway(config, KubeOps(kube))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    runners: list[web.BaseRunner] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        runner = gateway.runner(gateway.app())
        await runner.setup()
        runners.append(runner)
        # A burst of new connections beyond the listen backlog (aiohttp's default: 128) waits out 1 s SYN
        # retransmits: in `make bench`, 256 clients connecting at once had a 1.2 s p99 for that reason alone.
        await web.TCPSite(
            runner, config.host, config.port, reuse_address=True, reuse_port=slot is not None, backlog=LISTEN_BACKLOG
        ).start()
        if config.metrics_port or slot is not None:
            metrics_app = gateway.metrics.app()
            # Engines' own metrics, for a Prometheus the NetworkPolicy keeps away from them (engine_metrics.py).
            metrics_app.router.add_get("/engine-metrics", EngineMetrics(gateway.table, gateway.metrics.registry).handle)
            mrunner = web.AppRunner(metrics_app, access_log=None)
            await mrunner.setup()
            runners.append(mrunner)
            if slot is not None:  # the parent serves the sum of the workers' registries on --metrics-port
                await web.UnixSite(mrunner, slot.metrics_socket).start()
                gateway.peers_synced = slot.all_synced
            else:
                await web.TCPSite(mrunner, config.host, config.metrics_port, reuse_address=True).start()
        # Ready once every watch has listed: the routes, and the tenant keys when tenants are on (a gateway that took
        # traffic before knowing the keys would refuse good ones).
        pending = {"routes", "tenants"} if gateway.keys.tenants is not None else {"routes"}

        def synced(part: str) -> None:
            pending.discard(part)
            gateway.synced = not pending
            if gateway.synced and slot is not None:
                slot.mark_synced()

        tasks = await watchers.start(kube, gateway.table, config.namespaces, lambda: synced("routes"))
        if gateway.keys.tenants is not None and config.tenant_namespace:  # the store exists when the namespace is set
            tasks += gateway.keys.tenants.watch(kube, config.tenant_namespace, lambda: synced("tenants"))
        log.info(
            "gateway %s listening on %s:%d (metrics :%d), namespaces: %s",
            config.pod_name,
            config.host,
            config.port,
            config.metrics_port,
            ",".join(config.namespaces) or "all",
        )
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in reversed(runners):
            await r.cleanup()  # stops accepting, then lets in-flight requests finish (aiohttp's shutdown_timeout)
        await kube.close()


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        config = config_from(args)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    count = worker_count(args.workers)
    if count > 1:
        return workers.supervise(config, count)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0
