"""The local control plane is a real Kubernetes: controllers, scheduler, RBAC and the fake node agent all act."""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.kube import Kube, create_namespace, delete_namespace, pod_ready
from tests.cluster.podspec import STUB_IMAGE
from tests.cluster.wait import wait_for

MODEL = "tiny-model"
LABELS = {"app": "stub"}


def _is_loopback_pod_ip(ip: str | None) -> bool:
    return bool(ip) and ipaddress.ip_address(ip).is_loopback and ip != "127.0.0.1"


def _stub_container(**extra) -> client.V1Container:
    return client.V1Container(
        name="engine",
        image=STUB_IMAGE,
        args=["--served-model-name", MODEL],
        ports=[client.V1ContainerPort(container_port=8000, name="http")],
        readiness_probe=client.V1Probe(http_get=client.V1HTTPGetAction(path="/health", port="http")),
        **extra,
    )


@pytest.fixture(scope="module")
def served(kube: Kube, fake_nodes: list[str]):
    """A 2-replica Deployment of the stub behind a Service, shared by the tests that read it."""
    ns = create_namespace(kube, "served")
    kube.apps.create_namespaced_deployment(
        ns,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="stub"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=LABELS),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=LABELS), spec=client.V1PodSpec(containers=[_stub_container()])
                ),
            ),
        ),
    )
    kube.core.create_namespaced_service(
        ns,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="stub"),
            spec=client.V1ServiceSpec(selector=LABELS, ports=[client.V1ServicePort(port=80, target_port=8000)]),
        ),
    )
    yield ns
    delete_namespace(kube, ns)


def _ready_pods(kube: Kube, ns: str) -> list[client.V1Pod]:
    pods = kube.core.list_namespaced_pod(ns, label_selector="app=stub").items
    return [p for p in pods if pod_ready(p) and not p.metadata.deletion_timestamp]


def test_garbage_collector_cascades_to_children(kube: Kube, namespace: str) -> None:
    owner = kube.core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"))
    )
    kube.core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name="child",
                owner_references=[
                    client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
                ],
            )
        ),
    )
    kube.core.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        try:
            kube.core.read_namespaced_config_map("child", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(child_gone, timeout=30, message="the garbage collector to delete the child ConfigMap")


def test_deployment_pods_are_scheduled_and_become_ready(kube: Kube, served: str, fake_nodes: list[str]) -> None:
    pods = wait_for(
        lambda: len(p := _ready_pods(kube, served)) == 2 and p, timeout=60, message="2 Ready pods of the Deployment"
    )
    for pod in pods:
        assert pod.spec.node_name in fake_nodes  # placed by kube-scheduler, not by us
        assert pod.status.phase == "Running"
        assert _is_loopback_pod_ip(pod.status.pod_ip)
        assert pod.status.pod_ips[0].ip == pod.status.pod_ip
        assert pod.status.host_ip == "127.0.0.1"
        assert all(cs.ready for cs in pod.status.container_statuses)
    assert len({p.status.pod_ip for p in pods}) == 2
    dep = wait_for(
        lambda: (d := kube.apps.read_namespaced_deployment("stub", served)).status.ready_replicas == 2 and d,
        timeout=30,
        message="Deployment status readyReplicas=2",
    )
    assert dep.status.available_replicas == 2


def _ready_slice_addresses(kube: Kube, ns: str, service: str) -> set[str]:
    """The addresses a Service's EndpointSlices list as ready: where a proxy or the gateway sends requests."""
    version = kube.preferred_version("discovery.k8s.io")
    slices = kube.custom.list_namespaced_custom_object(
        "discovery.k8s.io", version, ns, "endpointslices", label_selector=f"kubernetes.io/service-name={service}"
    )
    return {
        a
        for s in slices["items"]
        for e in s.get("endpoints") or []
        if (e.get("conditions") or {}).get("ready")
        for a in e["addresses"]
    }


def test_endpointslice_lists_pod_loopback_addresses(kube: Kube, served: str) -> None:
    version = kube.preferred_version("discovery.k8s.io")
    pods = wait_for(lambda: len(p := _ready_pods(kube, served)) == 2 and p, timeout=60, message="2 Ready pods")
    want = {p.status.pod_ip for p in pods}
    got = wait_for(
        lambda: (a := _ready_slice_addresses(kube, served, "stub")) == want and a,
        timeout=30,
        message=f"EndpointSlice ({version}) with ready addresses {sorted(want)}",
    )
    assert all(_is_loopback_pod_ip(a) for a in got)


def test_stub_streams_chat_completion_through_pod_address(kube: Kube, served: str) -> None:
    pod = wait_for(lambda: _ready_pods(kube, served), timeout=60, message="a Ready pod")[0]
    conn = http.client.HTTPConnection(pod.status.pod_ip, 8000, timeout=10)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True, "max_tokens": 5}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    events = [line[len(b"data: ") :].decode() for line in resp.read().split(b"\n\n") if line.startswith(b"data: ")]
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["model"] for c in chunks} == {MODEL}  # the agent read --served-model-name from the pod spec
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "token0 token1 token2 token3 token4"


