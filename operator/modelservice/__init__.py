"""ModelService operator: serve models on Kubernetes from one custom resource."""

__version__ = "0.1.0"

GROUP = "serving.modelservice.dev"
VERSION = "v1alpha1"
KIND = "ModelService"
PLURAL = "modelservices"
FIELD_MANAGER = "modelservice-operator"
