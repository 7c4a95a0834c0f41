"""API keys: parsing, constant-time match, per-model and global Secrets."""

import asyncio
import base64

import pytest

from modelservice.gateway.auth import KeyStore, bearer_token, key_matches, parse_keys, secret_keys
from modelservice.gateway.routes import model_entry
from modelservice.gateway.testing import modelservice
from tests.unit.loop_clock import until

pytestmark = pytest.mark.unit


def secret(**data):
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_bearer_and_key_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token(None) is None
    assert parse_keys("k1\n\n  k2  \n# alice's key below\nk3\n") == ("k1", "k2", "k3")
    assert secret_keys(secret(keys="a\nb", other="c")) == {"keys": ("a", "b"), "other": ("c",)}


def test_key_matches():
    assert key_matches("b", ["a", "b"])
    assert not key_matches("c", ["a", "b"])
    assert not key_matches("", ["a"]) and not key_matches(None, ["a"]) and not key_matches("a", [])
    assert not key_matches("ab", ["a"])  # no prefix matches


def test_store_per_model_and_global():
    open_model = model_entry(modelservice("open", "a"))
    locked = model_entry(modelservice("locked", "a", api_key_secret="s"))
    store = KeyStore()
    assert store.permits(open_model, None)
    assert store.wanted([open_model, locked]) == {("a", "s")}
    assert store.missing(locked)
    assert not store.permits(locked, "Bearer k1")  # not loaded yet: closed
    store.update(("a", "s"), secret(keys="k1\nk2"))
    assert store.permits(locked, "Bearer k2") and not store.permits(locked, "Bearer k3")
    assert not store.permits(locked, None)
    store.update(("a", "s"), None)  # Secret deleted: nobody gets in
    assert not store.permits(locked, "Bearer k2")

    g = KeyStore(("ops", "global", "keys"))
    g.update(("ops", "global"), secret(keys="G"))
    g.update(("a", "s"), secret(keys="k1"))
    assert g.required(open_model) and g.permits(open_model, "Bearer G") and not g.permits(open_model, "Bearer k1")
    assert g.permits(locked, "Bearer G") and g.permits(locked, "Bearer k1")


async def test_refresher_fetches_kicked_secrets():
    from modelservice.gateway.testing import FakeOps

    ops = FakeOps()
    ops.secrets[("a", "s")] = secret(keys="k1")
    entries = [model_entry(modelservice("locked", "a", api_key_secret="s"))]
    store = KeyStore()
    task = asyncio.create_task(store.run(ops, lambda: entries, interval=60))
    await store.wait_loaded(entries[0], 30)  # a deadline for a starved machine; the store answers at once
    assert store.permits(entries[0], "Bearer k1")
    ops.secrets[("a", "s")] = secret(keys="k2")  # rotation: picked up at the next kick (or interval)
    store.kick()
    await until(lambda: store.permits(entries[0], "Bearer k2"), message="the rotated key picked up after the kick")
    assert store.permits(entries[0], "Bearer k2") and not store.permits(entries[0], "Bearer k1")
    task.cancel()


async def test_a_secret_the_gateway_may_not_read_is_a_503_with_the_reason_not_a_401():
    """Seen on the local cluster: with the chart's gateway.apiKeys off, the right key got 401 "invalid API key"."""
    from modelservice.gateway.testing import FakeOps

    class Forbidden(FakeOps):
        async def get_secret(self, namespace, name):
            raise RuntimeError('403 Forbidden: secrets "s" is forbidden')

    entries = [model_entry(modelservice("locked", "a", api_key_secret="s"))]
    store = KeyStore()
    task = asyncio.create_task(store.run(Forbidden(), lambda: entries, interval=60))
    await store.wait_loaded(entries[0], 30)  # a deadline for a starved machine; the store answers at once
    assert not store.permits(entries[0], "Bearer k1")
    assert store.unreadable(entries[0]) == (
        'the gateway cannot read the API key Secret a/s: 403 Forbidden: secrets "s" is forbidden'
    )
    store.update(("a", "s"), secret(keys="k1"))  # readable again: keys checked as usual
    assert store.unreadable(entries[0]) is None and store.permits(entries[0], "Bearer k1")
    task.cancel()
