"""The node agent's process runtime without a cluster: what a rendered pod becomes as a host process (native.py),
and a kubelet's container lifecycle around it (container.py), driven with small Python processes as "engines"."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import pytest

from modelservice.api import validate_spec
from modelservice.render import Context, render
from tests.cluster import native
from tests.cluster.container import Clock, ProcessContainer, backoff_delay, termination_message
from tests.cluster.native import Launch, LaunchError, engine_for_image, launch_for

pytestmark = pytest.mark.unit


def rendered_container(spec: dict) -> dict:
    ctx = Context(name="m", namespace="ns", uid="u", labels={}, replicas=1)
    return render(ctx, validate_spec(spec, gateway_enabled=True))["Deployment"]["spec"]["template"]["spec"][
        "containers"
    ][0]


def test_engine_images_are_recognised_by_repository_whatever_the_tag():
    assert engine_for_image("vllm/vllm-openai:v0.32.0").name == "vllm"
    assert engine_for_image("docker.io/vllm/vllm-openai@sha256:abc").name == "vllm"
    assert engine_for_image("ghcr.io/ggml-org/llama.cpp:server-cuda-b10434").name == "llamacpp"
    assert engine_for_image("localhost:5000/ghcr.io/ggml-org/llama.cpp:x") is None
    assert engine_for_image("lmsysorg/sglang:v0.5.3-cu129") is None


def test_a_rendered_vllm_pod_runs_unchanged_but_for_the_listed_translations(tmp_path):
    c = rendered_container(
        {"engine": "vllm", "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "args": ["--enforce-eager"]}
    )
    mounts = native.volume_dirs(tmp_path / "pod", {}, c)
    env = {e["name"]: e["value"] for e in c["env"]}
    launch = launch_for(
        engine_for_image(c["image"]),
        c,
        env,
        pod_ip="127.0.3.4",
        executable="/venv/bin/python",
        mounts=mounts,
        base_env={},
    )
    cache = mounts["/cache"]
    assert launch.argv == [
        "/venv/bin/python",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "--served-model-name",
        "m",
        "--host",
        "127.0.3.4",
        "--port",
        "8000",
        "--enforce-eager",
    ]
    assert launch.env["HF_HOME"] == f"{cache}/huggingface" and launch.env["HOME"] == mounts["/tmp"]
    assert launch.env["HF_HUB_OFFLINE"] == "1"
    assert launch.env["VLLM_HOST_IP"] == launch.env["VLLM_LOOPBACK_IP"] == "127.0.3.4"
    assert launch.model == "Qwen/Qwen2.5-0.5B-Instruct" and launch.cache_dir == f"{cache}/huggingface"
    assert launch.cwd == mounts["/tmp"] and Path(cache).is_dir()
    assert any("bind address" in t for t in launch.translations)


def test_a_rendered_llamacpp_pod_keeps_its_hub_reference_and_goes_offline(tmp_path):
    c = rendered_container({"engine": "llamacpp", "model": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"}})
    mounts = native.volume_dirs(tmp_path / "pod", {}, c)
    env = {e["name"]: e["value"] for e in c["env"]}
    launch = launch_for(
        engine_for_image(c["image"]),
        c,
        env,
        pod_ip="127.0.3.5",
        executable="/bin/llama-server",
        mounts=mounts,
        base_env={},
    )
    assert launch.argv[:3] == ["/bin/llama-server", "-hf", "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"]
    assert launch.argv[launch.argv.index("--host") + 1] == "127.0.3.5"
    assert launch.env["LLAMA_ARG_OFFLINE"] == "1"
    assert launch.env["LLAMA_CACHE"] == f"{mounts['/cache']}/llama.cpp" == launch.cache_dir
    assert launch.model == "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"


def test_paths_flags_and_hand_written_pods(tmp_path):
    engine = engine_for_image("vllm/vllm-openai:v1")
    mounts = {"/mnt/models": str(tmp_path / "models"), "/tmp": str(tmp_path / "tmp")}
    c = {
        "name": "c",
        "image": "vllm/vllm-openai:v1",
        "args": ["Org/M", "--download-dir=/mnt/models/x", "--host=0.0.0.0"],
    }
    launch = launch_for(
        engine,
        c,
        {"ADDR": "0.0.0.0:8000", "NOT_AN_ADDR": "10.0.0.0"},
        pod_ip="127.0.0.9",
        executable="/py",
        mounts=mounts,
        base_env={},
    )
    # No command: the image's `vllm serve MODEL` becomes the module entrypoint with --model (the CPU wheel's script
    # cannot start).
    assert launch.argv == [
        "/py",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "Org/M",
        f"--download-dir={tmp_path}/models/x",
        "--host=127.0.0.9",
    ]
    assert launch.env["ADDR"] == "127.0.0.9:8000" and launch.env["NOT_AN_ADDR"] == "10.0.0.0"
    with pytest.raises(LaunchError) as e:
        launch_for(
            engine, {**c, "command": ["bash", "-c", "x"]}, {}, pod_ip="127.0.0.9", executable="/py", mounts=mounts
        )
    assert e.value.reason == "CreateContainerError" and "bash" in str(e.value)


def test_backoff_and_termination_message(tmp_path):
    assert [backoff_delay(n) for n in range(1, 9)] == [0, 10, 20, 40, 80, 160, 300, 300]
    log = tmp_path / "0.log"
    log.write_text("".join(f"line {i}\n" for i in range(200)))
    msg = termination_message(log)
    assert msg.endswith("line 199") and msg.count("\n") == 79  # the kubelet's last 80 lines
    log.write_text("x" * 5000)
    assert len(termination_message(log)) == 2048


class FakeClock(Clock):
    """Sleeps of the backoff are recorded and skipped; probe periods are real but short in these tests."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        if seconds >= 10:  # a crash-loop backoff: recorded, not waited for
            self.slept.append(seconds)
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(seconds)


