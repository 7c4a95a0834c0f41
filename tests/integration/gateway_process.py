"""The gateway as a real subprocess against the test cluster (`python -m modelservice.cli gateway`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.controlplane import free_port
from tests.cluster.wait import wait_for

HELD_LIMIT = 30


class GatewayProcess:
    def __init__(self, kubeconfig: Path, log_path: Path, extra_args: tuple[str, ...] = ()):
        self.kubeconfig, self.log_path, self.extra_args = kubeconfig, log_path, list(extra_args)
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "GatewayProcess":
        cmd = [sys.executable, "-m", "modelservice.cli", "gateway", "--kubeconfig", str(self.kubeconfig),
               "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--activation-timeout", "60s", "--activity-interval", "2s", "--max-body-bytes", "64Ki",
               "--max-held-per-model", str(HELD_LIMIT), *self.extra_args]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "POD_NAME": "gateway-test-0"}, start_new_session=True)
        wait_for(self.healthy, timeout=30, message=f"gateway /healthz; log {self.log_path}")
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"gateway exited; log:\n{self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total
