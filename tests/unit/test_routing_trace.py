"""The routing benchmark's chat trace: the committed file is what the generator makes from its seed, and its turns
grow as a conversation does (each turn's messages start with the previous turn's)."""

import json

import pytest

from bench.routing_trace import TRACES, generate

pytestmark = pytest.mark.unit


def test_committed_trace_is_the_generators_output():
    committed = json.loads((TRACES / "chat-seed1.json").read_text())
    assert json.loads(json.dumps(generate(1))) == committed


def test_turns_extend_the_previous_turn_and_share_system_prompts():
    doc = generate(1)
    by_conv: dict[int, list[dict]] = {}
    for r in doc["requests"]:
        by_conv.setdefault(r["conversation"], []).append(r)
    for turns in by_conv.values():
        turns.sort(key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == list(range(len(turns))) and len(turns) >= 3
        for a, b in zip(turns, turns[1:]):
            assert b["messages"][: len(a["messages"])] == a["messages"] and len(b["messages"]) == len(a["messages"]) + 2
            assert b["t"] >= a["t"]
    systems = {r["messages"][0]["content"] for r in doc["requests"]}
    assert len(systems) == doc["apps"]
    times = [r["t"] for r in doc["requests"]]
    assert times == sorted(times) and abs(len(times) / times[-1] - 1) < 0.01  # 1 request per unit
