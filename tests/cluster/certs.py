"""A throwaway PKI for the local control plane, made with the openssl CLI.

The openssl CLI ships with the machine image, so the test setup needs no extra Python package. EC P-256 keys
because they are generated in milliseconds and every component of v1.20 accepts them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
DAYS = "3650"


@dataclass(frozen=True)
class Pki:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def ca_crt(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def admin_token(self) -> str:
        return (self.dir / "admin.token").read_text().strip()


def _openssl(*args: str) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError(
            "the openssl CLI is required to make the test cluster's certificates (apt-get install openssl)"
        )
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _leaf(pki: Path, name: str, subject: str, usage: str, san: str | None = None) -> None:
    args = [
        "req",
        "-x509",
        "-CA",
        str(pki / "ca.crt"),
        "-CAkey",
        str(pki / "ca.key"),
        *EC,
        "-keyout",
        str(pki / f"{name}.key"),
        "-out",
        str(pki / f"{name}.crt"),
        "-days",
        DAYS,
        "-subj",
        subject,
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-addext",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext",
        f"extendedKeyUsage={usage}",
    ]
    if san:
        args += ["-addext", f"subjectAltName={san}"]
    _openssl(*args)


def make_pki(dir: Path) -> Pki:
    """CA, apiserver serving cert, client certs per component, service-account key pair and a token file."""
    dir.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        *EC,
        "-keyout",
        str(dir / "ca.key"),
        "-out",
        str(dir / "ca.crt"),
        "-days",
        DAYS,
        "-subj",
        "/CN=modelservice-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )
    # The in-cluster names too, so a pod-side client could verify it if a test ever mounts the CA.
    san = ",".join(
        [
            "IP:127.0.0.1",
            "IP:10.96.0.1",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    _leaf(dir, "apiserver", "/CN=kube-apiserver", "serverAuth", san)
    # The default RBAC bindings name these users, so the components get exactly the rights a real cluster gives.
    _leaf(dir, "admin", "/O=system:masters/CN=admin", "clientAuth")
    _leaf(dir, "controller-manager", "/CN=system:kube-controller-manager", "clientAuth")
    _leaf(dir, "scheduler", "/CN=system:kube-scheduler", "clientAuth")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(dir / "sa.key"))
    _openssl("pkey", "-in", str(dir / "sa.key"), "-pubout", "-out", str(dir / "sa.pub"))
    token = secrets.token_hex(24)
    (dir / "admin.token").write_text(token + "\n")
    (dir / "tokens.csv").write_text(f'{token},admin,admin-uid,"system:masters"\n')
    for key in dir.glob("*.key"):
        key.chmod(0o600)
    return Pki(dir)
