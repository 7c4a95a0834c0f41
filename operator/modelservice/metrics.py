"""Prometheus metrics, named like controller-runtime's so existing dashboards carry over."""

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_TOTAL = Counter("modelservice_reconcile_total", "Reconciles by result.", ["result"])
RECONCILE_TIME = Histogram(
    "modelservice_reconcile_time_seconds",
    "Time per reconcile.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MANAGED = Gauge("modelservice_managed", "ModelServices the operator manages.")
LAST_WATCH_EVENT = Gauge(
    "modelservice_last_watch_event_timestamp_seconds", "Unix time of the last watch event received."
)
WORKQUEUE_DEPTH = Gauge("modelservice_workqueue_depth", "Keys waiting to be reconciled.")
API_WRITES = Counter("modelservice_api_writes_total", "Writes the operator sent, by verb and kind.", ["verb", "kind"])
