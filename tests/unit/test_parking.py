"""The pure parking decision (modelservice.parking): who gives GPUs back to whom, and what the waiting one is told."""

from __future__ import annotations

from dataclasses import replace

import pytest

from modelservice.parking import (
    Model,
    Node,
    Pending,
    Placement,
    Pod,
    Requirement,
    Reservation,
    Taint,
    Term,
    Toleration,
    plan,
)

MSG = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
NODES = [Node("n0", 2), Node("n1", 2)]


def idle(name: str, node: str, *, since: float, gpus: int = 1, **kw) -> Model:
    """A Ready scale-to-zero model with no request since `since`, holding `gpus` on `node`."""
    return Model(
        key=("ns", name),
        replicas=1,
        min_replicas=0,
        scale_to_zero=True,
        ready_since=since,
        last_request=since,
        pods=(Pod(node, gpus),),
        **kw,
    )


def waiter(name: str = "w", gpus: int = 1, **kw) -> Model:
    """A model woken by a held request whose pod the scheduler could not place."""
    kw.setdefault("in_flight", 1)
    kw.setdefault("pending", Pending(gpus, MSG))
    return Model(key=("ns", name), replicas=1, min_replicas=0, scale_to_zero=True, **kw)


def full_pool(**overrides) -> list[Model]:
    models = [
        idle("a", "n0", since=100),
        idle("b", "n0", since=50),
        idle("c", "n1", since=300),
        idle("d", "n1", since=200),
    ]
    return [replace(m, **overrides.get(m.key[1], {})) for m in models]


def parked(p) -> list[str]:
    return [park.victim[1] for park in p.parks]


def test_longest_idle_is_parked_and_only_one():
    p = plan(full_pool() + [waiter()], NODES)
    assert parked(p) == ["b"]
    assert p.parks[0].waiter == ("ns", "w") and p.parks[0].node == "n0" and p.parks[0].gpus == 1
    assert "ns/w" in p.parks[0].message
    assert p.waiting[("ns", "w")].startswith("waiting for GPUs on node n0: parking ns/b")
    assert MSG in p.waiting[("ns", "w")]


def test_lowest_priority_goes_first_then_longest_idle():
    models = full_pool(a={"priority": 5}, b={"priority": 5}, c={"priority": 1}, d={"priority": 1})
    assert parked(plan(models + [waiter(priority=5)], NODES)) == ["d"]  # c and d are lowest; d idle longer


def test_scheduler_priority_band_comes_before_spec_priority():
    # d has the lowest spec.priority but its pods' PriorityClass ranks it above everyone: it would preempt back.
    models = full_pool(d={"priority": 0, "pod_priority": 1000}, a={"priority": 3}, b={"priority": 3}, c={"priority": 2})
    assert parked(plan(models + [waiter(priority=3)], NODES)) == ["c"]


def test_a_lower_priority_waiter_takes_from_no_one_above_it():
    models = full_pool(a={"priority": 9}, b={"priority": 9}, c={"priority": 9}, d={"priority": 9})
    p = plan(models + [waiter(priority=1)], NODES)
    assert p.parks == []
    assert "nothing can be parked" in p.waiting[("ns", "w")]
    assert "ns/a has a higher priority" in p.waiting[("ns", "w")]


def test_pod_priority_of_the_waiter_lets_it_take_from_a_higher_spec_priority_in_a_lower_band():
    models = full_pool(a={"priority": 9}, b={"priority": 9}, c={"priority": 9}, d={"priority": 9})
    assert parked(plan(models + [waiter(priority=1, pod_priority=100)], NODES)) == ["b"]


def test_only_as_many_as_needed_on_a_node_where_that_frees_enough():
    # The waiter needs 2 GPUs on one node. n0: b idle longest, but a is busy, so parking b frees 1 GPU there: useless.
    models = full_pool(a={"in_flight": 2})
    p = plan(models + [waiter(gpus=2)], NODES)
    assert sorted(parked(p)) == ["c", "d"]
    assert {park.node for park in p.parks} == {"n1"}


