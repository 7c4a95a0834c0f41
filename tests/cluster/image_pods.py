"""Pods whose image is a local OCI image (`localhost/...`, e.g. the one `make image` builds) run for real on the fake
nodes: the image's root filesystem, entrypoint and user, the pod's command, args, env, volumes and securityContext.

This is the node's image store and the container set-up of a kubelet + runc, reduced to what the local cluster needs;
oci_images.py does the unpacking and the namespace/chroot launch, container.py runs the process (probes, restarts,
logs, Events) exactly as it does for native engines. Pure except `store_path` (a stat): pod + image config in,
`Launch` out, with every difference from a real node written down in `translations` (shown in the agent's log) and in
docs/local-control-plane.md ("Pods of local images"):

1. **Image store**: `localhost/<name>:<tag>` is the archive `<images dir>/<name>-<tag>.oci.tar` (what
   hack/build-image.sh writes: `localhost/modelservice-operator:0.1.0` → `modelservice-operator-0.1.0.oci.tar`).
   Nothing is pulled: a missing archive is the kubelet's ErrImagePull, with the command that builds it.
2. **API server**: `KUBERNETES_SERVICE_HOST`/`_PORT` name the local API server (127.0.0.1 and its port), as the
   kubelet sets them to the `kubernetes` Service; its serving certificate is valid for 127.0.0.1.
3. **Bind address**: the pod has no network namespace of its own (pods share the host's, each with its own 127.x
   address), so a Python process that listens on 0.0.0.0 gets the pod's address instead. A `sitecustomize` put on
   the image's PYTHONPATH (read-only bind mount) does it for AF_INET binds to 0.0.0.0 or "", and nothing else.
   Non-Python images are not supported here.
4. **Volumes**: emptyDir → a directory of the pod (mode 0777, as the kubelet makes it); secret and configMap → files
   written from the object's data (mode from defaultMode/items, owner root, read-only mount); the ServiceAccount token
   volume is such a secret on v1.20. Other volume types are refused with CreateContainerConfigError.
5. **/etc/hosts** is the kubelet-managed file (localhost and the pod's own name and address).

Enforced: runAsUser/runAsGroup/fsGroup/supplementalGroups (else the image's USER), runAsNonRoot (refused like the
kubelet: "container has runAsNonRoot and image will run as root"), readOnlyRootFilesystem, capabilities drop ALL
(an empty bounding set), allowPrivilegeEscalation: false (no_new_privs), a private mount and PID namespace. Checked
only (tests/unit/test_pss_*): seccompProfile, capabilities add, privileged, host namespaces. Not enforced: cgroup
limits (resources), network isolation, seccomp.
"""

from __future__ import annotations

import base64
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tests.cluster import oci_images
from tests.cluster.native import Launch, LaunchError

LOCAL_PREFIX = "localhost/"
POD_IP_ENV = "MODELSERVICE_FAKE_NODE_POD_IP"  # read by the bind shim (translation 3)
SHIM_DIR_IN_IMAGE = "/run/modelservice-fake-node"  # where the shim is mounted (a path no image uses)

BIND_SHIM = (
    '''\
"""Fake node (tests/cluster/image_pods.py, translation 3): listening on 0.0.0.0 means this pod's own address."""
import os
import socket

_POD_IP = os.environ.get("%s")
if _POD_IP:
    _bind = socket.socket.bind

    def bind(self, address):
        if self.family == socket.AF_INET and isinstance(address, tuple) and address[0] in ("", "0.0.0.0"):
            address = (_POD_IP,) + tuple(address[1:])
        return _bind(self, address)

    socket.socket.bind = bind
'''
    % POD_IP_ENV
)


def is_local_image(image: str) -> bool:
    return image.startswith(LOCAL_PREFIX)


def store_path(images_dir: Path, image: str) -> Path:
    """`localhost/modelservice-operator:0.1.0` → `<images_dir>/modelservice-operator-0.1.0.oci.tar`. A digest
    (`@sha256:...`) must match the archive's: checked by the caller with oci_images.manifest_digest."""
    ref = image[len(LOCAL_PREFIX) :].split("@", 1)[0]
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    return images_dir / f"{name.replace('/', '-')}-{tag}.oci.tar"


@dataclass(frozen=True)
class SecurityContext:
    user: str  # "uid:gid" or the image's USER string
    groups: tuple[int, ...]
    read_only_root: bool
    drop_capabilities: bool
    no_new_privileges: bool
    run_as_non_root: bool


def security_context(pod_spec: dict, container: dict, image_user: str) -> SecurityContext:
    """The effective settings, container over pod, as the kubelet merges them."""
    pod_sc, c_sc = pod_spec.get("securityContext") or {}, container.get("securityContext") or {}

    def pick(key: str):
        return c_sc[key] if key in c_sc else pod_sc.get(key)

    uid, gid = pick("runAsUser"), pick("runAsGroup")
    user = image_user or "0"
    if uid is not None or gid is not None:
        base_uid, _, base_gid = user.partition(":")
        user = f"{uid if uid is not None else base_uid}" + (
            f":{gid}" if gid is not None else (f":{base_gid}" if base_gid else "")
        )
    groups = tuple(int(g) for g in (pod_sc.get("supplementalGroups") or []))
    if pod_sc.get("fsGroup") is not None:
        groups += (int(pod_sc["fsGroup"]),)
    caps = (c_sc.get("capabilities") or {}).get("drop") or []
    return SecurityContext(
        user=user,
        groups=groups,
        read_only_root=bool(c_sc.get("readOnlyRootFilesystem")),
        drop_capabilities="ALL" in caps,
        no_new_privileges=c_sc.get("allowPrivilegeEscalation") is False,
        run_as_non_root=bool(pick("runAsNonRoot")),
    )


