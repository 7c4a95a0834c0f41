"""A real Prometheus (Debian's `prometheus` package) for tests: loopback only, a temp directory, a short scrape
interval, static targets. `make deps` (run by `make test`) installs the package when it is missing (hack/deps.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Optional

import yaml

from tests.cluster import processes
from tests.cluster.controlplane import free_port
from tests.cluster.wait import wait_for

SCRAPE_INTERVAL = 1.0  # seconds


def binary() -> Optional[str]:
    return shutil.which("prometheus")


class PrometheusProcess:
    def __init__(self, work: Path, targets: dict[str, str]):
        """targets: job name → host:port serving /metrics."""
        self.work, self.targets = work, targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "PrometheusProcess":
        exe = binary()
        if exe is None:
            raise RuntimeError("prometheus is not installed: apt-get install -y prometheus (make deps)")
        self.work.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL:g}s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in self.targets.items()
            ],
        }
        (self.work / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(self.work / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={self.work / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.work / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for(self._ready, timeout=60, message=f"Prometheus ready; log {self.work / 'prometheus.log'}")
        return self

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited: {(self.work / 'prometheus.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql: str, at: Optional[float] = None) -> list[dict[str, Any]]:
        params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"Prometheus refused {promql!r}: {e.read()[:500]!r}") from None
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def scraped_after(self, job: str, t: float) -> bool:
        """A successful scrape of `job` began after wall-clock time t."""
        got = self.query(f'timestamp(up{{job="{job}"}} == 1)')
        return bool(got) and float(got[0]["value"][1]) > t

    def wait_scraped(self, t: Optional[float] = None, timeout: float = 30) -> float:
        """Until every job was scraped after t (default: now); returns t."""
        t = time.time() if t is None else t
        wait_for(
            lambda: all(self.scraped_after(job, t) for job in self.targets),
            timeout=timeout,
            interval=0.2,
            message="a Prometheus scrape of every target",
        )
        return t

    def stop(self) -> None:
        processes.stop(self.proc)