def test_one_model_holding_two_gpus_is_enough_for_a_two_gpu_waiter():
    models = [idle("big", "n0", since=10, gpus=2), idle("c", "n1", since=5), idle("d", "n1", since=6)]
    # n1 needs two victims (c and d, c idle longer), n0 one: fewer victims wins when the ranks tie on priority...
    p = plan(models + [waiter(gpus=2)], NODES)
    # ... but the cost compares the most important victim first: on n1 that is d (idle since 6), on n0 big (10).
    assert parked(p) == ["c", "d"]
    models = [idle("big", "n0", since=1, gpus=2), idle("c", "n1", since=5), idle("d", "n1", since=6)]
    assert parked(plan(models + [waiter(gpus=2)], NODES)) == ["big"]


def test_nothing_parkable_says_why_for_each_holder():
    models = [
        idle("busy", "n0", since=1, in_flight=3),
        replace(idle("loading", "n0", since=1), ready_since=None),
        replace(idle("floor", "n1", since=1), min_replicas=1, scale_to_zero=False),
        idle("important", "n1", since=1, priority=50),
    ]
    p = plan(models + [waiter(priority=10)], NODES)
    assert p.parks == []
    why = p.waiting[("ns", "w")]
    assert why.startswith(f"no GPU free: {MSG}; nothing can be parked:")
    for part in (
        "ns/busy is busy (3 request(s) in flight)",
        "ns/loading is still loading",
        "ns/floor has minReplicas 1",
        "ns/important has a higher priority",
    ):
        assert part in why


def test_min_replicas_one_is_never_parked_below_it():
    models = [
        replace(idle(n, node, since=1), min_replicas=1, scale_to_zero=False)
        for n, node in (("a", "n0"), ("b", "n0"), ("c", "n1"), ("d", "n1"))
    ]
    assert plan(models + [waiter(priority=1000, pod_priority=1000)], NODES).parks == []


def test_a_model_scaled_out_above_a_floor_of_one_is_not_parked_either():
    big = Model(
        key=("ns", "x"),
        replicas=3,
        min_replicas=1,
        scale_to_zero=False,
        ready_since=1.0,
        pods=(Pod("n0", 1), Pod("n0", 1), Pod("n1", 1)),
    )
    p = plan([big, idle("d", "n1", since=5), waiter()], NODES)
    assert parked(p) == ["d"]


def test_two_models_that_each_need_the_whole_pool_do_not_park_each_other_in_a_loop():
    pool = [Node("n0", 2)]
    a = idle("a", "n0", since=10, gpus=2)
    b = waiter("b", gpus=2)
    # 1. b is asked for while a is idle: a is parked.
    p = plan([a, b], pool)
    assert parked(p) == ["a"]
    # 2. a's pods are on their way out: nothing more is parked, b is told whom it waits for.
    a_leaving = replace(a, replicas=0)
    p = plan([a_leaving, b], pool)
    assert p.parks == [] and p.waiting[("ns", "b")].startswith("waiting for ns/a to give back GPUs on node n0")
    # 3. b runs and loads (its request gave up meanwhile); a is asked for now and waits: b is loading, so a may
    #    not take it back.
    b_loading = Model(key=("ns", "b"), replicas=1, min_replicas=0, scale_to_zero=True, pods=(Pod("n0", 2),))
    a_waiting = replace(waiter("a", gpus=2), replicas=1)
    p = plan([a_waiting, b_loading], pool)
    assert p.parks == [] and "ns/b is still loading" in p.waiting[("ns", "a")]
    # 4. b is Ready and serving its request: still not.
    b_serving = replace(b_loading, ready_since=20.0, in_flight=1)
    assert plan([a_waiting, b_serving], pool).parks == []
    # 5. b is done (idle): now a may take the pool back, once; b then waits with nothing asking for it.
    b_idle = replace(b_serving, in_flight=0, last_request=25.0)
    assert parked(plan([a_waiting, b_idle], pool)) == ["b"]
    # 6. Both pending and both asked for, nobody holding anything: nothing to park, no loop.
    p = plan([a_waiting, replace(waiter("b", gpus=2))], pool)
    assert p.parks == [] and set(p.waiting) == {("ns", "a"), ("ns", "b")}


