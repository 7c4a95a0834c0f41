"""Issue #7.3: another writer keeps editing a Deployment field the operator owns; the operator wins it back within
10 s of the writer stopping, with about one write per foreign edit (no hot loop), and leaves alone the fields it
does not own (an annotation a user added)."""

from __future__ import annotations

import time

import pytest

from tests.cluster.wait import WaitTimeout, wait_for
from tests.integration import ms
from tests.reliability.scenarios import writes

pytestmark = pytest.mark.integration

PERIOD, DURATION = 0.5, 10.0
EDITS = int(DURATION / PERIOD)


def _image(kube, ns, name) -> str:
    return kube.apps.read_namespaced_deployment(name, ns).spec.template.spec.containers[0].image


def fight(kube, ns: str, name: str, edits: int, period: float) -> list[float]:
    """The rogue writer: `edits` strategic-merge patches of the container image, one every `period` seconds,
    each waiting (bounded) for its own tick. Returns the monotonic time of each edit."""
    times = []
    start = time.monotonic()
    for i in range(edits):
        tick = start + i * period
        wait_for(lambda: time.monotonic() >= tick, timeout=period + 1, interval=0.02, message="the next tick")
        kube.apps.patch_namespaced_deployment(
            name, ns, {"spec": {"template": {"spec": {"containers": [{"name": "server", "image": f"rogue/img:{i}"}]}}}},
            field_manager="rogue-writer")
        times.append(time.monotonic())
    return times


def test_foreign_writer_loses_without_a_hot_loop(rcluster, rkube, rnamespace, start_operator, figures):
    kube, ns, name = rkube, rnamespace, "contested"
    op = start_operator(rcluster.kubeconfig, "--namespace", ns, "--resync-seconds", "600")
    ms.create(kube, ns, ms.body(name))
    ms.wait_condition(kube, ns, name, "Ready", "True", timeout=60)
    ours = _image(kube, ns, name)
    # A field we do not own: a user's annotation, written by another manager.
    kube.apps.patch_namespaced_deployment(name, ns, {"metadata": {"annotations": {"team.example.com/owner": "alice"}}},
                                          field_manager="alice")
    wait_for(lambda: _image(kube, ns, name) == ours, timeout=5, message="settled")
    before = writes(op, verb="apply", kind="Deployment")
    generation_before = kube.apps.read_namespaced_deployment(name, ns).metadata.generation

    times = fight(kube, ns, name, EDITS, PERIOD)
    stopped = time.monotonic()
    wait_for(lambda: _image(kube, ns, name) == ours, timeout=10, interval=0.1,
             message="the operator's image back within 10 s of the writer stopping")
    won_after = time.monotonic() - stopped
    settled_writes = writes(op, verb="apply", kind="Deployment") - before
    # No hot loop: once won back, neither the write counter nor the Deployment's generation moves (3 s observed).
    generation = kube.apps.read_namespaced_deployment(name, ns).metadata.generation
    try:
        wait_for(lambda: writes(op, verb="apply", kind="Deployment") - before != settled_writes
                 or kube.apps.read_namespaced_deployment(name, ns).metadata.generation != generation,
                 timeout=3, interval=0.25, message="another write")
        quiet = False
    except WaitTimeout:
        quiet = True
    dep = kube.apps.read_namespaced_deployment(name, ns)
    managers = {m.manager: m.operation for m in dep.metadata.managed_fields or []}
    figures.update(foreign_edits=len(times), writer_seconds=round(times[-1] - times[0], 1),
                   operator_deployment_applies=settled_writes, seconds_to_win_back=round(won_after, 2),
                   deployment_generations=generation - generation_before, quiet_after=quiet,
                   user_annotation_kept=dep.metadata.annotations.get("team.example.com/owner") == "alice",
                   field_managers=sorted(managers))
    assert len(times) == EDITS
    assert 1 <= settled_writes <= EDITS + 2, settled_writes  # ideally one per foreign edit
    assert quiet
    assert dep.metadata.annotations.get("team.example.com/owner") == "alice"
    assert _image(kube, ns, name) == ours
    ms.wait_condition(kube, ns, name, "Ready", "True", timeout=30)
