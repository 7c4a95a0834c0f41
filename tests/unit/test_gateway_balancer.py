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