def test_a_model_waiting_for_gpus_itself_is_not_a_victim():
    # x runs one replica on n0 and waits for a second (it is busy: in flight), so it is not parked for w.
    x = Model(
        key=("ns", "x"),
        replicas=2,
        min_replicas=0,
        scale_to_zero=True,
        in_flight=4,
        ready_since=1.0,
        pods=(Pod("n0", 2),),
        pending=Pending(2, MSG),
    )
    p = plan([x, waiter(gpus=2)], [Node("n0", 2)])
    assert p.parks == []
    assert "ns/x" in p.waiting[("ns", "w")]


def test_terminating_pods_count_as_freed_so_no_second_victim_is_parked():
    models = full_pool(b={"pods": (Pod("n0", 1, terminating=True),)})
    p = plan(models + [waiter()], NODES)
    assert p.parks == []
    assert p.waiting[("ns", "w")].startswith("waiting for ns/b to give back GPUs on node n0")


def test_a_node_that_looks_free_parks_no_one():
    p = plan([idle("a", "n0", since=1), waiter()], NODES)
    assert p.parks == [] and "waiting for the scheduler to retry" in p.waiting[("ns", "w")]


def test_the_waiters_own_running_replica_counts_as_used():
    w = replace(waiter(gpus=1), replicas=2, ready_since=1.0, pods=(Pod("n0", 1),))
    p = plan([w, idle("a", "n0", since=5)], [Node("n0", 2)])
    assert parked(p) == ["a"]


def test_nominated_pod_is_left_to_scheduler_preemption():
    w = replace(waiter(), pending=Pending(1, MSG, nominated=True))
    p = plan(full_pool() + [w], NODES)
    assert p.parks == [] and "the scheduler is preempting" in p.waiting[("ns", "w")]


def test_a_pending_pod_nothing_asked_for_parks_no_one():
    w = waiter(in_flight=0)
    p = plan(full_pool() + [w], NODES)
    assert p.parks == [] and "no request is waiting for it" in p.waiting[("ns", "w")]
    # A floor of one is a standing request: it makes room.
    assert parked(plan(full_pool() + [replace(w, min_replicas=1, scale_to_zero=False)], NODES)) == ["b"]


def test_two_waiters_do_not_share_one_victim():
    models = full_pool(a={"in_flight": 1}, c={"in_flight": 1}, d={"in_flight": 1})
    p = plan(models + [waiter("w1", priority=1), waiter("w2", priority=2)], NODES)
    assert [(park.victim[1], park.waiter[1]) for park in p.parks] == [("b", "w2")]  # the more important first
    assert "nothing can be parked" in p.waiting[("ns", "w1")]


def test_two_waiters_each_get_their_own_victim():
    p = plan(full_pool() + [waiter("w1"), waiter("w2")], NODES)
    assert sorted((park.waiter[1], park.victim[1]) for park in p.parks) == [("w1", "b"), ("w2", "a")]


def pending_since(name: str, since: float, **kw) -> Model:
    """A waiter whose pending pod (`<name>-pod`) was created at `since`."""
    return waiter(name, **kw, pending=Pending(1, MSG, pod=f"{name}-pod", since=since))


