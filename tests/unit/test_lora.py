"""LoRA adapters, the pure parts: the API's refusals, the rendered engine flags (and that adapters never touch the pod
template), name collisions, a replica's LRU set, one load per replica however many requests ask, status hand-over.
The engine side runs on a real vLLM: tests/integration/test_vllm_lora.py and test_lora_cluster.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from modelservice.api import InvalidSpec, validate_spec
from modelservice.gateway.adapters import Adapters, AdapterUse, Residency, engine_message, name_conflicts, prefer_loaded
from modelservice.gateway.errors import GatewayError
from modelservice.gateway.routes import AdapterRef, Endpoint, model_entry
from modelservice.gateway.upstream import NotSent
from modelservice.render import Context, render
from modelservice.status import ADAPTERS_ANNOTATION, Observed, adapters_from_leases, compute_status

LORA = {"maxLoaded": 2, "maxRank": 8, "claim": "adapters"}


def spec(**extra):
    return {"engine": "vllm", "model": {"uri": "hf://org/base"}, "lora": LORA, **extra}


def adapters(*names):
    return [{"name": n, "uri": f"pvc://adapters/{n}/v1"} for n in names]


def ms(name, created="2026-01-01T00:00:00Z", served=None, adapter_names=(), ns="ns"):
    body = spec(adapters=adapters(*adapter_names))
    if served:
        body["model"]["servedName"] = served
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": created,
        },
        "spec": body,
    }


# -- API -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, problem",
    [
        (spec(adapters=adapters("a", "a")), "declared twice"),
        (spec(adapters=[{"name": "ns/a", "uri": "pvc://adapters/a"}]), "spec.adapters[0].name"),
        (spec(adapters=[{"name": "a", "uri": "hf://org/adapter"}]), "spec.adapters[0].uri"),
        (spec(adapters=[{"name": "a", "uri": "pvc://other/a"}]), "claim 'other' is not mounted"),
        ({**spec(adapters=adapters("a")), "model": {"uri": "hf://org/base", "servedName": "a"}}, "base model's served"),
        ({**spec(), "lora": {**LORA, "maxRank": 12}}, "not a rank vLLM accepts"),
        ({"engine": "vllm", "model": {"uri": "hf://org/base"}, "adapters": adapters("a")}, "adapters need spec.lora"),
        (
            {"engine": "llamacpp", "model": {"uri": "hf://org/b-GGUF:Q4"}, "lora": LORA},
            "engine vllm only, not llamacpp",
        ),
    ],
)
def test_the_api_refuses_bad_adapters_with_the_field_and_the_fix(raw, problem):
    with pytest.raises(InvalidSpec) as e:
        validate_spec(raw, gateway_enabled=True)
    assert problem in str(e.value), e.value


def test_adapters_need_the_gateway():
    with pytest.raises(InvalidSpec, match="gateway.enabled=true"):
        validate_spec(spec(adapters=adapters("a")), gateway_enabled=False)


# -- render ----------------------------------------------------------------------------------------------------------
def _template(raw):
    ctx = Context(name="m", namespace="ns", uid="u", labels={}, replicas=1)
    return render(ctx, validate_spec(raw, gateway_enabled=True))["Deployment"]["spec"]["template"]


def test_vllm_starts_with_lora_flags_and_the_adapter_claim_as_its_working_directory():
    c = _template(spec())["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--enable-lora") :][:7] == [
        "--enable-lora",
        "--max-loras",
        "2",
        "--max-cpu-loras",
        "2",
        "--max-lora-rank",
        "8",
    ]
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in c["env"]
    assert {"name": "adapters", "mountPath": "/mnt/adapters", "readOnly": True} in c["volumeMounts"]
    assert c["workingDir"] == "/mnt/adapters"
    assert (
        "--enable-lora"
        not in _template({"engine": "vllm", "model": {"uri": "hf://org/base"}})["spec"]["containers"][0]["args"]
    )


def test_adding_or_removing_an_adapter_leaves_the_pod_template_unchanged():
    assert _template(spec()) == _template(spec(adapters=adapters("a", "b"))) == _template(spec(adapters=adapters("a")))


# -- names -----------------------------------------------------------------------------------------------------------
def test_a_served_name_wins_over_an_adapter_and_the_oldest_base_keeps_a_shared_adapter_name():
    entries = [
        model_entry(ms("old", "2026-01-01T00:00:00Z", adapter_names=("shared", "chat"))),
        model_entry(ms("new", "2026-02-01T00:00:00Z", adapter_names=("shared", "own", "new"))),
        model_entry(ms("chat", "2026-03-01T00:00:00Z")),
    ]
    routes, conflicts = name_conflicts(entries)
    assert {n: k for n, (k, _) in routes.items()} == {"shared": ("ns", "old"), "own": ("ns", "new")}
    assert "served name of model ns/chat" in conflicts[(("ns", "old"), "chat")]
    assert "already served by ns/old" in conflicts[(("ns", "new"), "shared")]
    assert "served name of model ns/new" in conflicts[(("ns", "new"), "new")]  # its own name (no servedName)
    assert routes["own"][1] == AdapterRef("own", "./own/v1")  # relative to the claim's mount, the engine's cwd


# -- a replica's set -------------------------------------------------------------------------------------------------
def test_the_least_recently_used_idle_adapter_goes_first_and_one_in_use_never():
    r = Residency(capacity=2)
    assert r.victim() is None
    r.loaded["a"], r.loaded["b"] = "a", "b"
    r.touch("a")
    assert r.victim() == "b"
    r.acquire("b")
    assert r.victim() == "a"
    r.acquire("a")
    with pytest.raises(LookupError):
        r.victim()
    r.release("b")
    assert r.victim() == "b"


class FakeEngine:
    """vLLM's adapter API as test_vllm_lora.py pins it; each load waits until the test lets it finish."""

    def __init__(self, refuse=None):
        self.calls: list[tuple[str, str]] = []
        self.registered: set[str] = set()
        self.gate = asyncio.Event()
        self.refuse = refuse or {}

    async def __call__(self, ep, path, doc):
        self.calls.append((path.rsplit("/", 1)[1].split("_")[0], doc["lora_name"]))
        if path.endswith("unload_lora_adapter"):
            self.registered.discard(doc["lora_name"])
            return 200, "Success"
        await self.gate.wait()
        if doc["lora_name"] in self.refuse:
            return 500, json.dumps({"error": {"message": self.refuse[doc["lora_name"]], "type": "InternalServerError"}})
        self.registered.add(doc["lora_name"])
        return 200, f"Success: LoRA adapter '{doc['lora_name']}' added successfully."