def write_projected_files(
    dest: Path, data: dict[str, str], items: Optional[list[dict]], mode: int, decode: bool
) -> None:
    """A secret/configMap volume's files: every key, or only `items` (key → path, mode)."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o755)
    chosen = items if items else [{"key": k, "path": k} for k in data]
    for item in chosen:
        if item["key"] not in data:
            raise LaunchError("CreateContainerConfigError", f"key {item['key']!r} not found in the volume's source")
        raw = data[item["key"]]
        content = base64.b64decode(raw) if decode else raw.encode()
        path = dest / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.chmod(path, item.get("mode", mode) & 0o7777)


def etc_hosts(pod_name: str, pod_ip: str) -> str:
    return (
        "# Kubernetes-managed hosts file (fake node).\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
        f"{pod_ip}\t{pod_name}\n"
    )


def launch_for_image(
    pod: dict,
    container: dict,
    config: oci_images.ImageConfig,
    rootfs: Path,
    *,
    env: dict[str, str],
    pod_ip: str,
    pod_dir: Path,
    volumes: dict[str, Path],
    api_host: str,
    api_port: int,
) -> Launch:
    """The host process for `container` of `pod`, run from the unpacked image at `rootfs`.

    `env` is the container's environment already resolved (valueFrom done, as a kubelet does); `volumes` maps each
    of the pod's volume names to its host directory (emptyDir made, secret/configMap files written)."""
    spec = pod["spec"]
    sc = security_context(spec, container, config.user)
    uid, _gid = oci_images.resolve_user(rootfs, sc.user)
    if sc.run_as_non_root and uid == 0:
        raise LaunchError(
            "CreateContainerConfigError",
            "container has runAsNonRoot and image will run as root "
            f'(pod: "{pod["metadata"]["name"]}_{pod["metadata"]["namespace"]}", '
            f"container: {container['name']})",
        )
    argv = oci_images.resolve_argv(config, container.get("command"), container.get("args"))
    mounts: dict[str, oci_images.Mount] = {}
    for m in container.get("volumeMounts") or []:
        host = volumes.get(m["name"])
        if host is None:
            raise LaunchError("CreateContainerConfigError", f"volumeMount {m['name']!r} names no volume of the pod")
        if m.get("subPath"):
            host = host / m["subPath"]
            host.mkdir(parents=True, exist_ok=True)
        mounts[m["mountPath"]] = oci_images.Mount(host, read_only=bool(m.get("readOnly")))
    shim = pod_dir / "fake-node"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(BIND_SHIM)
    mounts[SHIM_DIR_IN_IMAGE] = oci_images.Mount(shim, read_only=True)
    hosts = pod_dir / "etc-hosts"
    hosts.write_text(etc_hosts(pod["metadata"]["name"], pod_ip))
    mounts.setdefault("/etc/hosts", oci_images.Mount(hosts, read_only=True))
    out_env = oci_images.container_env(
        config,
        {
            "HOSTNAME": pod["metadata"]["name"],
            **env,
            "KUBERNETES_SERVICE_HOST": api_host,
            "KUBERNETES_SERVICE_PORT": str(api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(api_port),
            "KUBERNETES_PORT": f"tcp://{api_host}:{api_port}",
        },
    )
    out_env[POD_IP_ENV] = pod_ip
    out_env["PYTHONPATH"] = ":".join(p for p in (SHIM_DIR_IN_IMAGE, out_env.get("PYTHONPATH", "")) if p)
    workdir = container.get("workingDir") or config.workdir or "/"
    argv_host = oci_images.launch_argv(
        rootfs,
        sc.user,
        argv,
        mounts,
        read_only=sc.read_only_root,
        workdir=workdir,
        supplemental_groups=sc.groups,
        drop_capabilities=sc.drop_capabilities,
        no_new_privileges=sc.no_new_privileges,
    )
    translations = [
        f"image {container.get('image')} -> {rootfs} (digest {config.digest})",
        f"KUBERNETES_SERVICE_HOST:PORT -> {api_host}:{api_port}",
        f"listen 0.0.0.0 -> {pod_ip} (sitecustomize on PYTHONPATH)",
        f"user {sc.user}, groups {list(sc.groups)}, read-only root {sc.read_only_root}, "
        f"drop all capabilities {sc.drop_capabilities}, no_new_privs {sc.no_new_privileges}",
    ]
    if mounts:
        translations.append(
            "mounts: "
            + ", ".join(f"{c} -> {m.host}{' (ro)' if m.read_only else ''}" for c, m in sorted(mounts.items()))
        )
    return Launch(argv=argv_host, env=out_env, cwd="/", translations=translations)


def empty_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, stat.S_IRWXU | stat.S_IRWXG | stat.S_IRWXO)  # the kubelet's emptyDir is 0777
    return path