def test_rbac_denies_serviceaccount_without_role(kube: Kube, namespace: str) -> None:
    kube.core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody"))
    )
    sa = wait_for(
        lambda: (s := kube.core.read_namespaced_service_account("nobody", namespace)).secrets and s,
        timeout=30,
        message="token Secret for ServiceAccount nobody",
    )
    secret = kube.core.read_namespaced_secret(sa.secrets[0].name, namespace)
    token = base64.b64decode(secret.data["token"]).decode()

    admin_cfg = kube.api_client.configuration
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert = admin_cfg.host, admin_cfg.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    with client.ApiClient(cfg) as as_sa:
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(as_sa).list_namespaced_pod(namespace)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:nobody" in denied.value.body

        # The token itself is valid: granting a role lets the same request through.
        kube.rbac.create_namespaced_role_binding(
            namespace,
            {  # a dict: the Subject model's name varies by client
                "metadata": {"name": "nobody-view"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
                "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
            },
        )
        wait_for(
            lambda: client.CoreV1Api(as_sa).list_namespaced_pod(namespace) is not None,
            timeout=15,
            message="the ServiceAccount to be allowed after the RoleBinding",
        )


def test_pod_asking_for_too_many_gpus_stays_pending(kube: Kube, namespace: str, fake_nodes: list[str]) -> None:
    kube.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="greedy"),
            spec=client.V1PodSpec(
                containers=[_stub_container(resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "99"}))]
            ),
        ),
    )

    def unschedulable():
        pod = kube.core.read_namespaced_pod("greedy", namespace)
        cond = next((c for c in pod.status.conditions or [] if c.type == "PodScheduled"), None)
        return cond if cond and cond.status == "False" else None

    cond = wait_for(unschedulable, timeout=30, message="PodScheduled=False on the greedy pod")
    assert cond.reason == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond.message
    pod = kube.core.read_namespaced_pod("greedy", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name and not pod.status.pod_ip


def test_ready_waits_for_stub_startup_delay_and_deletion_needs_no_kubelet(
    kube: Kube, namespace: str, fake_nodes: list[str]
) -> None:
    delay = 2.0
    kube.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="slow", annotations={"stub.modelservice.dev/startup-delay": str(delay)}),
            spec=client.V1PodSpec(containers=[_stub_container()]),
        ),
    )
    running = wait_for(
        lambda: (p := kube.core.read_namespaced_pod("slow", namespace)).status.pod_ip and p,
        timeout=30,
        message="the slow pod to get an address",
    )
    assert not pod_ready(running), "Ready before the stub finished its startup delay"
    pod = wait_for(
        lambda: pod_ready(p := kube.core.read_namespaced_pod("slow", namespace)) and p,
        timeout=30,
        interval=0.1,
        message="the slow pod to become Ready",
    )
    ready_at = next(c.last_transition_time for c in pod.status.conditions if c.type == "Ready")
    # Server timestamps have 1 s resolution: a 2 s delay shows as at least 1 s between start and Ready.
    assert (ready_at - pod.status.start_time).total_seconds() >= delay - 1
    ip = pod.status.pod_ip

    kube.core.delete_namespaced_pod("slow", namespace)  # default grace period: only the agent can finish it

    def gone() -> bool:
        try:
            kube.core.read_namespaced_pod("slow", namespace)
            return False
        except ApiException as e:
            return e.status == 404

    wait_for(gone, timeout=30, message="the pod to be deleted by the node agent")

    def stub_stopped() -> bool:
        try:
            http.client.HTTPConnection(ip, 8000, timeout=1).request("GET", "/health")
            return False
        except OSError:
            return True

    wait_for(stub_stopped, timeout=10, message=f"the stub at {ip}:8000 to stop")


