"""Least in-flight balancing."""

import random
from collections import Counter

import pytest

from modelservice.gateway.balancer import Balancer
from modelservice.gateway.routes import Endpoint

pytestmark = pytest.mark.unit
EPS = [Endpoint(f"127.0.2.{i}", 8000) for i in range(1, 4)]


def test_concurrent_requests_spread_evenly():
    b = Balancer(random.Random(1))
    for _ in range(30):  # 30 long requests that all stay in flight
        b.acquire(b.pick(EPS))
    assert [b.in_flight(ep) for ep in EPS] == [10, 10, 10]


def test_busy_endpoint_is_avoided_and_ties_are_random():
    b = Balancer(random.Random(2))
    for _ in range(5):
        b.acquire(EPS[0])  # one replica stuck on long generations
    picks = Counter(b.pick(EPS) for _ in range(200))  # short requests, released at once
    assert EPS[0] not in picks and picks[EPS[1]] > 60 and picks[EPS[2]] > 60


def test_release_and_exclude():
    b = Balancer()
    b.acquire(EPS[0])
    b.release(EPS[0])
    assert b.in_flight(EPS[0]) == 0 and b._in_flight == {}
    assert b.pick(EPS, exclude=EPS[:2]) == EPS[2]
    assert b.pick(EPS, exclude=EPS) is None
    assert b.pick([]) is None


# -- prefix affinity: rendezvous hashing with bounded loads ---------------------------------------------------------
KEYS = [bytes([i]) * 8 for i in range(200)]


def test_a_key_goes_to_the_same_endpoint_while_it_is_not_overloaded():
    b = Balancer(random.Random(3))
    owners = {k: b.pick(EPS, key=k) for k in KEYS}
    assert all(b.pick(EPS, key=k) == owners[k] for k in KEYS for _ in range(3))
    spread = Counter(owners.values())  # keys spread over the endpoints (200 keys, 3 endpoints: ~67 each)
    assert set(spread) == set(EPS) and min(spread.values()) > 40, spread


def test_bounded_load_spills_a_hot_key_over_the_others():
    """One conversation (or one system prompt) sending 30 requests at once: its replica takes at most
    ceil(1.25 * 30 / 3) = 13 of them, the rest spill to the others, and the in-flight counts stay within the bound
    after every pick."""
    b = Balancer(random.Random(4))
    for n in range(30):
        ep = b.pick(EPS, key=KEYS[0])
        b.acquire(ep)
        assert max(b.in_flight(e) for e in EPS) <= -(-1.25 * (n + 1) // 3)
    counts = sorted(b.in_flight(ep) for ep in EPS)
    assert counts[-1] == 13 and sum(counts) == 30, counts


def test_a_busy_owner_is_skipped_and_gets_its_keys_back_when_it_drains():
    b = Balancer(random.Random(5))
    owner = b.pick(EPS, key=KEYS[1])
    for _ in range(4):
        b.acquire(owner)  # long generations on the owner; nothing elsewhere: bound = ceil(1.25 * 5 / 3) = 3
    other = b.pick(EPS, key=KEYS[1])
    assert other != owner
    for _ in range(4):
        b.release(owner)
    assert b.pick(EPS, key=KEYS[1]) == owner


def test_an_endpoint_that_goes_away_moves_only_its_own_keys():
    b = Balancer(random.Random(6))
    before = {k: b.pick(EPS, key=k) for k in KEYS}
    gone = EPS[0]
    after = {k: b.pick(EPS[1:], key=k) for k in KEYS}
    assert all(after[k] == before[k] for k in KEYS if before[k] != gone)
    assert all(after[k] in EPS[1:] for k in KEYS)  # the next turn goes elsewhere: an endpoint, not an error
    moved = Counter(after[k] for k in KEYS if before[k] == gone)
    assert set(moved) == set(EPS[1:])  # spread over the survivors, not all onto one


def test_exclude_gives_the_next_ranked_endpoint_and_one_candidate_needs_no_hash():
    b = Balancer(random.Random(7))
    first = b.pick(EPS, key=KEYS[2])
    second = b.pick(EPS, exclude=[first], key=KEYS[2])
    assert second not in (first, None)
    assert b.pick(EPS, exclude=[first, second], key=KEYS[2]) not in (first, second, None)
    assert b.pick(EPS, exclude=EPS, key=KEYS[2]) is None
    assert b.pick(EPS[:1], key=KEYS[2]) == EPS[0]


def test_every_gateway_process_agrees_on_the_owner():
    """Workers and gateway replicas each have their own Balancer: the ranking is a hash, not a random draw."""
    assert [Balancer(random.Random(s)).pick(EPS, key=k) for s in (1, 2) for k in KEYS[:20]][:20] == [
        Balancer(random.Random(9)).pick(EPS, key=k) for k in KEYS[:20]
    ]


def test_the_load_factor_is_per_call_one_is_least_loaded_and_a_large_one_is_plain_hashing():
    """spec.routing.loadFactor reaches pick(): the same 30 simultaneous requests of one key are spread evenly at 1
    (no stickiness beyond the mean), capped at ceil(2 * 30 / 3) = 20 on the owner at 2, and all stay on it at 10."""
    top = {}
    for factor in (1.0, 2.0, 10.0):
        b = Balancer(random.Random(8))
        for _ in range(30):
            b.acquire(b.pick(EPS, key=KEYS[3], load_factor=factor))
        top[factor] = max(b.in_flight(ep) for ep in EPS)
    assert top == {1.0: 10, 2.0: 20, 10.0: 30}, top
