"""Fault injection and bookkeeping for the reliability suite (issue #7).

- PrivateControlPlane: a ControlPlane in a temp dir whose kube-apiserver can be stopped, killed and restarted on the
  same etcd, and whose etcd can be compacted (through etcd's own HTTP gateway: no etcdctl on this machine).
- Inventory: every child the operator made in a namespace, grouped by owner, so a test can count duplicates,
  orphans and missing children exactly.
- exceptions_in / unexpected_exceptions: the tracebacks in an operator or gateway log, minus the expected ones.

Everything here waits on conditions with timeouts (tests.cluster.wait.wait_for); nothing sleeps blindly.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tests.cluster.controlplane import ControlPlane, pid_alive
from tests.cluster.wait import wait_for

MANAGED_BY = "app.kubernetes.io/managed-by=modelservice-operator"
MODELSERVICE_LABEL = "serving.modelservice.dev/modelservice"
GROUP, VERSION, PLURAL = "serving.modelservice.dev", "v1alpha1", "modelservices"


class PrivateControlPlane(ControlPlane):
    """A ControlPlane whose apiserver this suite may take down. Never use it on the shared .cluster/.

    The restart reuses the command line recorded in pids.json (same etcd, same port, same certificates), and
    records the new PID there so ControlPlane.stop() still stops everything.
    """

    def _component(self, name: str) -> dict[str, Any]:
        state = json.loads(self.pids_file.read_text())
        return next(c for c in state["components"] if c["name"] == name)

    @property
    def etcd_url(self) -> str:
        cmd = self._component("etcd")["cmd"]
        return next(a.split("=", 1)[1] for a in cmd if a.startswith("--listen-client-urls="))

    def apiserver_ready(self) -> bool:
        try:
            return self._get("/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def stop_apiserver(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> str:
        """Stop kube-apiserver: `sig`, then SIGKILL after `grace` seconds. Returns how it ended.

        A SIGTERMed v1.20 apiserver stops listening at once but lingers until its open watches time out (minutes):
        for clients it is gone immediately, so the grace is short.
        """
        comp = self._component("kube-apiserver")
        pid, cmd = comp["pid"], comp["cmd"]
        if not pid_alive(pid, cmd):
            return "not running"
        proc = self._procs.get("kube-apiserver")
        os.kill(pid, sig)
        try:
            wait_for(
                lambda: not pid_alive(pid, cmd) or (proc is not None and proc.poll() is not None),
                timeout=grace,
                interval=0.05,
                message="kube-apiserver to exit",
            )
            how = signal.Signals(sig).name
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: not pid_alive(pid, cmd) or (proc is not None and proc.poll() is not None),
                timeout=30,
                interval=0.05,
                message="kube-apiserver to exit after SIGKILL",
            )
            how = f"{signal.Signals(sig).name}, then SIGKILL after {grace:g}s"
        if proc is not None:
            proc.wait(10)
        return how

    def start_apiserver(self, timeout: float = 60) -> None:
        cmd = self._component("kube-apiserver")["cmd"]
        self._spawn("kube-apiserver", cmd)
        wait_for(self.apiserver_ready, timeout=timeout, interval=0.1, message="restarted kube-apiserver /readyz")

    def restart_apiserver(self, sig: int = signal.SIGTERM) -> str:
        how = self.stop_apiserver(sig)
        self.start_apiserver()
        return how

    # -- etcd, through its gRPC gateway (JSON over HTTP) ------------------------------------------------------------
    def _etcd(self, path: str, body: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        req = urllib.request.Request(
            self.etcd_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def etcd_revision(self) -> int:
        return int(
            self._etcd("/v3/kv/range", {"key": base64.b64encode(b"\0").decode(), "limit": 1, "keys_only": True})[
                "header"
            ]["revision"]
        )

    def etcd_compact_and_defrag(self) -> int:
        """Compact etcd's history up to now (every older resourceVersion becomes 'too old'), then defragment."""
        rev = self.etcd_revision()
        self._etcd("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        self._etcd("/v3/maintenance/defragment", {})
        return rev


# -- children bookkeeping ------------------------------------------------------------------------------------------
CHILD_COMMANDS = {  # kubectl resource name → kind; kubectl picks whatever version the cluster serves
    "deployments.apps": "Deployment",
    "services": "Service",
    "persistentvolumeclaims": "PersistentVolumeClaim",
    "horizontalpodautoscalers.autoscaling": "HorizontalPodAutoscaler",
    "poddisruptionbudgets.policy": "PodDisruptionBudget",
}


def kubectl_json(kubeconfig: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args, "-o", "json"], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return json.loads(out.stdout)


@dataclass
class Inventory:
    """What exists in one namespace: ModelServices by name, children by (kind, owner uid)."""

    modelservices: dict[str, dict[str, Any]]
    children: list[dict[str, Any]]

    @classmethod
    def take(cls, kubeconfig: Path, namespace: str) -> "Inventory":
        items = kubectl_json(kubeconfig, "get", "modelservices", "-n", namespace)["items"]
        children = []
        for resource, kind in CHILD_COMMANDS.items():
            for obj in kubectl_json(kubeconfig, "get", resource, "-n", namespace, "-l", MANAGED_BY)["items"]:
                obj["kind"] = kind
                children.append(obj)
        return cls({o["metadata"]["name"]: o for o in items}, children)

    def by_owner(self) -> dict[str, Counter]:
        out: dict[str, Counter] = defaultdict(Counter)
        for c in self.children:
            for ref in c["metadata"].get("ownerReferences") or []:
                if ref.get("controller"):
                    out[ref["uid"]][c["kind"]] += 1
        return out

    def report(self, expected_kinds: Iterable[str] = ("Deployment", "Service")) -> dict[str, Any]:
        """Counts of duplicates, orphans and missing children against the ModelServices that exist."""
        uids = {o["metadata"]["uid"]: name for name, o in self.modelservices.items()}
        owners = self.by_owner()
        duplicates = {
            uids.get(uid, uid): dict(kinds) for uid, kinds in owners.items() if any(n > 1 for n in kinds.values())
        }
        orphans = [
            f"{c['kind']}/{c['metadata']['name']}"
            for c in self.children
            if not any(r.get("controller") and r.get("uid") in uids for r in c["metadata"].get("ownerReferences") or [])
        ]
        missing = {
            name: [k for k in expected_kinds if owners.get(o["metadata"]["uid"], Counter())[k] != 1]
            for name, o in self.modelservices.items()
        }
        missing = {k: v for k, v in missing.items() if v}
        wrong_name = [
            f"{c['kind']}/{c['metadata']['name']}"
            for c in self.children
            if c["metadata"].get("labels", {}).get(MODELSERVICE_LABEL) is None
        ]
        return {
            "modelservices": len(self.modelservices),
            "children": len(self.children),
            "duplicates": duplicates,
            "orphans": orphans,
            "missing": missing,
            "unlabelled": wrong_name,
        }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def status_is_current_ready(obj: dict[str, Any]) -> bool:
    st = obj.get("status") or {}
    return (
        st.get("observedGeneration") == obj["metadata"].get("generation")
        and condition(obj, "Ready").get("status") == "True"
    )


# -- logs ------------------------------------------------------------------------------------------------------------
# Tracebacks an operator log may hold without anything being wrong: kopf logs the exception of a failing probe
# (that is how /healthz turns 500) and aiohttp logs the 500 it becomes.
EXPECTED_EXCEPTIONS = (
    r"kopf\._core\.actions\.execution\.PermanentError: no watch event for",
    r"kopf\._core\.engines\.activities\.ActivityError: One or more handlers failed",
)


def exceptions_in(text: str) -> list[str]:
    """The final 'Type: message' line of every traceback in a log."""
    out = []
    for block in text.split("Traceback (most recent call last):\n")[1:]:
        for line in block.splitlines():
            if line and not line[0].isspace():
                out.append(line)
                break
    return out


def unexpected_exceptions(text: str, allowed: tuple[str, ...] = EXPECTED_EXCEPTIONS) -> list[str]:
    return [e for e in exceptions_in(text) if not any(re.match(p, e) for p in allowed)]


def metric_sum(metrics: dict[str, float], prefix: str, **labels: str) -> float:
    """Sum the samples of one metric (name{labels} → value from OperatorProcess.metrics()) matching labels."""
    total = 0.0
    for key, value in metrics.items():
        name, _, rest = key.partition("{")
        if name != prefix:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_healthz(port: int, want: int, timeout: float, message: str) -> int:
    """Poll the operator's /healthz until it answers `want` (200 or 500)."""

    def check() -> Optional[int]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                code = r.status
        except urllib.error.HTTPError as e:
            code = e.code
        return code if code == want else None

    return wait_for(check, timeout=timeout, interval=0.2, message=message)
