"""Session fixtures: the CRD installed, one operator running with the gateway features on, and the gateway."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.integration.gateway_process import TEST_FLAGS, GatewayProcess
from tests.integration.operator_process import OperatorProcess, install_crds

# The session operator's flags; a test that runs a second operator beside it uses the same ones, or the two would take
# turns rewriting what they disagree on (status.endpoint, the NetworkPolicy). The gateway runs here as a process, not
# a pod: the selector names the chart's gateway pods, and the policies are checked for what they select.
GATEWAY_POD_SELECTOR = "app.kubernetes.io/name=modelservice-operator,app.kubernetes.io/component=gateway"
OPERATOR_FLAGS = [
    "--gateway-enabled",
    "--network-policy",
    "--gateway-namespace",
    "modelservice-system",
    "--gateway-pod-selector",
    GATEWAY_POD_SELECTOR,
]


@pytest.fixture(scope="session")
def crds(cluster) -> None:
    install_crds(cluster.kubeconfig)


@pytest.fixture(scope="session")
def operator(cluster, crds, tmp_path_factory) -> Iterator[OperatorProcess]:
    # A short resync so the idle-resync test sees several passes; production default is 600 s.
    op = OperatorProcess(
        cluster.kubeconfig,
        tmp_path_factory.mktemp("operator") / "operator.log",
        extra_args=[*OPERATOR_FLAGS, "--resync-seconds", "3"],
    ).start()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def gateway(cluster, crds, tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(cluster.kubeconfig, tmp_path_factory.mktemp("gateway") / "gateway.log", *TEST_FLAGS).start()
    yield gw
    gw.stop()
