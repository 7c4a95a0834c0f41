"""Root conftest: marks every test by the folder it lives in, so `-m "unit or integration"` selects by layer; and the
one `namespace` fixture, on whichever `kube` the test's folder provides (tests/integration: the shared cluster;
tests/reliability: its private control plane)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.cluster.kube import Kube, create_namespace, delete_namespace

TESTS_DIR = Path(__file__).resolve().parent
LAYERS = ("unit", "integration", "e2e")  # tests/reliability marks its own (integration, or chaos)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            layer = Path(item.path).resolve().relative_to(TESTS_DIR).parts[0]
        except ValueError:
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, ready for pods; deleted afterwards (without waiting for it to go)."""
    name = create_namespace(kube, request.node.name)
    yield name
    delete_namespace(kube, name)
