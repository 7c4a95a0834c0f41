"""Tenant keys on a real API server: a watched Secret, rotation without a restart, Warning Events on bad Secrets, and
no key in the gateway's log or in any Event."""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.request

from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.gateway_process import TEST_FLAGS, GatewayProcess

TENANT = "serving.modelservice.dev/tenant"
ACCESS = "serving.modelservice.dev/namespaces"


def _secret(name: str, tenant: str, keys: list[str], namespaces: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {TENANT: tenant}, "annotations": {ACCESS: namespaces}},
        "data": {"keys": base64.b64encode("\n".join(keys).encode()).decode()},
    }


def _call(url: str, path: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _chat(url: str, key: str | None) -> int:
    return _call(
        url,
        "/v1/chat/completions",
        key,
        {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )[0]


def _warnings(kube, ns: str, secret_name: str) -> list:
    return [
        e
        for e in kube.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={secret_name}").items
        if e.type == "Warning" and e.involved_object.kind == "Secret"
    ]


def test_tenant_keys_rotate_within_seconds_and_bad_secrets_get_events(kube, namespace, operator, fake_nodes, tmp_path):
    ns = namespace
    old, new, shared = (f"sk-{secrets.token_hex(12)}" for _ in range(3))
    kube.core.create_namespaced_secret(ns, _secret("team-a", "team-a", [old], ns))
    ms.create(kube, ns, ms.body("m"))
    gw = GatewayProcess(
        kube.kubeconfig, tmp_path / "gateway.log", *TEST_FLAGS, "--namespace", ns, "--tenants", "--tenant-namespace", ns
    ).start()
    try:
        wait_for(
            lambda: gw.metric("modelservice_gateway_ready_endpoints", model=f"{ns}/m") == 1,
            timeout=90,
            message="the model's endpoint in the gateway",
        )
        assert _chat(gw.url, old) == 200
        assert _chat(gw.url, None) == 401  # tenants on: every model needs a key
        status, listing = _call(gw.url, "/v1/models", old)
        assert status == 200 and [m["id"] for m in listing["data"]] == ["m"]

        # Rotation: the Secret's keys change; the watch brings it within seconds, no restart.
        kube.core.patch_namespaced_secret("team-a", ns, {"data": {"keys": base64.b64encode(new.encode()).decode()}})
        wait_for(lambda: _chat(gw.url, new) == 200, timeout=10, interval=0.2, message="the new key accepted")
        assert _chat(gw.url, old) == 401

        # Bad Secrets: refused, with a Warning Event on the Secret; the good tenant keeps working.
        kube.core.create_namespaced_secret(ns, _secret("bad-name", "Team_B", ["whatever"], ns))
        kube.core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": "no-keys", "labels": {TENANT: "team-c"}},
                "data": {"other": base64.b64encode(b"x").decode()},
            },
        )
        kube.core.create_namespaced_secret(ns, _secret("team-d", "team-d", [shared], ns))
        kube.core.create_namespaced_secret(ns, _secret("team-e", "team-e", [shared], ns))
        for name, reason in (
            ("bad-name", "InvalidTenantSecret"),
            ("no-keys", "InvalidTenantSecret"),
            ("team-d", "DuplicateTenantKey"),
            ("team-e", "DuplicateTenantKey"),
        ):
            wait_for(
                lambda name=name, reason=reason: any(e.reason == reason for e in _warnings(kube, ns, name)),
                timeout=20,
                message=f"a {reason} Warning on Secret {name}",
            )
        assert _chat(gw.url, shared) == 401  # claimed by two tenants: neither
        assert _chat(gw.url, new) == 200
        kube.core.delete_namespaced_secret("team-e", ns)
        wait_for(lambda: _chat(gw.url, shared) == 200, timeout=10, interval=0.2, message="the key team-d alone holds")
        kube.core.delete_namespaced_secret("team-a", ns)
        wait_for(lambda: _chat(gw.url, new) == 401, timeout=10, interval=0.2, message="a removed key refused")
    finally:
        gw.stop()
    said = gw.log_path.read_text() + "".join(
        f"{e.reason} {e.message}" for e in kube.core.list_namespaced_event(ns).items
    )
    for key in (old, new, shared):
        assert key not in said and base64.b64encode(key.encode()).decode() not in said
    assert "team-d" in said  # the Events name tenants
