"""Issue #7.1: the operator is SIGKILLed in the middle of a rollout and restarted; every ModelService ends with
exactly its children (no duplicates, no orphans, none missing) and a correct status.

The quick size (60) runs in `make test`; tests/reliability/test_chaos_soak.py runs 200 with three kills.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.reliability.scenarios import crash_mid_rollout

pytestmark = pytest.mark.integration

N = 60


def test_kill9_mid_rollout_leaves_exactly_the_children(rcluster, kube, namespace, start_operator, figures):
    r = crash_mid_rollout(
        kube, rcluster.kubeconfig, namespace, start_operator, n=N, kill_fractions=(0.3,), ready_timeout=150
    )
    figures.update(dataclasses.asdict(r))
    assert r.created == N
    inv = r.inventory
    assert inv["modelservices"] == N and inv["children"] == 2 * N, inv
    assert (inv["duplicates"], inv["orphans"], inv["missing"], inv["unlabelled"]) == ({}, [], {}, []), inv
    assert r.status_problems == []
    assert r.rolled_deployments == []  # the restarted operator re-applied nothing that changed a pod template
    # The restarted operator writes at most what was left to do: one apply per missing child (2 per object) plus
    # a few status writes per object; never a loop.
    assert r.writes_after_last_restart["apply"] <= 2 * N
    assert r.writes_after_last_restart["status"] <= 4 * N
    assert r.writes_after_last_restart["delete"] == 0
    assert r.errors_after_last_restart == 0
