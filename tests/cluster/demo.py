"""`make demo`: the product end to end on the local control plane, narrated.

Starts (or reuses) the local cluster, installs the CRD, runs the operator and the gateway, and creates one
ModelService that scales to zero. Then it shows the model warm, asleep, woken by a streamed chat completion through
the gateway (with the cold-start time), and asleep again. The model server is a real engine run by the fake node:
llama.cpp's llama-server by default (it starts in a fraction of a second), vLLM's CPU build with `--engine vllm`
(about 30-70 s to start, 3 GB), both serving a tiny random-weight model generated here (so the text is gibberish:
the weights are random, the serving is real).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from tests.cluster.controlplane import DEFAULT_STATE_DIR, ControlPlane, free_port
from tests.cluster.wait import wait_for
from tests.integration.operator_process import wait_crd_established

ROOT = Path(__file__).resolve().parents[2]
NS = "demo"


def say(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def kubectl(kubeconfig: Path, *args: str, show: bool = True, input: str | None = None) -> str:
    out = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, input=input, timeout=60
    )
    if show:
        print(f"$ kubectl {' '.join(args)}\n{out.stdout}{out.stderr}", end="", flush=True)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def spawn(name: str, args: list[str], kubeconfig: Path, logs: Path) -> subprocess.Popen:
    logs.mkdir(parents=True, exist_ok=True)
    log = open(logs / f"demo-{name}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "modelservice.cli", *args, "--kubeconfig", str(kubeconfig)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "POD_NAME": f"demo-{name}", "POD_NAMESPACE": NS},
    )


def ready_reason(kubeconfig: Path) -> tuple[str, str]:
    obj = json.loads(kubectl(kubeconfig, "get", "ms", "demo", "-n", NS, "-o", "json", show=False))
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == "Ready":
            return c["status"], c["reason"]
    return "Unknown", ""


# The demo's ModelService per engine: the CPU settings a 2-core machine needs; everything else is rendered as for a GPU.
DEMO_SPECS = {
    "llamacpp": {
        "engine": "llamacpp",
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M", "servedName": "demo"},
        "args": ["-t", "1", "-c", "4096"],
    },
    "vllm": {
        "engine": "vllm",
        "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct", "servedName": "demo"},
        "args": ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4"],
        "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
        "startupTimeout": "15m",
    },
}


async def stream_chat(url: str) -> tuple[float, float]:
    body = {
        "model": "demo",
        "stream": True,
        "max_tokens": 24,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Say hello to the platform team."}],
    }
    t0 = time.monotonic()
    first = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        async with s.post(f"{url}/v1/chat/completions", json=body) as r:
            if r.status != 200:
                raise SystemExit(f"gateway answered {r.status}: {await r.text()}")
            print("assistant: ", end="", flush=True)
            async for line in r.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                first = first or time.monotonic()
                choices = json.loads(line[6:]).get("choices") or [{}]
                delta = (choices[0].get("delta") or {}).get("content") or ""  # a role-only or usage chunk: nothing
                print(delta, end="", flush=True)
    print()
    return (first or time.monotonic()) - t0, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--keep", action="store_true", help="leave the cluster, operator and gateway running")
    p.add_argument("--idle", default="15s", help="scaleToZeroAfter for the demo model")
    p.add_argument(
        "--engine",
        choices=sorted(DEMO_SPECS),
        default="llamacpp",
        help="the real engine to serve (vllm installs ~3.4 GB once and takes ~30-70 s per cold start)",
    )
    args = p.parse_args(argv)

    say(
        f"Starting the local control plane with {args.engine} on its nodes (first run builds Kubernetes v1.20 and "
        "installs the engine once, ~5 min)"
    )
    cp = ControlPlane(DEFAULT_STATE_DIR, engines=(args.engine,))
    started_cluster = not cp.is_up()
    t0 = time.monotonic()
    cp.start()
    print(f"cluster ready in {time.monotonic() - t0:.1f}s; KUBECONFIG={cp.kubeconfig}")
    kc = cp.kubeconfig
    procs: list[subprocess.Popen] = []
    try:
        say("Installing the ModelService CRD")
        kubectl(kc, "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
        wait_crd_established(kc)

        say("Running the operator and the gateway")
        port = free_port()
        procs.append(
            spawn(
                "operator", ["run", "--gateway-enabled", "--metrics-port", "0", "--health-port", "0"], kc, cp.logs_dir
            )
        )
        procs.append(
            spawn(
                "gateway",
                [
                    "gateway",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--metrics-port",
                    "0",
                    "--activity-interval",
                    "2s",
                ],
                kc,
                cp.logs_dir,
            )
        )
        url = f"http://127.0.0.1:{port}"

        def gateway_up() -> bool:
            try:
                return asyncio.run(_get_ok(url + "/healthz"))
            except OSError:
                return False

        wait_for(gateway_up, timeout=60, message="gateway /healthz")
        print(f"gateway on {url}; logs in {cp.logs_dir}/demo-*.log")

        say(f"Creating a ModelService that scales to zero, served by {args.engine}")
        obj = {
            "apiVersion": "serving.modelservice.dev/v1alpha1",
            "kind": "ModelService",
            "metadata": {"name": "demo", "namespace": NS},
            "spec": {
                **DEMO_SPECS[args.engine],
                "autoscaling": {"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": args.idle},
            },
        }
        print(yaml.safe_dump(obj, sort_keys=False), end="")
        kubectl(
            kc,
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
            show=False,
        )
        kubectl(kc, "apply", "--server-side", "-f", "-", input=yaml.safe_dump(obj))
        wait_for(
            lambda: ready_reason(kc) == ("True", "Available"),
            timeout=900,
            interval=0.5,
            message="the model to load (a new scale-to-zero model first proves that it loads)",
        )
        kubectl(kc, "get", "ms", "-n", NS, "-o", "wide")
        pod = kubectl(kc, "get", "pods", "-n", NS, "-o", "name", show=False).split()[0]
        say(f"The engine's own log (kubectl logs {pod})")
        kubectl(kc, "logs", "-n", NS, pod, "--tail=8")

        say(f"No traffic: waiting for scale to zero (scaleToZeroAfter {args.idle})")
        wait_for(lambda: ready_reason(kc)[1] == "ScaledToZero", timeout=180, interval=0.5, message="scale to zero")
        kubectl(kc, "get", "ms,deployment,pods", "-n", NS)

        say("First request: the gateway holds it, wakes the model, and streams the answer")
        ttfb, total = asyncio.run(stream_chat(url))
        print(
            f"cold start: first token after {ttfb:.2f}s (the {args.engine} process started from zero), "
            f"stream done after {total:.2f}s"
        )
        kubectl(kc, "get", "ms,pods", "-n", NS, "-o", "wide")

        say("A warm request")
        ttfb, total = asyncio.run(stream_chat(url))
        print(f"warm: first token after {ttfb * 1000:.0f} ms")

        say(f"Idle again: back to zero after {args.idle}")
        wait_for(lambda: ready_reason(kc)[1] == "ScaledToZero", timeout=180, interval=0.5, message="scale to zero")
        kubectl(kc, "get", "ms,deployment", "-n", NS)
        kubectl(kc, "get", "events", "-n", NS, "--field-selector", "involvedObject.kind=ModelService")
        say("Done. `make test` runs the test suite; docs/install.md installs the chart on a real cluster.")
        return 0
    finally:
        if args.keep:
            print(f"\nleft running (--keep): export KUBECONFIG={kc}; stop with `make cluster-down`")
        else:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if started_cluster:
                cp.stop()


async def _get_ok(url: str) -> bool:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        async with s.get(url) as r:
            return r.status == 200


if __name__ == "__main__":
    sys.exit(main())
