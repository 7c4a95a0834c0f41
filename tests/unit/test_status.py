"""Status is a pure function of what the children say."""

from modelservice.controller import slim
from modelservice.status import Observed, compute_status, conditions_for, status_changed


def _dep(desired=1, ready=1, updated=None, replicas=None, gen=1, observed_gen=1, conditions=()):
    return {
        "metadata": {"name": "m", "generation": gen},
        "spec": {"replicas": desired},
        "status": {
            "readyReplicas": ready,
            "updatedReplicas": desired if updated is None else updated,
            "replicas": desired if replicas is None else replicas,
            "observedGeneration": observed_gen,
            "conditions": list(conditions),
        },
    }


def _by_type(conds):
    return {c["type"]: (c["status"], c["reason"]) for c in conds}


def _obs(**kw):
    return Observed(generation=3, name="m", namespace="ns", **kw)


def test_first_pass_is_reconciling():
    c = _by_type(conditions_for(_obs(first_pass=True)))
    assert c == {
        "Ready": ("False", "Reconciling"),
        "Reconciling": ("True", "Reconciling"),
        "Stalled": ("False", "Reconciling"),
    }


def test_available_when_rolled_out():
    assert _by_type(conditions_for(_obs(deployment=_dep(2, 2))))["Ready"] == ("True", "Available")


def test_progressing_while_pods_load():
    c = _by_type(conditions_for(_obs(deployment=_dep(2, 0))))
    assert c["Ready"] == ("False", "Progressing") and c["Reconciling"] == ("True", "Progressing")


def test_stale_deployment_generation_is_not_ready():
    c = _by_type(conditions_for(_obs(deployment=_dep(1, 1, gen=2, observed_gen=1))))
    assert c["Reconciling"][0] == "True"


def test_invalid_spec_is_stalled():
    conds = conditions_for(_obs(invalid_spec="spec.model.uri: set it"))
    assert _by_type(conds)["Stalled"] == ("True", "InvalidSpec")
    assert conds[0]["message"] == "spec.model.uri: set it"


def test_unschedulable_pod_is_awaiting_capacity():
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ]
        },
    }
    conds = conditions_for(_obs(deployment=_dep(1, 0), pods=[pod]))
    assert _by_type(conds)["Ready"] == ("False", "AwaitingCapacity")
    assert "Insufficient nvidia.com/gpu" in conds[0]["message"]


def test_crash_loop_is_surfaced():
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m"}}}]
        },
    }
    conds = conditions_for(_obs(deployment=_dep(1, 0), pods=[pod]))
    assert "CrashLoopBackOff" in conds[0]["message"]
    assert _by_type(conds)["Stalled"] == ("True", "CrashLoopBackOff")


def test_an_engine_that_exits_is_reported_with_its_last_log_lines():
    """FallbackToLogsOnError puts the engine's last log lines in lastState.terminated; the condition carries them,
    from the first restart on (before the crash-loop backoff starts)."""
    logs = "\n".join(f"loading layer {i}" for i in range(500)) + "\nerror: invalid argument: --no-such-flag"
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "containerStatuses": [
                {
                    "ready": False,
                    "restartCount": 1,
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": logs}},
                }
            ]
        },
    }
    conds = {c["type"]: c for c in conditions_for(_obs(deployment=_dep(1, 0), pods=[pod]))}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "ContainerRestarting"
    assert conds["Stalled"]["status"] == "True"
    message = conds["Stalled"]["message"]
    assert "exited with code 1 after 1 restart(s)" in message and message.endswith("--no-such-flag")
    assert len(message) <= 2048  # the end of the log is kept, the start cut
    # The operator's pod cache keeps what that needs.
    assert conditions_for(_obs(deployment=_dep(1, 0), pods=[slim(pod, "Pod")])) == list(conds.values())
    # A server that exits 0 (e.g. on the SIGTERM of a failed startup probe) and is not back is a problem too.
    pod["status"]["containerStatuses"][0]["lastState"]["terminated"] = {"exitCode": 0, "reason": "Completed"}
    conds = {c["type"]: c for c in conditions_for(_obs(deployment=_dep(1, 0), pods=[pod]))}
    assert (
        conds["Stalled"]["status"] == "True" and "exited with code 0 after 1 restart(s)" in conds["Stalled"]["message"]
    )
    # A restarted container that is Ready again (a one-off crash) is no problem.
    pod["status"]["containerStatuses"][0]["ready"] = True
    assert _by_type(conditions_for(_obs(deployment=_dep(1, 1), pods=[pod])))["Stalled"][0] == "False"


