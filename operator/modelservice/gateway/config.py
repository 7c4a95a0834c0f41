"""The gateway's settings, parsed from flags (cli.py) or built directly by tests."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Optional

from modelservice.api import parse_duration


@dataclass
class Config:
    host: str = "0.0.0.0"
    port: int = 8080
    metrics_port: int = 9090
    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    activation_timeout: float = 600.0
    max_body_bytes: int = 10 * 1024 * 1024
    max_held_per_model: int = 256
    header_timeout: float = 15.0  # until a complete request head, from connect or the previous response
    idle_timeout: float = 60.0  # longest silence while reading a body or writing to a client
    upstream_timeout: float = 600.0  # longest silence from a backend (queued prompts can take long)
    connect_timeout: float = 5.0
    kubeconfig: Optional[str] = None
    api_key_secret: Optional[tuple[str, str, str]] = None  # (namespace, name, data key)
    activity_interval: float = 10.0
    secret_refresh: float = 30.0
    metering: bool = True  # token metering (metering.py); off only to measure what it costs (make bench)
    max_metered_tenants: int = 100  # tenant label values in metrics; the rest are summed as "_other"
    quota_share: int = 1  # gateway replicas: each enforces 1/share of a tenant's quota (quotas.py)
    quota_default_max_tokens: int = 1024  # reserved for the answer when a request sets no max_tokens
    tenant_namespace: Optional[str] = None  # set: tenant keys from Secrets labelled as tenants in it (tenants.py)
    pod_name: str = field(default_factory=lambda: os.environ.get("POD_NAME") or socket.gethostname())
    pod_namespace: str = field(default_factory=lambda: os.environ.get("POD_NAMESPACE", ""))


def seconds(text: str) -> float:
    """'10m', '30s', '1h' or a bare number of seconds."""
    try:
        return float(text)
    except ValueError:
        return parse_duration(text)


def size(text: str) -> int:
    """'10Mi', '512Ki', '1G' or a bare number of bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * units[suffix])
    return int(text)


def secret_ref(text: str, default_namespace: str = "") -> tuple[str, str, str]:
    """[NS/]NAME[:KEY]: NS defaults to the gateway's own namespace, KEY to "keys" (as in spec.apiKeySecretRef)."""
    ref, _, key = text.partition(":")
    ns, sep, name = ref.rpartition("/")
    ns = ns if sep else default_namespace
    if not ns or not name or "/" in ns:
        raise ValueError(f"{text!r} is not [NAMESPACE/]NAME[:KEY] (NAMESPACE is needed when POD_NAMESPACE is unset)")
    return ns, name, key or "keys"
