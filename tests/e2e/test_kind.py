"""End to end on kind (via pytest-kind) where Docker and kind exist; elsewhere a skip that says what is missing.

The kind cluster is requested only after the checks pass, so a machine without Docker never tries to create one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cluster.wait import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def _docker_problem() -> str | None:
    host = os.environ.get("DOCKER_HOST", "")
    sock = Path("/var/run/docker.sock")
    if not host and not sock.exists():
        return f"no Docker daemon at {sock} (and DOCKER_HOST is unset)"
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    try:
        out = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return f"Docker daemon at {host or sock} did not answer `docker info` within 15 s"
    if out.returncode != 0:
        return f"Docker daemon at {host or sock} is unusable: {out.stderr.strip()[:200]}"
    return None


def _kind_problem(config: pytest.Config) -> str | None:
    if config.getoption("kind_bin", None) or shutil.which("kind") or os.environ.get("KIND_DOWNLOAD") == "1":
        return None
    return "no kind binary (put kind on PATH, pass --kind-bin, or set KIND_DOWNLOAD=1 to let pytest-kind fetch it)"


@pytest.fixture(scope="module")
def kind(request: pytest.FixtureRequest):
    problem = _docker_problem() or _kind_problem(request.config)
    if problem:
        print(f"e2e skipped: {problem}")
        pytest.skip(problem)
    return request.getfixturevalue("kind_cluster")


def test_kind_cluster_runs_the_crds(kind) -> None:
    wait_for(
        lambda: "Ready" in kind.kubectl("get", "nodes", "--no-headers"),
        timeout=180,
        interval=2,
        message="the kind node to be Ready",
    )
    crds = sorted((REPO_ROOT / "crds").glob("*.yaml"))
    for crd in crds:
        kind.kubectl("apply", "-f", str(crd))
    if crds:
        wait_for(
            lambda: "modelservices" in kind.kubectl("api-resources"),
            timeout=60,
            interval=1,
            message="the ModelService CRD to be served",
        )