EP = Endpoint("10.0.0.1", 8000, "base-pod-1")


def _entry(*names):
    return model_entry(ms("base", adapter_names=names))


async def test_many_requests_for_one_adapter_make_one_load_and_all_wait_for_it():
    engine = FakeEngine()
    mgr = Adapters(engine)
    entry = _entry("a")
    use = AdapterUse(mgr, entry, entry.adapters[0])
    tasks = [asyncio.ensure_future(use.acquire(EP)) for _ in range(20)]
    await asyncio.sleep(0)
    assert not any(t.done() for t in tasks)  # held while the one load runs
    engine.gate.set()
    releases = await asyncio.gather(*tasks)
    assert engine.calls == [("load", "a")] and mgr.loads == 1
    for release in releases:
        release()
    assert mgr.report(entry.key, ["a"], {}) == {"a": {"loadedOn": ["base-pod-1"]}}


async def test_a_full_replica_unloads_its_lru_adapter_and_waits_while_all_are_in_use():
    engine = FakeEngine()
    engine.gate.set()
    counted: list[tuple[str, str]] = []
    mgr = Adapters(engine, wait_timeout=3600, count=lambda key, name, outcome: counted.append((name, outcome)))
    entry = _entry("a", "b", "c")
    a, b, c = (AdapterUse(mgr, entry, x) for x in entry.adapters)
    release_a = await a.acquire(EP)
    release_b = await b.acquire(EP)
    waiting = asyncio.ensure_future(c.acquire(EP))  # two slots, both in use: waits, no load, no thrash
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done() and engine.calls == [("load", "a"), ("load", "b")]
    release_a()
    release_c = await waiting
    assert engine.calls == [("load", "a"), ("load", "b"), ("unload", "a"), ("load", "c")]
    release_b(), release_c()
    assert mgr.has(EP, entry.adapters[2]) and not mgr.has(EP, entry.adapters[0])
    release = await b.acquire(EP)  # loaded: no call
    release()
    assert len(engine.calls) == 4
    # What modelservice_gateway_adapter_loads_total counts: one entry per engine call, with its outcome.
    assert counted == [("a", "loaded"), ("b", "loaded"), ("a", "evicted"), ("c", "loaded")]
    await asyncio.gather(*mgr.sync(entry.key, _entry("b"), [EP]))  # c removed from the spec
    assert counted[-1] == ("c", "unloaded")


