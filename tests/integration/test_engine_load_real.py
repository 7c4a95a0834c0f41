"""The engine load signals' metric names (engine_load.NAMES) on the real engines: a real llama-server, polled by
EngineLoad, reports a request it defers (one slot, two requests); vLLM's names are pinned against the installed
vLLM's own source (starting vLLM takes minutes; its /metrics is exercised in the routing benchmark)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import urllib.request
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

from modelservice.api import Engine
from modelservice.gateway.engine_load import NAMES, EngineLoad
from modelservice.gateway.routes import Endpoint, RouteTable
from modelservice.gateway.testing import endpointslice, feed, modelservice
from tests.cluster.controlplane import find_engines, free_port
from tests.cluster.models_offline import OfflineModels
from tests.cluster.wait import wait_for


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except OSError:
        return 0


def test_llamacpp_names_on_a_real_llama_server(tmp_path: Path) -> None:
    exe = find_engines(("llamacpp",))["llamacpp"]
    port = free_port()
    log = open(tmp_path / "llama.log", "wb")
    # One slot: a second request waits (deferred) while the first generates.
    proc = subprocess.Popen(
        [
            exe,
            "-m",
            str(OfflineModels.build().model.gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics",
            "-np",
            "1",
            "-c",
            "32768",
            "-t",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/health") == 200, timeout=120, message="llama-server healthy")
        table = RouteTable()
        feed(table, modelservice("m", "ns", engine="llamacpp"), endpointslice("m", [("127.0.0.1", True)], port, "ns"))
        ep = Endpoint("127.0.0.1", port)
        load = EngineLoad(table, CollectorRegistry(), interval=1.0, timeout=1.0)

        async def poll():
            async with aiohttp.ClientSession() as s:
                await load.poll(s)
            return load.get(ep)

        idle = asyncio.run(poll())
        assert idle is not None and (idle.running, idle.waiting, idle.kv_cache) == (0, 0, None)

        body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 100000, "ignore_eos": True}).encode()
        done = threading.Event()

        def generate() -> None:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(req, timeout=300).read()
            except OSError:
                pass
            done.set()

        threads = [threading.Thread(target=generate, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        busy = wait_for(
            lambda: (lambda x: x if x and x.running == 1 and x.waiting == 1 else None)(asyncio.run(poll())),
            timeout=120,
            message="llama-server reporting one processing and one deferred request",
        )
        assert busy.running == 1 and busy.waiting == 1
    finally:
        proc.kill()
        proc.wait(30)
        log.close()


def test_vllm_names_are_in_the_installed_vllm() -> None:
    python = Path(find_engines(("vllm",))["vllm"])
    out = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('vllm').submodule_search_locations[0])"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    root = Path(out.stdout.strip())
    assert root.is_dir(), out.stderr[-2000:]
    source = "".join(p.read_text(errors="replace") for p in (root / "v1" / "metrics").rglob("*.py"))
    names = NAMES[Engine.vllm]
    for name in (names.running, names.waiting, names.kv_cache):
        assert f'"{name}"' in source, name
