"""argocd/health.lua, run under Lua 5.1 (what Argo CD's gopher-lua implements) over ModelService objects.

lupa's bundled Lua 5.1 is preferred; Debian's lua5.1 binary is the fallback; a newer Lua would hide 5.1-only
mistakes, so without either the tests skip with a reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "argocd" / "health.lua"
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing"}


def _lua_literal(value: Any) -> str:
    """A Python value as a Lua table constructor (lists become 1-based sequences, as Argo CD passes them)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {_lua_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "{" + ", ".join(_lua_literal(v) for v in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    return json.dumps(value)  # numbers, and strings (JSON escapes are valid Lua escapes for this data)


def run_health(obj: dict[str, Any]) -> dict[str, str]:
    script = SCRIPT.read_text()
    try:
        from lupa import lua51
    except ImportError:
        lua51 = None
    if lua51 is not None:
        lua = lua51.LuaRuntime()
        lua.globals().obj = lua.table_from(obj, recursive=True)
        hs = lua.execute(script)
        return {"status": hs["status"], "message": hs["message"]}
    binary = shutil.which("lua5.1")
    if binary is None:
        pytest.skip("no Lua 5.1: lupa has no lua51 module and lua5.1 is not installed (apt-get install -y lua5.1)")
    wrapper = (
        f"obj = {_lua_literal(obj)}\nlocal hs = (function()\n{script}\nend)()\n"
        "io.write(hs.status, '\\n', hs.message or '')"
    )
    done = subprocess.run([binary, "-"], input=wrapper, capture_output=True, text=True, check=True)
    status, _, message = done.stdout.partition("\n")
    return {"status": status, "message": message}


def ms(generation: int | None = 2, status: dict[str, Any] | None = None, **conditions: tuple) -> dict[str, Any]:
    """A ModelService; each keyword is a condition: Ready=("False", "Activating", "message")."""
    obj: dict[str, Any] = {
        "apiVersion": "serving.modelservice.dev/v1alpha1",
        "kind": "ModelService",
        "metadata": {"name": "llama", "namespace": "team-a"},
    }
    if generation is not None:
        obj["metadata"]["generation"] = generation
    if status is not None or conditions:
        obj["status"] = {"observedGeneration": 2, **(status or {})}
        obj["status"]["conditions"] = [
            {"type": t, "status": s, "reason": r, "message": m} for t, (s, r, m) in conditions.items()
        ]
    return obj


CASES = [
    ("no status", ms(), "Progressing", "Waiting for the operator"),
    (
        "status without observedGeneration",
        ms(status={"observedGeneration": None}),
        "Progressing",
        "Waiting for the operator",
    ),
    (
        "stale generation",
        ms(generation=3, Ready=("True", "Ready", "1/1 replicas ready")),
        "Progressing",
        "Waiting for the operator",
    ),
    (
        "stalled",
        ms(
            Stalled=("True", "InvalidSpec", "spec.model.uri: engine vllm needs a model"),
            Ready=("False", "InvalidSpec", "see Stalled"),
        ),
        "Degraded",
        "spec.model.uri: engine vllm needs a model",
    ),
    ("stalled without message", ms(Stalled=("True", "InvalidSpec", "")), "Degraded", "InvalidSpec"),
    (
        "ready",
        ms(Ready=("True", "Ready", "2/2 replicas ready"), Stalled=("False", "", "")),
        "Healthy",
        "2/2 replicas ready",
    ),
    ("ready without message", ms(Ready=("True", "", "")), "Healthy", "Ready"),
    (
        "scaled to zero",
        ms(Ready=("False", "ScaledToZero", "0 replicas; idle for 300s")),
        "Healthy",
        "Scaled to zero; wakes on the first request",
    ),
    ("scaled down by hand", ms(Ready=("False", "ScaledDown", "spec.replicas is 0")), "Suspended", "spec.replicas is 0"),
    (
        "activating",
        ms(Ready=("False", "Activating", "waking up: 0/1 replicas ready")),
        "Progressing",
        "waking up: 0/1 replicas ready",
    ),
    (
        "awaiting capacity",
        ms(Ready=("False", "AwaitingCapacity", "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.")),
        "Progressing",
        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    ),
    ("reconciling", ms(Ready=("False", "Reconciling", "applying children")), "Progressing", "applying children"),
    ("progressing", ms(Ready=("False", "Progressing", "1/2 replicas ready")), "Progressing", "1/2 replicas ready"),
    ("ready unknown", ms(Ready=("Unknown", "", "")), "Progressing", "Waiting for the Ready condition"),
    ("observed, no conditions", ms(status={"replicas": 0}), "Progressing", "Waiting for the Ready condition"),
    ("no metadata.generation", ms(generation=None, Ready=("True", "Ready", "ok")), "Healthy", "ok"),
]


@pytest.mark.parametrize("obj, status, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_health(obj, status, message):
    hs = run_health(obj)
    assert hs["status"] in STATUSES
    assert (hs["status"], hs["message"]) == (status, message)


def test_docs_carry_the_same_script():
    doc = (REPO / "docs" / "argocd.md").read_text()
    assert "resource.customizations.health.serving.modelservice.dev_ModelService: |" in doc
    assert textwrap.indent(SCRIPT.read_text(), "    ") in doc, "docs/argocd.md is out of date with argocd/health.lua"
