"""LoRA adapters on the real vLLM CPU build: what the product (issue #15) relies on, checked on the engine itself.

One vLLM process serves the tiny Llama (tests/cluster/tiny_model.py) with adapter support, started directly on the
loopback (no cluster: this is the engine's own contract, which the gateway and operator will build on). Adapters are
generated from seeds (tests/cluster/tiny_lora.py). docs/lora.md records what was seen and the design built on it.

The tests share the process and run in file order; the last one kills it on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Iterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.cluster import tiny_lora
from tests.cluster.controlplane import find_engines, free_port
from tests.cluster.models_offline import OfflineModels
from tests.cluster.wait import wait_for

VLLM_LOAD = 600  # seconds: ~30-75 s on a quiet machine, ~3-6.5 min seen beside four other agents
MAX_LORAS, MAX_RANK = 2, 8
BASE = "tiny"
PROMPT = "The quick brown fox"
MANY = 120  # tokens per request in the concurrent tests: many decoding steps, so batches overlap for long
# Adapter directories by the name the test serves them under; seeds make them differ.
GOOD = {"static-a": 1, "runtime-b": 2, "runtime-c": 3, "runtime-d": 4}

pytestmark = pytest.mark.timeout(VLLM_LOAD + 300)


@dataclass
class Engine:
    url: str
    proc: subprocess.Popen
    log: Path
    adapters: Path  # where the adapter directories lie, as a model cache would hold them

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def start(vllm_python: str, model_dir: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    env = {
        **os.environ,
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_LOOPBACK_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        "HF_HUB_OFFLINE": "1",
        # Adds /v1/load_lora_adapter and /v1/unload_lora_adapter (and SageMaker's /adapters): the engine API the
        # product loads adapters through at run time. The gateway must never expose them to clients.
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        # Adds /pause and /resume: the concurrent tests hold the scheduler until every stream has reached the engine,
        # so "sent together" means "scheduled together" however late a busy machine delivers one of them.
        "VLLM_SERVER_DEV_MODE": "1",
    }
    cmd = [
        vllm_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        BASE,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "4",
        "--enable-lora",
        "--max-loras",
        str(MAX_LORAS),
        "--max-lora-rank",
        str(MAX_RANK),
        # Logs "Added request <id>." once a request is sent to the engine core: the concurrent tests resume the
        # paused scheduler only after every stream's line is there (see _concurrent_streams).
        "--enable-log-requests",
        *extra,
    ]
    with log.open("wb") as out:
        # Its own session, so that teardown ends the API server, its engine core and worker together.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # children left behind by a dead API server
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def http(engine: Engine, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        engine.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def complete(engine: Engine, model: str, max_tokens: int = 16) -> tuple[int, object]:
    status, body = http(
        engine,
        "POST",
        "/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0},
    )
    return status, (body["choices"][0]["text"] if status == 200 else body)


def text(engine: Engine, model: str, max_tokens: int = 16) -> str:
    status, out = complete(engine, model, max_tokens)
    assert status == 200, (model, status, out)
    assert out, model
    return out


def load(engine: Engine, name: str, path: Path) -> tuple[int, object]:
    return http(engine, "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})


def unload(engine: Engine, name: str) -> tuple[int, object]:
    return http(engine, "POST", "/v1/unload_lora_adapter", {"lora_name": name})


def models(engine: Engine) -> dict[str, str | None]:
    status, body = http(engine, "GET", "/v1/models")
    assert status == 200, body
    return {m["id"]: m["parent"] for m in body["data"]}


def assert_openai_error(body: object, status: int, err_type: str, *words: str) -> str:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert (error["code"], error["type"]) == (status, err_type), error
    for w in words:
        assert w in error["message"], (w, error)
    return error["message"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    vllm_python = find_engines(("vllm",))["vllm"]
    base_dir = OfflineModels.build().model.dir  # the tiny Llama the cluster's vLLM pods serve
    root = tmp_path_factory.mktemp("lora")
    adapters = root / "adapters"
    for name, seed in GOOD.items():
        tiny_lora.build(adapters / name, base_dir, seed=seed, rank=MAX_RANK)
    tiny_lora.build(adapters / "rank-16", base_dir, seed=5, rank=2 * MAX_RANK)
    tiny_lora.build(adapters / "no-such-module", base_dir, seed=6, targets=("qkv_fused",))
    tiny_lora.build(adapters / "all-linear", base_dir, seed=7, rank=4, targets=tiny_lora.ATTENTION + tiny_lora.MLP)
    port, log = free_port(), root / "vllm.log"
    # One adapter given at start (--lora-modules: preloaded, a change needs a restart), the others at run time.
    proc = start(vllm_python, base_dir, port, log, ["--lora-modules", f"static-a={adapters / 'static-a'}"])
    eng = Engine(f"http://127.0.0.1:{port}", proc, log, adapters)
    try:
        wait_for(
            lambda: _healthy(eng),
            timeout=VLLM_LOAD,
            interval=2,
            message="vLLM with --enable-lora to serve",
            fatal=(EngineExited,),
        )
        yield eng
    finally:
        stop(proc)


class EngineExited(AssertionError):
    pass


def _healthy(engine: Engine) -> bool:
    if not engine.alive():
        raise EngineExited(f"vLLM exited with code {engine.proc.returncode}:\n{engine.log_tail()}")
    try:
        with urllib.request.urlopen(engine.url + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture
def live(engine: Engine) -> Engine:
    assert engine.alive(), f"vLLM is gone:\n{engine.log_tail()}"
    return engine


def test_adapters_given_at_start_and_loaded_at_run_time_answer_differently(live: Engine) -> None:
    assert models(live) == {BASE: None, "static-a": BASE}
    status, body = load(live, "runtime-b", live.adapters / "runtime-b")
    assert status == 200 and "runtime-b" in body, body
    # Listed at once, as a child of the base (the gateway can read a replica's loaded set here).
    assert models(live) == {BASE: None, "static-a": BASE, "runtime-b": BASE}
    base, a, b = text(live, BASE), text(live, "static-a"), text(live, "runtime-b")
    # The adapter is really applied: greedy decoding of one prompt differs from the base's and between adapters ...
    assert len({base, a, b}) == 3, (base, a, b)
    # ... and is the same answer every time (what the product's tests compare against).
    assert (text(live, BASE), text(live, "static-a"), text(live, "runtime-b")) == (base, a, b)
    # The OpenAI `model` of the answer is the adapter's name.
    status, body = http(
        live,
        "POST",
        "/v1/chat/completions",
        {"model": "runtime-b", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert status == 200 and body["model"] == "runtime-b", body


def test_an_adapter_covering_every_linear_layer_loads_and_serves(live: Engine) -> None:
    status, body = load(live, "all-linear", live.adapters / "all-linear")
    assert status == 200, body
    assert text(live, "all-linear") != text(live, BASE)


def test_unloaded_it_answers_404_in_openai_shape(live: Engine) -> None:
    assert load(live, "runtime-c", live.adapters / "runtime-c")[0] == 200
    text(live, "runtime-c")
    status, body = unload(live, "runtime-c")
    assert status == 200 and "runtime-c" in body, body
    assert "runtime-c" not in models(live)
    for path, payload in [
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        status, body = http(live, "POST", path, {"model": "runtime-c", "max_tokens": 4, **payload})
        assert status == 404, body
        assert_openai_error(body, 404, "NotFoundError", "The model `runtime-c` does not exist")
    status, body = unload(live, "runtime-c")
    assert_openai_error(body, 404, "NotFoundError", "'runtime-c' cannot be found")
    assert status == 404
    # Loaded again under the same name, it serves the same answer: a replica that lost it can take it back.
    assert load(live, "runtime-c", live.adapters / "runtime-c")[0] == 200
    assert text(live, "runtime-c") == text(live, "runtime-c")


def test_names_that_are_taken_are_refused_with_400(live: Engine) -> None:
    status, body = load(live, "runtime-b", live.adapters / "runtime-d")
    assert status == 400
    assert_openai_error(body, 400, "InvalidUserInput", "'runtime-b' has already been loaded")
    status, body = load(live, BASE, live.adapters / "runtime-d")
    assert status == 400
    assert_openai_error(body, 400, "InvalidUserInput", f"'{BASE}' conflicts with a served base model")


def test_bad_adapters_are_refused_with_the_engine_reason_and_the_rest_keep_serving(live: Engine) -> None:
    before = {m: text(live, m) for m in (BASE, "static-a", "runtime-b")}
    # vLLM reports a bad adapter as a 500 (its worker raised), with the reason in the message.
    status, body = load(live, "rank-16", live.adapters / "rank-16")
    assert status == 500
    assert_openai_error(body, 500, "InternalServerError", f"LoRA rank 16 is greater than max_lora_rank {MAX_RANK}")
    status, body = load(live, "no-such-module", live.adapters / "no-such-module")
    assert status == 500
    message = assert_openai_error(
        body, 500, "InternalServerError", "expected target modules", "model.layers.0.self_attn.qkv_fused"
    )
    assert str(live.adapters) not in message  # vLLM writes <path> for the directory
    # A path with no adapter is a 404, like an unknown model (the product must tell the two apart by the route).
    status, body = load(live, "missing", live.adapters / "not-there")
    assert status == 404
    assert_openai_error(body, 404, "NotFoundError", "Loading lora missing failed: No adapter found for")
    # None of them is registered; the base and the adapters loaded before answer as before.
    assert not {"rank-16", "no-such-module", "missing"} & set(models(live))
    assert {m: text(live, m) for m in before} == before
    status, body = complete(live, "rank-16")
    assert status == 404, body


def test_more_adapters_at_once_than_max_loras_wait_their_turn(live: Engine) -> None:
    """--max-loras bounds the adapters in one batch, not the adapters registered: with more registered, a request
    for another one waits (vLLM defers it) until a running adapter's requests finish; nothing fails, and each answer
    is the one that adapter gives alone (no weights mixed up while swapping)."""
    registered = set(models(live))
    if "runtime-d" not in registered:
        assert load(live, "runtime-d", live.adapters / "runtime-d")[0] == 200
    names = ["static-a", "runtime-b", "runtime-d"]  # MAX_LORAS + 1 adapters, all registered
    assert len(names) == MAX_LORAS + 1
    alone = {n: text(live, n, max_tokens=8) for n in names}
    runs = asyncio.run(_concurrent_streams(live, names, max_tokens=MANY))
    for n in names:
        assert runs.texts[n].startswith(alone[n]), (n, runs.texts[n], alone[n])
    # At most MAX_LORAS adapters decode together: the three were in the engine when it resumed, yet one of them ran
    # on its own once the other two had finished (~MANY steps of one token). Were all three running, no step would.
    assert runs.lone_steps >= MANY // 2, runs.lone_steps
    info = _lora_info(live)
    assert info and all(labels["max_lora"] == str(MAX_LORAS) for labels in info), info


@dataclass
class Streams:
    texts: dict[str, str]
    lone_steps: int  # engine steps that computed one token at most (a request decoding on its own) while they ran


async def _stream(
    session: aiohttp.ClientSession, engine: Engine, name: str, max_tokens: int
) -> AsyncIterator[tuple[str, int]]:
    """A streamed completion of PROMPT (greedy, exactly max_tokens): after each chunk, the text so far and the
    completion tokens the engine counted so far."""
    body = {
        "model": name,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    out, used = "", 0
    async with session.post(engine.url + "/v1/completions", json=body) as r:
        assert r.status == 200, (name, await r.text())
        async for line in r.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            used = (chunk.get("usage") or {}).get("completion_tokens", used)
            out += "".join(c["text"] for c in chunk.get("choices") or [])
            yield out, used


async def _concurrent_streams(engine: Engine, names: list[str], max_tokens: int) -> Streams:
    """Streams for `names`, sent together while the engine's scheduler is paused (mode "keep": requests queue, nothing
    is scheduled) and resumed once every one of them is in the engine core, so that they are scheduled together
    however late a busy machine gets each one there.

    "In the engine core" is read from the API server's log, not from the response headers: vLLM sends a stream's 200
    before it adds the request (the add runs when the response body is first read). The "Added request" line is
    logged after the add is sent on the socket /resume later goes through, so the engine core takes the adds first.

    How they ran is the engine's word, not the client's: the steps of one token at most in vLLM's tokens-per-step
    histogram. A starved client cannot tell: it reads one stream's buffered chunks without yielding to the others
    (seen under a CPU hog: three streams that ran in one batch looked as if they had run one after another)."""
    log_from = engine.log.stat().st_size
    lone_before = _lone_steps(engine)

    async def one(session: aiohttp.ClientSession, name: str) -> str:
        out, used = "", 0
        async for so_far in _stream(session, engine, name, max_tokens):
            out, used = so_far
        assert used == max_tokens, (name, used)
        return out

    def all_added() -> bool:
        with engine.log.open("rb") as f:
            f.seek(log_from)
            return f.read().count(b"Added request ") >= len(names)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=VLLM_LOAD)) as s:
        async with s.post(engine.url + "/pause", params={"mode": "keep"}) as r:
            assert r.status == 200, await r.text()
        tasks = [asyncio.create_task(one(s, n)) for n in names]
        try:
            deadline = asyncio.get_running_loop().time() + VLLM_LOAD
            while not all_added():
                failed = [t for t in tasks if t.done()]  # a stream refused: no waiting for the others
                if failed:
                    await failed[0]
                assert asyncio.get_running_loop().time() < deadline, f"not all added:\n{engine.log_tail()}"
                await asyncio.sleep(0.05)
        finally:
            async with s.post(engine.url + "/resume") as r:
                assert r.status == 200, await r.text()
        texts = dict(zip(names, await asyncio.gather(*tasks)))
    return Streams(texts, _lone_steps(engine) - lone_before)


def _lone_steps(engine: Engine) -> int:
    """vllm:iteration_tokens_total's lowest bucket (le=1): engine steps that computed one token at most."""
    buckets = _samples(engine, "vllm:iteration_tokens_total_bucket")
    return int(sum(s.value for s in buckets if float(s.labels["le"]) == 1))