async def test_all_slots_in_use_past_the_wait_is_a_429_with_the_reason():
    engine = FakeEngine()
    engine.gate.set()
    now = [0.0]
    mgr = Adapters(engine, wait_timeout=10, clock=lambda: now[0])
    entry = _entry("a", "b", "c")
    for x in entry.adapters[:2]:
        await mgr.acquire(entry, EP, x)
    now[0] = 11.0
    with pytest.raises(GatewayError) as e:
        await mgr.acquire(entry, EP, entry.adapters[2])
    assert e.value.status == 429 and e.value.code == "adapter_capacity_exceeded"
    assert "maxLoaded" in e.value.message


async def test_an_engine_refusal_reaches_every_waiter_and_the_status_and_a_later_success_clears_it():
    rank = "LoRA rank 16 is greater than max_lora_rank 8."
    engine = FakeEngine(refuse={"a": rank})
    counted: list[str] = []
    now = [0.0]
    mgr = Adapters(engine, clock=lambda: now[0], count=lambda key, name, outcome: counted.append(outcome))
    entry = _entry("a")
    tasks = [asyncio.ensure_future(mgr.acquire(entry, EP, entry.adapters[0])) for _ in range(3)]
    engine.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(
        isinstance(r, GatewayError) and r.code == "adapter_load_failed" and rank in r.message for r in results
    ), results
    assert engine.calls == [("load", "a")] and counted == ["failed"]
    assert mgr.report(entry.key, ["a"], {})["a"] == {"loadedOn": [], "error": f"base-pod-1: {rank}"}
    engine.refuse = {}
    now[0] = 1.0  # the back-off's first window is over
    (await mgr.acquire(entry, EP, entry.adapters[0]))()
    assert mgr.report(entry.key, ["a"], {})["a"] == {"loadedOn": ["base-pod-1"]}


async def test_a_refused_adapter_backs_off_doubling_per_replica_and_a_new_uri_or_a_success_resets_it():
    refusal = "No adapter found for ./a/v1"
    engine = FakeEngine(refuse={"a": refusal})
    engine.gate.set()
    now = [100.0]
    mgr = Adapters(engine, clock=lambda: now[0])
    entry = _entry("a")
    a = entry.adapters[0]
    other = Endpoint("10.0.0.2", 8000, "base-pod-2")

    async def refused_with(ep=EP):
        with pytest.raises(GatewayError) as e:
            (await mgr.acquire(entry, ep, a))()
        assert e.value.status == 503 and e.value.code == "adapter_load_failed" and refusal in e.value.message
        return e.value

    first = await refused_with()
    assert first.retry_after == 1 and "backing off" not in first.message
    # Within the window: the same error at once, saying so and when the next try is; the engine is not called.
    now[0] = 100.9
    held = await refused_with()
    assert "backing off after 1 failed load(s) on replica base-pod-1" in held.message
    assert "next try is in 0.1 s" in held.message and held.retry_after == 1
    assert engine.calls == [("load", "a")]
    # Per replica: another replica tries at once.
    await refused_with(other)
    assert len(engine.calls) == 2
    # The window ends: one try, refused again, and the window doubles: 2 s, 4 s, ... up to 60 s.
    windows = []
    for _ in range(8):
        now[0] = mgr._failures[(EP, "a")].retry_at
        calls = len(engine.calls)
        err = await refused_with()
        assert len(engine.calls) == calls + 1
        windows.append(err.retry_after)
        now[0] += 0.5
        assert "next try is in" in (await refused_with()).message and len(engine.calls) == calls + 1
    assert windows == [2, 4, 8, 16, 32, 60, 60, 60]
    # A new uri (a spec change) is tried at once, back-off starting over.
    raw = ms("base", adapter_names=("a",))
    raw["spec"]["adapters"][0]["uri"] = "pvc://adapters/a/v2"
    moved = model_entry(raw)
    mgr.sync(moved.key, moved, [EP, other])
    calls = len(engine.calls)
    with pytest.raises(GatewayError) as e:
        await mgr.acquire(moved, EP, moved.adapters[0])
    assert len(engine.calls) == calls + 1 and e.value.retry_after == 1
    # A success ends it: the next refusal starts from the first window again.
    now[0] += 1
    engine.refuse = {}
    (await mgr.acquire(moved, EP, moved.adapters[0]))()
    assert (EP, "a") not in mgr._failures


