"""Issue #7.2: kube-apiserver restarts (same etcd) and watch expiry while the operator runs.

What forces "410 Gone / resourceVersion too old" on v1.20 (checked): restarting kube-apiserver. Its watch cache
starts empty at the current etcd revision, so every watch the operator resumes from an older resourceVersion gets
410 and every watch relists (at debug level kopf logs "Restarting the watch-stream" for its ModelService watch, and
kube.py "expired ... relisting" for the operator's own watches of what it owns).
etcd compaction alone does not do it while the apiserver runs, because watches are served from the apiserver's
watch cache, not from etcd; we compact and defragment after the restart anyway, so that no resourceVersion the
operator still holds is servable from etcd either.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

import pytest

from tests.cluster.kube import connect, create_namespace
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.operator_process import kubectl
from tests.reliability.harness import Inventory, unexpected_exceptions, wait_healthz
from tests.reliability.scenarios import freeze, reconciles, thaw, writes

pytestmark = pytest.mark.integration

WATCH_DEAD_AFTER = 5
# kopf caches probe results for 10 s, so /healthz turns 500 between WATCH_DEAD_AFTER and WATCH_DEAD_AFTER + 10 s.
HEALTH_TIMEOUT = WATCH_DEAD_AFTER + 10 + 10


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_operator_survives_apiserver_outage_restart_and_watch_expiry(restartable_cluster, start_operator, figures):
    cp = restartable_cluster
    kube = connect(cp.kubeconfig)
    ns = create_namespace(kube, "restart")
    op = start_operator(
        cp.kubeconfig,
        "--watch-dead-after",
        str(WATCH_DEAD_AFTER),
        "--resync-seconds",
        "600",
        "--log-level",
        "debug",
        log_name="operator-restart.log",
    )
    ms.create(kube, ns, ms.body("before"))
    ms.wait_condition(kube, ns, "before", "Ready", "True", timeout=60)

    # 1. The API server goes away entirely: liveness must say so once the window has passed.
    t0 = time.monotonic()
    how = cp.stop_apiserver(signal.SIGTERM)
    wait_healthz(op.health_port, 500, HEALTH_TIMEOUT, "/healthz 500 while the apiserver is down")
    unhealthy_after = time.monotonic() - t0
    assert op.proc.poll() is None, "the operator exited while the apiserver was down"

    # 2. It comes back on the same etcd; history is compacted so no old resourceVersion is servable.
    cp.start_apiserver()
    down_for = time.monotonic() - t0
    compacted_at = cp.etcd_compact_and_defrag()

    # 3. The operator recovers by itself: relists (410 on every watch), turns healthy, keeps reconciling.
    wait_healthz(op.health_port, 200, 60, "/healthz 200 after the apiserver is back")
    healthy_after = time.monotonic() - t0
    ms.create(kube, ns, ms.body("after"))
    ms.wait_condition(kube, ns, "after", "Ready", "True", timeout=60)
    ready_after = time.monotonic() - t0
    ms.wait_condition(kube, ns, "before", "Ready", "True", timeout=10)
    inv = Inventory.take(cp.kubeconfig, ns).report()
    log = op.log_path.read_text(errors="replace")
    # kopf's ModelService watch, and our own watches of what the operator owns (kube.py logs "expired … relisting").
    relists = log.count("Restarting the watch-stream") + log.count("; relisting")
    figures.update(
        apiserver_stop=how,
        seconds_to_unhealthy=round(unhealthy_after, 1),
        apiserver_down_seconds=round(down_for, 1),
        etcd_compacted_at_revision=compacted_at,
        watch_streams_restarted_410=relists,
        seconds_to_healthy=round(healthy_after, 1),
        seconds_to_new_object_ready=round(ready_after, 1),
        inventory=inv,
        reconcile_errors=reconciles(op, "error"),
        operator_alive=op.proc.poll() is None,
    )
    assert relists >= 1, "no watch expired: the scenario did not exercise a 410 relist"
    assert (inv["duplicates"], inv["orphans"], inv["missing"]) == ({}, [], {}), inv
    assert op.proc.poll() is None
    assert unexpected_exceptions(log) == []


def test_changes_made_while_the_watches_are_down_are_not_lost(restartable_cluster, start_operator, figures):
    """The operator is frozen (SIGSTOP: a long GC pause, a throttled container) while the apiserver restarts and a
    user deletes a ModelService and another one's Deployment. Thawed, the operator's watches expire (410) and relist;
    the relist must not hide those deletions: the Deployment comes back, the deleted ModelService is forgotten.
    Regression test of docs/reliability.md finding 2 (fixed in 697616b: caches rebuilt from fresh LISTs)."""
    cp = restartable_cluster
    kube = connect(cp.kubeconfig)
    ns = create_namespace(kube, "gap")
    op = start_operator(cp.kubeconfig, "--namespace", ns, "--resync-seconds", "2", log_name="operator-gap.log")
    for name in ("victim", "keeper"):
        ms.create(kube, ns, ms.body(name))
    for name in ("victim", "keeper"):
        ms.wait_condition(kube, ns, name, "Ready", "True", timeout=60)

    freeze(op)
    try:
        cp.restart_apiserver(signal.SIGKILL)
        ms.delete(kube, ns, "victim")
        kubectl(cp.kubeconfig, "delete", "deployment", "keeper", "-n", ns, "--wait=false")
        cp.restart_apiserver(signal.SIGKILL)  # a second restart: the watch cache now starts after the deletions
    finally:
        thaw(op)
    before = writes(op)

    def keeper_back() -> bool:
        return bool(kube.apps.list_namespaced_deployment(ns, field_selector="metadata.name=keeper").items)

    def managed() -> float:
        return op.metrics().get("modelservice_managed", -1)

    # What a correct cache reaches after the relist and a stale one never does (counting resync passes instead was
    # a stand-in for time: on a starved machine the relist could come after them). A timeout fails the test.
    wait_for(
        lambda: keeper_back() and managed() == 1,
        timeout=60,
        interval=0.5,
        message="keeper's Deployment recreated and the deleted ModelService forgotten (modelservice_managed 1)",
    )
    # No loop afterwards: three more resync passes (every 2 s, counted by the operator's own reconciles) add nothing.
    passes = reconciles(op, "success")
    wait_for(lambda: reconciles(op, "success") >= passes + 3, timeout=60, message="three more resync passes")
    figures.update(
        keeper_deployment_recreated=keeper_back(),
        managed_gauge=managed(),
        modelservices_that_exist=1,
        writes_in_window=writes(op) - before,
    )
    assert managed() == 1, f"the operator manages {managed():g} ModelServices; 1 exists"
    assert writes(op) - before <= 10  # keeper's Deployment and a few status writes, no loop


def test_liveness_stays_healthy_on_a_quiet_cluster(rcluster, kube, namespace, start_operator, figures):
    """Healthy watches on a cluster where nothing changes must not fail liveness (the chart's probe would restart
    the operator every --watch-dead-after + 60 s on a quiet cluster, 900 s by default). Regression test of
    docs/reliability.md finding 1 (fixed in 1e64897 by a heartbeat watch; since issue #17 by the operator's own watches,
    resumed every --watch-dead-after/3)."""
    dead_after = 3  # the old probe failed after 3 quiet seconds; the operator's watches now resume every second
    op = start_operator(
        rcluster.kubeconfig,
        "--namespace",
        namespace,
        "--watch-dead-after",
        str(dead_after),
        log_name="operator-quiet.log",
    )
    ms.create(kube, namespace, ms.body("quiet"))
    ms.wait_condition(kube, namespace, "quiet", "Ready", "True", timeout=60)
    assert rcluster.apiserver_ready()
    t0, start = time.monotonic(), time.time()
    # A broken probe has turned 500 once the last events of the rollout (a few seconds after Ready), the window and
    # kopf's 10 s probe cache have passed. The observation ends when the operator itself says its watches answered
    # after that span (its last-watch-event metric; watch resumptions keep it fresh on a quiet cluster), not when the
    # test's clock says so; every /healthz answer on the way must be 200, and an operator that exits or stops
    # answering fails the test (a timeout) instead of passing it.
    span = 5 + dead_after + 10 + 6
    answers: list[int] = []

    class Unhealthy(AssertionError):
        pass

    def healthy_past_the_span() -> bool:
        if op.proc.poll() is not None:
            raise Unhealthy(f"the operator exited ({op.proc.returncode})")
        answers.append(_healthz(op.health_port))
        if answers[-1] != 200:
            raise Unhealthy(
                f"/healthz {answers[-1]} after {time.monotonic() - t0:.1f}s although the apiserver and "
                "the watches are fine"
            )
        return op.metrics().get("modelservice_last_watch_event_timestamp_seconds", 0) >= start + span

    wait_for(
        healthy_past_the_span,
        timeout=span + 60,
        interval=0.5,
        fatal=(Unhealthy,),
        message="the operator's watches to answer past the window, /healthz 200 throughout",
    )
    figures.update(
        watch_dead_after=dead_after,
        healthz_200_answers=len(answers),
        seconds_observed=round(time.monotonic() - t0, 1),
        apiserver_ready=rcluster.apiserver_ready(),
    )