def test_progress_deadline_is_stalled():
    dep = _dep(
        1,
        0,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "ReplicaSet has timed out progressing.",
            }
        ],
    )
    assert _by_type(conditions_for(_obs(deployment=dep)))["Stalled"] == ("True", "ProgressDeadlineExceeded")


def test_scale_to_zero_and_activating():
    c = _by_type(conditions_for(_obs(deployment=_dep(0, 0), scale_to_zero=True)))
    assert c["Ready"] == ("False", "ScaledToZero") and c["Stalled"][0] == "False" and c["Reconciling"][0] == "False"
    c = _by_type(conditions_for(_obs(deployment=_dep(1, 0), scale_to_zero=True)))
    assert c["Ready"] == ("False", "Activating")


def test_status_fields_and_transition_times():
    o = _obs(deployment=_dep(2, 1), url="http://m.ns.svc.cluster.local:8000", endpoint="/models/ns/m/")
    s1 = compute_status(o, {}, "2026-01-01T00:00:00Z")
    assert s1["observedGeneration"] == 3 and s1["ready"] == "1/2" and s1["readyReplicas"] == 1
    assert s1["selector"] == "serving.modelservice.dev/modelservice=m" and s1["endpoint"] == "/models/ns/m/"
    # Same facts later: nothing changes, so nothing is written.
    s2 = compute_status(o, s1, "2026-01-01T00:05:00Z")
    assert not status_changed(s2, s1)
    # Ready flips: only Ready's transition time moves.
    s3 = compute_status(_obs(deployment=_dep(2, 2), url=o.url, endpoint=o.endpoint), s2, "2026-01-01T00:09:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in s3["conditions"]}
    assert times["Ready"] == "2026-01-01T00:09:00Z" and times["Stalled"] == "2026-01-01T00:00:00Z"
    assert all(c.get("message", "x") for c in s3["conditions"])  # never an empty string (see status._cond)


def test_huge_messages_are_cut():
    conds = conditions_for(_obs(apply_error="refused: " + "k" * 600_000))
    assert all(len(c["message"]) <= 2048 for c in conds) and conds[0]["message"].endswith("…")


def test_the_operators_slim_pod_cache_keeps_what_status_reads():
    from modelservice.controller import slim

    def pod(name, *, scheduled=True, waiting=None, init_waiting=None):
        cs = [
            {
                "name": "engine",
                "ready": False,
                "image": "vllm/vllm-openai:v0.6.3",
                "restartCount": 4,
                "state": {"waiting": waiting} if waiting else {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
            }
        ]
        ics = [{"name": "fetch", "state": {"waiting": init_waiting} if init_waiting else {"terminated": {}}}]
        conds = [
            {
                "type": "PodScheduled",
                "status": "True" if scheduled else "False",
                "reason": None if scheduled else "Unschedulable",
                "message": "0/2 nodes: Insufficient gpu.",
            },
            {"type": "Ready", "status": "True" if scheduled else "False"},
        ]
        return {
            "metadata": {
                "name": name,
                "namespace": "ns",
                "labels": {"a": "b"},
                "resourceVersion": "7",
                "managedFields": [{"manager": "kubelet"}],
                "annotations": {"x": "y" * 1000},
            },
            "spec": {"containers": [{"name": "engine", "args": ["--model", "m"] * 50}]},
            "status": {
                "phase": "Pending",
                "conditions": conds,
                "containerStatuses": cs,
                "initContainerStatuses": ics,
                "podIP": "127.0.1.2",
            },
        }

    cases = [
        [pod("a")],
        [pod("a", scheduled=False)],
        [pod("a"), pod("b", waiting={"reason": "CrashLoopBackOff", "message": "back-off 5m"})],
        [pod("a", init_waiting={"reason": "ImagePullBackOff", "message": "pull failed"})],
    ]
    for pods in cases:
        full = conditions_for(_obs(deployment=_dep(2, 1), pods=pods))
        assert conditions_for(_obs(deployment=_dep(2, 1), pods=[slim(p, "Pod") for p in pods])) == full
    # A healthy pod shrinks to the metadata the cache's bookkeeping needs.
    assert slim(pod("a"), "Pod") == {
        "metadata": {"name": "a", "namespace": "ns", "labels": {"a": "b"}, "resourceVersion": "7"},
        "status": {},
    }


def test_parked_says_for_whom_and_gpus_show_who_holds_them():
    c = conditions_for(_obs(deployment=_dep(0, 0), scale_to_zero=True, parked_for="team-b/llama-70b"))
    assert _by_type(c)["Ready"] == ("False", "Parked")
    assert c[0]["message"] == "Parked to make room for team-b/llama-70b; the first request wakes it"
    # Woken again: the old "for whom" no longer applies (the controller passes it at zero replicas only).
    assert _by_type(conditions_for(_obs(deployment=_dep(1, 0), scale_to_zero=True)))["Ready"][1] == "Activating"
    status = compute_status(_obs(deployment=_dep(1, 1), gpus=2), {}, "2026-01-01T00:00:00Z")
    assert status["gpus"] == 2
    assert "gpus" not in compute_status(_obs(deployment=_dep(1, 1)), {}, "2026-01-01T00:00:00Z")


def test_awaiting_capacity_carries_the_planners_word():
    pod = {
        "metadata": {"name": "p"},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ]
        },
    }
    said = "waiting for GPUs on node n0: parking ns/a to make room (no GPU free: 0/2 nodes ...)"
    conds = conditions_for(_obs(deployment=_dep(1, 0), pods=[pod], awaiting=said, scale_to_zero=True))
    assert _by_type(conds)["Ready"] == ("False", "AwaitingCapacity") and conds[0]["message"] == said


