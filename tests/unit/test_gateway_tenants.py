"""Tenants (tenants.py, auth.py): Secret shape, refusals, rotation by watch events, access, /v1/models per key."""

import base64
import logging

import aiohttp
import pytest

from modelservice.gateway.auth import ANONYMOUS, MODEL_KEY, KeyStore
from modelservice.gateway.routes import model_entry
from modelservice.gateway.tenants import TENANT_LABEL, TenantStore, parse_secret
from modelservice.gateway.testing import FakeOps, endpointslice, gateway_with, modelservice, serving
from tests.cluster.stub_server import make_app as stub_app

pytestmark = pytest.mark.unit


def secret(name, tenant, keys="", *, namespaces="*", models="", rv="1", data=None):
    notes = {
        k: v
        for k, v in (("serving.modelservice.dev/namespaces", namespaces), ("serving.modelservice.dev/models", models))
        if v
    }
    return {
        "metadata": {
            "name": name,
            "namespace": "gw",
            "uid": f"uid-{name}",
            "resourceVersion": rv,
            "labels": {TENANT_LABEL: tenant},
            "annotations": notes,
        },
        "data": data if data is not None else {"keys": base64.b64encode(keys.encode()).decode()},
    }


@pytest.mark.parametrize(
    "obj, why",
    [
        (secret("s", "Team_A", "k1"), "not a tenant name"),
        (secret("s", "", "k1"), "not a tenant name"),
        (secret("s", "a", data={}), "no data key"),
        (secret("s", "a", data={"keys": "!!not base64"}), "not base64"),
        (secret("s", "a", data={"keys": base64.b64encode(b"\xff\xfe").decode()}), "not base64 of UTF-8"),
        (secret("s", "a", "# only a comment\n\n"), "holds no key"),
        (secret("s", "a", "k1", namespaces="Bad_NS"), "is not a namespace"),
        (secret("s", "a", "k1", namespaces="", models="no-slash"), "is not a namespace"),
        (secret("s", "a", "k1", namespaces=""), "may use no model"),
    ],
)
def test_bad_secrets_are_refused_with_a_reason(obj, why):
    parsed, wrong = parse_secret(obj)
    assert parsed is None and why in wrong


def test_good_secret():
    parsed, wrong = parse_secret(secret("s", "team-a", "k1\n# bob's\nk2\n", namespaces="a, b", models="c/m.v1"))
    assert wrong is None and parsed.tenant.name == "team-a" and len(parsed.digests) == 2
    assert parsed.tenant.namespaces == {"a", "b"} and parsed.tenant.models == {"c/m.v1"}


def test_rotation_removal_and_a_key_claimed_by_two_tenants():
    store = TenantStore()
    assert store.apply("ADDED", secret("a", "team-a", "old")) == []
    assert store.identify("old").name == "team-a"
    assert store.apply("MODIFIED", secret("a", "team-a", "new", rv="2")) == []
    assert store.identify("old") is None and store.identify("new").name == "team-a"
    # Another tenant claims the same key: refused for both, one Warning per Secret, naming the other tenant only.
    problems = store.apply("ADDED", secret("b", "team-b", "new\nb-only"))
    assert store.identify("new") is None and store.identify("b-only").name == "team-b"
    assert sorted((p.secret["metadata"]["name"], p.reason) for p in problems) == [
        ("a", "DuplicateTenantKey"),
        ("b", "DuplicateTenantKey"),
    ]
    assert all("new" not in p.message.replace("team-", "") for p in problems)  # the key itself is never said
    assert "team-b" in next(p.message for p in problems if p.secret["metadata"]["name"] == "a")
    assert store.apply("DELETED", secret("b", "team-b")) == []
    assert store.identify("new").name == "team-a" and store.identify("b-only") is None
    # A bad Secret: a Warning once per version of it, not at every relist.
    bad = secret("c", "team-c", data={})
    assert [p.reason for p in store.apply("ADDED", bad)] == ["InvalidTenantSecret"]
    assert store.apply("MODIFIED", bad) == []
    assert [p.reason for p in store.apply("MODIFIED", secret("c", "team-c", data={}, rv="7"))] == [
        "InvalidTenantSecret"
    ]


def test_one_tenant_may_hold_several_secrets_and_their_access_adds_up():
    store = TenantStore()
    store.apply("ADDED", secret("a1", "team-a", "k1", namespaces="ns1"))
    store.apply("ADDED", secret("a2", "team-a", "k2\nk1", namespaces="", models="ns2/m"))
    for key in ("k1", "k2"):
        tenant = store.identify(key)
        assert tenant.may_use(model_entry(modelservice("x", "ns1")))
        assert tenant.may_use(model_entry(modelservice("m", "ns2")))
        assert not tenant.may_use(model_entry(modelservice("other", "ns2")))


