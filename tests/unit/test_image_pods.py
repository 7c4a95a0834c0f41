"""The fake node's translation of a pod of a local OCI image into a host process (tests/cluster/image_pods.py): pure
functions; the real run is tests/integration/test_image_in_cluster.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import image_pods as ip
from tests.cluster import oci_images as oi
from tests.cluster.native import LaunchError

CHART_POD_SC = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CHART_CONTAINER_SC = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def config(**kw) -> oi.ImageConfig:
    """What `make image` puts in the image config (hack/build-image.sh, Dockerfile)."""
    return oi.ImageConfig(
        **{
            "digest": "sha256:" + "a" * 64,
            "entrypoint": ("/opt/venv/bin/modelservice-operator",),
            "cmd": ("run",),
            "user": "65532:65532",
            "env": ("PATH=/opt/venv/bin:/usr/bin",),
            **kw,
        }
    )


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/false\nnonroot:x:65532:65532::/home:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnonroot:x:65532:\n")
    return root


def pod(container: dict, **spec) -> dict:
    return {"metadata": {"name": "op-1", "namespace": "ms-system"}, "spec": {"containers": [container], **spec}}


def test_store_path_names_the_archive_make_image_writes(tmp_path):
    assert (
        ip.store_path(tmp_path, "localhost/modelservice-operator:0.1.0")
        == tmp_path / "modelservice-operator-0.1.0.oci.tar"
    )
    assert ip.store_path(tmp_path, "localhost/team/x") == tmp_path / "team-x-latest.oci.tar"
    assert ip.store_path(tmp_path, "localhost/x:1@sha256:abc") == tmp_path / "x-1.oci.tar"
    assert ip.is_local_image("localhost/x:1") and not ip.is_local_image("ghcr.io/x:1")


def test_security_context_container_over_pod_as_the_kubelet_merges():
    sc = ip.security_context({"securityContext": CHART_POD_SC}, {"securityContext": CHART_CONTAINER_SC}, "0")
    assert (sc.user, sc.groups) == ("65532:65532", (65532,))
    assert sc.read_only_root and sc.drop_capabilities and sc.no_new_privileges and sc.run_as_non_root
    loose = ip.security_context({}, {"securityContext": {"runAsUser": 1000}}, "65532:65533")
    assert (loose.user, loose.read_only_root, loose.drop_capabilities, loose.no_new_privileges) == (
        "1000:65533",
        False,
        False,
        False,
    )
    assert ip.security_context({}, {}, "").user == "0"


def test_run_as_non_root_refuses_an_image_that_runs_as_root(rootfs, tmp_path):
    cfg = config(user="0")
    with pytest.raises(LaunchError, match="runAsNonRoot and image will run as root") as e:
        ip.launch_for_image(
            pod({"name": "c", "securityContext": {"runAsNonRoot": True}}),
            {"name": "c", "securityContext": {"runAsNonRoot": True}},
            cfg,
            rootfs,
            env={},
            pod_ip="127.9.0.2",
            pod_dir=tmp_path / "pod",
            volumes={},
            api_host="127.0.0.1",
            api_port=6443,
        )
    assert e.value.reason == "CreateContainerConfigError"


def test_the_chart_pod_spec_becomes_an_enforcing_launch(rootfs, tmp_path):
    container = {
        "name": "operator",
        "image": "localhost/modelservice-operator:0.1.0",
        "command": ["modelservice-operator"],
        "args": ["run", "--metrics-port", "8080"],
        "securityContext": CHART_CONTAINER_SC,
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True},
        ],
    }
    vols = {"tmp": ip.empty_dir(tmp_path / "v" / "tmp"), "token": tmp_path / "v" / "token"}
    ip.write_projected_files(vols["token"], {"token": "dG9rZW4=", "ca.crt": "Y2E="}, None, 0o644, decode=True)
    launch = ip.launch_for_image(
        pod(container, securityContext=CHART_POD_SC),
        container,
        config(),
        rootfs,
        env={"POD_NAME": "op-1"},
        pod_ip="127.9.0.2",
        pod_dir=tmp_path / "pod",
        volumes=vols,
        api_host="127.0.0.1",
        api_port=6443,
    )
    spec = json.loads(launch.argv[-1])
    assert spec["argv"] == ["modelservice-operator", "run", "--metrics-port", "8080"]  # command replaces entrypoint
    assert (spec["uid"], spec["gid"], spec["groups"]) == (65532, 65532, [65532])
    assert spec["read_only"] and spec["drop_caps"] and spec["no_new_privs"]
    mounts = {m[0]: (m[1], m[2]) for m in spec["mounts"]}
    assert mounts["/tmp"] == (str(vols["tmp"]), False)
    assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"] == (str(vols["token"]), True)
    assert mounts["/etc/hosts"][1] and mounts[ip.SHIM_DIR_IN_IMAGE][1]
    assert (vols["token"] / "token").read_text() == "token" and oct(os.stat(vols["tmp"]).st_mode & 0o777) == "0o777"
    env = launch.env
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443")
    assert env["POD_NAME"] == env["HOSTNAME"] == "op-1" and env["PATH"] == "/opt/venv/bin:/usr/bin"
    assert env["PYTHONPATH"].split(":")[0] == ip.SHIM_DIR_IN_IMAGE and env[ip.POD_IP_ENV] == "127.9.0.2"


def test_a_volume_this_node_cannot_provide_is_refused(rootfs, tmp_path):
    c = {"name": "c", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    with pytest.raises(LaunchError, match="names no volume"):
        ip.launch_for_image(
            pod(c),
            c,
            config(),
            rootfs,
            env={},
            pod_ip="127.9.0.2",
            pod_dir=tmp_path / "pod",
            volumes={},
            api_host="127.0.0.1",
            api_port=6443,
        )


def test_the_bind_shim_gives_a_wildcard_listener_the_pods_address(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(ip.BIND_SHIM)
    probe = (
        "import socket\nfor host in ('0.0.0.0', ''):\n    s = socket.socket()\n    s.bind((host, 0))\n"
        "    print(s.getsockname()[0])\n    s.close()\ns = socket.socket()\ns.bind(('127.0.0.1', 0))\n"
        "print(s.getsockname()[0])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), ip.POD_IP_ENV: "127.9.0.7"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["127.9.0.7", "127.9.0.7", "127.0.0.1"], out.stderr