def test_the_oldest_waiter_of_a_priority_gets_the_one_victim_and_its_gpu_is_reserved_for_it():
    """First come, first served: "zed" has waited since 10, "amy" since 20; one victim (b). zed gets it whatever the
    names' order, and the node made room on is reserved for zed's pod (the controller nominates it there), so that
    amy's pod cannot take the GPU when it frees."""
    models = full_pool(a={"in_flight": 1}, c={"in_flight": 1}, d={"in_flight": 1})
    p = plan(models + [pending_since("amy", 20), pending_since("zed", 10)], NODES)
    assert [(park.victim[1], park.waiter[1]) for park in p.parks] == [("b", "zed")]
    assert p.reserve == {("ns", "zed"): Reservation("zed-pod", "n0", 1)}
    assert "nothing can be parked" in p.waiting[("ns", "amy")]
    # Priority still comes before age.
    p = plan(models + [pending_since("amy", 20, priority=1), pending_since("zed", 10)], NODES)
    assert [(park.victim[1], park.waiter[1]) for park in p.parks] == [("b", "amy")]


def test_gpus_reserved_for_an_older_waiter_are_not_counted_free_for_a_newer_one():
    """b's GPU is on its way back and zed waits for it: amy does not wait for the same GPU, she parks her own
    victim; and a GPU that looks free is reserved for the oldest, the next one makes room elsewhere."""
    models = full_pool(b={"pods": (Pod("n0", 1, terminating=True),)})
    p = plan(models + [pending_since("amy", 20), pending_since("zed", 10)], NODES)
    assert p.reserve[("ns", "zed")] == Reservation("zed-pod", "n0", 1)
    assert p.waiting[("ns", "zed")].startswith("waiting for ns/b to give back GPUs on node n0")
    assert [(park.victim[1], park.waiter[1]) for park in p.parks] == [("a", "amy")]
    assert p.reserve[("ns", "amy")] == Reservation("amy-pod", "n0", 1)
    free = [idle("c", "n1", since=300), idle("d", "n1", since=200), idle("a", "n0", since=100)]  # one free on n0
    p = plan(free + [pending_since("amy", 20), pending_since("zed", 10)], NODES)
    assert p.reserve[("ns", "zed")].node == "n0" and "looks free now" in p.waiting[("ns", "zed")]
    assert [(park.victim[1], park.waiter[1]) for park in p.parks] == [("a", "amy")]  # a: idle longest on n0


def test_our_own_reservation_is_not_taken_for_the_schedulers_preemption():
    """A waiter nominated by our reservation is planned again (its GPU may have gone to a higher-priority pod);
    only a nomination that is not ours leaves it to the scheduler."""
    w = waiter(pending=Pending(1, MSG, pod="w-pod", since=1.0, reserved_on="n0"))
    p = plan(full_pool() + [w], NODES)
    assert parked(p) == ["b"] and p.reserve[("ns", "w")].node == "n0"


@pytest.mark.parametrize(
    "placement,expected",
    [
        (Placement(node_selector={"gpu": "h100"}), ["d"]),
        (Placement(terms=(Term(expressions=(Requirement("gpu", "In", ("h100",)),)),)), ["d"]),
        (Placement(terms=(Term(expressions=(Requirement("gpu", "NotIn", ("a10",)),)),)), ["d"]),
        (Placement(terms=(Term(fields=(Requirement("metadata.name", "In", ("n0",)),)),)), ["b"]),
        (
            Placement(
                terms=(
                    Term(expressions=(Requirement("gpu", "In", ("none",)),)),
                    Term(expressions=(Requirement("gpu", "Exists"),)),
                )
            ),
            ["b"],
        ),  # ORed: any node; b longest
    ],
)
def test_only_nodes_the_pending_pod_may_use_count(placement, expected):
    nodes = [Node("n0", 2, {"gpu": "a10"}), Node("n1", 2, {"gpu": "h100"})]
    assert parked(plan(full_pool() + [waiter(placement=placement)], nodes)) == expected


