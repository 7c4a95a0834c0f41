"""Where the operator meets kopf: what it overrides of the framework, and the one credentials source both use.

_NoDiffBase leans on kopf's internals (that the diff-base storage's build() is called on every event, with these
arguments): these tests fail when a kopf release changes that, instead of the operator silently losing the CPU the
override saves (docs/benchmarks.md) or kopf calling a method we no longer override.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import kopf
import pytest
import yaml
from kopf._cogs.configs import diffbase
from kopf._cogs.structs import diffs
from kopf._core.reactor import processing

from modelservice import GROUP, handlers


def test_no_diff_base_overrides_the_method_kopf_calls_on_every_event() -> None:
    ours = inspect.signature(handlers._NoDiffBase.build)
    theirs = inspect.signature(diffbase.DiffBaseStorage.build)
    assert ours.parameters.keys() == theirs.parameters.keys(), (ours, theirs)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in theirs.parameters.items() if name != "self")
    # The call site in kopf's per-event processing (cause detection) that the override exists for.
    assert "diffbase_storage.build(body=body, extra_fields=extra_fields)" in inspect.getsource(processing)


def test_no_diff_base_gives_kopf_an_empty_essence_that_never_differs() -> None:
    storage = handlers._NoDiffBase(prefix=GROUP)
    body = kopf.Body(
        {
            "apiVersion": f"{GROUP}/v1alpha1",
            "kind": "ModelService",
            "metadata": {"name": "m", "namespace": "n", "annotations": {"a": "b"}},
            "spec": {"x": 1},
        }
    )
    essence = storage.build(body=body, extra_fields=["spec.x"])
    assert essence == {}
    assert not diffs.diff(storage.build(body=body), essence)  # the next event's essence: never a change to act on


async def test_kopf_logs_in_with_the_token_our_client_sends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One credentials source: kopf's login handler and the controller's client read the same TokenSource; a
    second login (kopf's answer to a 401 or an expiry) reads the rotated token instead of handing back the old."""
    token = tmp_path / "token"
    token.write_text("first")
    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "x"}}],
                "clusters": [{"name": "k", "cluster": {"server": "https://k:6443", "insecure-skip-tls-verify": True}}],
                "users": [{"name": "u", "user": {"tokenFile": "token"}}],
            }
        )
    )
    monkeypatch.setitem(handlers.OPTIONS, "kubeconfig", str(config))
    monkeypatch.setattr(handlers, "_TOKENS", [])
    monkeypatch.setattr(handlers, "_GIVEN", [])

    info = await handlers.login()
    assert (info.server, info.token, info.insecure, info.default_namespace) == ("https://k:6443", "first", True, "x")
    token.write_text("second")
    assert await handlers._token_source().get() == "first"  # within the file's TTL
    assert (await handlers.login()).token == "second"
    assert await handlers._token_source().get() == "second"  # our client follows kopf's re-login
    # Our client read the rotated token first (after a 401 of its own): kopf's next login takes it without a read.
    token.write_text("third")
    assert await handlers._token_source().refresh() == "third"
    token.write_text("fourth")
    assert (await handlers.login()).token == "third"
