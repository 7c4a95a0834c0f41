"""A real Kubernetes v1.20 control plane from local binaries: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, plus our fake node agent (node_agent.py) in place of kubelets.

Processes run in their own sessions so they outlive the `python -m tests.cluster up` that started them; everything
needed to find and stop them again is in the state dir (pids.json, kubeconfig, pki/, logs/).
The recipe and its traps: docs/local-control-plane.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.cluster.certs import Pki, make_pki
from tests.cluster.wait import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = REPO_ROOT / ".cluster"
K8S_BIN_SCRIPT = Path(__file__).resolve().parent / "k8s-bin.sh"
GET_ENGINES_SCRIPT = REPO_ROOT / "hack" / "get-engines.sh"
# The controller-manager's own list minus controllers that need a cloud, a kubelet, a network or volumes, and minus
# the legacy Endpoints controller: Endpoints reject the loopback pod IPs we use (EndpointSlices carry them).
CONTROLLERS = (
    "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service,-attachdetach,-persistentvolume-binder,-endpoint"
)
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


class ControlPlaneError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binaries() -> Path:
    """The directory with kube-apiserver & co: KUBEBUILDER_ASSETS if set, else k8s-bin.sh (builds once, cached)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and (Path(assets) / "kube-apiserver").exists():
        return Path(assets)
    out = subprocess.run(["bash", str(K8S_BIN_SCRIPT)], check=True, capture_output=True, text=True, timeout=1800)
    return Path(out.stdout.strip().splitlines()[-1])


