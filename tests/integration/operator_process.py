"""The operator as a real subprocess against the test cluster: what users run, with its metrics readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import processes
from tests.cluster.controlplane import free_port
from tests.cluster.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "modelservices.serving.modelservice.dev.yaml"


def kubectl(kubeconfig: Path, *args: str, check: bool = True, input: Optional[str] = None) -> str:
    out = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args], capture_output=True, text=True, input=input, timeout=60
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def install_crds(kubeconfig: Path) -> None:
    kubectl(kubeconfig, "apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    wait_crd_established(kubeconfig)


def wait_crd_established(kubeconfig: Path) -> None:
    """Polled, not `kubectl wait`: kubectl 1.32 fails at once ("status.conditions accessor error") when it reads the
    CRD before the apiserver has written any condition, which a loaded machine makes likely."""
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
    wait_for(
        lambda: (
            kubectl(
                kubeconfig, "get", "crd/modelservices.serving.modelservice.dev", "-o", f"jsonpath={jsonpath}"
            ).strip()
            == "True"
        ),
        60,
        message="the ModelService CRD Established",
    )


# The operator's flags as the chart's default install gives them (the session operator's, the GPU-pool bench's). A test
# that runs a second operator beside the session's uses the same ones, or the two would take turns rewriting what they
# disagree on (status.endpoint, the NetworkPolicy, the preStop wait). The gateway runs here as a process, not a pod:
# the selector names the chart's gateway pods, and the policies are checked for what they select.
GATEWAY_POD_SELECTOR = "app.kubernetes.io/name=modelservice-operator,app.kubernetes.io/component=gateway"
OPERATOR_FLAGS = [
    "--gateway-enabled",
    "--network-policy",
    "--gateway-namespace",
    "modelservice-system",
    "--gateway-pod-selector",
    GATEWAY_POD_SELECTOR,
]


@dataclass
class OperatorProcess:
    kubeconfig: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None
    metrics_port: int = 0
    health_port: int = 0

    def start(self) -> "OperatorProcess":
        self._new_ports()
        processes.start_serving(
            self._spawn,
            self.healthy,
            self._new_ports,
            timeout=60,
            message=f"operator never became healthy; log {self.log_path}",
        )
        return self

    def _spawn(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "modelservice.cli",
            "run",
            "--kubeconfig",
            str(self.kubeconfig),
            "--metrics-port",
            str(self.metrics_port),
            "--health-port",
            str(self.health_port),
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True
            )

    def _new_ports(self) -> None:
        self.metrics_port, self.health_port = free_port(), free_port()

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise processes.Exited(f"operator exited ({self.proc and self.proc.returncode}); log:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        processes.stop(self.proc, sig)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """Prometheus text → {'name{labels}': value} (samples only; labels in the order the page gives them)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
        return out

    def counter(self, prefix: str) -> float:
        return sum(
            v
            for k, v in self.metrics().items()
            if k.startswith(prefix) and not k.endswith("_created") and "_created{" not in k
        )