def test_identify_bills_tenants_model_keys_and_anonymous_callers():
    open_entry = model_entry(modelservice("open", "a"))
    locked = model_entry(modelservice("locked", "b", api_key_secret="s"))
    plain = KeyStore()
    plain.update(("b", "s"), {"stringData": {"keys": "model-key"}})
    assert plain.identify(open_entry, None) == ANONYMOUS
    assert plain.identify(locked, "Bearer model-key") == MODEL_KEY
    tenants = TenantStore()
    tenants.apply("ADDED", secret("t", "team-a", "tk", namespaces="a"))
    keys = KeyStore(tenants=tenants)
    keys.update(("b", "s"), {"stringData": {"keys": "model-key"}})
    assert keys.identify(open_entry, None) is None  # tenants on: every model needs a key
    assert keys.identify(open_entry, "Bearer tk") == "team-a"
    assert keys.identify(locked, "Bearer tk") is None and keys.known_tenant("Bearer tk")
    assert keys.identify(locked, "Bearer model-key") == MODEL_KEY  # today's per-model keys keep working


async def test_gateway_with_tenants(caplog):
    """Over sockets: tenant keys reach their models, other models are 404 to them, /v1/models lists per key."""
    caplog.set_level(logging.DEBUG)

    async def scenario():
        async with serving(stub_app("m", 1000.0)) as up:
            port = int(up.rsplit(":", 1)[1])
            objs = [
                modelservice("m", "team-a"),
                modelservice("m", "team-b"),
                modelservice("shared", "lab", api_key_secret="lab-keys"),
                endpointslice("m", [("127.0.0.1", True)], port, "team-a"),
                endpointslice("m", [("127.0.0.1", True)], port, "team-b"),
                endpointslice("shared", [("127.0.0.1", True)], port, "lab"),
            ]
            ops = FakeOps()
            ops.secrets[("lab", "lab-keys")] = {"data": {"keys": base64.b64encode(b"lab-key").decode()}}
            async with gateway_with(*objs, ops=ops, tenant_namespace="gw") as (gw, url):
                gw.keys.tenants.apply(
                    "ADDED", secret("a", "team-a", "sk-a-1", namespaces="team-a", models="lab/shared")
                )
                gw.keys.tenants.apply("ADDED", secret("b", "team-b", "sk-b-1", namespaces="team-b"))
                gw.keys.tenants.apply("ADDED", secret("bad", "team-c", data={"keys": "%%%"}))

                async def chat(model, key=None):
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    async with s.post(
                        url + "/v1/chat/completions",
                        headers=headers,
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                    ) as r:
                        return r.status, (await r.json()).get("error", {}).get("code")

                async def models(key=None):
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    async with s.get(url + "/v1/models", headers=headers) as r:
                        return r.status, sorted(m["id"] for m in (await r.json()).get("data", []))

                async with aiohttp.ClientSession() as s:
                    assert await chat("team-a/m", "sk-a-1") == (200, None)
                    assert await chat("lab/shared", "sk-a-1") == (200, None)
                    assert await chat("team-b/m", "sk-a-1") == (404, "model_not_found")
                    assert await chat("team-b/m", "sk-b-1") == (200, None)
                    assert await chat("team-b/m") == (401, "invalid_api_key")
                    assert await chat("team-b/m", "nope") == (401, "invalid_api_key")
                    assert await chat("nothing/here", "nope") == (401, "invalid_api_key")  # learns nothing
                    assert await chat("lab/shared", "lab-key") == (200, None)  # the model's own key
                    assert await models("sk-a-1") == (200, ["shared", "team-a/m"])
                    assert await models("sk-b-1") == (200, ["team-b/m"])
                    assert await models("lab-key") == (200, ["shared"])
                    assert (await models())[0] == 401
                    # Rotation: the new key works at once, the old one stops.
                    gw.keys.tenants.apply("MODIFIED", secret("b", "team-b", "sk-b-2", namespaces="team-b", rv="2"))
                    assert await chat("team-b/m", "sk-b-1") == (401, "invalid_api_key")
                    assert await chat("team-b/m", "sk-b-2") == (200, None)

    await scenario()
    for secret_text in ("sk-a-1", "sk-b-1", "sk-b-2", "lab-key"):
        assert secret_text not in caplog.text
