"""The gateway as a real subprocess against a test cluster (`python -m modelservice.cli gateway`), one class for the
integration and the reliability suites and the benchmarks: its log in a file, its metrics and memory readable."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import processes
from tests.cluster.controlplane import free_port

HELD_LIMIT = 30
# What the integration tests run the gateway with: short timers so scale-to-zero scenarios take seconds.
TEST_FLAGS = (
    "--activation-timeout",
    "60s",
    "--activity-interval",
    "2s",
    "--max-body-bytes",
    "64Ki",
    "--max-held-per-model",
    str(HELD_LIMIT),
)


class GatewayProcess:
    def __init__(self, kubeconfig: Path, log_path: Path, *args: str, env: Optional[dict[str, str]] = None):
        self.kubeconfig, self.log_path, self.args = kubeconfig, log_path, list(args)
        self._new_ports()
        self.env = {"POD_NAME": "gateway-test-0", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 60) -> "GatewayProcess":
        processes.start_serving(
            self._spawn,
            self.healthy,
            self._new_ports,
            timeout=timeout,
            message=f"gateway /healthz; log {self.log_path}",
        )
        return self

    def _spawn(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "modelservice.cli",
            "gateway",
            "--kubeconfig",
            str(self.kubeconfig),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *self.args,
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env}
            )

    def _new_ports(self) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise processes.Exited(f"gateway exited; log:\n{self.log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The gateway's processes: the one we started and, with --workers N > 1, its N workers."""
        return [self.pid, *processes.children(self.pid)]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        processes.stop(self.proc)

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def rss_bytes(self) -> int:
        """Resident set size of the gateway process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")
