"""The Pod Security Standards checker itself (tests/reliability/pss.py): a compliant pod passes, and each rule of
"baseline" and "restricted" catches the one field that breaks it. Without these, a checker that said yes to
everything would make tests/unit/test_pss_pods.py pass."""

from __future__ import annotations

import copy

import pytest

from tests.reliability import pss

GOOD = {
    "metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/app": "runtime/default"}},
    "spec": {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
            "sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65000"}],
        },
        "initContainers": [
            {
                "name": "init",
                "image": "i",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }
        ],
        "containers": [
            {
                "name": "app",
                "image": "a",
                "ports": [{"containerPort": 80}],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                    "seLinuxOptions": {"type": "container_t"},
                },
            }
        ],
        "volumes": [
            {"name": "t", "emptyDir": {}},
            {"name": "p", "persistentVolumeClaim": {"claimName": "c"}},
            {"name": "s", "secret": {"secretName": "x"}},
            {"name": "pr", "projected": {"sources": []}},
        ],
    },
}


def _with(path: str, value):
    """GOOD with one field set; path like 'spec.containers.0.securityContext.privileged'."""
    pod = copy.deepcopy(GOOD)
    node = pod
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return pod


def test_the_good_pod_is_restricted_and_baseline():
    assert pss.baseline(GOOD) == [] and pss.restricted(GOOD) == []


BASELINE_BREAKS = {
    "hostNetwork": ("spec.hostNetwork", True),
    "hostPID": ("spec.hostPID", True),
    "hostIPC": ("spec.hostIPC", True),
    "hostProcess": ("spec.securityContext.windowsOptions", {"hostProcess": True}),
    "privileged": ("spec.containers.0.securityContext.privileged", True),
    "privileged-init": ("spec.initContainers.0.securityContext.privileged", True),
    "capability": ("spec.containers.0.securityContext.capabilities.add", ["SYS_ADMIN"]),
    "hostPath": ("spec.volumes", [{"name": "h", "hostPath": {"path": "/"}}]),
    "hostPort": ("spec.containers.0.ports", [{"containerPort": 80, "hostPort": 80}]),
    "apparmor": ("metadata.annotations", {"container.apparmor.security.beta.kubernetes.io/app": "unconfined"}),
    "apparmor-field": ("spec.containers.0.securityContext.appArmorProfile", {"type": "Unconfined"}),
    "selinux-type": ("spec.securityContext.seLinuxOptions", {"type": "spc_t"}),
    "selinux-user": ("spec.containers.0.securityContext.seLinuxOptions", {"user": "root"}),
    "procMount": ("spec.containers.0.securityContext.procMount", "Unmasked"),
    "seccomp-pod": ("spec.securityContext.seccompProfile", {"type": "Unconfined"}),
    "seccomp-container": ("spec.containers.0.securityContext.seccompProfile", {"type": "Unconfined"}),
    "seccomp-annotation": ("metadata.annotations", {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}),
    "sysctl": ("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]),
}


@pytest.mark.parametrize("rule", BASELINE_BREAKS)
def test_each_baseline_rule_is_enforced(rule):
    pod = _with(*BASELINE_BREAKS[rule])
    assert pss.baseline(pod), f"{rule} not caught"
    assert pss.restricted(pod), f"{rule} not caught by restricted"


RESTRICTED_BREAKS = {
    "volume-type": ("spec.volumes", [{"name": "n", "nfs": {"server": "s", "path": "/"}}]),
    "volume-gitrepo": ("spec.volumes", [{"name": "g", "gitRepo": {"repository": "r"}}]),
    "escalation-unset": ("spec.containers.0.securityContext.allowPrivilegeEscalation", None),
    "escalation-true": ("spec.initContainers.0.securityContext.allowPrivilegeEscalation", True),
    "nonroot-unset": ("spec.securityContext.runAsNonRoot", None),
    "nonroot-false-container": ("spec.containers.0.securityContext.runAsNonRoot", False),
    "uid0-pod": ("spec.securityContext.runAsUser", 0),
    "uid0-container": ("spec.containers.0.securityContext.runAsUser", 0),
    "seccomp-unset": ("spec.securityContext.seccompProfile", None),
    "drop-not-all": ("spec.containers.0.securityContext.capabilities.drop", ["NET_RAW"]),
    "add-chown": ("spec.containers.0.securityContext.capabilities.add", ["CHOWN"]),
}


@pytest.mark.parametrize("rule", RESTRICTED_BREAKS)
def test_each_restricted_rule_is_enforced(rule):
    pod = _with(*RESTRICTED_BREAKS[rule])
    assert pss.restricted(pod), f"{rule} not caught"
    assert pss.baseline(pod) == [], pss.baseline(pod)  # these rules are restricted-only


def test_container_level_settings_can_stand_in_for_the_pod():
    pod = copy.deepcopy(GOOD)
    del pod["spec"]["securityContext"]["runAsNonRoot"], pod["spec"]["securityContext"]["seccompProfile"]
    for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
        c["securityContext"].update(
            runAsNonRoot=True, seccompProfile={"type": "Localhost", "localhostProfile": "p.json"}
        )
    assert pss.restricted(pod) == []


def test_workload_templates_are_found():
    dep = {"kind": "Deployment", "spec": {"template": GOOD}}
    cron = {"kind": "CronJob", "spec": {"jobTemplate": {"spec": {"template": GOOD}}}}
    assert pss.pod_template_of(dep) is GOOD and pss.pod_template_of(cron) is GOOD
