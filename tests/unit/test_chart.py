"""The Helm chart: lint, render, Kubernetes schemas, RBAC surface, values schema, and the CRD copy.

helm comes from hack/get-helm.sh (tests/helm_util.py); the tests skip with a reason only when npm is missing.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from modelservice import cli
from modelservice.gateway import cli as gateway_cli
from tests import helm_util as hu

CRD_FILE = "modelservices.serving.modelservice.dev.yaml"
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
MATRIX = [None, *hu.ci_values_files()]
MATRIX_IDS = ["default", *(p.name.removesuffix("-values.yaml") for p in hu.ci_values_files())]

OPERATOR = "modelservice-modelservice-operator"
GATEWAY = "modelservice-modelservice-operator-gateway"


def _triples(group: str, resources: str, verbs: str) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources.split() for v in verbs.split()}


# The product's security surface, written out by hand on purpose: changing templates/_rbac.tpl must change this.
CHILD = "get list watch create patch delete"  # server-side apply (PATCH, create on first apply), no PUT
OPERATOR_NAMESPACED = (
    _triples("serving.modelservice.dev", "modelservices", "get list watch")
    | _triples("serving.modelservice.dev", "modelservices/status", "get patch")
    | _triples("apps", "deployments", CHILD)
    | _triples("apps", "deployments/scale", "patch")
    | _triples("", "services persistentvolumeclaims", CHILD)
    | _triples("autoscaling", "horizontalpodautoscalers", CHILD)
    | _triples("policy", "poddisruptionbudgets", CHILD)
    | _triples("networking.k8s.io", "networkpolicies", CHILD)
    | _triples("", "pods", "get list watch patch")
    | _triples("", "pods/status", "patch")  # the GPU pool's reservation (docs/gpu-pool.md)
    | _triples("coordination.k8s.io", "leases", "get list watch")
    | _triples("", "events", "get create patch")
)
OPERATOR_CLUSTER = _triples("apiextensions.k8s.io", "customresourcedefinitions", "get list watch") | _triples(
    "", "nodes", "get list watch"
)  # the GPU pool planner: where a pod fits
GATEWAY_RULES = (
    _triples("serving.modelservice.dev", "modelservices", "get list watch")
    | _triples("discovery.k8s.io", "endpointslices", "get list watch")
    | _triples("apps", "deployments", "get list watch")
    | _triples("apps", "deployments/scale", "get patch update")
    | _triples("coordination.k8s.io", "leases", "get list watch create update patch")
    | _triples("", "events", "create patch")
)
GATEWAY_SECRETS = _triples("", "secrets", "get")  # point reads of the Secrets ModelServices name; no list/watch
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "nodes")}


@pytest.fixture(scope="module", autouse=True)
def helm() -> str:
    try:
        return hu.helm_binary()
    except hu.HelmUnavailable as e:
        pytest.skip(str(e))


@functools.lru_cache(maxsize=None)
def _render(values_file: Path | None, kube_version: str | None = None, api_versions: tuple[str, ...] = ()):
    return hu.render([values_file] if values_file else [], kube_version=kube_version, api_versions=api_versions)


def rendered(values_file: Path | None = None, **kwargs):
    return _render(values_file, kwargs.get("kube_version"), tuple(kwargs.get("api_versions", ())))


def values_of(values_file: Path | None) -> dict:
    base = yaml.safe_load((hu.CHART_DIR / "values.yaml").read_text())
    override = yaml.safe_load(values_file.read_text()) if values_file else {}

    def merge(a: dict, b: dict) -> dict:
        return {
            **a,
            **{k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v for k, v in b.items()},
        }

    return merge(base, override or {})


def roles(docs, comp: str, kind: str) -> list[dict]:
    return [d for d in hu.of_kind(docs, kind) if hu.component(d) == comp]


# ---- lint and Kubernetes schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", MATRIX, ids=MATRIX_IDS)
def test_lint_strict(values_file):
    done = hu.lint([values_file] if values_file else [])
    assert done.returncode == 0, done.stdout + done.stderr


def _schema_version(which: str) -> str:
    import kubernetes_validate as kv
    from kubernetes_validate import utils

    known = {utils.major_minor(v) for v in utils.all_versions()}
    if which == "newest":
        return utils.major_minor(utils.latest_version())
    if which not in known:
        pytest.fail(
            f"kubernetes-validate {kv.__version__} ships no Kubernetes {which} schemas "
            f"(it has {min(known)}..{max(known)}); kubernetes-validate 1.28.x ships 1.20..1.28"
        )
    return which


@pytest.mark.parametrize("which", ["1.20", "newest"])
@pytest.mark.parametrize("values_file", MATRIX, ids=MATRIX_IDS)
def test_manifests_match_kubernetes_schemas(values_file, which):
    import kubernetes_validate

    version = _schema_version(which)
    docs = rendered(values_file, kube_version=f"{version}.0")
    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD of prometheus-operator: not in the Kubernetes schemas
            continue
        try:
            with warnings.catch_warnings():  # kubernetes-validate 1.28 uses jsonschema's deprecated RefResolver
                warnings.simplefilter("ignore", DeprecationWarning)
                kubernetes_validate.validate(doc, version, strict=True)
        except Exception as e:  # noqa: BLE001 - name the manifest, then fail with the validator's message
            pytest.fail(
                f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: "
                f"{getattr(e, 'message', e)}"
            )


def test_every_object_has_the_standard_labels():
    for values_file in MATRIX:
        for doc in rendered(values_file):
            labels = doc["metadata"].get("labels", {})
            for key in (
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by",
                "helm.sh/chart",
            ):
                assert key in labels, f"{doc['kind']}/{doc['metadata']['name']} lacks label {key}"
            assert labels["app.kubernetes.io/instance"] == hu.RELEASE


def test_chart_metadata():
    chart = yaml.safe_load((hu.CHART_DIR / "Chart.yaml").read_text())
    assert (chart["version"], chart["appVersion"], chart["kubeVersion"]) == ("0.1.0", "0.1.0", ">=1.20.0-0")
    with pytest.raises(hu.HelmError, match="kubeVersion"):
        hu.render(kube_version="1.19.0")


# ---- the operator and gateway Deployments --------------------------------------------------------------------------


def test_operator_deployment_contract():
    docs = rendered()
    dep = hu.find(docs, "Deployment", OPERATOR)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    assert c["image"] == "ghcr.io/modelservice/modelservice-operator:0.1.0"
    assert c["command"] == ["modelservice-operator"]
    assert c["args"] == [
        "run",
        "--all-namespaces",
        "--metrics-port",
        "8080",
        "--health-port",
        "8081",
        "--gateway-enabled",
        "--network-policy",
        "--gateway-namespace",
        "modelservice-system",
        "--gateway-pod-selector",
        "app.kubernetes.io/component=gateway,app.kubernetes.io/instance="
        "modelservice,app.kubernetes.io/name=modelservice-operator",
    ]
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/healthz"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == OPERATOR
    metrics = hu.find(docs, "Service", f"{OPERATOR}-metrics")
    assert metrics["spec"]["ports"][0]["port"] == 8080


@pytest.mark.parametrize("name", [OPERATOR, GATEWAY])
def test_restricted_security_context(name):
    pod = hu.find(rendered(), "Deployment", name)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}


def test_watch_namespaces_become_namespace_args():
    docs = rendered(hu.CI_VALUES_DIR / "namespaced-values.yaml")
    ns_args = ["--namespace", "team-a", "--namespace", "team-b"]
    assert hu.container_args(docs, OPERATOR)[:5] == ["run", *ns_args]
    assert "--all-namespaces" not in hu.container_args(docs, OPERATOR)
    assert hu.container_args(docs, GATEWAY)[5:9] == ns_args


def test_gateway_deployment_contract():
    docs = rendered()
    dep = hu.find(docs, "Deployment", GATEWAY)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert dep["spec"]["replicas"] == 2
    assert c["args"] == [
        "gateway",
        "--port",
        "8080",
        "--metrics-port",
        "9090",
        "--activation-timeout",
        "10m",
        "--max-body-bytes",
        "10485760",
        "--workers",
        "auto",
    ]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}  # 503 until watches synced
    assert c["livenessProbe"]["tcpSocket"] == {"port": "http"}  # a slow sync is not a dead process
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090}
    svc = hu.find(docs, "Service", GATEWAY)
    assert svc["spec"]["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(80, "http")]
    metrics = hu.find(docs, "Service", f"{GATEWAY}-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["ports"][0]["port"] == 9090


@pytest.mark.parametrize("values_file", MATRIX, ids=MATRIX_IDS)
def test_args_parse_with_the_real_command_lines(values_file, monkeypatch):
    """The rendered args are accepted by the operator's and the gateway's own argument parsers."""
    docs = rendered(values_file)
    values = values_of(values_file)
    seen = []
    monkeypatch.setattr(cli, "_run", lambda args: seen.append(args) or 0)  # parse, do not start kopf
    assert cli.main(hu.container_args(docs, OPERATOR)) == 0
    (args,) = seen
    assert args.gateway_enabled is values["gateway"]["enabled"]
    assert (args.namespace or []) == values["watchNamespaces"]
    assert args.prestop_seconds == values["operator"]["preStopSeconds"]
    if values["gateway"]["enabled"]:
        gw_args = hu.container_args(docs, GATEWAY)
        assert gw_args[0] == "gateway"
        config = gateway_cli.config_from(gateway_cli.parser().parse_args(gw_args[1:]))
        assert (config.port, config.metrics_port) == (8080, 9090)
        assert config.namespaces == values["watchNamespaces"]
        assert config.max_body_bytes == values["gateway"]["maxBodyBytes"]
        workers = gateway_cli.parser().parse_args(gw_args[1:]).workers
        assert workers == values["gateway"]["workers"]


def test_large_values_stay_integers_in_args():
    # Helm reads YAML numbers as floats; 104857600 must not become 1.048576e+08.
    args = hu.container_args(rendered(hu.CI_VALUES_DIR / "overrides-values.yaml"), GATEWAY)
    assert args[args.index("--max-body-bytes") + 1] == "104857600"


def test_image_tag_and_digest():
    docs = hu.render(values={"image": {"tag": "1.2.3"}})
    assert (
        hu.find(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/modelservice/modelservice-operator:1.2.3"
    )
    docs = rendered(hu.CI_VALUES_DIR / "overrides-values.yaml")
    image = hu.find(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("registry.example.com/mirror/modelservice-operator@sha256:")


def test_network_policy_lets_in_exactly_the_gateway_pods():
    """The selector the operator gets names the labels the gateway's pods carry (and pods of no other Deployment)."""
    from modelservice.netpol import parse_labels

    docs = hu.render(values={"networkPolicy": {"metricsNamespaces": ["monitoring"]}})
    args = hu.container_args(docs, OPERATOR)
    selector = parse_labels(args[args.index("--gateway-pod-selector") + 1])
    for dep in hu.of_kind(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == (dep["metadata"]["name"] == GATEWAY), dep["metadata"]["name"]
    assert args[args.index("--metrics-namespace") + 1] == "monitoring"
    off = hu.container_args(hu.render(values={"networkPolicy": {"enabled": False}}), OPERATOR)
    assert "--network-policy" not in off and "--gateway-enabled" in off


def test_grafana_dashboard_is_off_by_default_and_a_sidecar_configmap_when_on():
    assert [d for d in hu.of_kind(rendered(), "ConfigMap") if "dashboard" in d["metadata"]["name"]] == []
    docs = hu.render(values={"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    (cm,) = [d for d in hu.of_kind(docs, "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1" and cm["metadata"]["namespace"] == "monitoring"
    dashboard = json.loads(cm["data"]["modelservice-usage.json"])
    assert dashboard == json.loads((hu.CHART_DIR / "files/dashboards/modelservice-usage.json").read_text())
    assert all(t["expr"] for p in dashboard["panels"] for t in p["targets"])


def test_gateway_off_renders_no_gateway():
    docs = rendered(hu.CI_VALUES_DIR / "gateway-off-values.yaml")
    assert [d for d in docs if hu.component(d) == "gateway"] == []
    assert "--gateway-enabled" not in hu.container_args(docs, OPERATOR)
    assert "--network-policy" not in hu.container_args(docs, OPERATOR)  # no gateway: nothing to let in


@pytest.mark.parametrize(
    "kube_version, api_version", [("1.20.0", "policy/v1beta1"), ("1.21.0", "policy/v1"), ("1.30.0", "policy/v1")]
)
def test_gateway_pdb_follows_the_cluster(kube_version, api_version):
    pdb = hu.find(rendered(kube_version=kube_version), "PodDisruptionBudget")
    assert pdb["apiVersion"] == api_version and pdb["spec"]["minAvailable"] == 1


def test_no_gateway_pdb_for_one_replica():
    assert hu.of_kind(rendered(hu.CI_VALUES_DIR / "overrides-values.yaml"), "PodDisruptionBudget") == []


@pytest.mark.parametrize(
    "enabled, cluster_has_crd, expected",
    [("auto", False, False), ("auto", True, True), (True, False, True), (False, True, False)],
)
def test_service_monitor(enabled, cluster_has_crd, expected):
    docs = hu.render(
        values={"serviceMonitor": {"enabled": enabled}}, api_versions=[SERVICE_MONITOR_API] if cluster_has_crd else []
    )
    monitors = hu.of_kind(docs, "ServiceMonitor")
    assert bool(monitors) is expected
    if monitors:  # it must select exactly the two metrics Services
        selector = monitors[0]["spec"]["selector"]["matchLabels"]
        picked = [
            s["metadata"]["name"]
            for s in hu.of_kind(docs, "Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert set(picked) == {f"{OPERATOR}-metrics", f"{GATEWAY}-metrics"}
        assert monitors[0]["spec"]["endpoints"][0]["port"] == "metrics"


# ---- RBAC ------------------------------------------------------------------------------------------------------


def test_rbac_cluster_wide_is_exactly_the_contract():
    docs = rendered()
    assert hu.of_kind(docs, "Role", "RoleBinding") == []
    (op,) = roles(docs, "operator", "ClusterRole")
    (gw,) = roles(docs, "gateway", "ClusterRole")
    assert hu.rule_triples(op) == OPERATOR_NAMESPACED | OPERATOR_CLUSTER
    assert hu.rule_triples(gw) == GATEWAY_RULES


@pytest.mark.parametrize("values_file", ["namespaced-values.yaml", "namespaced-apikeys-values.yaml"])
def test_rbac_with_watch_namespaces(values_file):
    path = hu.CI_VALUES_DIR / values_file
    docs = rendered(path)
    namespaces = values_of(path)["watchNamespaces"]
    gateway_expected = GATEWAY_RULES | (GATEWAY_SECRETS if values_of(path)["gateway"]["apiKeys"]["enabled"] else set())
    for comp, expected in (("operator", OPERATOR_NAMESPACED), ("gateway", gateway_expected)):
        rs = roles(docs, comp, "Role")
        assert sorted(r["metadata"]["namespace"] for r in rs) == sorted(namespaces)
        for r in rs:
            assert hu.rule_triples(r) == expected
    (crd_reader,) = roles(docs, "operator", "ClusterRole")
    assert hu.rule_triples(crd_reader) == OPERATOR_CLUSTER
    assert roles(docs, "gateway", "ClusterRole") == []
    for cr in hu.of_kind(docs, "ClusterRole"):
        granted = {(g, r) for g, r, _ in hu.rule_triples(cr)}
        assert granted <= CLUSTER_SCOPED, f"ClusterRole {cr['metadata']['name']} grants namespaced {granted}"


@pytest.mark.parametrize("values_file", MATRIX, ids=MATRIX_IDS)
def test_secrets_only_with_api_keys(values_file):
    docs = rendered(values_file)
    api_keys = values_of(values_file)["gateway"]["apiKeys"]["enabled"]
    for role in hu.of_kind(docs, "Role", "ClusterRole"):
        secrets = {t for t in hu.rule_triples(role) if t[1] == "secrets"}
        if api_keys and hu.component(role) == "gateway":
            assert secrets == GATEWAY_SECRETS
        else:
            assert secrets == set(), f"{role['kind']}/{role['metadata']['name']} may read Secrets"


def test_tenants_grant_secrets_of_the_release_namespace_only(monkeypatch):
    for values in ({}, {"watchNamespaces": ["team-a"]}):
        docs = hu.render(values={**values, "gateway": {"tenants": {"enabled": True}}})
        (role,) = [r for r in roles(docs, "gateway", "Role") if r["metadata"]["name"] == f"{GATEWAY}-tenants"]
        assert role["metadata"]["namespace"] == hu.NAMESPACE
        assert hu.rule_triples(role) == _triples("", "secrets", "get list watch") | _triples(
            "", "events", "create patch"
        )
        others = [r for r in hu.of_kind(docs, "Role", "ClusterRole") if r is not role]
        assert not any(t[1] == "secrets" for r in others for t in hu.rule_triples(r))
        (binding,) = [b for b in hu.of_kind(docs, "RoleBinding") if b["roleRef"]["name"] == f"{GATEWAY}-tenants"]
        assert binding["subjects"][0]["name"] == GATEWAY
        args = hu.container_args(docs, GATEWAY)
        assert "--tenants" in args
        monkeypatch.setenv("POD_NAMESPACE", hu.NAMESPACE)
        config = gateway_cli.config_from(gateway_cli.parser().parse_args(args[1:]))
        assert config.tenant_namespace == hu.NAMESPACE
        assert config.quota_share == 2  # gateway.replicas: each replica enforces its share of a quota
    assert "--tenants" not in hu.container_args(rendered(), GATEWAY)


@pytest.mark.parametrize("values_file", MATRIX, ids=MATRIX_IDS)
def test_bindings_point_at_rendered_roles_and_service_accounts(values_file):
    docs = rendered(values_file)
    values = values_of(values_file)
    role_keys = {
        (r["kind"], r["metadata"]["name"], r["metadata"].get("namespace"))
        for r in hu.of_kind(docs, "Role", "ClusterRole")
    }
    accounts = {values["serviceAccount"]["name"] or OPERATOR, values["gateway"]["serviceAccount"]["name"] or GATEWAY}
    for b in hu.of_kind(docs, "RoleBinding", "ClusterRoleBinding"):
        ns = b["metadata"].get("namespace") if b["roleRef"]["kind"] == "Role" else None
        assert (b["roleRef"]["kind"], b["roleRef"]["name"], ns) in role_keys
        (subject,) = b["subjects"]
        assert subject["name"] in accounts and subject["namespace"] == hu.NAMESPACE
    created = {sa["metadata"]["name"] for sa in hu.of_kind(docs, "ServiceAccount")}
    for dep in hu.of_kind(docs, "Deployment"):
        sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
        assert sa in accounts
        if hu.component(dep) == "operator":
            assert (sa in created) is values["serviceAccount"]["create"]


# ---- the CRD -------------------------------------------------------------------------------------------------


def _expected_crd_text() -> str:
    committed = hu.REPO / "crds" / CRD_FILE
    if committed.is_file():
        return committed.read_text()
    from modelservice.crd import crd_yaml  # crds/ not generated yet: compare with the generator itself

    return crd_yaml()


def test_chart_crd_copy_is_byte_identical():
    copy = hu.CHART_DIR / "files" / "crds" / CRD_FILE
    assert copy.read_text() == _expected_crd_text(), (
        f"{copy.relative_to(hu.REPO)} differs from crds/{CRD_FILE}: run `make crds`"
    )


def test_rendered_crd_is_the_file_plus_keep_and_labels():
    source = yaml.safe_load(_expected_crd_text())
    (crd,) = hu.of_kind(rendered(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-options": "Delete=false,Prune=false",
    }
    assert source["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    assert {k: v for k, v in crd.items() if k != "metadata"} == {k: v for k, v in source.items() if k != "metadata"}
    assert crd["metadata"]["name"] == source["metadata"]["name"]


def test_crd_switches():
    assert hu.of_kind(hu.render(values={"crds": {"install": False}}), "CustomResourceDefinition") == []
    (crd,) = hu.of_kind(hu.render(values={"crds": {"keep": False}}), "CustomResourceDefinition")
    assert not crd["metadata"].get("annotations")


# ---- values, schema, notes --------------------------------------------------------------------------------------

BAD_VALUES = [
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ({"watchNamespaces": ["a" * 64]}, "/watchNamespaces/0"),
    ({"gateway": {"replicas": 0}}, "/gateway/replicas"),
    ({"gateway": {"replicas": 1.5}}, "/gateway/replicas"),
    ({"image": {"tag": 1.0}}, "/image/tag"),
    ({"gateway": {"activationTimeout": "10 minutes"}}, "/gateway/activationTimeout"),
    ({"gateway": {"maxBodyBytes": 0}}, "/gateway/maxBodyBytes"),
    ({"gateway": {"workers": 0}}, "/gateway/workers"),
    ({"gateway": {"workers": "many"}}, "/gateway/workers"),
    ({"gateway": {"service": {"type": "Ingress"}}}, "/gateway/service/type"),
    ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ({"operator": {"preStopSeconds": -1}}, "/operator/preStopSeconds"),
    ({"operator": {"preStopSeconds": 61}}, "/operator/preStopSeconds"),
    ({"watchNamespace": ["team-a"]}, "watchNamespace"),  # a typo must not be silently ignored
]


@pytest.mark.parametrize("values, where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_values_schema_refuses(values, where):
    with pytest.raises(hu.HelmError) as err:
        hu.render(values=values)
    assert "values don't meet the specifications of the schema" in err.value.stderr
    assert where in err.value.stderr, err.value.stderr


def test_set_string_tag_is_accepted():
    # --set image.tag=2 is a number (refused, see above); the documented way out is --set-string.
    docs = hu.render(extra_args=["--set-string", "image.tag=2"])
    assert hu.find(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":2")


def test_every_value_has_a_comment():
    """A leaf key needs a comment right above it, or under an ancestor key that has one (e.g. resources)."""
    lines = (hu.CHART_DIR / "values.yaml").read_text().splitlines()
    documented: list[tuple[int, bool]] = []  # (indent, documented) of the open ancestors
    previous = ""
    for line in lines:
        m = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if m:
            indent = len(m.group(1))
            documented = [(i, d) for i, d in documented if i < indent]
            has_comment = previous.strip().startswith("#")
            ok = has_comment or any(d for _, d in documented)
            is_leaf = m.group(3).strip() != ""
            assert ok or not is_leaf, f"values.yaml: `{m.group(2)}` has no comment"
            documented.append((indent, ok))
        if line.strip():
            previous = line


def test_schema_is_draft_07_json():
    schema = json.loads((hu.CHART_DIR / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("values_file", MATRIX, ids=MATRIX_IDS)
def test_notes_render(values_file):
    args = ["install", hu.RELEASE, str(hu.CHART_DIR), "--namespace", hu.NAMESPACE, "--dry-run=client"]
    done = hu.run_helm(*args, *(["-f", str(values_file)] if values_file else []))
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"deployment/{OPERATOR}" in notes and "kind: ModelService" in notes
    assert (f"service/{GATEWAY}" in notes) is values_of(values_file)["gateway"]["enabled"]