def test_no_node_matches_placement():
    p = plan(full_pool() + [waiter(placement=Placement(node_selector={"gpu": "b200"}))], NODES)
    assert p.parks == [] and "no node matches its placement" in p.waiting[("ns", "w")]


def test_a_node_with_fewer_gpus_than_the_pod_needs_frees_nothing():
    nodes = [Node("n0", 2), Node("n1", 4)]
    models = [idle("a", "n0", since=1, gpus=2), idle("c", "n1", since=9, gpus=4)]
    assert parked(plan(models + [waiter(gpus=3)], nodes)) == ["c"]


def test_taints_must_be_tolerated():
    nodes = [Node("n0", 2, taints=(Taint("dedicated", "training", "NoSchedule"),)), Node("n1", 2)]
    assert parked(plan(full_pool() + [waiter()], nodes)) == ["d"]  # b on the tainted node is idle longer
    tol = Placement(tolerations=(Toleration("dedicated", "Equal", "training", "NoSchedule"),))
    assert parked(plan(full_pool() + [waiter(placement=tol)], nodes)) == ["b"]
    soft = [Node("n0", 2, taints=(Taint("x", "", "PreferNoSchedule"),)), Node("n1", 2)]
    assert parked(plan(full_pool() + [waiter()], soft)) == ["b"]
    cordoned = [Node("n0", 2, unschedulable=True), Node("n1", 2)]
    assert parked(plan(full_pool() + [waiter()], cordoned)) == ["d"]


@pytest.mark.parametrize(
    "tol,taint,ok",
    [
        (Toleration("k", "Exists"), Taint("k", "v", "NoSchedule"), True),
        (Toleration("", "Exists"), Taint("k", "v", "NoExecute"), True),
        (Toleration("k", "Equal", "v"), Taint("k", "v", "NoExecute"), True),
        (Toleration("k", "Equal", "w"), Taint("k", "v", "NoSchedule"), False),
        (Toleration("k", "Exists", effect="NoExecute"), Taint("k", "v", "NoSchedule"), False),
        (Toleration("j", "Exists"), Taint("k", "", "NoSchedule"), False),
    ],
)
def test_toleration_matching(tol, taint, ok):
    assert tol.tolerates(taint) is ok


@pytest.mark.parametrize(
    "req,labels,ok",
    [
        (Requirement("n", "Gt", ("3",)), {"n": "4"}, True),
        (Requirement("n", "Gt", ("3",)), {"n": "3"}, False),
        (Requirement("n", "Lt", ("3",)), {"n": "2"}, True),
        (Requirement("n", "Lt", ("3",)), {"n": "x"}, False),
        (Requirement("n", "Lt", ("3",)), {}, False),
        (Requirement("n", "DoesNotExist"), {}, True),
        (Requirement("n", "NotIn", ("a",)), {}, True),
        (Requirement("n", "Bogus"), {"n": "a"}, False),
    ],
)
def test_requirements(req, labels, ok):
    assert req.matches(labels) is ok


def test_an_empty_term_matches_no_node():
    assert not Term().matches(Node("n0", 1))


# ---- from the API's objects ----------------------------------------------------------------------------------


