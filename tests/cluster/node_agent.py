"""Fake kubelets for the local control plane (what kwok does), and a small process runtime for the pods' containers.

Registers Nodes with CPU, memory, pods and nvidia.com/gpu capacity and keeps their Leases fresh, so the real
scheduler binds pods to them. Every pod bound to one of its nodes gets a loopback address of its own (127.0.0.2
upwards; 127.0.0.1 stays the apiserver's), and then, by its image:
- a known engine image (vLLM's, llama.cpp's server: native.py) with that engine installed here (`--engine`): the real
  engine runs as a host process from the pod's rendered command, args and env, with the few translations native.py
  lists; probes, restarts, crash-loop backoff and termination messages as a kubelet's (container.py); its output goes
  to `<pods-dir>/<pod uid>/logs/<container>/<restart>.log`;
- anything else: the stub model server, inside this event loop (no process per pod, so 1000 pods fit on 2 cores);
  an engine image with no local build gets an Event saying the stub stands in for it.
The pod is reported Running, and Ready when its probes pass. There is no kubelet to finish a deletion, so it runs a
`sleep N` preStop hook, stops the container and deletes terminating pods with grace 0 itself. Pods the scheduler cannot place stay Pending.

    python -m tests.cluster.node_agent --kubeconfig .cluster/kubeconfig --nodes 2 --gpus-per-node 2 \
        --engine llamacpp=$(hack/get-engines.sh llamacpp | cut -d= -f2)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import resource
import shutil
import signal
import ssl
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.cluster import image_pods, kubelet_api, native, oci_images
from tests.cluster.addresses import IpPool
from tests.cluster.container import ProcessContainer
from tests.cluster.kubeapi import MERGE_PATCH, ApiError, KubeApi, WatchExpired
from tests.cluster.podspec import StubConfig, stub_config
from tests.cluster.stub_server import make_app, stub_state

log = logging.getLogger("node-agent")

FAKE_NODE_LABEL = "stub.modelservice.dev/fake-node"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
ASSIGNED = {"fieldSelector": "spec.nodeName!="}  # the scheduler's own filter for bound pods
LEASE_DURATION, LEASE_RENEW = 40, 15.0
PROBE_RETRY = 1.0  # seconds between probes when the stub's ready time is not the reason for failing
MAX_PROBES = 3600  # so an unanswerable probe gives up after about an hour
API_RETRIES = 5
BIND_ATTEMPTS = 8
# Engine images we render but cannot run here (no CPU build in our registries): served by the stub, with an Event.
ENGINE_IMAGES_WITHOUT_LOCAL_BUILD = (
    "lmsysorg/sglang",
    "ghcr.io/huggingface/text-generation-inference",
    "nvcr.io/nvidia/tritonserver",
    "ollama/ollama",
)
TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def rfc3339(micro: bool = False) -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def pre_stop_sleep(pod: dict) -> tuple[float, str] | None:
    """The first container's preStop hook as (seconds to wait, why it is not run as written), or None for no hook.

    The hook a pod going away runs while its EndpointSlice drops it: the engine keeps serving the requests that were
    already on their way (the race the operator's `sleep` hook covers, render.PRESTOP_SECONDS). The stub and native
    engines run on the host, not in their image, so only `sleep N` is carried out; another hook is reported (the
    FailedPreStopHook Event a kubelet writes when a hook fails) and not run.
    """
    containers = pod["spec"].get("containers") or [{}]
    hook = ((containers[0].get("lifecycle") or {}).get("preStop")) or None
    if hook is None:
        return None
    command = (hook.get("exec") or {}).get("command") or []
    if len(command) == 2 and command[0] in ("sleep", "/bin/sleep"):
        try:
            return max(0.0, float(command[1])), ""
        except ValueError:
            pass
    return 0.0, f"preStop hook {hook} not run: this node carries out only `sleep N`"


@dataclass
class PodRuntime:
    uid: str
    key: str  # namespace/name, for logs
    ip: str | None = None
    runner: web.AppRunner | None = None
    task: asyncio.Task | None = None
    deleting: bool = False
    started_at: str = field(default_factory=rfc3339)
    container: ProcessContainer | None = None  # a native engine's process (None: the stub serves this pod)
    pod: dict | None = None  # the spec the container was started from
    finishing: asyncio.Task | None = None  # finish_deletion: preStop hook, drain, teardown, the final DELETE
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the pod object was deleted (grace 0 from elsewhere)
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class NodeAgent:
    def __init__(
        self,
        api: KubeApi,
        nodes: list[str],
        capacity: dict[str, str],
        default_tps: float = 200.0,
        ready_file: Path | None = None,
        ip_block: int | None = None,
        engines: dict[str, str] | None = None,
        pods_dir: Path | None = None,
        models=None,
        images_dir: Path | None = None,
    ):
        self.api, self.nodes, self.capacity, self.default_tps = api, set(nodes), capacity, default_tps
        self.images_dir = images_dir or oci_images.CACHE  # the node's image store for localhost/ images
        self.engines = engines or {}  # native engine name → the host executable (hack/get-engines.sh)
        self.pods_dir = pods_dir or Path("/tmp/modelservice-pods")
        self.models = models  # models_offline.OfflineModels: what pre-fills engines' download caches
        self.kubelet_port = 10250  # `kubectl logs` reaches the agent here (kubelet_api.py): set by serve_logs()
        self.node_names, self.ready_file = nodes, ready_file
        self.runtimes: dict[str, PodRuntime] = {}
        self.node_uids: dict[str, str] = {}
        self.ips, self._claim = IpPool.claim(ip_block)
        self.api_slots = asyncio.Semaphore(32)  # leaves the apiserver room for the controllers on 2 cores
        self.background: set[asyncio.Task] = set()
        self.http: aiohttp.ClientSession | None = None

    # -- nodes and leases ------------------------------------------------------------------------------------------
    async def register_nodes(self) -> None:
        await asyncio.gather(*(self._register(n) for n in self.node_names))
        # A previous agent with more nodes left some behind; with no node-lifecycle controller they would stay
        # Ready forever and swallow pods. Ours are the ones with our label and name prefix.
        prefix = self.node_names[0].rsplit("-", 1)[0] + "-"
        nodes = await self.api.get("/api/v1/nodes", params={"labelSelector": f"{FAKE_NODE_LABEL}=true"})
        for node in nodes["items"]:
            name = node["metadata"]["name"]
            if name.startswith(prefix) and name[len(prefix) :].isdigit() and name not in self.nodes:
                await self.api.request("DELETE", f"/api/v1/nodes/{name}", allow=(404,))
                log.info("deleted leftover node %s", name)
        log.info(
            "nodes ready: %s (%s); pod addresses from 127.%d.0.0/16",
            ", ".join(self.node_names),
            ", ".join(f"{k}={v}" for k, v in self.capacity.items()),
            self.ips.block,
        )

    async def _register(self, name: str) -> None:
        status, node = await self.api.request("GET", f"/api/v1/nodes/{name}", allow=(404,))
        if status == 404:
            node = (
                await self.api.request(
                    "POST",
                    "/api/v1/nodes",
                    body={
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {
                            "name": name,
                            "labels": {
                                "kubernetes.io/hostname": name,
                                "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64",
                                "node.kubernetes.io/instance-type": "fake-gpu",
                                FAKE_NODE_LABEL: "true",
                            },
                        },
                    },
                )
            )[1]
        conditions = [
            {
                "type": t,
                "status": "False",
                "reason": f"KubeletHas{r}",
                "lastHeartbeatTime": rfc3339(),
                "lastTransitionTime": rfc3339(),
                "message": "fake node",
            }
            for t, r in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ] + [
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "fake node agent is ready",
                "lastHeartbeatTime": rfc3339(),
                "lastTransitionTime": rfc3339(),
            }
        ]
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            content_type=MERGE_PATCH,
            body={
                "status": {
                    "capacity": self.capacity,
                    "allocatable": self.capacity,
                    "conditions": conditions,
                    "addresses": [
                        {"type": "InternalIP", "address": "127.0.0.1"},
                        {"type": "Hostname", "address": name},
                    ],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
                    "nodeInfo": {
                        "machineID": name,
                        "systemUUID": name,
                        "bootID": name,
                        "kernelVersion": "fake",
                        "osImage": "fake",
                        "containerRuntimeVersion": "stub://1.0",
                        "kubeletVersion": "v1.20.2",
                        "kubeProxyVersion": "v1.20.2",
                        "operatingSystem": "linux",
                        "architecture": "amd64",
                    },
                }
            },
        )
        # Added by admission at creation; with the node-lifecycle controller off, nobody else removes it.
        taints = (node.get("spec") or {}).get("taints") or []
        if any(t["key"] == NOT_READY_TAINT for t in taints):
            keep = [t for t in taints if t["key"] != NOT_READY_TAINT]
            await self.api.request(
                "PATCH", f"/api/v1/nodes/{name}", content_type=MERGE_PATCH, body={"spec": {"taints": keep or None}}
            )
        self.node_uids[name] = node["metadata"]["uid"]
        await self._renew_lease(name, node["metadata"]["uid"])

    async def _renew_lease(self, name: str, node_uid: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION, "renewTime": rfc3339(micro=True)}
        status, _ = await self.api.request("PATCH", path, content_type=MERGE_PATCH, body={"spec": spec}, allow=(404,))
        if status == 404:
            await self.api.request(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                body={
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "spec": spec,
                    "metadata": {
                        "name": name,
                        "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}],
                    },
                },
                allow=(409,),
            )

    async def lease_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), LEASE_RENEW)
                return
            except asyncio.TimeoutError:
                pass
            for name in self.node_names:  # N small requests per period: the whole cost of keeping nodes alive
                try:
                    await self._renew_lease(name, self.node_uids[name])
                except (ApiError, *TRANSIENT) as e:
                    log.warning("lease %s: %s", name, e)

    # -- pods ------------------------------------------------------------------------------------------------------
    async def pod_loop(self, max_cycles: int = 100_000) -> None:
        """List, then watch from there; relist when the watch expires. Gives up after 60 s without the API."""
        rv: str | None = None
        failing_since: float | None = None
        failures = 0
        for _ in range(max_cycles):
            try:
                if rv is None:
                    pods, rv = await self.api.list_all("/api/v1/pods", ASSIGNED)
                    self.resync(pods)
                    if self.ready_file and not self.ready_file.exists():
                        self.ready_file.write_text(f"{len(self.runtimes)} pods adopted\n")  # for ControlPlane
                async for ev in self.api.watch("/api/v1/pods", ASSIGNED, rv):
                    rv = ev["object"]["metadata"]["resourceVersion"]
                    if ev["type"] != "BOOKMARK":
                        self.on_event(ev["type"], ev["object"])
                failing_since, failures = None, 0
            except WatchExpired:
                rv = None
            except (ApiError, *TRANSIENT) as e:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > 60:
                    raise RuntimeError(f"API unreachable for 60 s: {e}") from e
                log.warning("watch: %s; retrying", e)
                failures += 1
                await asyncio.sleep(min(5.0, 0.2 * 2 ** min(failures, 5)))

    def resync(self, pods: list[dict]) -> None:
        mine = {p["metadata"]["uid"]: p for p in pods if p["spec"].get("nodeName") in self.nodes}
        for uid in [u for u in self.runtimes if u not in mine]:  # deleted while we were not watching
            self._spawn(self.teardown(self.runtimes.pop(uid)))
        for pod in mine.values():
            self.on_event("ADDED", pod)

    def on_event(self, kind: str, pod: dict) -> None:
        meta = pod["metadata"]
        if pod["spec"].get("nodeName") not in self.nodes:
            return
        uid, rt = meta["uid"], self.runtimes.get(meta["uid"])
        if kind == "DELETED":
            if rt:
                self.runtimes.pop(uid)
                if rt.finishing is None:
                    self._spawn(self.teardown(rt))
                else:  # force-deleted during its preStop hook or drain: the kubelet kills the containers now
                    rt.gone.set()
            return
        if meta.get("deletionTimestamp"):
            rt = rt or self.runtimes.setdefault(uid, PodRuntime(uid, f"{meta['namespace']}/{meta['name']}"))
            if not rt.deleting:
                rt.deleting = True
                rt.finishing = asyncio.create_task(self.finish_deletion(rt, pod))
                self.background.add(rt.finishing)
                rt.finishing.add_done_callback(self.background.discard)
            return
        if rt is None and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            rt = self.runtimes[uid] = PodRuntime(uid, f"{meta['namespace']}/{meta['name']}")
            rt.task = asyncio.create_task(self.run_pod(rt, pod))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def run_pod(self, rt: PodRuntime, pod: dict) -> None:
        image = pod["spec"]["containers"][0].get("image", "")
        if image_pods.is_local_image(image):
            await self.run_image(rt, pod, image)
            return
        engine = native.engine_for_image(image)
        if engine is not None and engine.name in self.engines:
            await self.run_native(rt, pod, engine)
            return
        if engine is not None or any(image.startswith(p) for p in ENGINE_IMAGES_WITHOUT_LOCAL_BUILD):
            self._spawn(
                self.event(
                    pod,
                    "Normal",
                    "StubEngine",
                    f"no local build of {image} on this node: the stub model server stands in for it",
                )
            )
        await self.run_stub(rt, pod)

    async def run_native(self, rt: PodRuntime, pod: dict, engine: native.NativeEngine) -> None:
        """The real engine as a host process (native.py says what is translated, container.py runs it)."""

        async def prepare(pod_dir: Path, c0: dict) -> native.Launch:
            env = await self.resolve_env(pod, c0)
            mounts = native.volume_dirs(pod_dir, pod["spec"], c0, await self.claim_dirs(pod))
            launch = native.launch_for(
                engine, c0, env, pod_ip=rt.ip, executable=self.engines[engine.name], mounts=mounts
            )
            if launch.model and launch.cache_dir and self.models is not None:
                where = await asyncio.to_thread(self.models.prefill, engine.kind, Path(launch.cache_dir), launch.model)
                launch.translations.append(f"model {launch.model} -> {where}")
            return launch

        await self.run_process(
            rt, pod, prepare, lambda launch: f"{engine.name} {' '.join(launch.argv)}", measure_start=True
        )

    async def claim_dirs(self, pod: dict) -> dict[str, str]:
        """Volume name → host directory of each PersistentVolumeClaim bound to a hostPath or local volume (the
        scheduler only binds a pod whose claims are bound). Other claims stay per-pod directories, as before."""
        ns, out = pod["metadata"]["namespace"], {}
        for vol in pod["spec"].get("volumes") or []:
            claim = (vol.get("persistentVolumeClaim") or {}).get("claimName")
            if not claim:
                continue
            status, pvc = await self.api.request(
                "GET", f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}", allow=(404,)
            )
            pv_name = (pvc or {}).get("spec", {}).get("volumeName") if status == 200 else None
            if not pv_name:
                continue
            status, pv = await self.api.request("GET", f"/api/v1/persistentvolumes/{pv_name}", allow=(404,))
            spec = pv.get("spec", {}) if status == 200 else {}
            path = (spec.get("hostPath") or spec.get("local") or {}).get("path")
            if path:
                out[vol["name"]] = path
        return out

    async def run_image(self, rt: PodRuntime, pod: dict, image: str) -> None:
        """A pod of a local OCI image (image_pods.py says what is translated, oci_images.py launches it)."""

        async def prepare(pod_dir: Path, c0: dict) -> native.Launch:
            archive = image_pods.store_path(self.images_dir, image)
            if not archive.is_file():
                raise native.LaunchError(
                    "ErrImagePull",
                    (
                        f"image {image} is not in this node's local store ({archive}): nothing is pulled here; "
                        "`make image` builds localhost/modelservice-operator:<chart appVersion>"
                    ),
                )
            try:
                config = await asyncio.to_thread(oci_images.image_config, archive)
                if "@" in image and image.split("@", 1)[1] != config.digest:
                    raise native.LaunchError("ErrImagePull", f"{image}: the local archive has {config.digest}")
                rootfs = await asyncio.to_thread(oci_images.unpack, archive)
            except oci_images.ImageError as e:
                raise native.LaunchError("ErrImagePull", f"{image}: {e}") from e
            self._spawn(self.event(pod, "Normal", "Pulled", f'Container image "{image}" already present on machine'))
            env = await self.resolve_env(pod, c0)
            volumes = await self.image_volumes(pod, pod_dir)
            host, _, port = self.api.server.split("://", 1)[-1].rpartition(":")
            return await asyncio.to_thread(
                image_pods.launch_for_image,
                pod,
                c0,
                config,
                rootfs,
                env=env,
                pod_ip=rt.ip,
                pod_dir=pod_dir,
                volumes=volumes,
                api_host=host,
                api_port=int(port or 443),
            )

        await self.run_process(rt, pod, prepare, lambda launch: image)

    async def run_process(self, rt: PodRuntime, pod: dict, prepare, describe, measure_start: bool = False) -> None:
        """What every real container shares, native engine or local image: an address, the pod's directory, the
        launch from `prepare(pod_dir, container)` (a LaunchError or ImageError is the kubelet's waiting reason with
        its Failed Event), then the process until the pod goes (container.py). `describe(launch)` names it in the
        log; `measure_start` leaves the engine's own start time in the pod's directory (bench/engine_cold.py)."""
        spec, c0 = pod["spec"], pod["spec"]["containers"][0]
        rt.pod = pod
        try:
            rt.ip = self.ips.allocate()
            pod_dir = self.pods_dir / rt.uid
            try:
                launch = await prepare(pod_dir, c0)
            except (native.LaunchError, oci_images.ImageError) as e:
                reason = getattr(e, "reason", "CreateContainerError")
                await self.patch_status(rt, pod, ready=False, statuses=[self._waiting(c0, reason, str(e))])
                self._spawn(self.event(pod, "Warning", "Failed", f"Error: {reason}: {e}"))
                log.warning("%s: %s", rt.key, e)
                return
            grace = float(spec.get("terminationGracePeriodSeconds", 30))
            rt.container = ProcessContainer(
                c0["name"],
                c0.get("image", ""),
                c0,
                launch,
                rt.ip,
                pod_dir / "logs" / c0["name"],
                grace=grace,
                on_change=lambda: self.report_native(rt),
                http=self.http,
                start_file=pod_dir / "engine-start.json" if measure_start else None,
                on_event=lambda type_, reason, message: self.event(pod, type_, reason, message),
            )
            log.info("%s -> %s: %s (translated: %s)", rt.key, rt.ip, describe(launch), "; ".join(launch.translations))
            await rt.container.run()
        except asyncio.CancelledError:
            raise
        except ApiError as e:
            log.info("%s: %s", rt.key, e)
        except Exception as e:  # noqa: BLE001 - one bad pod must not take the agent down
            log.exception("%s: failed to start", rt.key)
            # A bug of this fake node, not of the pod: say so on the pod rather than leave it silently Pending.
            try:
                await self.patch_status(
                    rt,
                    pod,
                    ready=False,
                    statuses=[self._waiting(c0, "CreateContainerError", f"fake node agent: {type(e).__name__}: {e}")],
                )
            except (ApiError, *TRANSIENT):
                pass

    async def image_volumes(self, pod: dict, pod_dir: Path) -> dict[str, Path]:
        """The pod's volumes as host directories: emptyDir made, secret and configMap files written (a missing
        non-optional source is the kubelet's CreateContainerConfigError)."""
        ns, out = pod["metadata"]["namespace"], {}
        for vol in pod["spec"].get("volumes") or []:
            name, host = vol["name"], pod_dir / "volumes" / vol["name"]
            if "emptyDir" in vol:
                out[name] = image_pods.empty_dir(host)
                continue
            for kind, path, decode, key in (
                ("secret", "secrets", True, "secretName"),
                ("configMap", "configmaps", False, "name"),
            ):
                src = vol.get(kind)
                if src is None:
                    continue
                status, obj = await self.api.request("GET", f"/api/v1/namespaces/{ns}/{path}/{src[key]}", allow=(404,))
                if status == 404 and not src.get("optional"):
                    raise native.LaunchError("CreateContainerConfigError", f"{kind} {src[key]!r} not found")
                data = ((obj or {}).get("data") or {}) if status != 404 else {}
                await asyncio.to_thread(
                    image_pods.write_projected_files,
                    host,
                    data,
                    src.get("items"),
                    src.get("defaultMode", 0o644),
                    decode,
                )
                out[name] = host
                break
            else:
                raise native.LaunchError(
                    "CreateContainerConfigError",
                    f"volume {name!r}: only emptyDir, secret and configMap run on this fake node",
                )
        return out

    async def report_native(self, rt: PodRuntime) -> None:
        """Patch the pod's status from its container's current state (serialized, so the newest state wins)."""
        if rt.container is None or rt.pod is None or rt.deleting:
            return
        async with rt.status_lock:
            state = rt.container.state
            try:
                await self.patch_status(
                    rt, rt.pod, ready=state.ready, statuses=[state.to_status(f"native://{rt.uid}/{state.name}")]
                )
            except (ApiError, *TRANSIENT) as e:
                log.info("%s: status: %s", rt.key, e)

    @staticmethod
    def _waiting(c: dict, reason: str, message: str) -> dict:
        return {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}},
            "lastState": {},
        }

    async def resolve_env(self, pod: dict, c: dict) -> dict[str, str]:
        """The container's env as a kubelet resolves it: values, and valueFrom Secret/ConfigMap keys and pod fields.
        A missing non-optional reference is the kubelet's CreateContainerConfigError."""
        ns, out = pod["metadata"]["namespace"], {}
        for var in c.get("env") or []:
            name, src = var["name"], var.get("valueFrom")
            if src is None:
                out[name] = str(var.get("value", ""))
                continue
            for kind, path in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
                ref = src.get(kind)
                if ref is None:
                    continue
                status, obj = await self.api.request(
                    "GET", f"/api/v1/namespaces/{ns}/{path}/{ref['name']}", allow=(404,)
                )
                data = (obj or {}).get("data") or {} if status != 404 else {}
                if ref["key"] in data:
                    raw = data[ref["key"]]
                    out[name] = base64.b64decode(raw).decode() if kind == "secretKeyRef" else raw
                elif not ref.get("optional"):
                    raise native.LaunchError(
                        "CreateContainerConfigError", f"{kind} {ref['name']}/{ref['key']} not found for env {name}"
                    )
            field = (src.get("fieldRef") or {}).get("fieldPath")
            if field:
                meta = pod["metadata"]
                out[name] = {
                    "metadata.name": meta["name"],
                    "metadata.namespace": ns,
                    "status.podIP": pod.get("status", {}).get("podIP", ""),
                    "spec.nodeName": pod["spec"].get("nodeName", ""),
                }.get(field, "")
        return out

    async def event(self, pod: dict, type_: str, reason: str, message: str) -> None:
        meta = pod["metadata"]
        try:
            await self._api_retry(
                "POST",
                f"/api/v1/namespaces/{meta['namespace']}/events",
                body={
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
                    "involvedObject": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": meta["name"],
                        "namespace": meta["namespace"],
                        "uid": meta["uid"],
                    },
                    "type": type_,
                    "reason": reason,
                    "message": message,
                    "source": {"component": "fake-kubelet"},
                    "firstTimestamp": rfc3339(),
                    "lastTimestamp": rfc3339(),
                    "count": 1,
                },
            )
        except (ApiError, *TRANSIENT) as e:
            log.info("%s: event: %s", meta["name"], e)

    async def run_stub(self, rt: PodRuntime, pod: dict) -> None:
        try:
            cfg = stub_config(pod, self.default_tps)
            status = pod.get("status") or {}
            adopted = status.get("phase") == "Running" and self.ips.reserve(status.get("podIP"))
            was_ready = adopted and any(
                c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or []
            )
            rt.started_at = status.get("startTime") or rt.started_at
            # A restarted agent is a restarted kubelet: the containers kept running, so no second startup delay.
            delay = 0.0 if adopted else cfg.startup_delay
            rt.ip = status["podIP"] if adopted else self.ips.allocate()
            for attempt in range(BIND_ATTEMPTS):  # something else may hold ip:port: take the next address
                app = make_app(cfg.model, cfg.tokens_per_second, delay, max_concurrency=cfg.max_concurrency)
                rt.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
                await rt.runner.setup()
                try:
                    for port in cfg.ports:
                        await web.TCPSite(rt.runner, rt.ip, port, reuse_address=True).start()
                    break
                except OSError as e:
                    runner, rt.runner = rt.runner, None
                    await runner.cleanup()
                    if attempt == BIND_ATTEMPTS - 1:
                        raise
                    log.warning("%s: bind %s: %s; trying another address", rt.key, rt.ip, e)
                    self.ips.release(rt.ip)
                    rt.ip = self.ips.allocate()
            if rt.ip != status.get("podIP"):
                was_ready = False  # the old address was taken: the status must say where the stub is now
            log.info(
                "%s -> %s:%s model=%s %s",
                rt.key,
                rt.ip,
                cfg.ports[0],
                cfg.model,
                "(adopted)" if adopted else f"delay={delay:.1f}s",
            )
            if not was_ready:
                if cfg.probes:
                    await self.patch_status(rt, pod, ready=False)
                await self.await_probes(rt, cfg, app)
                await self.patch_status(rt, pod, ready=True)
                log.info("%s ready", rt.key)
        except asyncio.CancelledError:
            raise
        except ApiError as e:  # usually the pod went away between the event and the patch
            log.info("%s: %s", rt.key, e)
        except Exception:  # noqa: BLE001 - one bad pod must not take the agent down
            log.exception("%s: failed to start", rt.key)

    async def await_probes(self, rt: PodRuntime, cfg: StubConfig, app: web.Application) -> None:
        state, loop = stub_state(app), asyncio.get_running_loop()
        for _ in range(MAX_PROBES):
            results = [await self._probe(rt.ip, port, path) for port, path in cfg.probes]
            if all(results):
                return
            until_ready = state.ready_at - loop.time()
            await asyncio.sleep(until_ready + 0.01 if until_ready > 0 else PROBE_RETRY)
        log.warning("%s: probes never passed; leaving it unready", rt.key)

    async def _probe(self, ip: str | None, port: int, path: str) -> bool:
        assert self.http is not None
        try:
            async with self.http.get(f"http://{ip}:{port}{path}") as r:
                return 200 <= r.status < 400
        except TRANSIENT:
            return False

    async def patch_status(self, rt: PodRuntime, pod: dict, ready: bool, statuses: list[dict] | None = None) -> None:
        now, spec = rfc3339(), pod["spec"]
        flag = "True" if ready else "False"
        why = (
            {}
            if ready
            else {
                "reason": "ContainersNotReady",
                "message": "containers with unready status: [" + " ".join(c["name"] for c in spec["containers"]) + "]",
            }
        )

        def running(c: dict) -> dict:
            return {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": f"stub://{c.get('image', '')}",
                "containerID": f"stub://{rt.uid}/{c['name']}",
                "ready": ready,
                "started": True,
                "restartCount": 0,
                "state": {"running": {"startedAt": rt.started_at}},
            }

        scheduled = next(
            (c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"),
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now, "lastProbeTime": None},
        )
        status = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": rt.ip,
            "podIPs": [{"ip": rt.ip}],
            "startTime": rt.started_at,
            "conditions": [
                scheduled,
                {"type": "Initialized", "status": "True", "lastTransitionTime": now, "lastProbeTime": None},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now, "lastProbeTime": None, **why},
                {"type": "Ready", "status": flag, "lastTransitionTime": now, "lastProbeTime": None, **why},
            ],
            "containerStatuses": statuses if statuses is not None else [running(c) for c in spec["containers"]],
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
                for c in spec["initContainers"]
            ]
        path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}/status"
        # A merge patch replaces lists whole (podIPs must not keep an old address); metadata.uid makes it fail on
        # a same-named successor instead of reporting on the wrong pod.
        await self._api_retry(
            "PATCH", path, body={"metadata": {"uid": rt.uid}, "status": status}, content_type=MERGE_PATCH
        )

    async def _api_retry(self, method: str, path: str, **kw):
        for attempt in range(API_RETRIES):
            try:
                async with self.api_slots:
                    return await self.api.request(method, path, **kw)
            except ApiError as e:
                if e.status not in (429, 500, 503, 504) or attempt == API_RETRIES - 1:
                    raise
            except TRANSIENT:
                if attempt == API_RETRIES - 1:
                    raise
            await asyncio.sleep(0.2 * 2**attempt)

    async def teardown(self, rt: PodRuntime) -> None:
        if rt.container is not None:
            rt.deleting = True  # no more status patches: the pod is going away
            await rt.container.stop()  # SIGTERM, the pod's grace period, SIGKILL: as a kubelet stops it
        if rt.task and not rt.task.done():
            rt.task.cancel()
            await asyncio.gather(rt.task, return_exceptions=True)
        if rt.runner:
            runner, rt.runner = rt.runner, None
            await runner.cleanup()
        self.ips.release(rt.ip)
        rt.ip = None
        if rt.container is not None:  # the pod's emptyDirs and logs go with it
            await asyncio.to_thread(shutil.rmtree, self.pods_dir / rt.uid, True)

    async def finish_deletion(self, rt: PodRuntime, pod: dict) -> None:
        """What the kubelet does with a terminating pod: the preStop hook, then SIGTERM and the rest of the grace
        period, then confirm the deletion with grace 0."""
        meta = pod["metadata"]
        grace = float(meta.get("deletionGracePeriodSeconds") or 0)
        hook = pre_stop_sleep(pod)
        if hook is not None:
            seconds, message = hook
            if message:
                self._spawn(self.event(pod, "Warning", "FailedPreStopHook", message))
            # The kubelet runs the hook inside the grace period and gives the containers what is left of it, at
            # least 2 s when the hook used it all up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rt.gone.wait(), min(seconds, grace))
            grace = max(grace - seconds, 2.0)
            if rt.container is not None:
                rt.container.grace = 0.0 if rt.gone.is_set() else grace
        if not rt.gone.is_set():
            await self.drain_stub(rt, grace)
        await self.teardown(rt)
        if rt.gone.is_set():
            return  # nothing left to confirm
        try:
            await self._api_retry(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": rt.uid}},
                allow=(404, 409),
            )
            log.info("%s deleted", rt.key)
        except (ApiError, *TRANSIENT) as e:
            log.warning("%s: delete: %s", rt.key, e)

    @staticmethod
    async def drain_stub(rt: PodRuntime, grace: float) -> None:
        """An engine told to stop finishes what it is generating within the pod's grace period, as vLLM does on
        SIGTERM: the stub's requests in progress (a long stream) run to their end, up to the grace period, before
        teardown closes it. (Native engines get the same from their container's SIGTERM and grace.)"""
        if rt.runner is None or rt.container is not None:
            return
        state, loop = stub_state(rt.runner.app), asyncio.get_running_loop()
        deadline = loop.time() + grace
        while state.running + state.waiting > 0 and loop.time() < deadline and not rt.gone.is_set():
            await asyncio.sleep(0.1)

    def find_logs(self, namespace: str, pod: str, container: str) -> list[Path] | None:
        key = f"{namespace}/{pod}"
        rt = next((r for r in self.runtimes.values() if r.key == key), None)
        if rt is None:
            return None
        if rt.container is None:
            return []  # the stub model server writes no log
        return rt.container.log_paths() if rt.container.state.name == container else None

    async def serve_logs(self, cert: Path, key: Path, port: int) -> web.AppRunner:
        """The kubelet's log endpoint on 127.0.0.1:port (HTTPS), so `kubectl logs` reads native engines' output."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        runner = web.AppRunner(kubelet_api.make_app(self.find_logs), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
        self.kubelet_port = runner.addresses[0][1]
        return runner

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=64)  # probes are one-offs: hold no idle sockets
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as self.http:
            await self.register_nodes()
            tasks = [
                asyncio.create_task(self.pod_loop()),
                asyncio.create_task(self.lease_loop(stop)),
                asyncio.create_task(stop.wait()),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()  # an agent whose watch died must exit non-zero, not idle
            finally:
                for t in tasks:
                    t.cancel()
                rts = list(self.runtimes.values())
                log.info("stopping %d stub servers", len(rts))
                await asyncio.wait_for(asyncio.gather(*(self.teardown(rt) for rt in rts), return_exceptions=True), 15)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kubeconfig", default=None, help="default: $KUBECONFIG, then ~/.kube/config")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--node-prefix", default="fake-node")
    p.add_argument("--cpu", default="64")
    p.add_argument("--memory", default="256Gi")
    p.add_argument("--pods", type=int, default=1000, help="pods per node")
    p.add_argument("--gpus-per-node", type=int, default=2)
    p.add_argument("--tokens-per-second", type=float, default=200.0, help="default stub rate")
    p.add_argument("--ready-file", type=Path, help="written once nodes are registered and bound pods listed")
    p.add_argument("--ip-block", type=int, help="use 127.N.0.0/16 for pods (default: the first free block)")
    p.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="NAME=EXECUTABLE",
        help="run pods of this engine's images natively (vllm=<venv python>, llamacpp=<llama-server>)",
    )
    p.add_argument(
        "--pods-dir",
        type=Path,
        default=Path("/tmp/modelservice-pods"),
        help="per-pod volumes and container logs of native engines",
    )
    p.add_argument(
        "--images-dir",
        type=Path,
        default=oci_images.CACHE,
        help="the node's image store: localhost/NAME:TAG runs NAME-TAG.oci.tar from here (make image)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the generated tiny model that answers for every hub model (default: built in the cache)",
    )
    p.add_argument(
        "--kubelet-cert",
        type=Path,
        help="TLS certificate (and --kubelet-key) for the log endpoint that "
        "`kubectl logs` reaches through the API server; without them there is none",
    )
    p.add_argument("--kubelet-key", type=Path)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    engines = dict(e.split("=", 1) for e in args.engine)
    for name, exe in engines.items():
        if name not in {e.name for e in native.NATIVE_ENGINES} or not Path(exe).exists():
            p.error(f"--engine {name}={exe}: unknown engine or no such executable (see hack/get-engines.sh)")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One listening socket per pod plus connections: 1000 pods need more than the usual 1024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    capacity = {
        "cpu": args.cpu,
        "memory": args.memory,
        "pods": str(args.pods),
        "ephemeral-storage": "1Ti",
        "nvidia.com/gpu": str(args.gpus_per_node),
    }
    nodes = [f"{args.node_prefix}-{i}" for i in range(args.nodes)]

    async def amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        models = None
        if engines:
            from tests.cluster.models_offline import OfflineModels  # numpy & co. only where engines run

            models = await asyncio.to_thread(OfflineModels.build, args.model_dir)
        async with KubeApi.from_kubeconfig(args.kubeconfig) as api:
            agent = NodeAgent(
                api,
                nodes,
                capacity,
                args.tokens_per_second,
                args.ready_file,
                args.ip_block,
                engines=engines,
                pods_dir=args.pods_dir,
                models=models,
                images_dir=args.images_dir,
            )
            logs = await agent.serve_logs(args.kubelet_cert, args.kubelet_key, 0) if args.kubelet_cert else None
            try:
                await agent.run(stop)
            finally:
                if logs is not None:
                    await logs.cleanup()

    asyncio.run(amain())


if __name__ == "__main__":
    main()
