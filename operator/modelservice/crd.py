"""CRD generation from the pydantic models in api.py: `make crds` and `modelservice-operator crd` call this.

pydantic emits JSON Schema (with $refs, anyOf-null for Optional, titles); Kubernetes wants a structural OpenAPI v3
schema (everything inlined, `type` on every node, no nulls). The conversion below is small on purpose: it only handles
the shapes api.py uses, and the unit test that diffs the committed CRD catches anything new.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from modelservice import GROUP, KIND, PLURAL, VERSION
from modelservice.api import ModelServiceSpec, ModelServiceStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
# Keys of pydantic's JSON Schema that Kubernetes' structural schema does not take.
_DROP = {"title", "additionalProperties"}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        target.update({k: v for k, v in node.items() if k != "$ref"})
        return _structural(target, defs)
    if node.get("x-kubernetes-int-or-string"):  # Quantity: the shape Kubernetes' own CRDs use
        string = next(b for b in node["anyOf"] if b.get("type") == "string")
        return {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": string["pattern"],
            "x-kubernetes-int-or-string": True,
            **({"description": node["description"]} if "description" in node else {}),
        }
    if "anyOf" in node:  # Optional[X]: drop the null branch; absence is how Kubernetes says "unset"
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        merged = {k: v for k, v in node.items() if k != "anyOf"}
        if len(branches) != 1:
            raise ValueError(f"unsupported union in schema: {node}")
        merged = {k: v for k, v in merged.items() if not (k == "default" and v is None)}
        return _structural({**branches[0], **merged}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "enum":
            out["enum"] = [v.value if hasattr(v, "value") else v for v in value]
        elif key == "properties":
            out["properties"] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if out.get("type") == "object" and "properties" not in out:
        if isinstance(extra, dict) and extra:  # map[string]X
            out["additionalProperties"] = _structural(extra, defs)
        else:  # an object of any shape (dict[str, Any]); api.py has none today: corev1.py types what we embed
            out["x-kubernetes-preserve-unknown-fields"] = True
    if "default" in out and isinstance(out["default"], (dict, list)) and not out["default"]:
        del out["default"]  # empty containers as defaults only add noise to every stored object
    return out


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="serialization")
    defs = raw.pop("$defs", {})
    return _structural(raw, defs)


def _spec_schema() -> dict[str, Any]:
    schema = _schema_of(ModelServiceSpec)
    schema["description"] = "What to serve and how. The operator never writes to spec."
    return schema


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def _status_schema() -> dict[str, Any]:
    # Only the operator writes status, in full: defaults there would only hide a bug (and v1.20 mishandles '').
    schema: dict[str, Any] = _strip_defaults(_schema_of(ModelServiceStatus))
    schema["description"] = "What the operator observed. Written by the operator only."
    conds = schema["properties"]["conditions"]
    conds["x-kubernetes-list-type"] = "map"
    conds["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def build_crd() -> dict[str, Any]:
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "schema": {
            "openAPIV3Schema": {
                "type": "object",
                "description": "A model served on Kubernetes: the operator runs it as a Deployment, a Service and "
                "(optionally) an autoscaler, and the gateway can scale it to zero.",
                "required": ["spec"],
                "properties": {
                    "apiVersion": {"type": "string", "description": "serving.modelservice.dev/v1alpha1"},
                    "kind": {"type": "string", "description": "ModelService"},
                    "metadata": {"type": "object"},
                    "spec": _spec_schema(),
                    "status": _status_schema(),
                },
            }
        },
        "subresources": {
            "status": {},
            "scale": {
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".status.selector",
            },
        },
        "additionalPrinterColumns": [
            {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
            {"name": "Adapters", "type": "string", "jsonPath": ".status.adaptersLoaded"},
            {"name": "Status", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
            {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "modelservice-operator", "app.kubernetes.io/part-of": "modelservice"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "modelservice",
                "shortNames": ["msvc", "ms"],
                "categories": ["modelserving"],
            },
            "scope": "Namespaced",
            "versions": [version],
        },
    }


HEADER = "# Generated by `make crds` from operator/modelservice/api.py. Do not edit by hand.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)
