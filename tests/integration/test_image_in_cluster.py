"""What a user does with the product: `helm install` the chart with the image `make image` built, and use it.

The fake node agent runs the image's pods for real (tests/cluster/image_pods.py): the image's root filesystem read-only,
as its non-root user, with exactly the chart's pod spec (command, args, env, probes, securityContext, volumes, the
ServiceAccount token). The operator and the gateway inside those pods talk to the local API server with their own
credentials and RBAC; the test talks to the gateway at its pod address, as a client inside the cluster would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from modelservice.labels import MODELSERVICE_LABEL
from tests import helm_util as hu
from tests.cluster import oci_images
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.integration.engine_client import check_stream, stream_chat
from tests.integration.operator_process import kubectl

REPO = Path(__file__).resolve().parents[2]
CRD_NAME = "crd/modelservices.serving.modelservice.dev"
LLAMA = dict(
    engine="llamacpp",
    image=None,
    model={"uri": "hf://org/model-GGUF:Q8_0"},
    args=["-t", "1", "-c", "2048", "-np", "1"],
    autoscaling={"minReplicas": 0, "maxReplicas": 1, "scaleToZeroAfter": "5s"},
)
READY_TIMEOUT = 240  # the image's pods: a Python start from a read-only root on a busy 2-core machine


def app_version() -> str:
    return yaml.safe_load((hu.CHART_DIR / "Chart.yaml").read_text())["appVersion"]


@pytest.fixture(scope="module")
def image_archive() -> Path:
    """The archive `make image` writes (`make test` builds it first); built here when missing, never skipped."""
    archive = oci_images.CACHE / f"modelservice-operator-{app_version()}.oci.tar"
    if not archive.is_file():
        done = subprocess.run(
            ["bash", str(REPO / "hack" / "build-image.sh"), "build"], capture_output=True, text=True, timeout=3000
        )
        assert done.returncode == 0, f"make image failed:\n{done.stderr[-3000:]}"
    assert archive.is_file(), f"make image did not leave {archive}"
    return archive


@pytest.fixture
def helm_bin() -> str:
    return hu.helm_binary()


def helm(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return hu.run_helm("--kubeconfig", str(kubeconfig), *args, check=check)


def diagnose(kubeconfig: Path, ns: str, selector: str) -> str:
    """What a user would look at: describe and the logs (current and previous) of the pods."""
    out = [kubectl(kubeconfig, "describe", "pods", "-n", ns, "-l", selector, check=False)]
    for prev in ("", "--previous"):
        out.append(
            kubectl(kubeconfig, "logs", "-n", ns, "-l", selector, "--tail=30", *([prev] if prev else []), check=False)
        )
    return "\n".join(out)[-6000:]


def rolled_out(kube, ns: str, name: str, image: str) -> bool:
    """Every replica of the Deployment runs `image` and is Ready (its own readiness probe), and no old pod is left."""
    d = kube.apps.read_namespaced_deployment(name, ns)
    st = d.status
    want = d.spec.replicas
    if d.spec.template.spec.containers[0].image != image:
        return False
    if (st.observed_generation or 0) < d.metadata.generation:
        return False
    if (st.updated_replicas or 0) != want or (st.ready_replicas or 0) != want or (st.replicas or 0) != want:
        return False
    sel = ",".join(f"{k}={v}" for k, v in d.spec.selector.match_labels.items())
    pods = [p for p in kube.core.list_namespaced_pod(ns, label_selector=sel).items if not p.metadata.deletion_timestamp]
    return len(pods) == want and all(
        p.spec.containers[0].image == image and p.status.container_statuses and p.status.container_statuses[0].ready
        for p in pods
    )


def wait_rolled_out(kube, kubeconfig: Path, ns: str, name: str, image: str, timeout: float = READY_TIMEOUT) -> None:
    """Waits for rolled_out(); failing, says why as a user would find it (describe, logs), not just "timed out"."""
    try:
        wait_for(
            lambda: rolled_out(kube, ns, name, image),
            timeout=timeout,
            message=f"deployment {ns}/{name} Ready on {image}",
        )
    except Exception as e:
        d = kube.apps.read_namespaced_deployment(name, ns)
        sel = ",".join(f"{k}={v}" for k, v in d.spec.selector.match_labels.items())
        raise AssertionError(f"{e}\n{diagnose(kubeconfig, ns, sel)}") from e


def image_pod(kube, ns: str, component: str):
    pods = [
        p
        for p in kube.core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/component={component}").items
        if not p.metadata.deletion_timestamp
    ]
    assert len(pods) == 1, [p.metadata.name for p in pods]
    return pods[0]


@pytest.fixture
def no_host_operator(operator) -> Iterator[None]:
    """The session's operator (a host process watching every namespace) is paused: the chart's operator is the only
    one reconciling this test's ModelServices, as on a real cluster."""
    operator.stop()
    yield
    operator.start()