def find_engines(names: tuple[str, ...]) -> dict[str, str]:
    """engine name → its executable here, installing what is missing (hack/get-engines.sh; vLLM takes minutes once).
    A failed install fails loudly: tests of real engines must never quietly fall back to the stub."""
    if not names:
        return {}
    out = subprocess.run(["bash", str(GET_ENGINES_SCRIPT), *names], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise ControlPlaneError(f"installing engines {', '.join(names)} failed:\n{out.stderr[-3000:]}")
    found = dict(line.split("=", 1) for line in out.stdout.split() if "=" in line)
    keys = {"vllm": "VLLM_PYTHON", "llamacpp": "LLAMA_SERVER"}
    return {n: found[keys[n]] for n in names}


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else raw.decode(errors="replace").rstrip("\0").split("\0")


def agent_code_digest() -> str:
    """What the node agent runs: every module of tests/cluster (the agent, its runtimes, the stub server)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def pid_alive(pid: int, cmd: list[str]) -> bool:
    """Alive and still the process we started: a recycled PID must not be signalled."""
    return _cmdline(pid) == cmd


class ControlPlane:
    """Start with `start()`, stop with `stop()`; usable as a context manager.

    `start()` on a state dir whose cluster is already up and healthy reuses it (`self.reused` is then True); if only
    the node agent is gone it restarts just that; any other stale state (dead processes, a rebooted machine) is
    stopped, cleaned and started fresh. `stop()` is idempotent.
    """

    ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent")

    def __init__(
        self,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        *,
        nodes: int = 2,
        gpus_per_node: int = 2,
        cpu: str = "64",
        memory: str = "256Gi",
        pods_per_node: int = 1000,
        node_agent: bool = True,
        engines: tuple[str, ...] = (),
        bin_dir: str | Path | None = None,
        start_timeout: float = 120.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.nodes, self.gpus_per_node, self.cpu, self.memory = nodes, gpus_per_node, cpu, memory
        self.pods_per_node, self.node_agent = pods_per_node, node_agent
        self.engines = engines  # run natively on the fake nodes (installed by hack/get-engines.sh); others: the stub
        self.bin_dir = Path(bin_dir) if bin_dir else None
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.reused = False
        self.startup_seconds = 0.0
        self._procs: dict[str, subprocess.Popen] = {}

    # -- paths and state -------------------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pids_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def pki(self) -> Pki:
        return Pki(self.state_dir / "pki")

    def _state(self) -> dict:
        try:
            return json.loads(self.pids_file.read_text())
        except (OSError, ValueError):
            return {"components": []}

    def _save_state(self, state: dict) -> None:
        tmp = self.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.pids_file)

    @property
    def server(self) -> str | None:
        return self._state().get("server")

    # -- health ----------------------------------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.pki.admin_token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def status(self) -> dict[str, bool]:
        """Component name -> process alive, plus 'apiserver-ready' from /readyz."""
        out = {c["name"]: pid_alive(c["pid"], c["cmd"]) for c in self._state()["components"]}
        try:
            out["apiserver-ready"] = bool(self.server) and self._get("/readyz")[0] == 200
        except OSError:
            out["apiserver-ready"] = False
        return out

    def is_up(self) -> bool:
        st = self.status()
        expected = self.ORDER if self._state().get("node_agent", True) else self.ORDER[:-1]
        return all(st.get(name) for name in expected) and st.get("apiserver-ready", False)

    # -- start -----------------------------------------------------------------------------------------------------
    def start(self) -> "ControlPlane":
        if self.pids_file.exists():
            if self.is_up():
                self.reused = True
                self.ensure_engines()
                return self
            st = self.status()
            if (
                self._state().get("node_agent", True)
                and all(st.get(n) for n in self.ORDER[:-1])
                and st.get("apiserver-ready")
            ):
                self.restart_node_agent()  # only the agent died: the cluster's objects are worth keeping
                self.reused = True
                return self
            self.stop()  # stale: some processes died (or the machine restarted); kill the rest, start clean
        started = time.monotonic()
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _start_all(self) -> None:
        bins = self.bin_dir or find_binaries()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.logs_dir, ignore_errors=True)
        self.logs_dir.mkdir()
        pki = make_pki(self.state_dir / "pki")
        # etcd's fsyncs dominate apiserver latency on disk; tmpfs makes the cluster several times faster.
        shm = Path("/dev/shm")
        etcd_data = tempfile.mkdtemp(prefix="modelservice-etcd-", dir=shm if os.access(shm, os.W_OK) else None)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        server = f"https://127.0.0.1:{api_port}"
        self._save_state({"components": [], "etcd_data": etcd_data, "server": server, "node_agent": self.node_agent})
        self._write_kubeconfigs(server, pki)

        self._spawn(
            "etcd",
            [
                str(bins / "etcd"),
                "--name=default",
                f"--data-dir={etcd_data}",
                "--logger=zap",
                "--log-level=warn",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--initial-cluster-state=new",
            ],
        )
        self._wait("etcd", lambda: self._http_ok(f"http://127.0.0.1:{etcd_port}/health"), "etcd /health")

        self._spawn(
            "kube-apiserver",
            [
                str(bins / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                "--insecure-port=0",
                f"--cert-dir={self.state_dir / 'pki'}",
                f"--tls-cert-file={pki.path('apiserver.crt')}",
                f"--tls-private-key-file={pki.path('apiserver.key')}",
                f"--client-ca-file={pki.ca_crt}",
                f"--token-auth-file={pki.path('tokens.csv')}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={pki.path('sa.pub')}",
                f"--service-account-signing-key-file={pki.path('sa.key')}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--api-audiences={SA_ISSUER}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                # The `kubernetes` Endpoints would point at 127.0.0.1, which Endpoints validation rejects: skip it.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                # `kubectl logs` goes through the node's kubelet: the fake nodes' is the agent, at their InternalIP
                # (their Hostname resolves nowhere).
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )
        self._wait("kube-apiserver", lambda: self._get("/readyz")[0] == 200, "kube-apiserver /readyz")

        qps = ["--kube-api-qps=200", "--kube-api-burst=400"]  # defaults (20/30) make 1000-pod benchmarks crawl
        cm_port, sched_port = free_port(), free_port()
        self._spawn(
            "kube-controller-manager",
            [
                str(bins / "kube-controller-manager"),
                f"--kubeconfig={self.state_dir / 'controller-manager.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={cm_port}",
                "--port=0",
                f"--cert-dir={self.state_dir / 'pki' / 'cm-serving'}",
                f"--service-account-private-key-file={pki.path('sa.key')}",
                f"--root-ca-file={pki.ca_crt}",
                "--use-service-account-credentials=true",
                f"--controllers={CONTROLLERS}",
                f"--cluster-signing-cert-file={pki.ca_crt}",
                f"--cluster-signing-key-file={pki.ca_key}",
                *qps,
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(bins / "kube-scheduler"),
                f"--kubeconfig={self.state_dir / 'scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={sched_port}",
                "--port=0",
                f"--cert-dir={self.state_dir / 'pki' / 'scheduler-serving'}",
                *qps,
            ],
        )
        for name, port in (("kube-controller-manager", cm_port), ("kube-scheduler", sched_port)):
            self._wait(
                name, lambda p=port: self._http_ok(f"https://127.0.0.1:{p}/healthz", verify=False), f"{name} /healthz"
            )

        if self.node_agent:
            self._start_node_agent()
        # Pods can only be created once the ServiceAccount admission finds the default SA and its token Secret.
        self._wait("kube-controller-manager", self._default_sa_ready, "default ServiceAccount with token")

    def _start_node_agent(self, cmd: list[str] | None = None) -> None:
        ready = self.state_dir / "node-agent.ready"
        ready.unlink(missing_ok=True)
        (self.state_dir / "node-agent.code").write_text(agent_code_digest())
        self._spawn(
            "node-agent",
            cmd
            or [
                sys.executable,
                "-m",
                "tests.cluster.node_agent",
                f"--kubeconfig={self.kubeconfig}",
                f"--nodes={self.nodes}",
                f"--gpus-per-node={self.gpus_per_node}",
                f"--cpu={self.cpu}",
                f"--memory={self.memory}",
                f"--pods={self.pods_per_node}",
                f"--ready-file={ready}",
                f"--pods-dir={self.state_dir / 'pods'}",
                f"--kubelet-cert={self.pki.path('apiserver.crt')}",
                f"--kubelet-key={self.pki.path('apiserver.key')}",
                *(f"--engine={name}={exe}" for name, exe in find_engines(self.engines).items()),
            ],
        )
        self._wait("node-agent", ready.exists, "the node agent to register its nodes and adopt their pods")

    def ensure_engines(self) -> None:
        """A reused cluster whose node agent runs fewer engines than asked for, or older code than this checkout's
        (a `make cluster` left running across a `git pull`), gets a new agent that runs them all."""
        recorded = next((c for c in self._state()["components"] if c["name"] == "node-agent"), None)
        if recorded is None:
            return
        running = {a.split("=")[1] for a in recorded["cmd"] if a.startswith("--engine=")}
        code = self.state_dir / "node-agent.code"
        current = code.exists() and code.read_text() == agent_code_digest()
        if set(self.engines) <= running and current:
            return
        self.engines = tuple(sorted(running | set(self.engines)))
        self._terminate(recorded["name"], recorded["pid"], recorded["cmd"])
        self._start_node_agent(
            [a for a in recorded["cmd"] if not a.startswith("--engine=")]
            + [f"--engine={n}={exe}" for n, exe in find_engines(self.engines).items()]
        )

    def restart_node_agent(self) -> None:
        """Stop the agent and start a new one, which re-adopts the pods bound to its nodes (a kubelet restart).

        The new agent gets the recorded command line, so a cluster made with other node options keeps them even
        when this ControlPlane object was built with the defaults.
        """
        recorded = next((c for c in self._state()["components"] if c["name"] == "node-agent"), None)
        if recorded:
            self._terminate(recorded["name"], recorded["pid"], recorded["cmd"])
        self._start_node_agent(recorded["cmd"] if recorded else None)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs_dir / f"{name}.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        env.pop("KUBECONFIG", None)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        log.close()
        self._procs[name] = proc
        state = self._state()
        state["components"] = [c for c in state["components"] if c["name"] != name]
        state["components"].append({"name": name, "pid": proc.pid, "cmd": cmd})
        self._save_state(state)

    def _wait(self, name: str, predicate, message: str) -> None:
        def check():
            proc = self._procs[name]
            if proc.poll() is not None:
                raise ControlPlaneError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            return predicate()

        try:
            wait_for(check, timeout=self.start_timeout, interval=0.1, message=message, fatal=(ControlPlaneError,))
        except AssertionError as e:
            raise ControlPlaneError(f"{e}\n--- {name} log tail ---\n{self.log_tail(name)}") from None

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.logs_dir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @staticmethod
    def _http_ok(url: str, verify: bool = True) -> bool:
        ctx = ssl.create_default_context()
        if not verify:  # the components' self-signed serving certs; loopback only
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _default_sa_ready(self) -> bool:
        code, body = self._get("/api/v1/namespaces/default/serviceaccounts/default")
        return code == 200 and bool(json.loads(body).get("secrets"))

    def _write_kubeconfigs(self, server: str, pki: Pki) -> None:
        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        def config(user: str, cert: str, embed: bool) -> dict:
            if embed:  # the admin kubeconfig is self-contained so it can be copied anywhere
                cluster = {"server": server, "certificate-authority-data": b64(pki.ca_crt)}
                creds = {
                    "client-certificate-data": b64(pki.path(f"{cert}.crt")),
                    "client-key-data": b64(pki.path(f"{cert}.key")),
                }
            else:
                cluster = {"server": server, "certificate-authority": str(pki.ca_crt)}
                creds = {"client-certificate": str(pki.path(f"{cert}.crt")), "client-key": str(pki.path(f"{cert}.key"))}
            return {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "modelservice-local",
                "clusters": [{"name": "modelservice-local", "cluster": cluster}],
                "users": [{"name": user, "user": creds}],
                "contexts": [
                    {"name": "modelservice-local", "context": {"cluster": "modelservice-local", "user": user}}
                ],
            }

        for path, user, cert, embed in (
            (self.kubeconfig, "admin", "admin", True),
            (
                self.state_dir / "controller-manager.kubeconfig",
                "system:kube-controller-manager",
                "controller-manager",
                False,
            ),
            (self.state_dir / "scheduler.kubeconfig", "system:kube-scheduler", "scheduler", False),
        ):
            path.write_text(yaml.safe_dump(config(user, cert, embed), sort_keys=False))
            path.chmod(0o600)

    # -- stop ------------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Reverse order, SIGTERM then SIGKILL after `stop_timeout`. Idempotent; leaves pki/ and logs/ to read."""
        state = self._state()
        for comp in reversed(state["components"]):
            self._terminate(comp["name"], comp["pid"], comp["cmd"])
        if state.get("etcd_data"):
            shutil.rmtree(state["etcd_data"], ignore_errors=True)
        self.pids_file.unlink(missing_ok=True)
        self._procs.clear()

    def _terminate(self, name: str, pid: int, cmd: list[str]) -> None:
        proc = self._procs.get(name)
        if not pid_alive(pid, cmd):
            if proc:
                proc.poll()
            return
        for sig, timeout in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            if proc is not None:  # our child: wait() also reaps it
                try:
                    proc.wait(timeout)
                    return
                except subprocess.TimeoutExpired:
                    continue
            try:
                wait_for(lambda: not pid_alive(pid, cmd), timeout=timeout, interval=0.05, message=f"{name} to exit")
                return
            except AssertionError:
                continue

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