def test_restarted_node_agent_readopts_its_pods(cluster, kube: Kube, namespace: str, fake_nodes: list[str]) -> None:
    if cluster.control_plane is None:
        pytest.skip("the cluster's node agent is not ours to restart")
    kube.core.create_namespaced_pod(
        namespace,
        client.V1Pod(metadata=client.V1ObjectMeta(name="kept"), spec=client.V1PodSpec(containers=[_stub_container()])),
    )
    before = wait_for(
        lambda: pod_ready(p := kube.core.read_namespaced_pod("kept", namespace)) and p,
        timeout=30,
        message="the pod to become Ready",
    )
    cluster.control_plane.restart_node_agent()

    def answers() -> bool:
        conn = http.client.HTTPConnection(before.status.pod_ip, 8000, timeout=1)
        try:
            conn.request("GET", "/v1/models")
            return json.loads(conn.getresponse().read())["data"][0]["id"] == MODEL
        finally:
            conn.close()

    wait_for(answers, timeout=15, message=f"the re-adopted stub at {before.status.pod_ip}:8000")
    after = kube.core.read_namespaced_pod("kept", namespace)
    assert after.status.pod_ip == before.status.pod_ip and pod_ready(after)


def test_a_terminating_pod_serves_through_its_prestop_sleep(kube: Kube, namespace: str, fake_nodes: list[str]) -> None:
    """As a kubelet does: a pod being deleted runs its preStop `sleep` before SIGTERM, so a request already on its way
    when the EndpointSlice drops the pod is still answered (the race render.PRESTOP_SECONDS covers for the gateway)."""
    labels = {"app": "prestop"}
    hook = client.V1Lifecycle(pre_stop=client.V1LifecycleHandler(_exec=client.V1ExecAction(command=["sleep", "600"])))
    kube.core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="prestop", labels=labels),
            spec=client.V1PodSpec(containers=[_stub_container(lifecycle=hook)], termination_grace_period_seconds=900),
        ),
    )
    kube.core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="prestop"),
            spec=client.V1ServiceSpec(selector=labels, ports=[client.V1ServicePort(port=80, target_port=8000)]),
        ),
    )

    def ready_addresses() -> set[str]:
        return _ready_slice_addresses(kube, namespace, "prestop")

    pod = wait_for(
        lambda: pod_ready(p := kube.core.read_namespaced_pod("prestop", namespace)) and p,
        timeout=60,
        message="the pod to become Ready",
    )
    ip = pod.status.pod_ip
    wait_for(lambda: ready_addresses() == {ip}, timeout=30, message=f"the EndpointSlice to list {ip}")

    def health() -> int:
        conn = http.client.HTTPConnection(ip, 8000, timeout=10)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status
        finally:
            conn.close()

    kube.core.delete_namespaced_pod("prestop", namespace)  # default grace: 900 s, 600 of them in the hook
    try:
        wait_for(lambda: not ready_addresses(), timeout=30, message="the EndpointSlice to drop the terminating pod")
        assert kube.core.read_namespaced_pod("prestop", namespace).metadata.deletion_timestamp
        assert health() == 200  # out of the slice, still serving: the hook holds its SIGTERM
    finally:
        kube.core.delete_namespaced_pod("prestop", namespace, grace_period_seconds=0)  # as `kubectl delete --force`

    def stub_stopped() -> bool:
        try:
            health()
            return False
        except OSError:
            return True

    wait_for(stub_stopped, timeout=30, message=f"the force-deleted pod's stub at {ip}:8000 to stop")