def test_the_slim_pod_keeps_what_the_pool_planner_reads():
    pod = {
        "metadata": {"name": "a", "namespace": "ns", "deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "nodeName": "n0",
            "priority": 100,
            "containers": [
                {"name": "s", "resources": {"limits": {"nvidia.com/gpu": "2", "cpu": "1"}}},
                {"name": "side", "resources": {"requests": {"nvidia.com/gpu": 1}}},
            ],
        },
        "status": {"nominatedNodeName": "n1"},
    }
    s = slim(pod, "Pod")
    assert s["spec"] == {"nodeName": "n0", "priority": 100} and s["gpus"] == 3
    assert s["status"] == {"nominatedNodeName": "n1"} and s["metadata"]["deletionTimestamp"]


async def test_a_new_model_costs_one_status_write_before_its_deployment_exists():
    """The first pass writes Reconciling before applying, then computes status again: the two must be equal (every
    field in both, status.gpus included), or each new model costs an extra status write (make bench counts them)."""

    from modelservice.controller import Controller

    class FakeKube:
        def __init__(self):
            self.status_patches = 0

        async def apply(self, obj, **_):
            return obj

        async def merge_patch(self, path, body):
            if path.endswith("/status"):
                self.status_patches += 1
            return body

        async def create(self, path, body):
            return body

    kube = FakeKube()
    c = Controller(kube, gateway_enabled=True)
    body = {
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": {"engine": "vllm", "model": {"uri": "hf://o/m"}},
    }
    c.on_modelservice("ADDED", body)
    assert await c.reconcile(("ns", "m")) == "success"
    assert kube.status_patches == 1 and body["status"]["gpus"] == 0