def test_converters_read_what_the_scheduler_reads():
    from modelservice.api import Placement as SpecPlacement
    from modelservice.parking import node_from, pending_gpu_message, placement_from

    node = node_from(
        {
            "metadata": {"name": "n0", "labels": {"gpu": "h100"}},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}], "unschedulable": True},
            "status": {"allocatable": {"nvidia.com/gpu": "8"}},
        }
    )
    assert node == Node("n0", 8, {"gpu": "h100"}, (Taint("k", "", "NoSchedule"),), unschedulable=True)
    assert node_from({"metadata": {"name": "cpu"}}).gpus == 0
    pl = placement_from(
        SpecPlacement.model_validate(
            {
                "nodeSelector": {"pool": "a"},
                "tolerations": [{"key": "k", "operator": "Exists"}],
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [
                                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                            ]
                        }
                    }
                },
            }
        )
    )
    assert pl.node_selector == {"pool": "a"} and pl.tolerations == (Toleration("k", "Exists"),)
    assert pl.terms == (Term(expressions=(Requirement("gpu", "In", ("h100",)),)),)
    assert pl.allows(Node("x", 1, {"pool": "a", "gpu": "h100"}, (Taint("k", "v", "NoExecute"),)))
    assert not pl.allows(Node("x", 1, {"pool": "a", "gpu": "a10"}))
    assert placement_from(SpecPlacement()) == Placement()

    def pod(reason, message):
        return {
            "status": {
                "conditions": [{"type": "PodScheduled", "status": "False", "reason": reason, "message": message}]
            }
        }

    assert pending_gpu_message(pod("Unschedulable", MSG)) == MSG
    assert pending_gpu_message(pod("Unschedulable", "0/2 nodes are available: 2 Insufficient memory.")) is None
    assert pending_gpu_message(pod("SchedulerError", MSG)) is None
    assert pending_gpu_message({}) is None


def test_a_restart_between_two_parks_parks_only_what_is_still_missing():
    # A 2-GPU pod needs both c and d (n1). The operator parked c, then restarted: the fresh plan counts c's GPUs as
    # on their way back and parks d only; once both are leaving it parks no one.
    models = full_pool(a={"in_flight": 1}, b={"in_flight": 1})
    w = waiter(gpus=2)
    assert sorted(parked(plan(models + [w], NODES))) == ["c", "d"]
    c_gone = full_pool(a={"in_flight": 1}, b={"in_flight": 1}, c={"replicas": 0})
    p = plan(c_gone + [w], NODES)
    assert parked(p) == ["d"] and p.parks[0].node == "n1"
    both = full_pool(a={"in_flight": 1}, b={"in_flight": 1}, c={"replicas": 0}, d={"replicas": 0})
    p = plan(both + [w], NODES)
    assert p.parks == [] and p.waiting[("ns", "w")].startswith("waiting for ns/c, ns/d to give back GPUs on node n1")


def test_a_pending_model_nothing_asked_for_is_parked_so_it_cannot_take_the_freed_gpu():
    # p waits for a GPU with no request for it (say its pod was preempted): the GPU freed for w would go to p first.
    p_idle = replace(waiter("p", in_flight=0), ready_since=1.0)
    plan_ = plan(full_pool() + [p_idle, waiter(priority=0)], NODES)
    assert [(x.victim[1], x.competing) for x in plan_.parks] == [("b", False), ("p", True)]
    assert "would have taken the ones freed on node n0" in plan_.parks[1].message
    # One the scheduler ranks above w keeps its place in the queue: it is not ours to park.
    above = replace(p_idle, pod_priority=10)
    assert parked(plan(full_pool() + [above, waiter()], NODES)) == ["b"]
    # One that cannot use the node freed for w does not compete.
    elsewhere = replace(p_idle, placement=Placement(node_selector={"pool": "other"}))
    assert parked(plan(full_pool() + [elsewhere, waiter()], NODES)) == ["b"]
    # While the victim's GPUs are on their way back, a competitor is parked as well.
    leaving = full_pool(b={"replicas": 0})
    assert parked(plan(leaving + [p_idle, waiter()], NODES)) == ["p"]


# ---- rollouts on a full pool ----------------------------------------------------------------------------------


def rolling(name: str, node: str, *, replicas: int = 1, ready: int = 1, **kw) -> Model:
    """A model whose spec changed: its old replicas serve on `node`, the surge pod cannot be placed."""
    kw.setdefault("min_replicas", 0)
    return Model(
        key=("ns", name),
        replicas=replicas,
        scale_to_zero=kw["min_replicas"] == 0,
        ready_since=1.0,
        last_request=1.0,
        pods=tuple(Pod(node, 1) for _ in range(ready)),
        pending=Pending(1, MSG),
        rolling=True,
        ready=ready,
        **{k: v for k, v in kw.items() if k != "min_replicas"},
        min_replicas=kw["min_replicas"],
    )


