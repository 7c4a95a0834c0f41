"""In a pod, the operator and the gateway authenticate with the ServiceAccount token the kubelet mounts.

Found by running the image in the local cluster (tests/integration/test_image_in_cluster.py): the Kubernetes client's
in-cluster loader wrote "bearer <token>" in lower case, and we sent "Bearer bearer <token>", a 401 at start-up.
modelservice.kube now reads the mounted files itself; this checks the header it sends."""

from __future__ import annotations

import pytest

from modelservice import kube


@pytest.fixture
def in_a_pod(tmp_path, monkeypatch):
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("eyJhbGciOi.the-token.sig\n")
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    (tmp_path / "namespace").write_text("modelservice-system")
    monkeypatch.setattr(kube, "SA_TOKEN", str(token))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return token


async def test_the_mounted_token_is_sent_as_is(in_a_pod):
    creds = kube.load_credentials(None)
    assert creds.server == "https://10.96.0.1:443"
    assert creds.token_file == str(in_a_pod)  # re-read later: projected tokens rotate
    headers = await kube.Kube(creds)._headers()
    assert headers["Authorization"] == "Bearer eyJhbGciOi.the-token.sig"


async def test_kopf_logs_in_with_the_same_credentials(in_a_pod, monkeypatch):
    """Not kopf's login_with_service_account: it dials kubernetes.default.svc, which needs cluster DNS."""
    from modelservice import handlers

    monkeypatch.setitem(handlers.OPTIONS, "kubeconfig", None)
    monkeypatch.setattr(handlers, "_TOKENS", [])
    monkeypatch.setattr(handlers, "_GIVEN", [])
    info = await handlers.login()
    assert info.server == "https://10.96.0.1:443"
    assert info.as_http_headers() == {"Authorization": "Bearer eyJhbGciOi.the-token.sig"}
    assert info.ca_path == str(in_a_pod.parent / "ca.crt")
