"""Flag parsing of `modelservice-operator gateway`."""

import pytest

from modelservice.gateway import cli
from modelservice.gateway.config import seconds, secret_ref, size

pytestmark = pytest.mark.unit


def test_value_parsers():
    assert seconds("10m") == 600 and seconds("1h30m") == 5400 and seconds("2.5") == 2.5
    assert size("10Mi") == 10 * 2**20 and size("512Ki") == 512 * 1024 and size("1000") == 1000
    assert secret_ref("ops/keys") == ("ops", "keys", "keys")
    assert secret_ref("ops/keys:tokens") == ("ops", "keys", "tokens")
    assert secret_ref("keys", "gw-ns") == ("gw-ns", "keys", "keys")
    with pytest.raises(ValueError):
        secret_ref("keys")  # no namespace anywhere


def test_flags_to_config(monkeypatch):
    monkeypatch.setenv("POD_NAME", "gateway-7f9c-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "modelservice-system")
    args = cli.parser().parse_args(
        [
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--activation-timeout",
            "2m",
            "--max-body-bytes",
            "1Mi",
            "--api-key-secret",
            "global-keys",
            "--header-timeout",
            "5s",
            "--idle-timeout",
            "30s",
            "--activity-interval",
            "5s",
            "--max-held-per-model",
            "10",
        ]
    )
    c = cli.config_from(args)
    assert (c.namespaces, c.activation_timeout, c.max_body_bytes, c.header_timeout, c.idle_timeout) == (
        ["a", "b"],
        120,
        2**20,
        5,
        30,
    )
    assert c.api_key_secret == ("modelservice-system", "global-keys", "keys")
    assert (c.activity_interval, c.max_held_per_model, c.pod_name) == (5, 10, "gateway-7f9c-abcde")
    d = cli.config_from(cli.parser().parse_args([]))
    assert (
        d.port,
        d.metrics_port,
        d.activation_timeout,
        d.max_body_bytes,
        d.max_held_per_model,
        d.activity_interval,
        d.namespaces,
        d.api_key_secret,
    ) == (8080, 9090, 600, 10 * 2**20, 256, 10, [], None)
