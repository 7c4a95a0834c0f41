"""In a pod, the operator and the gateway authenticate with the ServiceAccount token the kubelet mounts.

Found by running the image in the local cluster (tests/integration/test_image_in_cluster.py): the Kubernetes client's
in-cluster loader writes "bearer <token>" in lower case, and we sent "Bearer bearer <token>", a 401 at start-up."""

from __future__ import annotations

import pytest
from kubernetes.config import incluster_config

from modelservice import kube


@pytest.fixture
def in_a_pod(tmp_path, monkeypatch):
    token, ca = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("eyJhbGciOi.the-token.sig")
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(kube, "SA_TOKEN", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setattr(kube.ssl, "create_default_context", lambda cafile=None: object())  # the CA file is a dummy
    return token


def test_the_mounted_token_is_sent_as_is(in_a_pod):
    creds = kube.load_credentials(None)
    assert creds.server == "https://10.96.0.1:443"
    assert creds.token == "eyJhbGciOi.the-token.sig"
    assert creds.token_file == str(in_a_pod)  # re-read later: projected tokens rotate


def test_kopf_logs_in_with_the_same_credentials(in_a_pod):
    """Not kopf's login_with_service_account: it dials kubernetes.default.svc, which needs cluster DNS."""
    from modelservice import handlers

    info = handlers.login()
    assert info.server == "https://10.96.0.1:443"
    assert (info.scheme, info.token) == ("Bearer", "eyJhbGciOi.the-token.sig")
    assert info.ca_path == kube.SA_CA