def test_a_rollout_of_an_idle_scale_to_zero_model_replaces_in_place_and_parks_no_one():
    others = [idle("b", "n0", since=50), idle("c", "n1", since=300), idle("d", "n1", since=200)]
    p = plan(others + [rolling("r", "n0")], NODES)
    assert p.parks == [] and p.in_place == {("ns", "r")}
    assert p.waiting[("ns", "r")].startswith("rolling out in place")


def test_a_rollout_of_a_model_in_use_parks_an_idle_one_for_its_surge():
    others = [idle("b", "n0", since=50), idle("c", "n1", since=300), idle("d", "n1", since=200)]
    p = plan(others + [rolling("r", "n0", in_flight=2)], NODES)
    assert parked(p) == ["b"] and p.in_place == set()


def test_a_rollout_with_nothing_to_park_replaces_in_place_only_if_other_replicas_serve():
    floors = [
        replace(idle(n, node, since=1), min_replicas=1, scale_to_zero=False) for n, node in (("b", "n0"), ("c", "n1"))
    ]
    busy_single = rolling("r", "n0", in_flight=3)
    p = plan(floors + [idle("x", "n1", since=1, in_flight=1), busy_single], NODES)
    assert p.parks == [] and p.in_place == set()  # its one replica serves requests: the rollout waits
    assert "nothing can be parked" in p.waiting[("ns", "r")]
    two = rolling("r", "n0", replicas=2, ready=2, in_flight=3, min_replicas=2)
    p = plan([replace(floors[1], pods=(Pod("n1", 2),))] + [two], NODES)
    assert p.parks == [] and p.in_place == {("ns", "r")}
    assert "other replicas keep serving" in p.waiting[("ns", "r")]


# ---- the controller's view: slim caches → the planner's models ------------------------------------------------