@pytest.fixture
def adopted_crd(cluster) -> Iterator[None]:
    """The session's CRD (installed with kubectl like every other test's) made adoptable by this release, so the
    chart installs and keeps it as it would on a fresh cluster."""
    yield
    # helm uninstall kept it (resource-policy: keep) with helm's ownership marks: drop them for the next test.
    kubectl(
        cluster.kubeconfig,
        "annotate",
        CRD_NAME,
        "meta.helm.sh/release-name-",
        "meta.helm.sh/release-namespace-",
        check=False,
    )


def test_helm_install_runs_the_image_and_serves_a_model_from_zero(
    kube, cluster, namespace, crds, fake_nodes, engines, image_archive, helm_bin, adopted_crd, no_host_operator
):
    kc, tag = cluster.kubeconfig, app_version()
    release, repo = "ms-image", oci_images.LOCAL_REPOSITORY
    image = f"{repo}:{tag}"
    for k, v in (("meta.helm.sh/release-name", release), ("meta.helm.sh/release-namespace", namespace)):
        kubectl(kc, "annotate", "--overwrite", CRD_NAME, f"{k}={v}")
    kubectl(kc, "label", "--overwrite", CRD_NAME, "app.kubernetes.io/managed-by=Helm")
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "IfNotPresent"},
        "watchNamespaces": [namespace],
        "gateway": {"replicas": 1, "apiKeys": {"enabled": True}},
    }
    with tempfile.TemporaryDirectory() as tmp:
        vf = Path(tmp) / "values.yaml"
        vf.write_text(yaml.safe_dump(values))
        helm(kc, "install", release, str(hu.CHART_DIR), "-n", namespace, "-f", str(vf))
    op_name, gw_name = f"{release}-modelservice-operator", f"{release}-modelservice-operator-gateway"
    names = [d.metadata.name for d in kube.apps.list_namespaced_deployment(namespace).items]
    assert set(names) >= {op_name, gw_name}, names
    wait_rolled_out(kube, kc, namespace, op_name, image)
    wait_rolled_out(kube, kc, namespace, gw_name, image)

    op_pod = image_pod(kube, namespace, "operator")
    status = op_pod.status.container_statuses[0]
    assert status.image_id.startswith("native://") or status.container_id.startswith("native://"), status
    # The chart's restricted pod spec, as run: non-root, read-only root (the pod's own log says what was enforced).
    sc = op_pod.spec.containers[0].security_context
    assert sc.read_only_root_filesystem and sc.allow_privilege_escalation is False and sc.capabilities.drop == ["ALL"]

    # A model with an API key, at zero; a request to the gateway's pod address wakes it and streams an answer.
    kube.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "llm-key"}, "stringData": {"api-key": "sk-image-test"}}
    )
    ms.create(kube, namespace, ms.body("tiny", **LLAMA, apiKeySecretRef={"name": "llm-key", "key": "api-key"}))
    ms.wait_condition(kube, namespace, "tiny", "Ready", "False", reason="ScaledToZero", timeout=120)

    def ask(gateway_pod) -> str:
        url = f"http://{gateway_pod.status.pod_ip}:8080"
        code, _, raw = asyncio.run(stream_chat(url, "tiny", headers={"Authorization": "Bearer wrong"}, timeout=60))
        assert code == 401, raw[-500:]
        code, chunks, raw = asyncio.run(
            stream_chat(url, "tiny", headers={"Authorization": "Bearer sk-image-test"}, timeout=180)
        )
        assert code == 200, raw[-2000:]
        return check_stream(chunks, "tiny")

    assert ask(image_pod(kube, namespace, "gateway"))
    ms.wait_condition(kube, namespace, "tiny", "Ready", "False", reason="ScaledToZero", timeout=180)
    wait_for(
        lambda: not kube.core.list_namespaced_pod(namespace, label_selector=f"{MODELSERVICE_LABEL}=tiny").items,
        timeout=120,
        message="the model's pod gone again",
    )

    # helm upgrade to a new tag rolls both; the ModelService and its key Secret keep working unchanged.
    new_tag = f"{tag}-upgrade-test"
    new_archive = oci_images.CACHE / f"modelservice-operator-{new_tag}.oci.tar"
    if new_archive.exists() or new_archive.is_symlink():
        new_archive.unlink()
    os.link(image_archive.resolve(), new_archive)  # a second tag of the same image, as a registry would hold it
    try:
        generation = ms.get(kube, namespace, "tiny")["metadata"]["generation"]
        helm(
            kc,
            "upgrade",
            release,
            str(hu.CHART_DIR),
            "-n",
            namespace,
            "--reuse-values",
            "--set",
            f"image.tag={new_tag}",
        )
        wait_rolled_out(kube, kc, namespace, op_name, f"{repo}:{new_tag}")
        wait_rolled_out(kube, kc, namespace, gw_name, f"{repo}:{new_tag}")
        assert ask(image_pod(kube, namespace, "gateway"))
        assert ms.get(kube, namespace, "tiny")["metadata"]["generation"] == generation  # nobody rewrote the spec
    finally:
        new_archive.unlink()

    # helm uninstall removes the operator and the gateway, and leaves the CRD and the user's ModelServices.
    helm(kc, "uninstall", release, "-n", namespace, "--wait")
    wait_for(
        lambda: (
            not [
                d
                for d in kube.apps.list_namespaced_deployment(namespace).items
                if d.metadata.name in (op_name, gw_name)
            ]
        ),
        timeout=60,
        message="the release's Deployments gone",
    )
    assert kubectl(kc, "get", CRD_NAME, "-o", "name").strip()
    assert ms.get(kube, namespace, "tiny") is not None
    assert kube.core.read_namespaced_secret("llm-key", namespace)


