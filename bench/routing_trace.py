"""A multi-turn chat trace for the routing benchmark (bench/routing.py), generated from a fixed seed.

    python -m bench.routing_trace [--seed 1] [--out bench/traces/chat-seed1.json]

What it models: a few applications, each with its own long system prompt, and many conversations with them. Each
conversation sends several turns; turn n's messages are turn n-1's plus the assistant's answer and the next user
question, so its prompt grows and shares everything but the last two messages with the turn before. The assistant's
answers are part of the trace (not the engine's own output), so every replay sends the same bytes.

Time is in trace units: conversations start as a Poisson process and a user thinks (exponentially) between turns; the
unit is chosen so the whole trace averages 1 request per unit, and a replay scales it to the rate it wants (70 % of
the round-robin capacity it measured). Requests are sent at their times whether or not the previous turn has been
answered (open loop: a slow router gets the same load, not less).

Text is drawn from the words of the tiny model's tokenizer training text (tests/cluster/tiny_model.py), so that its
byte-level BPE tokenizes it about as densely as English; prompt lengths in tokens are recorded by the replay from
vLLM's own usage figures.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path
from typing import Any

from tests.cluster.tiny_model import TRAINING_TEXT

TRACES = Path(__file__).resolve().parent / "traces"
FORMAT = 1


def _words() -> list[str]:
    return sorted(set(re.findall(r"[A-Za-z]+[,.;!?]?", TRAINING_TEXT)))


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def generate(
    seed: int = 1,
    *,
    apps: int = 4,
    conversations: int = 48,
    turns: tuple[int, int] = (3, 6),
    system_words: int = 400,
    user_words: tuple[int, int] = (40, 100),
    answer_words: tuple[int, int] = (30, 80),
    max_tokens: int = 8,
    think: float = 6.0,
) -> dict[str, Any]:
    rng = random.Random(seed)
    words = _words()
    systems = [f"You are assistant number {a}. " + _text(rng, words, system_words) for a in range(apps)]
    requests: list[dict[str, Any]] = []
    start = 0.0
    for c in range(conversations):
        start += rng.expovariate(1.0)  # conversation arrivals; rescaled below
        app = rng.randrange(apps)
        messages: list[dict[str, str]] = [{"role": "system", "content": systems[app]}]
        t = start
        for turn in range(rng.randint(*turns)):
            if turn:
                messages.append({"role": "assistant", "content": _text(rng, words, rng.randint(*answer_words))})
                t += rng.expovariate(1.0 / think)
            messages.append({"role": "user", "content": _text(rng, words, rng.randint(*user_words))})
            requests.append({"t": t, "conversation": c, "turn": turn, "app": app, "messages": list(messages)})
    requests.sort(key=lambda r: (r["t"], r["conversation"]))
    span = requests[-1]["t"] - requests[0]["t"]
    scale = (len(requests) - 1) / span  # 1 request per unit on average
    t0 = requests[0]["t"]
    for r in requests:
        r["t"] = round((r["t"] - t0) * scale, 4)
    return {
        "format": FORMAT,
        "seed": seed,
        "generator": "bench.routing_trace.generate",
        "max_tokens": max_tokens,
        "apps": apps,
        "conversations": conversations,
        "requests": requests,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.routing_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    out = a.out or TRACES / f"chat-seed{a.seed}.json"
    doc = generate(a.seed)
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    n = len(doc["requests"])
    chars = [sum(len(m["content"]) for m in r["messages"]) for r in doc["requests"]]
    print(f"{out}: {n} requests, {doc['conversations']} conversations, prompt {min(chars)}-{max(chars)} characters")


if __name__ == "__main__":
    main()