async def test_an_unreachable_replica_is_not_sent_the_request():
    async def refused(ep, path, doc):
        raise NotSent("connection refused")

    counted: list[str] = []
    mgr = Adapters(refused, count=lambda key, name, outcome: counted.append(outcome))
    entry = _entry("a")
    with pytest.raises(NotSent):
        await mgr.acquire(entry, EP, entry.adapters[0])
    assert not mgr.has(EP, entry.adapters[0]) and counted == ["failed"]


async def test_removed_adapters_are_unloaded_and_a_replica_that_left_starts_empty():
    engine = FakeEngine()
    engine.gate.set()
    mgr = Adapters(engine)
    entry = _entry("a", "b")
    for x in entry.adapters:
        (await mgr.acquire(entry, EP, x))()
    await asyncio.gather(*mgr.sync(entry.key, _entry("b"), [EP]))
    assert engine.calls[-1] == ("unload", "a") and not mgr.has(EP, entry.adapters[0])
    mgr.sync(entry.key, _entry("b"), [])  # the pod went away (or restarted)
    assert not mgr.has(EP, entry.adapters[1]) and mgr.report(entry.key, ["b"], {}) == {"b": {"loadedOn": []}}
    use = AdapterUse(mgr, entry, entry.adapters[1])
    (await use.acquire(EP))()
    assert use.lost(EP, 404)  # the engine forgot it (restarted in place): load it again, replay once
    assert not mgr.has(EP, entry.adapters[1])
    (await use.acquire(EP))()
    assert not use.lost(EP, 200) and not use.lost(EP, 404)  # once per request: then the 404 is the answer


async def test_affinity_prefers_a_replica_with_the_adapter_loaded():
    engine = FakeEngine()
    engine.gate.set()
    mgr = Adapters(engine)
    entry = _entry("a")
    use = AdapterUse(mgr, entry, entry.adapters[0])
    other = Endpoint("10.0.0.2", 8000, "base-pod-2")
    assert use.candidates([EP, other], ()) == (EP, other)
    (await use.acquire(other))()
    assert use.candidates([EP, other], ()) == (other,)
    assert use.candidates([EP, other], {other}) == (EP, other)  # tried: any replica, the balancer excludes it


def test_affinity_spills_to_another_replica_when_the_loaded_one_is_over_the_load_bound():
    """Issue #15: the replica with the adapter when it has capacity, else the least loaded (which loads it). The bound is
    the prefix affinity's: in flight + 1 <= ceil(1.25 x (all in flight + 1) / replicas)."""
    a, b, c = (Endpoint(f"10.0.0.{i}", 8000, f"pod-{i}") for i in (1, 2, 3))
    load = {a: 0, b: 0, c: 0}
    warm = {a}

    def pick() -> tuple[Endpoint, ...]:
        return prefer_loaded([a, b, c], (), warm.__contains__, load.__getitem__)

    assert pick() == (a,)
    load[a] = 1  # bound ceil(1.25 x 2 / 3) = 1: a is at it, so a second request may not join it
    assert pick() == (a, b, c)
    load.update({a: 2, b: 2, c: 2})  # all busy alike: a is within ceil(1.25 x 7 / 3) = 3
    assert pick() == (a,)
    warm.add(b)
    load.update({a: 5, b: 1, c: 0})  # ceil(1.25 x 7 / 3) = 3: b still has room, a not
    assert pick() == (b,)
    load.update({a: 5, b: 5, c: 0})  # both warm replicas over the bound: every replica, the balancer picks c
    assert pick() == (a, b, c)
    assert prefer_loaded([a, b, c], {a}, warm.__contains__, load.__getitem__) == (a, b, c)  # tried: bound over the rest


async def test_two_loads_at_once_on_a_full_replica_evict_two_different_adapters():
    """Found by the adapter bench: both loads picked the same LRU victim, the second failed (KeyError → 502)."""

    engine = FakeEngine()
    engine.gate.set()
    mgr = Adapters(engine, wait_timeout=3600)
    entry = _entry("a", "b", "c", "d")
    a, b, c, d = (AdapterUse(mgr, entry, x) for x in entry.adapters)
    (await a.acquire(EP))()
    (await b.acquire(EP))()
    engine.gate.clear()  # both loads start before either finishes
    loading = [asyncio.ensure_future(u.acquire(EP)) for u in (c, d)]
    for _ in range(5):
        await asyncio.sleep(0)
    engine.gate.set()
    for release in await asyncio.gather(*loading):
        release()
    assert sorted(engine.calls[2:]) == [("load", "c"), ("load", "d"), ("unload", "a"), ("unload", "b")]
    assert [mgr.has(EP, x) for x in entry.adapters] == [False, False, True, True]