def test_an_image_that_fails_to_start_is_not_ready_and_says_why(kube, cluster, namespace, image_archive, helm_bin):
    """The chart's operator pod spec with a module that is not in the image: the pod never gets Ready, the wait
    fails, and describe and logs carry Python's own words."""
    kc, tag = cluster.kubeconfig, app_version()
    image = f"{oci_images.LOCAL_REPOSITORY}:{tag}"
    docs = hu.render(
        values={
            "image": {"repository": oci_images.LOCAL_REPOSITORY, "tag": tag},
            "watchNamespaces": [namespace],
            "crds": {"install": False},
            "gateway": {"enabled": False},
        },
        namespace=namespace,
        release="broken",
        kube_version="1.20.0",
    )
    dep = json.loads(json.dumps(hu.find(docs, "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["command"] = ["python3", "-m", "modelservice.no_such_module"]
    kept = [d for d in docs if d.get("kind") in ("ServiceAccount", "Role", "RoleBinding")] + [dep]
    kubectl(kc, "apply", "-n", namespace, "-f", "-", input=hu.to_yaml(kept))
    name = dep["metadata"]["name"]
    wait_for(lambda: _crash_looping(kube, namespace), timeout=READY_TIMEOUT, message="the broken pod crash-looping")
    with pytest.raises(AssertionError) as failed:  # the wait must not report success, and must say why
        wait_rolled_out(kube, kc, namespace, name, image, timeout=1)
    assert "No module named modelservice.no_such_module" in str(failed.value), str(failed.value)[-3000:]
    assert "Back-off restarting failed container" in str(failed.value) or "CrashLoopBackOff" in str(failed.value)


def _crash_looping(kube, ns: str) -> bool:
    pods = kube.core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/component=operator").items
    for p in pods:
        st = (p.status.container_statuses or [None])[0]
        if st and st.restart_count >= 1 and st.state.waiting and st.state.waiting.reason == "CrashLoopBackOff":
            return True
    return False
