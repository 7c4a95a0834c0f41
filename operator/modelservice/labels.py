"""Names, labels and annotations shared by the operator, the gateway and the test cluster.

One place so the three agree: the gateway finds backends and the operator finds children by these.
"""

from modelservice import FIELD_MANAGER, GROUP

# On every child and on the pod template. The selector uses MODELSERVICE_LABEL only (selectors are immutable).
MODELSERVICE_LABEL = f"{GROUP}/modelservice"
ENGINE_LABEL = f"{GROUP}/engine"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = FIELD_MANAGER

# Activity Leases (coordination.k8s.io/v1) the gateway writes, one per model per gateway replica.
ACTIVITY_LABEL = f"{GROUP}/activity"
IN_FLIGHT_ANNOTATION = f"{GROUP}/in-flight"  # the highest since the previous write: load, for scaling
# In flight when written; a model that goes idle is written at once (not after the interval), so the GPU pool
# planner sees an idle model as soon as it is one (parking.py).
IN_FLIGHT_NOW_ANNOTATION = f"{GROUP}/in-flight-now"
LAST_REQUEST_ANNOTATION = f"{GROUP}/last-request"
# Requests waiting in the engines' own queues, as the gateway last read them (engine_load.py); absent: not known.
WAITING_ANNOTATION = f"{GROUP}/waiting"


def child_name(ms_name: str) -> str:
    """Deployment, Service, HPA and PDB share the ModelService's name: what `kubectl get` users expect."""
    return ms_name


def cache_pvc_name(ms_name: str) -> str:
    return f"{ms_name}-cache"


def selector_labels(ms_name: str) -> dict[str, str]:
    return {MODELSERVICE_LABEL: ms_name}


def selector_string(ms_name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(ms_name).items())