async def test_without_affinity_every_replica_is_a_candidate_even_where_the_adapter_is_loaded():
    """The bench's comparison switch (bench/adapters.py): off, the balancer alone picks, so it loads elsewhere too."""

    engine = FakeEngine()
    engine.gate.set()
    mgr = Adapters(engine, affinity=False)
    entry = _entry("a")
    use = AdapterUse(mgr, entry, entry.adapters[0])
    other = Endpoint("10.0.0.2", 8000, "base-pod-2")
    (await use.acquire(other))()
    assert mgr.has(other, entry.adapters[0])
    assert use.candidates([EP, other], ()) == (EP, other)
    (await use.acquire(EP))()  # picked there: a second load of the same adapter
    assert mgr.loads == 2 and engine.calls == [("load", "a"), ("load", "a")]
    assert Adapters(engine).affinity  # on unless a harness turns it off


def test_engine_messages_are_read_from_vllm_error_shapes():
    assert engine_message('{"error": {"message": "boom", "type": "x"}}') == "boom"
    assert engine_message('{"object": "error", "message": "old shape"}') == "old shape"
    assert engine_message("Internal Server Error") == "Internal Server Error"


# -- status ----------------------------------------------------------------------------------------------------------
def _lease(renew, report):
    return {"metadata": {"annotations": {ADAPTERS_ANNOTATION: json.dumps(report)}}, "spec": {"renewTime": renew}}


def test_status_merges_every_gateways_report_for_pods_that_exist():
    leases = [
        _lease("2026-01-01T00:00:02Z", {"a": {"loadedOn": ["p1"]}, "b": {"loadedOn": [], "error": "rank"}}),
        _lease("2026-01-01T00:00:01Z", {"a": {"loadedOn": ["p2", "gone"]}, "b": {"loadedOn": ["p2"]}}),
        {"metadata": {"annotations": {ADAPTERS_ANNOTATION: "not json"}}, "spec": {}},
    ]
    out = adapters_from_leases(["a", "b", "c"], leases, {"p1", "p2"})
    assert out == [
        {"name": "a", "loadedOn": ["p1", "p2"]},
        {"name": "b", "loadedOn": ["p2"], "error": "rank"},
        {"name": "c", "loadedOn": []},
    ]
    status = compute_status(Observed(generation=1, name="m", namespace="ns", adapters=out), {}, "now")
    assert status["adapters"] == out and status["adaptersLoaded"] == "2/3"


async def test_preloaded_adapters_load_on_every_ready_replica_stay_and_a_failing_one_is_not_retried_in_a_loop():
    engine = FakeEngine(refuse={"bad": "LoRA rank 16 is greater than max_lora_rank 8."})
    engine.gate.set()
    mgr = Adapters(engine, wait_timeout=0)
    raw = ms("base", adapter_names=("p", "bad", "x", "y"))
    raw["spec"]["adapters"][0]["preload"] = raw["spec"]["adapters"][1]["preload"] = True
    entry = model_entry(raw)
    p, bad, x, y = entry.adapters
    other = Endpoint("10.0.0.2", 8000, "base-pod-2")
    await asyncio.gather(*mgr.sync(entry.key, entry, [EP, other]))
    assert mgr.has(EP, p) and mgr.has(other, p) and not mgr.has(EP, bad)
    assert sorted(engine.calls) == sorted([("load", "p"), ("load", "p"), ("load", "bad"), ("load", "bad")])
    assert "max_lora_rank" in mgr.report(entry.key, ["bad"], {})["bad"]["error"]
    for _ in range(3):  # status writes come back as changes of the model: no new load of the failed path
        await asyncio.gather(*mgr.sync(entry.key, entry, [EP, other]))
    assert len(engine.calls) == 4
    (await mgr.acquire(entry, EP, x))()  # maxLoaded 2: p is kept, x takes the other slot
    with pytest.raises(GatewayError) as e:  # x is idle but p is pinned: y evicts x, never p
        release_x = await mgr.acquire(entry, EP, x)
        await mgr.acquire(entry, EP, y)
    release_x()
    assert e.value.status == 429
    (await mgr.acquire(entry, EP, y))()
    assert mgr.has(EP, p) and mgr.has(EP, y) and not mgr.has(EP, x)


def test_preloading_more_adapters_than_a_replica_holds_is_refused():
    raw = spec(adapters=[{**a, "preload": True} for a in adapters("a", "b", "c")])
    with pytest.raises(InvalidSpec, match="3 adapters are preloaded"):
        validate_spec(raw, gateway_enabled=True)