def test_the_controller_builds_the_planners_view_from_its_slim_caches():
    from modelservice.api import validate_spec
    from modelservice.controller import Controller, slim

    c = Controller(kube=None)  # nothing here talks to an API server
    gpu = {"containers": [{"name": "s", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}

    def pod(model, name, node=None, deleting=False, pending=None, priority=None, nominated=None):
        meta = {
            "name": name,
            "namespace": "ns",
            "labels": {"serving.modelservice.dev/modelservice": model},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        }
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        spec = dict(gpu, **({"nodeName": node} if node else {}), **({"priority": priority} if priority else {}))
        status = (
            {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": pending}]}
            if pending
            else {}
        )
        if nominated:
            status["nominatedNodeName"] = nominated
        return slim({"metadata": meta, "spec": spec, "status": status}, "Pod")

    def dep(replicas, ready, total=None, updated=None):
        return {
            "metadata": {"name": "x"},
            "spec": {"replicas": replicas},
            "status": {"readyReplicas": ready, "replicas": total or replicas, "updatedReplicas": updated or replicas},
        }

    s2z = {
        "engine": "vllm",
        "model": {"uri": "hf://o/m"},
        "priority": 7,
        "autoscaling": {"minReplicas": 0, "maxReplicas": 2},
        "placement": {"nodeSelector": {"gpu": "h100"}},
    }
    c._specs[("ns", "a")] = validate_spec(s2z, gateway_enabled=True)
    c._specs[("ns", "w")] = validate_spec(
        {"engine": "vllm", "model": {"uri": "hf://o/m"}, "replicas": 2}, gateway_enabled=True
    )
    c.store.children[("ns", "a")]["Deployment"] = dep(1, 1, total=2, updated=1)
    c.store.children[("ns", "w")]["Deployment"] = dep(2, 1)
    c.store.pods[("ns", "a")] = {"a-1": pod("a", "a-1", node="n0", priority=100), "a-2": pod("a", "a-2", pending=MSG)}
    c.store.pods[("ns", "w")] = {
        "w-1": pod("w", "w-1", node="n1", deleting=True),
        "w-2": pod("w", "w-2", pending=MSG, nominated="n1"),
    }
    c.store.pods[("ns", "cpu-only")] = {"x": pod("cpu-only", "x", node="n0")}  # no spec seen yet: skipped
    c._ready_since[("ns", "a")] = 5.0
    models = {m.key[1]: m for m in c.pool_models(now=10.0)}
    assert set(models) == {"a", "w"}
    a, w = models["a"], models["w"]
    assert a.pods == (Pod("n0", 1),) and a.pending == Pending(1, MSG, pod="a-2", since=1767225600.0)
    assert a.rolling and a.ready == 1
    assert (a.priority, a.pod_priority, a.scale_to_zero, a.min_replicas, a.ready_since) == (7, 100, True, 0, 5.0)
    assert a.placement.node_selector == {"gpu": "h100"}
    assert w.pods == (Pod("n1", 1, terminating=True),)
    assert w.pending == Pending(1, MSG, nominated=True, pod="w-2", since=1767225600.0)
    # Our own reservation (the annotation and the nomination agree) is not the scheduler's preemption.
    ours = pod("w", "w-2", pending=MSG, nominated="n1")
    c.store.pods[("ns", "w")]["w-2"] = dict(ours, reservedOn="n1")
    w = {m.key[1]: m for m in c.pool_models(now=10.0)}["w"]
    assert w.pending == Pending(1, MSG, nominated=False, pod="w-2", since=1767225600.0, reserved_on="n1")
    assert (w.min_replicas, w.scale_to_zero, w.rolling) == (2, False, False)


def test_a_reserved_waiter_whose_gpus_are_free_is_nudged_and_only_then():
    """The victim is gone and its GPU is free: the waiter reserved there is nudged (the scheduler tries it now, not
    after its backoff). Not while the GPU is still on its way back, and not a waiter reserved on another node (its
    reservation is moved, which is itself an update the scheduler reacts to)."""
    rest = [idle("c", "n1", since=300), idle("d", "n1", since=200), idle("a", "n0", since=100)]  # one free on n0
    w = waiter(pending=Pending(1, MSG, pod="w-pod", since=1.0, reserved_on="n0"))
    p = plan(rest + [w], NODES)
    assert p.nudge == {("ns", "w"): "w-pod"} and p.parks == []
    leaving = rest[:2] + [idle("a", "n0", since=100), replace(idle("b", "n0", since=50), replicas=0)]
    assert plan(leaving + [w], NODES).nudge == {}
    elsewhere = replace(w, pending=replace(w.pending, reserved_on="n1"))
    p = plan(rest + [elsewhere], NODES)
    assert p.nudge == {} and p.reserve[("ns", "w")].node == "n0"


async def test_the_controller_nudges_a_pod_at_most_once_per_interval():
    from modelservice import controller as ctl
    from modelservice.controller import Controller

    class Kube:
        def __init__(self):
            self.patches = []

        async def merge_patch(self, path, body):
            self.patches.append((path, body))

    kube = Kube()
    c = Controller(kube=kube)
    now = [100.0]
    c.clock = lambda: now[0]
    await c._nudge(("ns", "w"), "w-pod")
    await c._nudge(("ns", "w"), "w-pod")  # within NUDGE_EVERY: not again
    now[0] += ctl.NUDGE_EVERY
    await c._nudge(("ns", "w"), "w-pod")
    assert [p for p, _ in kube.patches] == ["/api/v1/namespaces/ns/pods/w-pod"] * 2
    assert set(kube.patches[0][1]["metadata"]["annotations"]) == {"serving.modelservice.dev/scheduling-retry"}
