"""Fake kubelets for the local control plane (what kwok does), plus the "containers": one stub model server per pod.

Registers Nodes with CPU, memory, pods and nvidia.com/gpu capacity and keeps their Leases fresh, so the real
scheduler binds pods to them. For every pod bound to one of its nodes it gives the pod a loopback address of its
own (127.0.0.2 upwards; 127.0.0.1 stays the apiserver's), serves the stub model server there inside this event
loop (no process per pod, so 1000 pods fit on 2 cores), and reports the pod Running, then Ready once the stub
answers the pod's probe paths over HTTP. There is no kubelet to finish a deletion, so it deletes terminating pods
with grace 0 itself. Pods the scheduler cannot place never reach it and stay Pending.

    python -m tests.cluster.node_agent --kubeconfig .cluster/kubeconfig --nodes 2 --gpus-per-node 2
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.cluster.addresses import IpPool
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
TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def rfc3339(micro: bool = False) -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PodRuntime:
    uid: str
    key: str  # namespace/name, for logs
    ip: str | None = None
    runner: web.AppRunner | None = None
    task: asyncio.Task | None = None
    deleting: bool = False
    started_at: str = field(default_factory=rfc3339)


class NodeAgent:
    def __init__(self, api: KubeApi, nodes: list[str], capacity: dict[str, str], default_tps: float = 200.0,
                 ready_file: Path | None = None, ip_block: int | None = None):
        self.api, self.nodes, self.capacity, self.default_tps = api, set(nodes), capacity, default_tps
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
            if name.startswith(prefix) and name[len(prefix):].isdigit() and name not in self.nodes:
                await self.api.request("DELETE", f"/api/v1/nodes/{name}", allow=(404,))
                log.info("deleted leftover node %s", name)
        log.info("nodes ready: %s (%s); pod addresses from 127.%d.0.0/16", ", ".join(self.node_names),
                 ", ".join(f"{k}={v}" for k, v in self.capacity.items()), self.ips.block)

    async def _register(self, name: str) -> None:
        status, node = await self.api.request("GET", f"/api/v1/nodes/{name}", allow=(404,))
        if status == 404:
            node = (await self.api.request("POST", "/api/v1/nodes", body={
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "fake-gpu", FAKE_NODE_LABEL: "true"}},
            }))[1]
        conditions = [
            {"type": t, "status": "False", "reason": f"KubeletHas{r}", "lastHeartbeatTime": rfc3339(),
             "lastTransitionTime": rfc3339(), "message": "fake node"}
            for t, r in (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"),
                         ("PIDPressure", "SufficientPID"))
        ] + [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "fake node agent is ready",
              "lastHeartbeatTime": rfc3339(), "lastTransitionTime": rfc3339()}]
        await self.api.request("PATCH", f"/api/v1/nodes/{name}/status", content_type=MERGE_PATCH, body={"status": {
            "capacity": self.capacity, "allocatable": self.capacity, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": name, "systemUUID": name, "bootID": name, "kernelVersion": "fake",
                         "osImage": "fake", "containerRuntimeVersion": "stub://1.0", "kubeletVersion": "v1.20.2",
                         "kubeProxyVersion": "v1.20.2", "operatingSystem": "linux", "architecture": "amd64"},
        }})
        # Added by admission at creation; with the node-lifecycle controller off, nobody else removes it.
        taints = (node.get("spec") or {}).get("taints") or []
        if any(t["key"] == NOT_READY_TAINT for t in taints):
            keep = [t for t in taints if t["key"] != NOT_READY_TAINT]
            await self.api.request("PATCH", f"/api/v1/nodes/{name}", content_type=MERGE_PATCH,
                                   body={"spec": {"taints": keep or None}})
        self.node_uids[name] = node["metadata"]["uid"]
        await self._renew_lease(name, node["metadata"]["uid"])

    async def _renew_lease(self, name: str, node_uid: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION, "renewTime": rfc3339(micro=True)}
        status, _ = await self.api.request("PATCH", path, content_type=MERGE_PATCH, body={"spec": spec}, allow=(404,))
        if status == 404:
            await self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", body={
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec,
                "metadata": {"name": name, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}]}}, allow=(409,))

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
                self._spawn(self.teardown(self.runtimes.pop(uid)))
            return
        if meta.get("deletionTimestamp"):
            rt = rt or self.runtimes.setdefault(uid, PodRuntime(uid, f"{meta['namespace']}/{meta['name']}"))
            if not rt.deleting:
                rt.deleting = True
                self._spawn(self.finish_deletion(rt, meta))
            return
        if rt is None and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
            rt = self.runtimes[uid] = PodRuntime(uid, f"{meta['namespace']}/{meta['name']}")
            rt.task = asyncio.create_task(self.run_pod(rt, pod))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def run_pod(self, rt: PodRuntime, pod: dict) -> None:
        try:
            cfg = stub_config(pod, self.default_tps)
            status = pod.get("status") or {}
            adopted = status.get("phase") == "Running" and self.ips.reserve(status.get("podIP"))
            was_ready = adopted and any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])
            rt.started_at = status.get("startTime") or rt.started_at
            # A restarted agent is a restarted kubelet: the containers kept running, so no second startup delay.
            delay = 0.0 if adopted else cfg.startup_delay
            rt.ip = status["podIP"] if adopted else self.ips.allocate()
            for attempt in range(BIND_ATTEMPTS):  # something else may hold ip:port: take the next address
                app = make_app(cfg.model, cfg.tokens_per_second, delay)
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
            log.info("%s -> %s:%s model=%s %s", rt.key, rt.ip, cfg.ports[0], cfg.model,
                     "(adopted)" if adopted else f"delay={delay:.1f}s")
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

    async def patch_status(self, rt: PodRuntime, pod: dict, ready: bool) -> None:
        now, spec = rfc3339(), pod["spec"]
        flag = "True" if ready else "False"
        why = {} if ready else {"reason": "ContainersNotReady", "message": "stub model server is loading"}

        def running(c: dict) -> dict:
            return {"name": c["name"], "image": c.get("image", ""), "imageID": f"stub://{c.get('image', '')}",
                    "containerID": f"stub://{rt.uid}/{c['name']}", "ready": ready, "started": True,
                    "restartCount": 0, "state": {"running": {"startedAt": rt.started_at}}}

        scheduled = next((c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"),
                         {"type": "PodScheduled", "status": "True", "lastTransitionTime": now, "lastProbeTime": None})
        status = {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": rt.ip, "podIPs": [{"ip": rt.ip}],
            "startTime": rt.started_at,
            "conditions": [
                scheduled,
                {"type": "Initialized", "status": "True", "lastTransitionTime": now, "lastProbeTime": None},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": now, "lastProbeTime": None, **why},
                {"type": "Ready", "status": flag, "lastTransitionTime": now, "lastProbeTime": None, **why},
            ],
            "containerStatuses": [running(c) for c in spec["containers"]],
        }
        if spec.get("initContainers"):
            status["initContainerStatuses"] = [
                {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": True, "restartCount": 0,
                 "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}} for c in spec["initContainers"]]
        path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}/status"
        # A merge patch replaces lists whole (podIPs must not keep an old address); metadata.uid makes it fail on
        # a same-named successor instead of reporting on the wrong pod.
        await self._api_retry("PATCH", path, body={"metadata": {"uid": rt.uid}, "status": status},
                              content_type=MERGE_PATCH)

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
        if rt.task and not rt.task.done():
            rt.task.cancel()
            await asyncio.gather(rt.task, return_exceptions=True)
        if rt.runner:
            runner, rt.runner = rt.runner, None
            await runner.cleanup()
        self.ips.release(rt.ip)
        rt.ip = None

    async def finish_deletion(self, rt: PodRuntime, meta: dict) -> None:
        """What the kubelet does after the containers stop: confirm the deletion with grace 0."""
        await self.teardown(rt)
        try:
            await self._api_retry("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                                  body={"gracePeriodSeconds": 0, "preconditions": {"uid": rt.uid}},
                                  allow=(404, 409))
            log.info("%s deleted", rt.key)
        except (ApiError, *TRANSIENT) as e:
            log.warning("%s: delete: %s", rt.key, e)

    async def run(self, stop: asyncio.Event) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=64)  # probes are one-offs: hold no idle sockets
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as self.http:
            await self.register_nodes()
            tasks = [asyncio.create_task(self.pod_loop()), asyncio.create_task(self.lease_loop(stop)),
                     asyncio.create_task(stop.wait())]
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
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One listening socket per pod plus connections: 1000 pods need more than the usual 1024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    capacity = {"cpu": args.cpu, "memory": args.memory, "pods": str(args.pods), "ephemeral-storage": "1Ti",
                "nvidia.com/gpu": str(args.gpus_per_node)}
    nodes = [f"{args.node_prefix}-{i}" for i in range(args.nodes)]

    async def amain() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with KubeApi.from_kubeconfig(args.kubeconfig) as api:
            await NodeAgent(api, nodes, capacity, args.tokens_per_second, args.ready_file,
                            args.ip_block).run(stop)

    asyncio.run(amain())


if __name__ == "__main__":
    main()
