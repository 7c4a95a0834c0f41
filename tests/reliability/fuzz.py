"""A seeded generator of hostile ModelService specs (issue #7.4).

Each body starts from a valid spec (every engine, every optional section) and gets one to three mutations from a
catalogue: wrong types, huge strings, unknown engines, negative and huge numbers, bad URIs, conflicting autoscaling,
garbage inside the embedded core/v1 fields (env valueFrom, affinity, tolerations: typed by the CRD), bad quantities,
durations and label values. A few bodies are left valid on purpose. Same seed, same bodies: a failure names its
seed and index, and `generate(seed)[index]` rebuilds it.

Sizes are bounded: most bodies are far under etcd's 1.5 MiB request limit; a few go over it on purpose (v1.20
refuses those with 413 above 3 MiB, and with a 500 "larger than max" from its etcd client in between).
"""

from __future__ import annotations

import copy
import random
from typing import Any, Callable

ENGINES = ["vllm", "sglang", "tgi", "triton", "ollama", "llamacpp", "custom"]
URIS = {
    "vllm": "hf://org/model",
    "sglang": "hf://org/model",
    "tgi": "s3://bucket/model",
    "triton": "pvc://models/repo",
    "ollama": "ollama://llama3.2:1b",
    "llamacpp": "https://example.com/model.gguf",
    "custom": "gs://bucket/m",
}
WRONG_TYPES: list[Any] = [None, True, 0, -1, 1.5, "", "x", [], [1, "a"], {}, {"a": {"b": [None]}}]
HUGE_NUMBERS: list[Any] = [-1, -(2**31), 2**31, 2**53 + 1, 2**63, -(2**63), 10**30, 1e308, -1e-9, 0.5]
BAD_URIS = [
    "",
    "model",
    "hf:/org/model",
    "hf://",
    "ftp://host/model",
    "HF://org/model",
    "hf:// spaces in it",
    "pvc://UPPER/path",
    "pvc://-bad-/x",
    "pvc://a_b/c",
    "ollama://tag",
    "hf://org/model\n--evil",
    "s3://b/" + "k" * 3000,
    "https://exämple.com/ünïcode",
    "oci://" + "r" * 2100,
    "hf://org/model?x=1#y",
    "file:///etc/passwd",
    "javascript://x",
    "hf://\u0000nul",
]
BAD_DURATIONS = ["", "5", "-5s", "1d", "10x", "1h-30m", "9" * 40 + "s", "0s", "0.000001ms", "999999999h"]
BAD_QUANTITIES: list[Any] = ["", "-1", "1.5.5", "1e3", "one", "1 Gi", "0.5", "1.5", -1, 2**63, "9" * 70]
BAD_LABELS = ["-starts-with-dash", "has space", "x" * 64, "ünicode", "a/b/c", "", "ok"]


def _dict(spec: dict[str, Any], key: str) -> dict[str, Any]:
    """spec[key] as a dict to write into, replacing whatever a previous mutation left there (True, a list...)."""
    if not isinstance(spec.get(key), dict):
        spec[key] = {}
    return spec[key]


