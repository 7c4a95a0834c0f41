"""The operator on a real API server: children, owner references, scale, drift, GC, bad input, capacity, idle."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.rest import ApiException

from modelservice import FIELD_MANAGER
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.operator_process import OPERATOR_FLAGS, OperatorProcess, kubectl

ENGINE_EXAMPLES = ["vllm", "sglang", "tgi", "triton", "ollama", "llamacpp", "custom", "scale-to-zero"]
# Engines with no build in our registries (docs/engines.md); llama.cpp's example runs the real llama-server.
STUBBED_ENGINE_EXAMPLES = {"sglang", "tgi", "triton", "ollama"}


def _owned_by(obj, owner) -> bool:
    refs = obj.metadata.owner_references or []
    return any(r.uid == owner["metadata"]["uid"] and r.controller and r.block_owner_deletion for r in refs)


def _hpa(kube, ns, name):
    """The HPA as JSON, whichever autoscaling version the cluster serves (None when absent)."""
    out = kubectl(
        kube.kubeconfig, "get", "hpa", name, "-n", ns, "-o", "json", "--ignore-not-found", "--show-managed-fields"
    )
    return json.loads(out) if out.strip() else None


@pytest.mark.parametrize("example", ENGINE_EXAMPLES)
def test_every_example_becomes_ready_with_owned_children(kube, namespace, operator, fake_nodes, example):
    obj = ms.example(example)
    name = obj["metadata"]["name"]
    created = ms.create(kube, namespace, obj)
    ready = ms.wait_condition(kube, namespace, name, "Ready", "True", timeout=90)
    dep = kube.apps.read_namespaced_deployment(name, namespace)
    svc = kube.core.read_namespaced_service(name, namespace)
    assert _owned_by(dep, created) and _owned_by(svc, created)
    assert svc.spec.ports[0].name == "http"
    status = ready["status"]
    assert status["url"] == f"http://{name}.{namespace}.svc.cluster.local:{svc.spec.ports[0].port}"
    assert status["readyReplicas"] == dep.status.ready_replicas and status["selector"]
    assert status["endpoint"] == f"/models/{namespace}/{name}/"
    if obj["spec"].get("replicas", 1) > 1:
        assert name in kubectl(kube.kubeconfig, "get", "pdb", "-n", namespace, "-o", "name")
    if example in STUBBED_ENGINE_EXAMPLES:  # no build of these engines here: the node says the stub stands in
        pods = kube.core.list_namespaced_pod(namespace).items
        wait_for(
            lambda: any(
                e.reason == "StubEngine"
                for p in pods
                for e in kube.core.list_namespaced_event(
                    namespace, field_selector=f"involvedObject.name={p.metadata.name}"
                ).items
            ),
            timeout=30,
            message="a StubEngine Event on the pod",
        )


def test_first_pass_reports_reconciling(kube, namespace, operator, fake_nodes):
    ms.create(
        kube, namespace, ms.body("first", podTemplate={"annotations": {"stub.modelservice.dev/startup-delay": "2"}})
    )
    obj = ms.wait_condition(kube, namespace, "first", "Reconciling", "True")
    assert ms.condition(obj, "Ready")["status"] == "False"
    ms.wait_condition(kube, namespace, "first", "Ready", "True")


def test_kubectl_scale_reaches_the_deployment(kube, namespace, operator, fake_nodes):
    ms.create(kube, namespace, ms.body("scaled"))
    ms.wait_condition(kube, namespace, "scaled", "Ready", "True")
    kubectl(kube.kubeconfig, "scale", "ms", "scaled", "-n", namespace, "--replicas=3")
    wait_for(
        lambda: kube.apps.read_namespaced_deployment("scaled", namespace).spec.replicas == 3,
        timeout=10,
        message="Deployment replicas 3",
    )
    obj = wait_for(
        lambda: (o := ms.get(kube, namespace, "scaled"))["status"].get("ready") == "3/3" and o,
        timeout=30,
        message="status 3/3 ready",
    )
    assert obj["status"]["replicas"] == 3 and ms.condition(obj, "Ready")["status"] == "True"
    assert "scaled" in kubectl(kube.kubeconfig, "get", "pdb", "-n", namespace, "-o", "name")


def test_drift_is_repaired_and_user_fields_are_left_alone(kube, namespace, operator, fake_nodes):
    ms.create(kube, namespace, ms.body("drift"))
    ms.wait_condition(kube, namespace, "drift", "Ready", "True")
    image = kube.apps.read_namespaced_deployment("drift", namespace).spec.template.spec.containers[0].image
    kube.apps.patch_namespaced_deployment(
        "drift",
        namespace,
        {
            "metadata": {"annotations": {"team.example.com/owner": "alice"}},
            "spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil:1"}]}}},
        },
    )
    kubectl(kube.kubeconfig, "delete", "service", "drift", "-n", namespace)  # the client mis-parses 1.20's reply
    wait_for(
        lambda: (
            kube.apps.read_namespaced_deployment("drift", namespace).spec.template.spec.containers[0].image == image
        ),
        timeout=10,
        message="image restored within 10 s",
    )
    wait_for(
        lambda: kube.core.read_namespaced_service("drift", namespace),
        timeout=10,
        message="Service recreated within 10 s",
    )
    annotations = kube.apps.read_namespaced_deployment("drift", namespace).metadata.annotations
    assert annotations.get("team.example.com/owner") == "alice"


def test_deleting_the_modelservice_collects_its_children(kube, namespace, operator, fake_nodes):
    ms.create(kube, namespace, ms.body("gc", replicas=2))
    ms.wait_condition(kube, namespace, "gc", "Ready", "True")
    ms.delete(kube, namespace, "gc")

    def gone():
        try:
            kube.apps.read_namespaced_deployment("gc", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, timeout=30, message="Deployment garbage-collected")
    wait_for(lambda: not kube.core.list_namespaced_service(namespace).items, timeout=30, message="Service GC'd")


def test_invalid_spec_stalls_once_and_recovers(kube, namespace, operator, fake_nodes):
    # Passes the CRD schema (pattern-valid URI) but not the operator's cross-field rules.
    ms.create(kube, namespace, ms.body("bad", engine="triton", model={"uri": "hf://org/model"}))
    obj = ms.wait_condition(kube, namespace, "bad", "Stalled", "True", "InvalidSpec")
    msg = ms.condition(obj, "Stalled")["message"]
    assert "spec.model.uri" in msg and "pvc://" in msg
    assert ms.condition(obj, "Ready")["status"] == "False"
    reconciles = operator.counter('modelservice_reconcile_total{result="invalid"}')
    wait_for(
        lambda: operator.counter('modelservice_reconcile_total{result="invalid"}') > reconciles,
        timeout=15,
        message="a resync of the invalid object",
    )  # resync every 3 s in tests
    warnings = ms.events_for(kube, namespace, "bad", "InvalidSpec")
    assert len(warnings) == 1 and warnings[0].type == "Warning" and warnings[0].count == 1
    with pytest.raises(ApiException):
        kube.apps.read_namespaced_deployment("bad", namespace)  # nothing half-built
    ms.patch(kube, namespace, "bad", {"spec": {"model": {"uri": "s3://bucket/repo"}}})
    obj = ms.wait_condition(kube, namespace, "bad", "Ready", "True")
    assert ms.condition(obj, "Stalled")["status"] == "False"


def test_schema_refuses_what_it_can(kube, namespace, crds):
    for spec in (
        {"engine": "nope"},
        {"engine": "vllm", "replicas": -1},
        {"engine": "vllm", "model": {"uri": "ftp://x"}},
        {"engine": "vllm", "autoscaling": {"minReplicas": 1}},
        {"engine": "vllm", "port": "http"},
        # The embedded core/v1 shapes are typed (corev1.py), not passed through.
        {"engine": "vllm", "placement": {"tolerations": [{"key": 5, "operator": "Exists"}]}},
        {"engine": "vllm", "placement": {"tolerations": [{"operator": "Sometimes"}]}},
        {"engine": "vllm", "placement": {"affinity": {"nodeAffinity": 5}}},
        {"engine": "vllm", "placement": {"topologySpreadConstraints": [{"maxSkew": 1}]}},
        {"engine": "vllm", "env": [{"name": "A", "valueFrom": {"secretKeyRef": "oops"}}]},
    ):
        with pytest.raises(ApiException) as e:
            ms.create(kube, namespace, {**ms.body("refused"), "spec": spec})
        assert e.value.status == 422, spec


def test_unknown_keys_in_embedded_core_types_are_pruned_as_in_a_pod(kube, namespace, crds):
    """Like a Deployment's: the API server drops them (kubectl's field validation warns or refuses first). Garbage
    nested 30 levels deep goes the same way, at once (docs/reliability.md finding 4: it used to pin the CPU)."""
    deep: dict = {"x": "y"}
    for _ in range(30):
        deep = {"d": [deep]}
    created = ms.create(
        kube,
        namespace,
        ms.body(
            "pruned",
            env=[{"name": "A", "value": "1", "extra": "x"}],
            placement={
                "affinity": {"nodeAfinity": deep, "podAntiAffinity": {}},
                "tolerations": [{"key": "gpu", "colour": "red"}],
            },
        ),
    )
    assert created["spec"]["env"] == [{"name": "A", "value": "1"}]
    assert created["spec"]["placement"]["affinity"] == {"podAntiAffinity": {}}
    assert created["spec"]["placement"]["tolerations"] == [{"key": "gpu"}]


def test_gpu_request_no_node_can_satisfy_awaits_capacity(kube, namespace, operator, fake_nodes):
    ms.create(kube, namespace, ms.body("huge", resources={"limits": {"nvidia.com/gpu": 64}}))
    obj = ms.wait_condition(kube, namespace, "huge", "Ready", "False", "AwaitingCapacity")
    assert "Insufficient nvidia.com/gpu" in ms.condition(obj, "Ready")["message"]
    assert ms.condition(obj, "Stalled")["status"] == "False"


def test_autoscaling_renders_an_hpa_and_removing_it_deletes_it(kube, namespace, operator, fake_nodes):
    ms.create(
        kube,
        namespace,
        ms.body(
            "auto",
            resources={"requests": {"cpu": "1"}},
            autoscaling={"minReplicas": 2, "maxReplicas": 4, "cpuUtilization": 70},
        ),
    )
    ms.wait_condition(kube, namespace, "auto", "Ready", "True")
    hpa = _hpa(kube, namespace, "auto")["spec"]
    assert hpa["minReplicas"] == 2 and hpa["maxReplicas"] == 4 and hpa["scaleTargetRef"]["name"] == "auto"
    ms.patch(kube, namespace, "auto", {"spec": {"autoscaling": None}})
    wait_for(lambda: _hpa(kube, namespace, "auto") is None, timeout=15, message="HPA deleted with autoscaling")


def _written_by_operator(obj: dict) -> tuple:
    """An object's spec and the operator's managedFields entries (their time moves with every write of ours)."""
    ours = [
        (m.get("operation"), m.get("time"), json.dumps(m.get("fieldsV1"), sort_keys=True))
        for m in obj["metadata"].get("managedFields") or []
        if m.get("manager") == FIELD_MANAGER
    ]
    assert ours, f"no managedFields entry of {FIELD_MANAGER}: {obj['metadata'].get('managedFields')}"
    return json.dumps(obj["spec"], sort_keys=True), ours


def _versions(kube, op, namespace, name):
    return (
        ms.get(kube, namespace, name)["metadata"]["resourceVersion"],
        kube.apps.read_namespaced_deployment(name, namespace).metadata.resource_version,
        kube.core.read_namespaced_service(name, namespace).metadata.resource_version,
        op.counter("modelservice_api_writes_total"),
    )


def _settle(kube, op, namespace, name):
    """Wait for a quiet state: the same versions and write count across one full reconcile pass."""

    def settled():
        before, passes = (
            _versions(kube, op, namespace, name),
            op.counter('modelservice_reconcile_total{result="success"}'),
        )
        wait_for(
            lambda: op.counter('modelservice_reconcile_total{result="success"}') > passes,
            timeout=10,
            message="a resync pass",
        )
        return before if _versions(kube, op, namespace, name) == before else None

    return wait_for(settled, timeout=30, message="a quiet state")


def test_idle_resync_writes_nothing(kube, namespace, crds, fake_nodes, tmp_path):
    # An operator of its own, scoped to this namespace, so its write counter speaks of this object only.
    op = OperatorProcess(
        kube.kubeconfig,
        tmp_path / "operator.log",
        extra_args=["--namespace", namespace, *OPERATOR_FLAGS, "--resync-seconds", "2"],
    ).start()
    try:
        ms.create(kube, namespace, ms.body("idle", replicas=2))
        ms.wait_condition(kube, namespace, "idle", "Ready", "True")
        before = _settle(kube, op, namespace, "idle")
        passes = op.counter('modelservice_reconcile_total{result="success"}')
        wait_for(
            lambda: op.counter('modelservice_reconcile_total{result="success"}') >= passes + 3,
            timeout=30,
            message="three more resync passes",
        )
        assert _versions(kube, op, namespace, "idle") == before  # no object changed and the operator sent no write
    finally:
        op.stop()


def test_a_change_the_api_server_refuses_is_stalled_not_retried(kube, namespace, operator, fake_nodes):
    """A PVC's storage class is immutable: the operator says so in status and does not hammer the API server."""
    ms.create(kube, namespace, ms.body("cached", cache={"size": "10Gi", "storageClassName": "fast"}))
    wait_for(
        lambda: kube.core.read_namespaced_persistent_volume_claim("cached-cache", namespace),
        timeout=30,
        message="cache PVC created",
    )
    ms.patch(kube, namespace, "cached", {"spec": {"cache": {"storageClassName": "slow"}}})
    obj = ms.wait_condition(kube, namespace, "cached", "Stalled", "True", "ApplyFailed", timeout=30)
    assert "PersistentVolumeClaim" in ms.condition(obj, "Stalled")["message"]
    assert ms.events_for(kube, namespace, "cached", "ApplyFailed")[0].type == "Warning"
    errors = operator.counter('modelservice_reconcile_total{result="error"}')
    ms.patch(kube, namespace, "cached", {"spec": {"cache": {"storageClassName": "fast"}}})
    obj = ms.wait_condition(kube, namespace, "cached", "Stalled", "False", timeout=30)
    assert operator.counter('modelservice_reconcile_total{result="error"}') == errors  # refused ≠ retried