def _samples(engine: Engine, name: str) -> list[Sample]:
    """The engine's /metrics samples named `name`."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=30) as r:
        families = list(text_string_to_metric_families(r.read().decode()))
    return [s for f in families for s in f.samples if s.name == name]


def test_a_new_version_replaces_an_adapter_in_place_under_its_name(live: Engine) -> None:
    """How the product moves an adapter to a new version (a new directory: files are never changed in place): load
    with load_inplace under the same name. No unload, so no moment when the name answers 404."""
    assert load(live, "versioned", live.adapters / "runtime-b")[0] == 200
    assert text(live, "versioned") == text(live, "runtime-b")
    status, body = http(
        live,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "versioned", "lora_path": str(live.adapters / "runtime-d"), "load_inplace": True},
    )
    assert status == 200, body
    assert text(live, "versioned") == text(live, "runtime-d")
    assert models(live)["versioned"] == BASE


def test_an_adapter_unloaded_mid_stream_finishes_that_stream(live: Engine) -> None:
    """Unload forgets the name for new requests; a request already running keeps its adapter to the end (so the
    gateway may unload an adapter without waiting for its streams, and the answer is still that adapter's)."""
    assert load(live, "leaving", live.adapters / "runtime-c")[0] == 200
    alone = text(live, "leaving", max_tokens=8)

    async def stream_then_unload() -> tuple[str, int, tuple[int, object]]:
        out, used, unloaded = "", 0, None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=VLLM_LOAD)) as s:
            async for so_far in _stream(s, live, "leaving", MANY):
                out, used = so_far
                if unloaded is None and out:  # the stream is open: unload its adapter now
                    unloaded = await asyncio.to_thread(unload, live, "leaving")
        return out, used, unloaded

    out, used, unloaded = asyncio.run(stream_then_unload())
    assert unloaded is not None and unloaded[0] == 200, unloaded
    assert used == MANY and out.startswith(alone), (used, out, alone)
    status, body = complete(live, "leaving")
    assert status == 404, body


