"""python -m tests.cluster up|down|status — the local control plane for demos, benchmarks and manual testing.

`up` returns once the cluster is ready and leaves it running in the background; `down` stops it (and is safe to
repeat); `status` says which components are alive.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.cluster.controlplane import DEFAULT_STATE_DIR, ControlPlane, ControlPlaneError


def _rel(p: Path) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return str(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="kubeconfig, pids, pki and logs (default: %(default)s)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start (or reuse) the cluster and return")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--gpus-per-node", type=int, default=2)
    up.add_argument("--cpu", default="64", help="cpu per node")
    up.add_argument("--memory", default="256Gi", help="memory per node")
    up.add_argument("--pods-per-node", type=int, default=1000)
    up.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each component")
    up.add_argument(
        "--engines",
        default="llamacpp",
        help="engines the fake nodes run for real, comma-separated: llamacpp, vllm (installs ~3.4 GB once);"
        " '' for none. Other images get the stub model server",
    )
    sub.add_parser("down", help="stop the cluster (idempotent)")
    sub.add_parser("status", help="which components are running")
    args = parser.parse_args(argv)

    if args.command == "up":
        cp = ControlPlane(
            args.state_dir,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            cpu=args.cpu,
            memory=args.memory,
            pods_per_node=args.pods_per_node,
            start_timeout=args.timeout,
            engines=tuple(e for e in args.engines.split(",") if e),
        )
        try:
            cp.start()
        except ControlPlaneError as e:
            print(f"cluster failed to start: {e}\nlogs: {_rel(cp.logs_dir)}/", file=sys.stderr)
            return 1
        how = "already running" if cp.reused else f"up in {cp.startup_seconds:.1f}s"
        print(f"cluster {how}: Kubernetes v1.20 at {cp.server}, state in {_rel(cp.state_dir)}/")
        if not cp.reused:
            print(
                f"  {args.nodes} fake nodes x {args.gpus_per_node} nvidia.com/gpu, {args.cpu} cpu, {args.memory}, "
                f"{args.pods_per_node} pods each; each pod gets its own 127.x.y.z address; engines run for real: "
                f"{args.engines or 'none'} (other images: a stub model server)"
            )
        print(
            f"\n  export KUBECONFIG={_rel(cp.kubeconfig)}\n  kubectl get nodes\n  kubectl get ms"
            f"          # once the CRDs are applied: kubectl apply -f crds/\n"
            f"\n  logs: {_rel(cp.logs_dir)}/   stop: python -m tests.cluster down"
        )
        return 0

    cp = ControlPlane(args.state_dir)
    if args.command == "down":
        was = cp.pids_file.exists()
        cp.stop()
        print("cluster stopped" if was else "no cluster running")
        return 0

    st = cp.status()
    if not cp.pids_file.exists():
        print("no cluster (run: python -m tests.cluster up)")
        return 1
    for name, alive in st.items():
        print(f"  {name:24} {'ok' if alive else 'DOWN'}")
    print(f"server: {cp.server}\nkubeconfig: {_rel(cp.kubeconfig)}")
    return 0 if cp.is_up() else 1


if __name__ == "__main__":
    sys.exit(main())