def test_a_restarted_operator_adopts_its_children_without_rewriting_them(kube, namespace, crds, fake_nodes, tmp_path):
    """The second operator learns the children from its first LIST (not from events): it must neither re-apply
    them (0 writes at restart) nor stumble when one of them has to go (deleting needs the child's apiVersion)."""

    def start(log_name):
        # Flags as the session's operator (it may be running too, cluster-wide): two operators that disagree about
        # status (endpoint) would take turns rewriting it.
        return OperatorProcess(
            kube.kubeconfig,
            tmp_path / log_name,
            extra_args=["--namespace", namespace, *OPERATOR_FLAGS, "--resync-seconds", "2"],
        ).start()

    op = start("first.log")
    try:
        ms.create(
            kube,
            namespace,
            ms.body(
                "adopt",
                resources={"requests": {"cpu": "1"}},
                autoscaling={"minReplicas": 1, "maxReplicas": 2, "cpuUtilization": 70},
            ),
        )
        ms.wait_condition(kube, namespace, "adopt", "Ready", "True")
        _settle(kube, op, namespace, "adopt")
    finally:
        op.stop()
    # Not the HPA's resourceVersion: the HPA controller writes its status on its own schedule (no metrics here, so
    # its conditions move). What must not move is what the operator wrote: the spec and our manager's entry.
    hpa_ours = _written_by_operator(_hpa(kube, namespace, "adopt"))
    op = start("second.log")
    try:
        before = _versions(kube, op, namespace, "adopt")  # the new operator's counter starts at 0
        wait_for(
            lambda: op.counter('modelservice_reconcile_total{result="success"}') >= 3,
            timeout=30,
            message="the restarted operator reconciled (resync passes)",
        )
        writes = {k: v for k, v in op.metrics().items() if k.startswith("modelservice_api_writes_total")}
        assert not writes and _versions(kube, op, namespace, "adopt") == before, writes
        assert _written_by_operator(_hpa(kube, namespace, "adopt")) == hpa_ours
        ms.patch(kube, namespace, "adopt", {"spec": {"autoscaling": None}})
        wait_for(lambda: _hpa(kube, namespace, "adopt") is None, timeout=15, message="HPA deleted with autoscaling")
        assert op.counter('modelservice_reconcile_total{result="error"}') == 0, op.log_tail()
    finally:
        op.stop()