def test_base_requests_batched_with_adapters_get_an_adapter_applied_on_the_cpu_build(live: Engine) -> None:
    """A vLLM CPU bug the product must know of (docs/lora.md): the CPU build's LoRA ops (torch_ops/lora_ops.py) gather
    the adapter slot of every token with `weights[index]`, and a base-model token's index is -1, which Python reads
    as the last slot. A base request decoded in one batch with adapter requests gets that adapter's delta: wrong text,
    no error. GPU kernels skip -1. Upstream: vllm-project/vllm PRs #48421 and #49656 (open). When a vLLM upgrade fixes
    it, this test fails: then assert the opposite (the base answers as alone) and drop the warning in docs/lora.md."""
    names = ["static-a", "runtime-b"]  # MAX_LORAS adapters: both slots hold an active adapter, so slot -1 is one
    alone = text(live, BASE, max_tokens=MANY)
    runs = asyncio.run(_concurrent_streams(live, [BASE, *names], max_tokens=MANY))
    assert runs.lone_steps == 0, f"they did not run in one batch: {runs.lone_steps} steps decoded one request alone"
    assert runs.texts[BASE] != alone, "the CPU build no longer applies an adapter to base requests: see the docstring"
    for n in names:  # the adapters' own requests are right
        assert runs.texts[n].startswith(text(live, n, max_tokens=8)), n


