"""Render is pure: spec in, children out. Every engine renders; the shapes our users and GitOps rely on hold."""

import pytest

from modelservice.api import Engine, validate_spec
from modelservice.engines import ENGINES
from modelservice.render import PRESTOP_SECONDS, ApiVersions, Context, prestop_seconds, render

CTX = dict(
    name="m",
    namespace="ns",
    uid="uid-1",
    labels={"team": "a", "app.kubernetes.io/instance": "argo-app", "argocd.argoproj.io/instance": "x"},
)

URIS = {
    "vllm": "hf://org/repo",
    "sglang": "hf://org/repo",
    "tgi": "hf://org/repo",
    "triton": "s3://bucket/repo",
    "ollama": "ollama://llama3.2:1b",
    "llamacpp": "hf://org/repo-GGUF:Q4_K_M",
    "custom": None,
}


def _render(spec_dict, gateway=True, replicas=1, versions=None, hpa_floor=None):
    versions = versions or ApiVersions()
    spec = validate_spec(spec_dict, gateway_enabled=gateway)
    return render(Context(**CTX, replicas=replicas, hpa_min_replicas=hpa_floor, versions=versions), spec)


def _container(children):
    return children["Deployment"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("engine", [e.value for e in Engine])
def test_every_engine_renders(engine):
    spec = {"engine": engine, "model": {"uri": URIS[engine]} if URIS[engine] else {}}
    if engine == "custom":
        spec.update(image="ghcr.io/acme/server:1.2.3", port=9000, probes={"readinessPath": "/ready"})
    out = _render(spec)
    dep, svc = out["Deployment"], out["Service"]
    c = _container(out)
    eng = ENGINES[Engine(engine)]
    assert c["image"] == (spec.get("image") or eng.image)
    assert not c["image"].endswith(":latest") and ":" in c["image"]
    port = spec.get("port", eng.port)
    assert c["ports"][0] == {"name": "http", "containerPort": port, "protocol": "TCP"}
    assert svc["spec"]["ports"][0]["name"] == "http" and svc["spec"]["ports"][0]["port"] == port
    assert (
        str(port) in " ".join(c.get("args", [])) + " ".join(e.get("value", "") for e in c["env"]) or engine == "custom"
    )
    assert dep["spec"]["selector"] == {"matchLabels": {"serving.modelservice.dev/modelservice": "m"}}
    assert dep["spec"]["template"]["spec"]["enableServiceLinks"] is False
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in c


def test_model_reaches_the_engine_in_its_own_flags():
    assert _container(_render({"engine": "vllm", "model": {"uri": "hf://org/repo", "servedName": "chat"}}))["args"][
        :4
    ] == ["--model", "org/repo", "--served-model-name", "chat"]
    assert "--model-path" in _container(_render({"engine": "sglang", "model": {"uri": "hf://org/repo"}}))["args"]
    assert _container(_render({"engine": "tgi", "model": {"uri": "hf://org/repo"}}))["args"][:2] == [
        "--model-id",
        "org/repo",
    ]
    assert _container(_render({"engine": "llamacpp", "model": {"uri": "hf://o/r:Q4"}}))["args"][:2] == ["-hf", "o/r:Q4"]
    assert (
        "--model-repository=s3://bucket/repo"
        in _container(_render({"engine": "triton", "model": {"uri": "s3://bucket/repo"}}))["args"]
    )
    ollama = _container(_render({"engine": "ollama", "model": {"uri": "ollama://llama3.2:1b"}}))
    assert "ollama pull 'llama3.2:1b'" in ollama["lifecycle"]["postStart"]["exec"]["command"][-1]


def test_pvc_and_downloaded_models_are_mounted():
    out = _render({"engine": "vllm", "model": {"uri": "pvc://weights/llama/8b"}})
    pod = out["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "model-source", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod[
        "volumes"
    ]
    assert _container(out)["args"][:2] == ["--model", "/mnt/models/llama/8b"]
    out = _render({"engine": "vllm", "model": {"uri": "s3://bucket/llama"}})
    init = out["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"] == ["s3://bucket/llama", "/mnt/models"] and _container(out)["args"][:2] == [
        "--model",
        "/mnt/models",
    ]


def test_startup_probe_is_sized_from_startup_timeout():
    c = _container(_render({"engine": "vllm", "model": {"uri": "hf://o/r"}, "startupTimeout": "20m"}))
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 1200
    # A loaded model is noticed within a second (the cold-start goal in docs/benchmarks.md depends on it).
    assert c["startupProbe"]["periodSeconds"] == 1


def test_engines_that_run_here_render_a_command_that_runs_in_the_upstream_image_too():
    c = _container(_render({"engine": "vllm", "model": {"uri": "hf://o/r"}}))
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert c["args"][:2] == ["--model", "o/r"] and c["image"].startswith("vllm/vllm-openai:v")
    c = _container(_render({"engine": "llamacpp", "model": {"uri": "hf://o/r:Q4_K_M"}}))
    assert c["command"] == ["/app/llama-server"] and c["args"][:2] == ["-hf", "o/r:Q4_K_M"]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_gpu_resources_env_placement_and_security():
    out = _render(
        {
            "engine": "vllm",
            "model": {"uri": "hf://o/r"},
            "resources": {"limits": {"nvidia.com/gpu": 1}, "requests": {"cpu": "4"}},
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                {"name": "HOME", "value": "/home/me"},
            ],
            "placement": {
                "nodeSelector": {"gpu": "a100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "priorityClassName": "high",
            },
            "podTemplate": {"annotations": {"a": "b"}, "labels": {"l": "v"}, "serviceAccountName": "sa"},
        }
    )
    c = _container(out)
    pod = out["Deployment"]["spec"]["template"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}, "requests": {"cpu": "4"}}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf"
    assert env["HOME"]["value"] == "/home/me" and [e["name"] for e in c["env"]].count("HOME") == 1
    assert pod["spec"]["nodeSelector"] == {"gpu": "a100"} and pod["spec"]["priorityClassName"] == "high"
    assert pod["spec"]["serviceAccountName"] == "sa" and "automountServiceAccountToken" not in pod["spec"]
    assert pod["metadata"]["annotations"]["a"] == "b" and pod["metadata"]["labels"]["l"] == "v"
    assert c["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False


def test_labels_never_copy_gitops_tracking():
    out = _render({"engine": "vllm", "model": {"uri": "hf://o/r"}})
    for obj in filter(None, out.values()):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "m"  # ours, not Argo's "argo-app"
        assert "argocd.argoproj.io/instance" not in labels and labels["team"] == "a"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "serving.modelservice.dev/v1alpha1",
                "kind": "ModelService",
                "name": "m",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert "annotations" not in obj["metadata"]


def test_replicas_omitted_when_autoscaling_owns_them():
    assert _render({"engine": "vllm", "model": {"uri": "hf://o/r"}}, replicas=3)["Deployment"]["spec"]["replicas"] == 3
    out = _render(
        {"engine": "vllm", "model": {"uri": "hf://o/r"}, "autoscaling": {"minReplicas": 0, "maxReplicas": 3}},
        replicas=None,
    )
    assert "replicas" not in out["Deployment"]["spec"]
    assert out["HorizontalPodAutoscaler"] is None  # no CPU target: the operator scales from gateway load


def test_hpa_and_pdb_follow_discovery_and_bounds():
    spec = {
        "engine": "vllm",
        "model": {"uri": "hf://o/r"},
        "resources": {"requests": {"cpu": "2"}},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 5, "cpuUtilization": 70},
    }
    out = _render(spec, replicas=None, versions=ApiVersions(hpa="autoscaling/v2beta2", pdb="policy/v1beta1"))
    hpa = out["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2beta2" and hpa["spec"]["minReplicas"] == 1  # an HPA cannot hold 0
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    assert out["PodDisruptionBudget"] is None
    out = _render(spec, replicas=None, hpa_floor=4)
    assert out["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 4
    out = _render(
        {"engine": "vllm", "model": {"uri": "hf://o/r"}, "replicas": 3},
        replicas=3,
        versions=ApiVersions(pdb="policy/v1beta1"),
    )
    assert out["PodDisruptionBudget"]["apiVersion"] == "policy/v1beta1"
    assert out["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_cache_pvc():
    out = _render(
        {"engine": "vllm", "model": {"uri": "hf://o/r"}, "cache": {"size": "100Gi", "storageClassName": "fast"}}
    )
    pvc = out["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "m-cache" and pvc["spec"]["storageClassName"] == "fast"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    c = _container(out)
    assert {"name": "cache", "mountPath": "/cache"} in c["volumeMounts"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in c["env"]


def test_pods_drain_for_the_length_of_a_generation_before_the_engine_stops():
    pod = _render({"engine": "vllm", "model": {"uri": "hf://o/m"}, "drainTimeout": "10m"})["Deployment"]["spec"][
        "template"
    ]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 600 + 2
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "2"]}}}
    default = _render({"engine": "vllm", "model": {"uri": "hf://o/m"}})["Deployment"]["spec"]["template"]["spec"]
    assert default["terminationGracePeriodSeconds"] == 300 + 2
    ollama = _container(_render({"engine": "ollama", "model": {"uri": "ollama://llama3.2:1b"}}))
    assert set(ollama["lifecycle"]) == {"postStart", "preStop"}
    custom = _container(_render({"engine": "custom", "image": "ghcr.io/acme/s:1", "port": 9000}))
    assert "lifecycle" not in custom  # a custom image may have no sleep: a failing hook is only noise


def test_by_default_no_prestop_wait_where_only_the_gateway_reaches_the_engines():
    """The wait is for clients that bypass the gateway; with the gateway's NetworkPolicy there are none."""
    assert prestop_seconds(None, gateway_only=True) == 0
    assert prestop_seconds(None, gateway_only=False) == PRESTOP_SECONDS == 2
    assert prestop_seconds(5, gateway_only=True) == 5 and prestop_seconds(0, gateway_only=False) == 0


@pytest.mark.parametrize("seconds", [0, 7])
def test_the_prestop_wait_is_the_operators_setting(seconds):
    """--prestop-seconds: the hook's sleep and the grace period's share of it; 0 renders no hook at all (a parked
    model's GPUs are free as soon as its idle engine exits)."""
    spec = validate_spec({"engine": "vllm", "model": {"uri": "hf://o/m"}}, gateway_enabled=True)
    pod = render(Context(**CTX, replicas=1, prestop_seconds=seconds), spec)["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300 + seconds
    hook = {"preStop": {"exec": {"command": ["sleep", str(seconds)]}}} if seconds else None
    assert pod["containers"][0].get("lifecycle") == hook


def test_rollouts_surge_unless_the_pool_planner_says_in_place():
    spec = validate_spec({"engine": "vllm", "model": {"uri": "hf://o/m"}}, gateway_enabled=True)
    surge = render(Context(**CTX, replicas=1), spec)["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert surge == {"maxSurge": 1, "maxUnavailable": 0}
    in_place = render(Context(**CTX, replicas=1, surge=False), spec)["Deployment"]["spec"]["strategy"]
    assert in_place["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
