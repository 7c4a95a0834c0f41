"""A model of the GPU pool (no cluster): the committed trace replayed against victim rules, in seconds of CPU.

Why it exists: to ask, before changing the planner, whether a different choice of whom to park (a minimum residency
after a load, or the least frequently used first) would give fewer cold starts or a lower cold p99 on the committed
trace (bench/traces/gpu-pool-seed1.json), and what the delay before an idle model is seen idle costs. The cluster
bench (bench/gpu_pool.py) measures the real thing; this only compares rules under the same simple assumptions:

- 4 GPUs, one per model; a model loads in LOAD seconds and serves a request in SERVE seconds, one after another;
- requests for a model at zero are held and wake it; a woken model gets a free GPU first-come first-served;
- when one waits and no GPU is free, an idle Ready model (nothing held or being served, idle for at least `detect`
  seconds: how late the operator learns it is idle) is parked; its GPU is free `release` seconds later.

    python -m bench.gpu_pool_sim [--detect 4] [--release 1] [--seconds 600]

Pure: `simulate(...)` returns the figures.
"""

from __future__ import annotations

import argparse
import heapq
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.gpu_pool_trace import Trace

TRACE = Path(__file__).resolve().parent / "traces" / "gpu-pool-seed1.json"
LOAD, SERVE, GPUS = 20.0, 0.3, 4


@dataclass
class State:
    ready_at: dict[str, float]
    last_end: dict[str, float]
    rate: dict[str, tuple[float, float]]  # decayed request count, when last updated


# Victim rules: lower sorts first (is parked first). Each gets (model, now, state).
Rule = Callable[[str, float, State], tuple]


def longest_idle(m: str, now: float, s: State) -> tuple:
    return (s.last_end.get(m, s.ready_at[m]),)


def min_residency(m: str, now: float, s: State) -> tuple:
    """A model Ready for less than its load time goes last (unless nothing else can be parked)."""
    return (now - s.ready_at[m] < LOAD,) + longest_idle(m, now, s)


def least_frequent(m: str, now: float, s: State, tau: float = 120.0) -> tuple:
    count, at = s.rate.get(m, (0.0, now))
    return (count * math.exp(-(now - at) / tau),) + longest_idle(m, now, s)


RULES: dict[str, Rule] = {
    "longest-idle": longest_idle,
    "min-residency": min_residency,
    "least-frequent": least_frequent,
}


def simulate(trace: Trace, rule: Rule, *, detect: float, release: float, seconds: float = 600.0) -> dict:
    state = {m: "zero" for m in trace.model_names}  # zero, waiting, loading, ready, leaving
    s = State({}, {}, {})
    held: dict[str, list[float]] = {m: [] for m in trace.model_names}
    busy_until = {m: -1.0 for m in trace.model_names}
    events: list[tuple[float, int, str, str]] = []
    seq = 0

    def push(t: float, kind: str, m: str) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, m))

    for r in trace.requests:
        if r["t"] < seconds:
            push(r["t"], "request", r["model"])
    free, waiters, cold, starts, parks, choices, idle_waiting, clock = GPUS, [], [], 0, 0, 0, 0.0, 0.0

    def idle(m: str, t: float) -> bool:
        return state[m] == "ready" and not held[m] and busy_until[m] <= t

    while events:
        t, _, kind, m = heapq.heappop(events)
        if waiters:
            idle_waiting += (t - clock) * sum(1 for x in state if idle(x, clock))
        clock = t
        if kind == "request":
            count, at = s.rate.get(m, (0.0, t))
            s.rate[m] = (count * math.exp(-(t - at) / 120.0) + 1, t)
            if state[m] == "ready":
                busy_until[m] = max(busy_until[m], t) + SERVE
                s.last_end[m] = busy_until[m]
                push(busy_until[m] + detect, "check", m)
            else:
                held[m].append(t)
                if state[m] == "zero":
                    state[m] = "waiting"
                    waiters.append(m)
        elif kind == "ready":
            state[m], s.ready_at[m] = "ready", t
            for sent in held[m]:
                busy_until[m] = max(busy_until[m], t) + SERVE
                cold.append(busy_until[m] - sent)
            held[m] = []
            s.last_end[m] = max(busy_until[m], t)
            push(s.last_end[m] + detect, "check", m)
        elif kind == "freed":
            free += 1
            state[m] = "zero"
            if held[m]:
                state[m] = "waiting"
                waiters.append(m)
        while waiters and free > 0:
            w = waiters.pop(0)
            free -= 1
            starts += 1
            state[w] = "loading"
            push(t + LOAD, "ready", w)
        need = len(waiters) - sum(1 for x in state.values() if x == "leaving")
        while need > 0:
            seen_idle = [x for x in state if idle(x, t) and t >= s.last_end.get(x, 0.0) + detect]
            if not seen_idle:
                break
            choices += len(seen_idle) > 1
            victim = min(seen_idle, key=lambda x: rule(x, t, s))
            state[victim] = "leaving"
            parks += 1
            push(t + release, "freed", victim)
            need -= 1
    cold.sort()
    pct = lambda q: round(cold[min(len(cold) - 1, int(q * len(cold)))], 1) if cold else None  # noqa: E731
    return {
        "cold_requests": len(cold),
        "ttft_cold_p50": pct(0.5),
        "ttft_cold_p99": pct(0.99),
        "cold_starts": starts,
        "parks": parks,
        "parks_with_a_choice": choices,
        "gpu_seconds_idle_while_waiting": round(idle_waiting),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--detect",
        type=float,
        nargs="+",
        default=[4.0, 1.0, 10.0],
        help="seconds before an idle model is seen idle (default: 4 = 2 intervals of 2 s, 1, 10)",
    )
    p.add_argument("--release", type=float, default=1.0, help="seconds from a park to its GPU being free")
    p.add_argument("--seconds", type=float, default=600.0)
    a = p.parse_args(argv)
    trace = Trace.from_json(TRACE.read_text())
    for detect in a.detect:
        for name, rule in RULES.items():
            r = simulate(trace, rule, detect=detect, release=a.release, seconds=a.seconds)
            print(f"detect {detect:>4g} s  {name:<15} " + "  ".join(f"{k} {v}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