def _lora_info(engine: Engine) -> list[dict[str, str]]:
    """vllm:lora_requests_info: a gauge whose labels name adapters with requests in flight (in 0.32 its "running"
    and "waiting" labels both list every adapter with any request) and max_lora; no list of loaded adapters."""
    return [s.labels for s in _samples(engine, "vllm:lora_requests_info")]


def test_an_adapter_whose_files_vanish_kills_the_engine_when_it_is_reloaded(live: Engine) -> None:
    """The hazard the product must design around (docs/lora.md): vLLM keeps --max-loras adapters in its worker's
    cache (max_cpu_loras defaults to max_loras) and reads an evicted one again from its path when a request names it.
    If the files are gone by then, the engine core dies and the whole server exits: adapter files must stay, unchanged,
    for as long as any replica has the adapter registered. Runs last: it ends the shared engine."""
    doomed = live.adapters / "doomed"
    shutil.copytree(live.adapters / "runtime-d", doomed)
    assert load(live, "doomed", doomed)[0] == 200
    text(live, "doomed")
    shutil.rmtree(doomed)
    for other in ("static-a", "runtime-b"):  # MAX_LORAS other adapters push it out of the worker's cache
        text(live, other)
    status, body = complete(live, "doomed")
    assert status == 500, body
    assert_openai_error(body, 500, "InternalServerError", "EngineCore encountered an issue")
    live.proc.wait(timeout=120)
    assert "No adapter found for" in live.log_tail(200_000) and "EngineDeadError" in live.log_tail(200_000)
