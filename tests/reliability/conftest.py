"""Fixtures of the reliability suite (issue #7).

Every test here runs on a *private* control plane in a temp dir, never on the shared .cluster/ or $KUBECONFIG:
the suite kills operators, restarts the API server and floods the cluster with fuzzed objects, and a session-wide
operator of another test module (cluster-wide, tests/integration/fixtures_operator.py) would otherwise reconcile
our objects too and make every write count meaningless.

- `rcluster` (package scope): a ControlPlane (with fake nodes) plus the CRD, shared by the tests that do not hurt
  the API server.
- `kube`: a client for it (tests/conftest.py's `namespace` then makes a fresh namespace per test on it).
- `restartable_cluster` (module scope): a PrivateControlPlane of its own, for the API server restart tests.
- `start_operator`, `start_gateway`: start an OperatorProcess / GatewayProcess (stopped at teardown, whatever
  happens).
- `stage` (module scope): the gateway-abuse stage (gateway_stage.py) on `rcluster`.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.cluster.kube import Kube, connect
from tests.integration.gateway_process import GatewayProcess
from tests.integration.operator_process import OperatorProcess, install_crds
from tests.reliability.gateway_stage import Stage, open_stage
from tests.reliability.harness import PrivateControlPlane

_FIGURES: list[tuple[str, dict]] = []


def _start(state_dir: Path) -> PrivateControlPlane:
    cp = PrivateControlPlane(state_dir, start_timeout=180)
    cp.start()
    install_crds(cp.kubeconfig)
    return cp


@pytest.fixture(scope="package")
def rcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateControlPlane]:
    cp = _start(tmp_path_factory.mktemp("reliability-cluster"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="package")
def kube(rcluster: PrivateControlPlane) -> Iterator[Kube]:
    k = connect(rcluster.kubeconfig)
    yield k
    k.api_client.close()


@pytest.fixture(scope="module")
def restartable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateControlPlane]:
    cp = _start(tmp_path_factory.mktemp("restartable-cluster"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
def start_operator(tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(kubeconfig: Path, *args: str, log_name: str = "operator.log") -> OperatorProcess:
        op = OperatorProcess(Path(kubeconfig), tmp_path / log_name, extra_args=list(args))
        started.append(op)  # before start(): a start that times out must still be stopped
        return op.start()

    yield start
    for op in started:
        if op.proc is not None and op.proc.poll() is None:
            os.kill(op.proc.pid, signal.SIGCONT)  # a test may have frozen it (SIGSTOP)
        op.stop()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(kubeconfig: Path, *args: str, log_name: str = "gateway.log", **kw) -> GatewayProcess:
        gw = GatewayProcess(Path(kubeconfig), tmp_path / log_name, *args, **kw)
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def stage(rcluster: PrivateControlPlane, kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    with open_stage(rcluster, kube, tmp_path_factory.mktemp("gateway-abuse")) as st:
        yield st


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict]:
    """A dict a test fills with its numbers (objects, faults, writes, seconds). They are printed in the terminal
    summary, and appended as JSON lines to $RELIABILITY_FIGURES when set (docs/reliability.md is made from them)."""
    data: dict = {}
    yield data
    if data:
        _FIGURES.append((request.node.nodeid, data))
        out = os.environ.get("RELIABILITY_FIGURES")
        if out:
            with open(out, "a") as f:
                f.write(json.dumps({"test": request.node.nodeid, **data}, default=str) + "\n")


def pytest_terminal_summary(terminalreporter) -> None:
    if _FIGURES:
        terminalreporter.section("reliability figures")
        for nodeid, data in _FIGURES:
            terminalreporter.write_line(f"{nodeid}: {json.dumps(data, default=str)}")
