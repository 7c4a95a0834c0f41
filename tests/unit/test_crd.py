"""One source of truth: the committed CRD and the chart's copy are exactly what the pydantic models generate."""

from pathlib import Path

import yaml

from modelservice.crd import build_crd, crd_yaml

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "crds" / "modelservices.serving.modelservice.dev.yaml"
CHART_COPY = ROOT / "charts" / "modelservice-operator" / "files" / "crds" / COMMITTED.name


def test_committed_crd_matches_the_models():
    assert COMMITTED.read_text() == crd_yaml(), "run `make crds` and commit the result"


def test_chart_copy_matches():
    assert CHART_COPY.read_text() == crd_yaml(), "run `make crds` and commit the result"


def _walk(node, path="", out=None):
    out = [] if out is None else out
    if isinstance(node, dict):
        out.append((path, node))
        for k, v in node.get("properties", {}).items():
            _walk(v, f"{path}.{k}", out)
        if "items" in node:
            _walk(node["items"], f"{path}[]", out)
    return out


def test_schema_is_structural_and_documented():
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema["properties"]["spec"], "spec") + _walk(schema["properties"]["status"], "status"):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert "$ref" not in node and "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
        if path.count(".") >= 1 and not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description (kubectl explain shows it)"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["msvc", "ms"] and names["categories"] == ["modelserving"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Engine", "Model", "Ready", "GPUs", "Adapters", "Status", "URL", "Age"]
    assert schema["properties"]["spec"]["properties"]["engine"]["enum"][0] == "vllm"
    assert schema["properties"]["spec"]["properties"]["replicas"]["default"] == 1
    yaml.safe_load(crd_yaml())


def test_adapters_and_conditions_are_list_maps_for_server_side_apply():
    """Keyed lists: with server-side apply each field manager owns its own entries (docs/lora.md: two pipelines add
    adapters to one base without replacing each other's)."""
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    adapters = schema["properties"]["spec"]["properties"]["adapters"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert (adapters["x-kubernetes-list-type"], adapters["x-kubernetes-list-map-keys"]) == ("map", ["name"])
    assert "name" in adapters["items"]["required"]  # a map key must be required
    assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])
