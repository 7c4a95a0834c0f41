"""Issue #7.4: 500 generated hostile ModelService bodies (tests/reliability/fuzz.py, seeded). Each is refused by the
API server or admitted and reported (Stalled with a message, or Ready/Progressing when it is in fact valid); the
operator never crashes, retries no object beyond its backoff, and valid objects created alongside become Ready.

RELIABILITY_FUZZ_SEED=<n> replays another seed; the chaos soak runs more bodies and seeds.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.cluster.kube import create_namespace, delete_namespace
from tests.cluster.wait import wait_for
from tests.integration import ms
from tests.reliability.harness import condition
from tests.reliability.scenarios import check_fuzz, fuzz_specs, reconciles

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("RELIABILITY_FUZZ_SEED", "7"))
COUNT = 500
CONTROLS = 5


def test_fuzzed_specs_are_refused_or_reported(rcluster, kube, namespace, start_operator, figures):
    control_ns = create_namespace(kube, "fuzz-controls")
    try:
        r = fuzz_specs(
            kube,
            rcluster.kubeconfig,
            namespace,
            control_ns,
            start_operator,
            seed=SEED,
            count=COUNT,
            controls=CONTROLS,
            threads=6,
            settle_timeout=90,
        )
    finally:
        delete_namespace(kube, control_ns)
    figures.update(dataclasses.asdict(r))
    check_fuzz(r, COUNT, CONTROLS)


# Specs the CRD admits (it checks the embedded core/v1 types, not their semantics) but the API server refuses for the
# Deployment: with 422 (a toleration's value with operator Exists, maxSkew 0), or, on v1.20, a field it does not know
# (namespaceSelector, 1.21+) with the 500 "failed to create typed patch object" of server-side apply. Regression test
# of docs/reliability.md finding 3 (fixed in 697616b: that 500 is a permanent refusal).
REFUSED_BY_THE_DEPLOYMENT = {
    "toleration-exists-with-value": {
        "placement": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}
    },
    "spread-max-skew-0": {
        "placement": {
            "topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]
        }
    },
    "namespace-selector-on-1-20": {
        "placement": {
            "affinity": {
                "podAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [
                        {"topologyKey": "kubernetes.io/hostname", "namespaceSelector": {"matchLabels": {"a": "b"}}}
                    ]
                }
            }
        }
    },
}


def test_a_child_the_apiserver_refuses_is_reported_stalled_not_retried(
    rcluster, kube, namespace, start_operator, figures
):
    op = start_operator(rcluster.kubeconfig, "--namespace", namespace, "--resync-seconds", "600")
    for name, extra in REFUSED_BY_THE_DEPLOYMENT.items():
        ms.create(kube, namespace, ms.body(name, **extra))

    def reported() -> dict:
        out = {}
        for name in REFUSED_BY_THE_DEPLOYMENT:
            c = condition(ms.get(kube, namespace, name) or {}, "Stalled")
            out[name] = (c.get("status"), c.get("reason"))
        return out

    # Three retries each (0.5 + 1 + 2 s of backoff) is more than enough to have seen the answer is permanent.
    wait_for(
        lambda: (
            reconciles(op, "error") >= 3 * len(REFUSED_BY_THE_DEPLOYMENT)
            or all(v == ("True", "ApplyFailed") for v in reported().values())
        ),
        timeout=30,
        message="retries or Stalled",
    )
    figures.update(stalled=reported(), error_reconciles=reconciles(op, "error"))
    assert all(v == ("True", "ApplyFailed") for v in reported().values()), f"not Stalled: {reported()}"
    assert reconciles(op, "error") == 0, f"{reconciles(op, 'error'):g} retries of permanent refusals"


# docs/reliability.md finding 6 (fixed: condition messages are cut at status.MAX_MESSAGE).
def test_a_refusal_that_echoes_a_huge_value_is_still_reported(rcluster, kube, namespace, start_operator, figures):
    """A toleration key is a label name (63 characters), but the CRD checks the embedded core/v1 types, not their
    formats: a 600 KB key is admitted, and the Deployment is refused with a 422 whose message quotes it in full."""
    op = start_operator(rcluster.kubeconfig, "--namespace", namespace, "--resync-seconds", "600")
    ms.create(
        kube, namespace, ms.body("echo", placement={"tolerations": [{"key": "k" * 600_000, "operator": "Exists"}]})
    )

    def stalled() -> dict:
        return condition(ms.get(kube, namespace, "echo") or {}, "Stalled")

    # A few retries (0.5 + 1 + 2 s of backoff) or the Stalled report, whichever comes first.
    wait_for(
        lambda: reconciles(op, "error") >= 3 or stalled().get("status") == "True",
        timeout=30,
        message="retries or Stalled",
    )
    got = stalled()
    figures.update(
        stalled=[got.get("status"), got.get("reason")],
        message_bytes=len(got.get("message") or ""),
        error_reconciles=reconciles(op, "error"),
    )
    assert (got.get("status"), got.get("reason")) == ("True", "ApplyFailed"), f"not Stalled: {got}"
    assert len(got.get("message") or "") <= 64 * 1024, "the status message was not cut"
    assert reconciles(op, "error") == 0, f"{reconciles(op, 'error'):g} retries"