class Gen:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def huge_string(self) -> str:
        # Mostly big-but-admissible sizes; now and then past etcd's 1.5 MiB request limit.
        r = self.rng.random()
        n = 2_000_000 if r < 0.03 else 1_100_000 if r < 0.1 else self.pick([300, 4097, 65_536, 300_000])
        return self.pick(["a", "é", "\u202e", "$(", "{{", "\\"]) * (n // 2) + "z" * (n - n // 2)

    def valid(self) -> dict[str, Any]:
        engine = self.pick(ENGINES)
        spec: dict[str, Any] = {"engine": engine, "model": {"uri": URIS[engine]}}
        if engine == "custom":
            spec["image"] = "registry.example.com/server:1"
        r = self.rng.random
        if r() < 0.3:
            spec["replicas"] = self.rng.randint(0, 3)
        if r() < 0.3:
            spec["autoscaling"] = {"minReplicas": 1, "maxReplicas": self.rng.randint(1, 4), "cpuUtilization": 70}
            spec["resources"] = {"requests": {"cpu": "1"}}
        if r() < 0.3:
            ref = {"secretKeyRef": {"name": "hf", "key": "t", "optional": True}}
            spec["env"] = [{"name": "HF_TOKEN", "valueFrom": ref}]
        if r() < 0.2:
            spec["cache"] = {"size": "10Gi"}
        if r() < 0.2:
            spec["args"] = ["--max-model-len", "4096"]
        if r() < 0.2:
            spec["placement"] = {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}
        if r() < 0.2:
            spec["podTemplate"] = {"labels": {"team": "a"}, "annotations": {"note": "x"}}
        return spec

    # -- mutations: each takes a spec and changes it in place --------------------------------------------------
    def m_wrong_type(self, s):
        field = self.pick(
            [
                "engine",
                "model",
                "image",
                "args",
                "env",
                "port",
                "resources",
                "replicas",
                "autoscaling",
                "cache",
                "startupTimeout",
                "placement",
                "podTemplate",
                "probes",
                "apiKeySecretRef",
            ]
        )
        s[field] = copy.deepcopy(self.pick(WRONG_TYPES))

    def m_nested_wrong_type(self, s):
        path = self.pick(
            [
                ("model", "uri"),
                ("model", "servedName"),
                ("autoscaling", "maxReplicas"),
                ("cache", "size"),
                ("placement", "nodeSelector"),
                ("podTemplate", "labels"),
                ("probes", "readinessPath"),
                ("resources", "limits"),
                ("apiKeySecretRef", "name"),
            ]
        )
        outer, inner = path
        _dict(s, outer)[inner] = copy.deepcopy(self.pick(WRONG_TYPES))

    def m_huge_string(self, s):
        where = self.pick(["image", "args", "env", "servedName", "annotation", "label", "nodeSelector", "uri"])
        text = self.huge_string()
        if where == "image":
            s["image"] = text
        elif where == "args":
            s["args"] = [text]
        elif where == "env":
            s["env"] = [{"name": "BIG", "value": text}]
        elif where == "servedName":
            _dict(s, "model")["servedName"] = "a" + text
        elif where == "annotation":
            s["podTemplate"] = {"annotations": {"big": text}}
        elif where == "label":
            s["podTemplate"] = {"labels": {"big": text[:1000]}}
        elif where == "nodeSelector":
            s["placement"] = {"nodeSelector": {"k": text}}
        else:
            s["model"] = {"uri": "hf://" + text}

    def m_unknown_engine(self, s):
        s["engine"] = self.pick(["VLLM", "vllm ", "tensorrt", "", "null", "ollama\u0000", "custom;rm -rf /"])

    def m_number(self, s):
        field = self.pick(
            [
                "port",
                "replicas",
                "minReplicas",
                "maxReplicas",
                "targetInFlight",
                "cpuUtilization",
                "args_count",
                "env_count",
            ]
        )
        value = self.pick(HUGE_NUMBERS)
        if field in ("port", "replicas"):
            s[field] = value
        elif field == "args_count":
            s["args"] = [f"--a{i}" for i in range(self.pick([200, 201, 1000]))]
        elif field == "env_count":
            s["env"] = [{"name": f"V{i}", "value": "x"} for i in range(self.pick([200, 201, 500]))]
        else:
            auto = _dict(s, "autoscaling")
            auto.setdefault("maxReplicas", 2)
            auto[field] = value

    def m_bad_uri(self, s):
        s["model"] = {"uri": self.pick(BAD_URIS)}
        if self.rng.random() < 0.3:
            s["engine"] = self.pick(ENGINES)

    def m_conflicting_autoscaling(self, s):
        s["autoscaling"] = self.pick(
            [
                {"minReplicas": 5, "maxReplicas": 2},
                {"minReplicas": 0, "maxReplicas": 2},  # scale to zero without the gateway
                {"minReplicas": 1, "maxReplicas": 2, "targetInFlight": 4},  # gateway signal without the gateway
                {"minReplicas": 1, "maxReplicas": 3, "cpuUtilization": 50},  # no requests.cpu
                {"minReplicas": 1},  # maxReplicas missing
                {"maxReplicas": 3, "scaleToZeroAfter": self.pick(BAD_DURATIONS)},
                {"minReplicas": 2, "maxReplicas": 2, "cpuUtilization": 80, "targetInFlight": 8},
            ]
        )
        if self.rng.random() < 0.5:
            s["replicas"] = self.rng.randint(0, 5)

    def m_passthrough_garbage(self, s):
        """The embedded core/v1 fields: typed in the CRD (corev1.py), which refuses wrong types and prunes unknown
        keys; their semantics are left to the API server's Deployment validation."""
        choice = self.rng.randrange(8)
        if choice == 0:
            s["env"] = [
                {
                    "name": "A",
                    "valueFrom": self.pick(
                        [
                            {"secretKeyRef": "oops"},
                            {"secretKeyRef": {"key": 5}},
                            {"nope": {}},
                            {"fieldRef": {"fieldPath": 7}},
                            {"secretKeyRef": {"name": "s", "key": "k"}, "configMapKeyRef": {"name": "c", "key": "k"}},
                        ]
                    ),
                }
            ]
        elif choice == 1:
            s["env"] = [{"name": "A", "value": "1", "extra": {"deep": [1, 2, {"x": None}]}}]
        elif choice == 2:
            s["placement"] = {
                "affinity": self.pick(
                    [
                        {"nodeAffinity": 5},
                        {"podAffinity": {"x": "y"}},
                        {"bogus": []},
                        {
                            "nodeAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": "all"}
                            }
                        },
                    ]
                )
            }
        elif choice == 3:
            s["placement"] = {
                "tolerations": [
                    self.pick(
                        [{"key": 5}, {"operator": "Sometimes"}, {"effect": "Boom"}, {"tolerationSeconds": "long"}, {}]
                    )
                ]
            }
        elif choice == 4:
            s["placement"] = {"topologySpreadConstraints": [{"maxSkew": -1, "whenUnsatisfiable": "Maybe"}]}
        elif choice == 5:
            deep: Any = "bottom"
            # 30: when these fields were preserve-unknown-fields, ~20 levels pinned a v1.20 API server's CPUs for
            # minutes (kubernetes#109099, docs/reliability.md finding 4); typed, the unknown key is pruned at once.
            for _ in range(self.pick([4, 8, 30])):
                deep = {"d": deep}
            s["placement"] = {"affinity": deep}
        elif choice == 6:
            s["env"] = [{"name": "DUP", "value": "1"}, {"name": "DUP", "value": "2"}]
        else:
            s["env"] = [{"name": "BOTH", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]

    def m_quantity(self, s):
        kind = self.pick(["requests", "limits"])
        res = self.pick(["cpu", "memory", "nvidia.com/gpu", "bogus/resource", "-neg", "x" * 300])
        s["resources"] = {kind: {res: self.pick(BAD_QUANTITIES + ["1", "2Gi", 1])}}
        if self.rng.random() < 0.3:
            s["resources"] = {"requests": {"cpu": "4"}, "limits": {"cpu": "1"}}
        if self.rng.random() < 0.2:
            s["resources"] = {"limits": {"nvidia.com/gpu": "0.5"}}
        if self.rng.random() < 0.2:
            s["cache"] = {"size": self.pick(BAD_QUANTITIES)}

    def m_duration(self, s):
        s["startupTimeout"] = self.pick(BAD_DURATIONS)

    def m_labels(self, s):
        key, value = self.pick(BAD_LABELS), self.pick(BAD_LABELS)
        s["podTemplate"] = self.pick(
            [
                {"labels": {key: value}},
                {"annotations": {key: value}},
                {"serviceAccountName": self.pick(BAD_LABELS)},
                {"imagePullSecrets": [{"name": self.pick(BAD_LABELS)}]},
            ]
        )
        if self.rng.random() < 0.3:
            s["placement"] = {"nodeSelector": {key: value}, "priorityClassName": self.pick(BAD_LABELS)}

    def m_port_arg(self, s):
        s["args"] = self.pick([["--port", "9000"], ["--port=1"], ["--http-port", "1"], ["--host", "::"]])
        s["port"] = self.pick([1, 80, 65535, 22])

    def m_unknown_field(self, s):
        s[self.pick(["replica", "engines", "gpu", "x-extra"])] = {"surprise": True}
        if self.rng.random() < 0.5:
            _dict(s, "model")["revision"] = "main"

    def m_probes(self, s):
        s["probes"] = {
            self.pick(["readinessPath", "livenessPath", "metricsPath"]): self.pick(
                ["health", "//", "/" + "p" * 2000, "/ok", "/\u0000", "/a b"]
            )
        }
        s["engine"] = "custom"
        s.setdefault("image", "registry.example.com/x:1")

    def mutations(self) -> list[Callable[[dict], None]]:
        return [
            self.m_wrong_type,
            self.m_nested_wrong_type,
            self.m_huge_string,
            self.m_unknown_engine,
            self.m_number,
            self.m_bad_uri,
            self.m_conflicting_autoscaling,
            self.m_passthrough_garbage,
            self.m_quantity,
            self.m_duration,
            self.m_labels,
            self.m_port_arg,
            self.m_unknown_field,
            self.m_probes,
        ]

    def body(self, name: str) -> tuple[dict[str, Any], list[str]]:
        spec = self.valid()
        applied = []
        if self.rng.random() >= 0.1:  # about one in ten stays valid on purpose
            for _ in range(self.rng.randint(1, 3)):
                m = self.pick(self.mutations())
                m(spec)
                applied.append(m.__name__.removeprefix("m_"))
        obj = {
            "apiVersion": "serving.modelservice.dev/v1alpha1",
            "kind": "ModelService",
            "metadata": {"name": name, "labels": {"reliability.modelservice.dev/fuzz": "true"}},
            "spec": spec,
        }
        if self.rng.random() < 0.05:
            obj["spec"] = self.pick(WRONG_TYPES)  # the whole spec of the wrong type, or missing
        return obj, applied


def generate(seed: int, count: int, prefix: str = "fz") -> list[tuple[dict[str, Any], list[str]]]:
    g = Gen(seed)
    return [g.body(f"{prefix}-{i:04d}") for i in range(count)]
