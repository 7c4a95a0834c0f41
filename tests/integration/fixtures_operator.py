"""Session fixtures: the CRD installed, one operator running with the gateway features on, and the gateway."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.integration.gateway_process import TEST_FLAGS, GatewayProcess
from tests.integration.operator_process import OPERATOR_FLAGS, OperatorProcess, install_crds


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
