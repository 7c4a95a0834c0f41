"""Replica decisions: who owns spec.replicas, when to sleep, how many replicas the load asks for."""

from modelservice.api import validate_spec
from modelservice.scaling import Activity, activity_from_leases, decide

NOW = 1_000_000.0


def _spec(**autoscaling):
    spec = {"engine": "vllm", "model": {"uri": "hf://o/r"}, "resources": {"requests": {"cpu": "1"}}}
    if autoscaling:
        spec["autoscaling"] = autoscaling
    return validate_spec(spec, gateway_enabled=True)


def test_manual_replicas_travel_in_the_apply():
    d = decide(_spec(), 2, Activity(), None, NOW)
    assert d.apply_replicas == 1 and d.scale_to is None


def test_idle_model_goes_to_zero_after_the_window():
    spec = _spec(minReplicas=0, maxReplicas=3, scaleToZeroAfter="60s")
    busy = decide(spec, 1, Activity(last_request=NOW - 30), NOW - 600, NOW)
    assert busy.scale_to is None and 29 <= busy.requeue_after <= 31
    idle = decide(spec, 1, Activity(last_request=NOW - 61), NOW - 600, NOW)
    assert idle.scale_to == 0 and idle.apply_replicas is None


def test_just_woken_model_is_not_put_back_to_sleep():
    # The lease may lag the gateway's scale-up: the time we saw it wake counts as activity.
    spec = _spec(minReplicas=0, maxReplicas=3, scaleToZeroAfter="60s")
    assert decide(spec, 1, Activity(last_request=NOW - 3600), NOW - 5, NOW).scale_to is None


def test_a_loading_model_is_never_idle():
    """Load time does not count as idle: a replica that has not been Ready since the model woke (the first replica
    of a new model, or one starting after a wake-up) keeps the model up however old its last request is."""
    spec = _spec(minReplicas=0, maxReplicas=3, scaleToZeroAfter="60s")
    loading = decide(spec, 1, Activity(last_request=NOW - 3600), None, NOW)
    assert loading.scale_to is None and loading.requeue_after is None  # the Ready transition brings the next pass
    # Ready for a moment: the window counts from Ready, not from the request that woke it an hour ago.
    assert decide(spec, 1, Activity(last_request=NOW - 3600), NOW - 59, NOW).scale_to is None
    assert decide(spec, 1, Activity(last_request=NOW - 3600), NOW - 61, NOW).scale_to == 0


def test_asleep_model_stays_asleep_until_the_gateway_wakes_it():
    spec = _spec(minReplicas=0, maxReplicas=3)
    assert decide(spec, 0, Activity(in_flight=0), None, NOW).scale_to is None


def test_in_flight_load_sizes_replicas_within_bounds():
    spec = _spec(minReplicas=1, maxReplicas=4, targetInFlight=8)
    assert decide(spec, 1, Activity(in_flight=20), NOW, NOW).scale_to == 3
    assert decide(spec, 3, Activity(in_flight=500), NOW, NOW).scale_to == 4
    assert decide(spec, 3, Activity(in_flight=0), NOW, NOW).scale_to == 1
    assert decide(spec, 1, Activity(in_flight=8), NOW, NOW).scale_to is None


def test_with_an_hpa_load_raises_its_floor():
    spec = _spec(minReplicas=1, maxReplicas=4, targetInFlight=8, cpuUtilization=70)
    d = decide(spec, 1, Activity(in_flight=20), NOW, NOW)
    assert d.hpa_floor == 3 and d.scale_to is None


def test_activity_from_leases_sums_fresh_gateways():
    def lease(last, renew, inflight):
        return {
            "metadata": {
                "annotations": {
                    "serving.modelservice.dev/last-request": last,
                    "serving.modelservice.dev/in-flight": str(inflight),
                }
            },
            "spec": {"renewTime": renew},
        }

    t = "1970-01-12T13:46:40Z"  # NOW
    stale = "1970-01-12T13:40:00Z"
    a = activity_from_leases([lease(t, t, 3), lease(stale, t, 2), lease(stale, stale, 50)], NOW)
    assert a.in_flight == 5 and a.last_request == NOW
    assert a.in_flight_now == 5  # gateways that write no in-flight-now figure: their peak stands for it


def test_in_flight_now_is_busy_at_this_moment_and_the_peak_stays_the_load():
    """The gateway writes the drop to idle at once (in-flight-now 0) while the interval's peak still says 1: the
    pool planner may park the model now, and scaling still sees the interval's load."""
    t = "1970-01-12T13:46:40Z"  # NOW
    stale = "1970-01-12T13:40:00Z"

    def lease(renew, peak, now):
        return {
            "metadata": {
                "annotations": {
                    "serving.modelservice.dev/in-flight": str(peak),
                    "serving.modelservice.dev/in-flight-now": str(now),
                }
            },
            "spec": {"renewTime": renew},
        }

    a = activity_from_leases([lease(t, 1, 0), lease(t, 2, 1), lease(stale, 9, 9)], NOW)
    assert (a.in_flight, a.in_flight_now) == (3, 1)
    a = activity_from_leases([lease(t, 1, 0)], NOW)
    assert (a.in_flight, a.in_flight_now) == (1, 0)


def test_the_engines_queue_scales_up_and_the_larger_count_wins():
    spec = _spec(minReplicas=1, maxReplicas=6, targetInFlight=8, targetQueue=4)
    # 2 replicas, 20 waiting (10 per replica > 4): ceil(20 / 4) = 5, more than in-flight's ceil(16 / 8) = 2.
    assert decide(spec, 2, Activity(in_flight=16, waiting=20), NOW, NOW).scale_to == 5
    # In-flight asks for more than the queue: in-flight wins.
    assert decide(spec, 2, Activity(in_flight=40, waiting=9), NOW, NOW).scale_to == 5
    # A queue within target holds the count (it is short because the replicas are there), in-flight alone would
    # have scaled down to 1.
    assert decide(spec, 3, Activity(in_flight=8, waiting=6), NOW, NOW).scale_to is None
    # No queue, or no figure (engines not read, or no fresh Lease carries one): in-flight and minReplicas decide.
    assert decide(spec, 3, Activity(in_flight=8, waiting=0), NOW, NOW).scale_to == 1
    assert decide(spec, 3, Activity(in_flight=8, waiting=None), NOW, NOW).scale_to == 1
    assert decide(spec, 2, Activity(waiting=1000), NOW, NOW).scale_to == 6  # within maxReplicas
    hpa = _spec(minReplicas=1, maxReplicas=6, targetQueue=4, cpuUtilization=70)
    assert decide(hpa, 1, Activity(waiting=10), NOW, NOW).hpa_floor == 3


def test_activity_takes_the_largest_fresh_queue_not_the_sum():
    """Every gateway (and worker) reads the same engines: two Leases saying 5 are one queue of 5."""
    t = "1970-01-12T13:46:40Z"  # NOW

    def lease(renew, waiting=None):
        ann = {"serving.modelservice.dev/in-flight": "1"}
        if waiting is not None:
            ann["serving.modelservice.dev/waiting"] = waiting
        return {"metadata": {"annotations": ann}, "spec": {"renewTime": renew}}

    assert activity_from_leases([lease(t, "5"), lease(t, "3"), lease(t)], NOW).waiting == 5
    assert activity_from_leases([lease("1970-01-01T00:00:00Z", "50"), lease(t, "2")], NOW).waiting == 2  # stale
    assert activity_from_leases([lease(t, "junk"), lease(t, "-4")], NOW).waiting == 0
    assert activity_from_leases([lease(t)], NOW).waiting is None
