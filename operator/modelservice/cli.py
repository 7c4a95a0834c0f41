"""`modelservice-operator run|crd|render|gateway|version`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any, Optional

import yaml

from modelservice import __version__

if TYPE_CHECKING:
    from modelservice.netpol import NetworkPolicyConfig


def _prestop_seconds(value: str) -> int:
    seconds = int(value)
    if not 0 <= seconds <= 60:
        raise argparse.ArgumentTypeError("must be 0 to 60")
    return seconds


def _prestop_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prestop-seconds",
        type=_prestop_seconds,
        help="how long a model pod going away waits before its engine is stopped, so that clients routing to it hear "
        "first (a preStop `sleep`; 0: none, and a parked model's GPUs are free at once). Default: 0 with "
        "--network-policy (only the gateway reaches the engines, and it replays what a stopping engine refused or "
        "dropped unread), 2 otherwise (docs/gpu-pool.md, 'The release')",
    )


def _render(path: str, gateway_enabled: bool, prestop: Optional[int]) -> int:
    from modelservice.api import InvalidSpec, validate_spec
    from modelservice.render import ApiVersions, Context, prestop_seconds, render
    from modelservice.scaling import Activity, decide

    with sys.stdin if path == "-" else open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    out: list[dict[str, Any]] = []
    for doc in docs:
        if doc.get("kind") != "ModelService":
            continue
        meta = doc.get("metadata", {})
        try:
            spec = validate_spec(doc.get("spec") or {}, gateway_enabled=gateway_enabled)
        except InvalidSpec as e:
            print(f"{meta.get('name', '?')}: invalid spec: {e}", file=sys.stderr)
            return 2
        decision = decide(spec, None, Activity(), None, 0)
        ctx = Context(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", "<uid>"),
            labels=meta.get("labels") or {},
            replicas=decision.apply_replicas,
            hpa_min_replicas=decision.hpa_floor,
            versions=ApiVersions(),
            prestop_seconds=prestop_seconds(prestop, gateway_only=False),
        )
        out += [obj for obj in render(ctx, spec).values() if obj]
    print(yaml.safe_dump_all(out, sort_keys=False), end="")
    return 0


def _network_policy(args: argparse.Namespace) -> Optional[NetworkPolicyConfig]:
    from modelservice.netpol import NetworkPolicyConfig, parse_labels

    if not args.network_policy:
        return None
    if not args.gateway_namespace or not args.gateway_pod_selector:
        raise SystemExit(
            "--network-policy needs --gateway-namespace and --gateway-pod-selector: the policy lets only "
            "the gateway's pods reach a model"
        )
    try:
        labels = parse_labels(args.gateway_pod_selector)
    except ValueError as e:
        raise SystemExit(f"--gateway-pod-selector: {e}") from None
    return NetworkPolicyConfig(args.gateway_namespace, labels, tuple(args.metrics_namespace or ()))


def _run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from modelservice import handlers
    from modelservice.render import prestop_seconds

    netpol = _network_policy(args)
    handlers.OPTIONS.update(
        gateway_enabled=args.gateway_enabled,
        workers=args.workers,
        network_policy=netpol,
        kubeconfig=args.kubeconfig,
        watch_dead_after=args.watch_dead_after,
        resync_seconds=args.resync_seconds,
        namespaces=args.namespace or [],
        gpu_pool_policy=args.gpu_pool_policy,
        prestop_seconds=prestop_seconds(args.prestop_seconds, gateway_only=args.gateway_enabled and netpol is not None),
    )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one INFO line per watch event is noise
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(
        standalone=True,  # one replica (Deployment strategy Recreate): no peering objects, no extra RBAC
        clusterwide=not args.namespace,
        namespaces=args.namespace or [],
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "gateway":
        from modelservice.gateway.cli import main as gateway_main

        return gateway_main(argv[1:])
    p = argparse.ArgumentParser(prog="modelservice-operator", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch all namespaces (default)")
    run.add_argument(
        "--gateway-enabled", action="store_true", help="the gateway is installed (scale to zero, API keys)"
    )
    run.add_argument(
        "--network-policy",
        action="store_true",
        help="render a NetworkPolicy per ModelService: only the gateway's pods reach the engine port",
    )
    run.add_argument("--gateway-namespace", help="namespace of the gateway's pods (for --network-policy)")
    run.add_argument("--gateway-pod-selector", metavar="K=V[,K=V]", help="labels of the gateway's pods")
    run.add_argument(
        "--metrics-namespace",
        action="append",
        metavar="NS",
        help="also let pods of this namespace reach the engines' metrics port (repeatable; opt-in: "
        "most engines serve metrics on the inference port, so this lets them call models too)",
    )
    run.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0: off)")
    run.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port, /healthz (0: off)")
    run.add_argument("--workers", type=int, default=4, help="concurrent reconciles")
    run.add_argument("--resync-seconds", type=float, default=600, help="re-check every ModelService this often")
    run.add_argument(
        "--gpu-pool-policy",
        choices=("park", "idle-timer"),
        default="park",
        help="park: park idle models to make room for one that lacks GPUs (docs/gpu-pool.md); "
        "idle-timer: only each model's own scaleToZeroAfter (the old behaviour, for comparison)",
    )
    _prestop_argument(run)
    run.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG or in-cluster)")
    run.add_argument(
        "--watch-dead-after",
        type=float,
        default=900,
        help="seconds without an answer on any watch before /healthz fails",
    )
    run.add_argument("--log-level", default="info")
    sub.add_parser("crd", help="print the CRD YAML")
    rend = sub.add_parser("render", help="print the children a ModelService would get (offline)")
    rend.add_argument("-f", "--filename", required=True, help="ModelService YAML file, or - for stdin")
    rend.add_argument("--gateway-enabled", action="store_true")
    _prestop_argument(rend)
    sub.add_parser("version", help="print the version")
    use = sub.add_parser("usage", help="chargeback report from Prometheus: tokens per tenant, GPU-seconds per model")
    use.add_argument("--prometheus", required=True, metavar="URL", help="e.g. http://prometheus.monitoring:9090")
    use.add_argument("--since", default="24h", help="window ending now (Prometheus duration: 30m, 24h, 7d)")
    use.add_argument("--output", "-o", choices=("table", "json", "csv"), default="table")
    sub.add_parser("gateway", help="run the serverless gateway (see `gateway --help`)")
    args = p.parse_args(argv)
    if args.command == "crd":
        from modelservice.crd import crd_yaml

        print(crd_yaml(), end="")
        return 0
    if args.command == "render":
        return _render(args.filename, args.gateway_enabled, args.prestop_seconds)
    if args.command == "usage":
        from modelservice.usage import main as usage_main

        return usage_main(args.prometheus, args.since, args.output)
    if args.command == "version":
        print(json.dumps({"version": __version__}))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