SERVER = """
import http.server, sys, time
time.sleep(float(sys.argv[2]))  # "loading the model"
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _container(port: int, path: str = "/health", threshold: int = 30) -> dict:
    probe = {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": 1,
        "failureThreshold": threshold,
        "timeoutSeconds": 1,
    }
    return {
        "name": "server",
        "ports": [{"name": "http", "containerPort": port}],
        "startupProbe": probe,
        "readinessProbe": {**probe, "failureThreshold": 3},
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


async def _until(predicate, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_startup_then_readiness_from_the_engines_own_health(tmp_path):
    port = _free_port()
    changes: list[tuple[bool, bool]] = []
    launch = Launch([sys.executable, "-c", SERVER, str(port), "0.3"], {}, str(tmp_path))
    async with aiohttp.ClientSession() as http:
        pc = ProcessContainer(
            "server",
            "img",
            _container(port),
            launch,
            "127.0.0.1",
            tmp_path / "logs",
            grace=2,
            http=http,
            start_file=tmp_path / "start.json",
        )

        async def on_change() -> None:
            changes.append((pc.state.started, pc.state.ready))

        pc.on_change = on_change
        task = asyncio.ensure_future(pc.run())
        await _until(lambda: pc.state.ready, "ready")
        await _until(lambda: (tmp_path / "start.json").exists(), "the engine-start measurement")
        status = pc.state.to_status("native://x")
        await pc.stop()
        await asyncio.wait_for(task, 10)
    assert changes[0] == (False, False) and changes[-1] == (True, True)  # started, then ready
    assert status["ready"] and status["started"] and "running" in status["state"]
    measured = json.loads((tmp_path / "start.json").read_text())
    assert 0.3 <= measured["engine_start_seconds"] < 10


async def _run_until(tmp_path, container: dict, argv: list[str], until, what: str, clock: Clock):
    """Run one ProcessContainer until `until(pc)`, then stop it; returns (statuses reported, Events emitted)."""
    statuses: list[dict] = []
    events: list[tuple[str, ...]] = []
    async with aiohttp.ClientSession() as http:
        pc = ProcessContainer(
            "server",
            "img",
            container,
            Launch(argv, {}, str(tmp_path)),
            "127.0.0.1",
            tmp_path / "logs",
            grace=2,
            http=http,
            clock=clock,
        )

        async def on_change() -> None:
            statuses.append(pc.state.to_status("native://x"))

        async def on_event(*event: str) -> None:
            events.append(event)

        pc.on_change, pc.on_event = on_change, on_event
        task = asyncio.ensure_future(pc.run())
        await _until(lambda: until(pc), what)
        await pc.stop()
        await asyncio.wait_for(task, 10)
    return statuses, events


async def test_an_engine_that_exits_crash_loops_with_its_last_words(tmp_path):
    clock = FakeClock()
    script = "import sys; print('loading', flush=True); print('error: invalid argument: --nope', file=sys.stderr); sys.exit(3)"
    statuses, events = await _run_until(
        tmp_path,
        _container(_free_port()),
        [sys.executable, "-c", script],
        lambda pc: pc.state.restart_count >= 4,
        "four restarts",
        clock,
    )
    assert clock.slept[:3] == [10, 20, 40]  # first restart immediate, then the kubelet's backoff
    looping = [s for s in statuses if s["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"]
    assert looping and "back-off 10s" in looping[0]["state"]["waiting"]["message"]
    assert ("Warning", "BackOff") in {e[:2] for e in events}
    term = looping[-1]["lastState"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert term["message"].endswith("error: invalid argument: --nope") and "loading" in term["message"]
    assert len(sorted((tmp_path / "logs").glob("*.log"))) >= 4  # one log per restart, as `kubectl logs -p` has


async def test_a_startup_probe_that_never_passes_kills_and_restarts_the_engine(tmp_path):
    port = _free_port()
    seen, events = await _run_until(
        tmp_path,
        _container(port, path="/never", threshold=2),
        [sys.executable, "-c", SERVER, str(port), "0"],
        lambda pc: pc.state.restart_count >= 1,
        "a restart after the startup probe gave up",
        FakeClock(),
    )
    term = next(s["lastState"]["terminated"] for s in seen if s["lastState"])
    assert term["exitCode"] in (143, 137) and term["reason"] == "Error"  # SIGTERM (or SIGKILL after the grace)
    assert not any(s["ready"] for s in seen)
    # The kubelet's Events on the pod (kubectl describe pod): why it was killed.
    assert ("Warning", "Unhealthy") == events[0][:2] and "statuscode: 404" in events[0][2]
    assert events[1][:2] == ("Normal", "Killing") and "failed startup probe" in events[1][2]


async def test_the_kubelet_log_endpoint_serves_current_previous_and_tail(tmp_path):
    """What `kubectl logs [-p] [--tail N]` asks the node for, through the API server."""
    from aiohttp.test_utils import TestClient, TestServer

    from tests.cluster import kubelet_api

    (tmp_path / "0.log").write_text("first run\ncrashed\n")
    (tmp_path / "1.log").write_text("second run\nline 2\nline 3\n")
    logs = {("ns", "p", "server"): [tmp_path / "0.log", tmp_path / "1.log"], ("ns", "stub", "server"): []}

    async with TestClient(TestServer(kubelet_api.make_app(lambda *k: logs.get(k)))) as client:

        async def get(path):
            r = await client.get(path)
            return r.status, await r.text()

        assert await get("/containerLogs/ns/p/server") == (200, "second run\nline 2\nline 3\n")
        assert await get("/containerLogs/ns/p/server?previous=true") == (200, "first run\ncrashed\n")
        assert await get("/containerLogs/ns/p/server?tailLines=1") == (200, "line 3\n")
        assert await get("/containerLogs/ns/stub/server") == (200, "")
        assert (await get("/containerLogs/ns/stub/server?previous=true"))[0] == 400
        assert (await get("/containerLogs/ns/nope/server"))[0] == 404


def test_a_claim_bound_to_a_host_directory_is_mounted_there_and_is_the_engines_cwd(tmp_path):
    """spec.lora's claim (docs/lora.md): the engine resolves adapter paths against its working directory, the
    claim's mount; the fake node mounts a claim bound to a hostPath PV at that host directory, as a kubelet does."""
    store = tmp_path / "adapter-volume"
    store.mkdir()
    c = {
        "image": "vllm/vllm-openai:v0.32.0",
        "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "args": ["--model", "org/m", "--port", "8000"],
        "workingDir": "/mnt/adapters",
        "volumeMounts": [
            {"name": "adapters", "mountPath": "/mnt/adapters", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    mounts = native.volume_dirs(tmp_path / "pod", {}, c, {"adapters": str(store)})
    assert mounts == {"/mnt/adapters": str(store), "/tmp": str(tmp_path / "pod" / "volumes" / "tmp")}
    launch = native.launch_for(
        native.NATIVE_ENGINES[0], c, {}, pod_ip="127.0.0.9", executable="/x/python", mounts=mounts
    )
    assert launch.cwd == str(store)
