"""The node agent's pure parts: reading a pod spec into a stub config, and handing out loopback addresses."""

from __future__ import annotations

import ipaddress

from tests.cluster.addresses import IpPool
from tests.cluster.podspec import stub_config


def pod(container: dict, annotations: dict | None = None, labels: dict | None = None) -> dict:
    return {
        "metadata": {"name": "p-1", "annotations": annotations or {}, "labels": labels or {}},
        "spec": {"containers": [{"name": "c", **container}]},
    }


def test_model_name_from_args_then_env_then_label_then_pod_name() -> None:
    assert stub_config(pod({"args": ["--served-model-name", "a", "--model", "b"]}), 200).model == "a"
    assert stub_config(pod({"args": ["--served-model-name=a2"]}), 200).model == "a2"
    assert stub_config(pod({"args": ["--model-id", "tgi/m"]}), 200).model == "tgi/m"
    assert stub_config(pod({"env": [{"name": "MODEL_NAME", "value": "e"}]}), 200).model == "e"
    labelled = pod({}, labels={"serving.modelservice.dev/modelservice": "ms"})
    assert stub_config(labelled, 200).model == "ms"
    assert stub_config(pod({}), 200).model == "p-1"


def test_delay_and_rate_from_annotations_or_env() -> None:
    cfg = stub_config(
        pod({"env": [{"name": "STUB_STARTUP_DELAY", "value": "3"}]}, {"stub.modelservice.dev/tokens-per-second": "50"}),
        200,
    )
    assert (cfg.startup_delay, cfg.tokens_per_second) == (3.0, 50.0)
    cfg = stub_config(
        pod({}, {"stub.modelservice.dev/startup-delay": "1.5", "stub.modelservice.dev/tokens-per-second": "bogus"}), 200
    )
    assert (cfg.startup_delay, cfg.tokens_per_second) == (1.5, 200.0)


def test_ports_and_probes() -> None:
    cfg = stub_config(pod({}), 200)
    assert (cfg.ports, cfg.probes) == ([8000], [])
    cfg = stub_config(
        pod(
            {
                "ports": [{"containerPort": 30000, "name": "http"}],
                "startupProbe": {"httpGet": {"path": "/health", "port": "http"}},
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 9000}},
            }
        ),
        200,
    )
    assert cfg.ports == [9000, 30000]
    assert cfg.probes == [(30000, "/health"), (9000, "/v2/health/ready")]
    cfg = stub_config(pod({"readinessProbe": {"exec": {"command": ["true"]}}}), 200)
    assert cfg.probes == [(8000, "/health")]  # still gated on the stub's startup delay


def test_ip_pool_never_hands_out_127_0_0_1_and_skips_used_addresses() -> None:
    pool = IpPool(0)
    ips = [pool.allocate() for _ in range(300)]
    assert ips[0] == "127.0.0.2"
    assert "127.0.0.1" not in ips and len(set(ips)) == 300
    assert all(ipaddress.ip_address(ip).packed[3] not in (0, 255) for ip in ips)
    assert ips[253] == "127.0.1.1"  # .2-.254 then the next /24


def test_ip_pool_readoption_and_no_immediate_reuse() -> None:
    pool = IpPool(0)
    assert pool.reserve("127.0.0.9")
    assert not pool.reserve("127.0.0.9") and not pool.reserve("127.0.0.1") and not pool.reserve("10.0.0.1")
    assert pool.allocate() == "127.0.0.10"  # continues after re-adopted addresses
    pool.release("127.0.0.10")
    assert pool.allocate() == "127.0.0.11"  # a released address is not handed straight back


def test_ip_pool_claims_distinct_blocks() -> None:
    first, sock1 = IpPool.claim()
    try:
        second, sock2 = IpPool.claim()
        try:
            assert first.block != second.block
            assert second.allocate().startswith(f"127.{second.block}.0.")
        finally:
            sock2.close()
    finally:
        sock1.close()
