"""A checker for the Kubernetes Pod Security Standards, "baseline" and "restricted" (issue #7.5).

v1.20 has no PodSecurity admission (it arrived as alpha in 1.22), so the chart and the operator cannot lean on the
API server to refuse a pod that breaks the standard. This module is written from the standard's published rules
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, policy version "latest"):

baseline                                        restricted = baseline plus
- no HostProcess (windowsOptions.hostProcess)   - volumes only of the allowed types
- no hostNetwork, hostPID, hostIPC              - allowPrivilegeEscalation: false (every container)
- privileged unset or false                     - runAsNonRoot: true (pod, or every container); never false
- capabilities.add within the baseline set      - runAsUser never 0
- no hostPath volumes                           - seccompProfile RuntimeDefault or Localhost (pod, or every
- no hostPorts (unset or 0)                       container); never Unconfined
- AppArmor: runtime/default or localhost/* only - capabilities.drop includes ALL; add only NET_BIND_SERVICE
- SELinux: type within the allowed set, no user/role
- procMount unset or Default
- seccomp never Unconfined (fields and legacy annotations)
- sysctls only from the safe set

Every function takes a pod *template* ({"metadata": ..., "spec": ...}) or a pod and returns a list of violations,
each naming the field, so a failing test says exactly what to change.
"""

from __future__ import annotations

from typing import Any, Iterator

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
APPARMOR_PREFIX = "container.apparmor.security.beta.kubernetes.io/"
SECCOMP_POD_ANNOTATION = "seccomp.security.alpha.kubernetes.io/pod"
SECCOMP_CONTAINER_PREFIX = "container.seccomp.security.alpha.kubernetes.io/"
VOLUME_SOURCE_KEYS_IGNORED = frozenset({"name"})


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(kind) or []:
            yield f"{kind}[{c.get('name', '?')}]", c


def _split(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return pod.get("metadata") or {}, pod.get("spec") or {}


def baseline(pod: dict[str, Any]) -> list[str]:
    meta, spec = _split(pod)
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    annotations = meta.get("annotations") or {}

    # HostProcess
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("spec.securityContext.windowsOptions.hostProcess must not be true")
    # Host namespaces
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"spec.{key} must be unset or false")
    # hostPath volumes
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            out.append(f"spec.volumes[{v.get('name')}].hostPath is not allowed")
    # SELinux (pod)
    out += _selinux("spec.securityContext", psc.get("seLinuxOptions"))
    # seccomp (pod)
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        out.append("spec.securityContext.seccompProfile.type must not be Unconfined")
    if annotations.get(SECCOMP_POD_ANNOTATION) == "unconfined":
        out.append(f"annotation {SECCOMP_POD_ANNOTATION} must not be unconfined")
    # sysctls
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(f"spec.securityContext.sysctls[{s.get('name')}] is not a safe sysctl")
    # AppArmor (annotations, and the 1.30+ fields)
    for key, value in annotations.items():
        if key.startswith(APPARMOR_PREFIX) and not (value == "runtime/default" or value.startswith("localhost/")):
            out.append(f"annotation {key}={value}: AppArmor must be runtime/default or localhost/*")
        if key.startswith(SECCOMP_CONTAINER_PREFIX) and value == "unconfined":
            out.append(f"annotation {key} must not be unconfined")
    out += _apparmor("spec.securityContext", psc.get("appArmorProfile"))

    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}.securityContext.windowsOptions.hostProcess must not be true")
        if sc.get("privileged"):
            out.append(f"{where}.securityContext.privileged must be unset or false")
        for cap in (sc.get("capabilities") or {}).get("add") or []:
            if cap not in BASELINE_CAPABILITIES:
                out.append(f"{where}.securityContext.capabilities.add: {cap} is not in the baseline set")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{where}.ports[{p.get('name', p.get('containerPort'))}].hostPort must be unset or 0")
        out += _selinux(f"{where}.securityContext", sc.get("seLinuxOptions"))
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where}.securityContext.procMount must be unset or Default")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}.securityContext.seccompProfile.type must not be Unconfined")
        out += _apparmor(f"{where}.securityContext", sc.get("appArmorProfile"))
    return out


def _selinux(where: str, opts: dict[str, Any] | None) -> list[str]:
    if not opts:
        return []
    out = []
    if opts.get("type", "") not in SELINUX_TYPES:
        out.append(f"{where}.seLinuxOptions.type {opts.get('type')!r} is not allowed")
    for key in ("user", "role"):
        if opts.get(key):
            out.append(f"{where}.seLinuxOptions.{key} must be unset")
    return out


def _apparmor(where: str, profile: dict[str, Any] | None) -> list[str]:
    if profile and profile.get("type") not in ("RuntimeDefault", "Localhost"):
        return [f"{where}.appArmorProfile.type must be RuntimeDefault or Localhost"]
    return []


def restricted(pod: dict[str, Any]) -> list[str]:
    meta, spec = _split(pod)
    out = baseline(pod)
    psc = spec.get("securityContext") or {}

    for v in spec.get("volumes") or []:
        kinds = set(v) - VOLUME_SOURCE_KEYS_IGNORED
        bad = kinds - RESTRICTED_VOLUME_TYPES
        if bad:
            out.append(f"spec.volumes[{v.get('name')}]: volume type {sorted(bad)} is not allowed")
    if psc.get("runAsUser") == 0:
        out.append("spec.securityContext.runAsUser must not be 0")
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
        out.append("spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}.securityContext.allowPrivilegeEscalation must be false")
        nonroot = sc.get("runAsNonRoot")
        if nonroot is False or (nonroot is None and not pod_nonroot):
            out.append(f"{where}: runAsNonRoot must be true (on the container or the pod)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}.securityContext.runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type")
        if seccomp is not None and seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}.securityContext.seccompProfile.type must be RuntimeDefault or Localhost")
        elif seccomp is None and pod_seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost (on the container or the pod)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}.securityContext.capabilities.drop must include ALL")
        for cap in caps.get("add") or []:
            if cap not in RESTRICTED_CAPABILITIES:
                out.append(f"{where}.securityContext.capabilities.add: only NET_BIND_SERVICE is allowed, not {cap}")
    return out


def pod_template_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The pod (template) of a Pod or a workload (Deployment, StatefulSet, DaemonSet, Job, CronJob)."""
    if obj.get("kind") == "Pod":
        return obj
    spec = obj.get("spec") or {}
    if obj.get("kind") == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]
