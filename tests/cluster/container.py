"""One container of a fake-node pod as a host process, with a kubelet's lifecycle.

What a kubelet does and this does too (the parts our operator and gateway depend on):
- probes: startupProbe until its first success (the others wait), then readinessProbe at once and every period,
  livenessProbe every period; `initialDelaySeconds`, `periodSeconds`, `timeoutSeconds`, `failureThreshold`,
  `successThreshold`; a startup or liveness probe that reaches its failureThreshold kills the container;
- restarts (restartPolicy Always): restartCount, `lastState.terminated` (exit code, reason, times and, with
  `terminationMessagePolicy: FallbackToLogsOnError`, the last log lines as its message), and the crash-loop backoff
  (10 s doubling to 300 s, reset after 10 minutes of running) shown as `waiting: CrashLoopBackOff`;
- stopping: SIGTERM to the process group, SIGKILL after the pod's grace period.

The clock is injected (`Clock`), so tests drive backoff without waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Awaitable, Callable, Optional

import aiohttp

from tests.cluster.native import Launch

log = logging.getLogger("node-agent.container")

BACKOFF_INITIAL, BACKOFF_MAX, BACKOFF_RESET = 10.0, 300.0, 600.0  # the kubelet's crash-loop constants
MESSAGE_LINES, MESSAGE_BYTES = 80, 2048  # the kubelet's FallbackToLogsOnError cut
FAST_POLL = 0.05  # the engine-start measurement's poll (bench only; never decides readiness)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def _nothing() -> None:
    return None


async def _no_event(type_: str, reason: str, message: str) -> None:
    return None


class Clock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def rfc3339(ts: Optional[float] = None) -> str:
    return datetime.fromtimestamp(ts if ts is not None else time.time(), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def backoff_delay(crashes: int) -> float:
    """Seconds to wait before the restart after the `crashes`-th consecutive failure (1-based); the first restart is
    immediate, as a kubelet's."""
    if crashes <= 1:
        return 0.0
    return min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (crashes - 2))


def termination_message(log_path: Path) -> str:
    """The kubelet's FallbackToLogsOnError message: the last 80 lines, at most 2 KiB, of the container's log."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16 * MESSAGE_BYTES))
            tail = f.read()
    except OSError:
        return ""
    lines = tail.decode("utf-8", "replace").splitlines()[-MESSAGE_LINES:]
    text = "\n".join(lines)
    return text[-MESSAGE_BYTES:]


@dataclass
class ProbeSpec:
    kind: str  # "http" | "tcp" | "none"
    port: int = 0
    path: str = "/"
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1

    @classmethod
    def from_container(cls, container: dict, which: str) -> Optional["ProbeSpec"]:
        probe = container.get(which)
        if not probe:
            return None
        named = {p.get("name"): p["containerPort"] for p in container.get("ports") or [] if p.get("name")}

        def port_of(p) -> int:
            return int(named.get(p, 0)) if isinstance(p, str) and not p.isdigit() else int(p)

        timing = dict(
            initial_delay=float(probe.get("initialDelaySeconds", 0)),
            period=float(probe.get("periodSeconds", 10)),
            timeout=float(probe.get("timeoutSeconds", 1)),
            failure_threshold=int(probe.get("failureThreshold", 3)),
            success_threshold=int(probe.get("successThreshold", 1)),
        )
        if "httpGet" in probe:
            return cls("http", port_of(probe["httpGet"].get("port", 0)), probe["httpGet"].get("path", "/"), **timing)
        if "tcpSocket" in probe:
            return cls("tcp", port_of(probe["tcpSocket"].get("port", 0)), **timing)
        return cls("none", **timing)  # exec/grpc: nothing to run them with here; counted as passing


@dataclass
class ContainerState:
    """What the pod's containerStatuses entry says; `to_status()` renders it."""

    name: str
    image: str
    restart_count: int = 0
    started: bool = False
    ready: bool = False
    running_since: Optional[float] = None  # wall clock
    waiting: Optional[dict] = None  # {"reason", "message"}
    last_terminated: Optional[dict] = None

    def to_status(self, container_id: str) -> dict:
        if self.running_since is not None:
            state = {"running": {"startedAt": rfc3339(self.running_since)}}
        else:
            state = {"waiting": self.waiting or {"reason": "ContainerCreating"}}
        out = {
            "name": self.name,
            "image": self.image,
            "imageID": f"native://{self.image}",
            "containerID": container_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {},
        }
        if self.last_terminated:
            out["lastState"] = {"terminated": self.last_terminated}
        return out


class ProcessContainer:
    """Runs `launch` until stopped, restarting it as a kubelet would; calls `on_change()` whenever the status moves."""

    def __init__(
        self,
        name: str,
        image: str,
        container: dict,
        launch: Launch,
        host: str,
        log_dir: Path,
        *,
        grace: float,
        http: aiohttp.ClientSession,
        on_change: Callable[[], Awaitable[None]] | None = None,
        clock: Clock | None = None,
        start_file: Path | None = None,
        on_event: Callable[[str, str, str], Awaitable[None]] | None = None,
    ):
        self.state = ContainerState(name, image)
        self.container, self.launch, self.host, self.log_dir = container, launch, host, log_dir
        self.grace, self.on_change, self.http = grace, on_change or _nothing, http
        self.on_event = on_event or _no_event  # (type, reason, message): the kubelet's Events on the pod
        self.probe_error = ""  # why the last probe failed, for the Unhealthy event
        self.clock = clock or Clock()
        self.start_file = start_file
        self.startup = ProbeSpec.from_container(container, "startupProbe")
        self.readiness = ProbeSpec.from_container(container, "readinessProbe")
        self.liveness = ProbeSpec.from_container(container, "livenessProbe")
        self.proc: Optional[asyncio.subprocess.Process] = None
        self.stopping = False
        self.crashes = 0
        self.pid: Optional[int] = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.state.restart_count}.log"

    def log_paths(self) -> list[Path]:
        return sorted(self.log_dir.glob("*.log"), key=lambda p: int(p.stem))

    async def run(self) -> None:
        while not self.stopping:
            started_at = self.clock.now()
            outcome = await self._run_once()
            if self.stopping:
                return
            ran = self.clock.now() - started_at
            self.crashes = 1 if ran >= BACKOFF_RESET else self.crashes + 1
            delay = backoff_delay(self.crashes)
            self.state.restart_count += 1
            if delay > 0:
                self.state.waiting = {
                    "reason": "CrashLoopBackOff",
                    "message": (f"back-off {delay:g}s restarting failed container={self.state.name} ({outcome})"),
                }
                await self.on_change()
                await self.on_event("Warning", "BackOff", f"Back-off restarting failed container {self.state.name}")
                await self.clock.sleep(delay)

    async def _run_once(self) -> str:
        """One container instance: start, probe, wait for exit or a failed probe; returns why it ended."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")  # the engine's own output only: it is the pod's log
        try:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.launch.argv,
                    env=self.launch.env,
                    cwd=self.launch.cwd,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as e:
                self._terminated(128, "StartError", str(e), time.time())
                await self.on_change()
                return f"start failed: {e}"
        finally:
            logf.close()
        self.pid = self.proc.pid
        began = time.time()
        self.state.running_since, self.state.waiting = began, None
        self.state.started = self.startup is None
        self.state.ready = False
        await self.on_change()
        exited = asyncio.ensure_future(self.proc.wait())
        probes = asyncio.ensure_future(self._probe_loop())
        measure = asyncio.ensure_future(self._measure_start(began)) if self.start_file else None
        try:
            done, _ = await asyncio.wait({exited, probes}, return_when=asyncio.FIRST_COMPLETED)
            why = "exited"
            if probes in done and not exited.done():
                why = probes.result()  # a failed startup/liveness probe: the kubelet kills the container
                log.info("%s: %s; killing", self.state.name, why)
                kind = why.split()[0]
                await self.on_event("Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {self.probe_error}")
                await self.on_event(
                    "Normal", "Killing", f"Container {self.state.name} failed {kind} probe, will be restarted"
                )
                await self._kill()
            code = await exited
            _kill_group(self.proc.pid)  # what the engine left behind (vLLM's engine core outlives a crashed server)
        finally:
            for t in (probes, measure):
                if t is not None and not t.done():
                    t.cancel()
        if self.stopping:
            return "stopped"
        reason = "Completed" if code == 0 else "Error"
        self._terminated(code if code >= 0 else 128 - code, reason, None, began)
        await self.on_change()
        return f"{why}, exit code {self.state.last_terminated['exitCode']}"

    def _terminated(self, code: int, reason: str, message: Optional[str], began: float) -> None:
        term = {
            "exitCode": code,
            "reason": reason,
            "startedAt": rfc3339(began),
            "finishedAt": rfc3339(),
            "containerID": f"native://{self.pid}",
        }
        if message is None and code != 0 and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = termination_message(self.log_path)
        if message:
            term["message"] = message
        self.state.last_terminated = term
        self.state.running_since, self.state.started, self.state.ready = None, False, False
        self.state.waiting = {"reason": "ContainerCreating"}

    async def _probe_loop(self) -> str:
        """Returns only when the container must be killed (the reason); readiness changes go to on_change()."""
        if self.startup is not None:
            await self.clock.sleep(self.startup.initial_delay)
            failures = 0
            while True:
                if await self._probe(self.startup):
                    break
                failures += 1
                if failures >= self.startup.failure_threshold:
                    return f"startup probe failed {failures} times"
                await self.clock.sleep(self.startup.period)
            self.state.started = True
            await self.on_change()
        tasks = []
        if self.liveness is not None:
            tasks.append(asyncio.ensure_future(self._liveness_loop()))
        if self.readiness is not None:
            tasks.append(asyncio.ensure_future(self._readiness_loop()))
        else:
            self.state.ready = True
            await self.on_change()
        if not tasks:
            await asyncio.Event().wait()  # nothing can kill it but its own exit
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for t in tasks:
                t.cancel()

    async def _liveness_loop(self) -> str:
        spec = self.liveness
        assert spec is not None
        await self.clock.sleep(max(spec.initial_delay, spec.period))
        failures = 0
        while True:
            failures = 0 if await self._probe(spec) else failures + 1
            if failures >= spec.failure_threshold:
                return f"liveness probe failed {failures} times"
            await self.clock.sleep(spec.period)

    async def _readiness_loop(self) -> str:
        spec = self.readiness
        assert spec is not None
        if self.startup is None:
            await self.clock.sleep(spec.initial_delay)
        ok_run = fail_run = 0
        while True:  # the first run is immediate once started: a kubelet triggers it when startup succeeds
            if await self._probe(spec):
                ok_run, fail_run = ok_run + 1, 0
                if not self.state.ready and ok_run >= spec.success_threshold:
                    self.state.ready = True
                    await self.on_change()
            else:
                ok_run, fail_run = 0, fail_run + 1
                if self.state.ready and fail_run >= spec.failure_threshold:
                    self.state.ready = False
                    await self.on_change()
            await self.clock.sleep(spec.period)

    async def _probe(self, spec: ProbeSpec) -> bool:
        url = f"http://{self.host}:{spec.port}{spec.path}"
        try:
            if spec.kind == "http":
                async with self.http.get(url, timeout=aiohttp.ClientTimeout(total=spec.timeout)) as r:
                    self.probe_error = f"HTTP probe failed with statuscode: {r.status} ({url})"
                    return 200 <= r.status < 400
            if spec.kind == "tcp":
                _, w = await asyncio.wait_for(asyncio.open_connection(self.host, spec.port), spec.timeout)
                w.close()
                return True
            return True
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            self.probe_error = f"Get {url}: {type(e).__name__} {e}".strip()
            return False

    async def _measure_start(self, began: float) -> None:
        """For the benchmarks: process start → the engine's first 2xx on its startup/readiness path, polled every
        50 ms (probes run once a second and would blur it). Written to start_file; never decides readiness."""
        spec = self.startup or self.readiness
        if spec is None or spec.kind != "http" or self.start_file is None:
            return
        fast = ProbeSpec("http", spec.port, spec.path, timeout=1.0)
        while not await self._probe(fast):
            await asyncio.sleep(FAST_POLL)
        healthy = time.time()
        self.start_file.write_text(
            f'{{"process_started": {began:.3f}, "first_healthy": {healthy:.3f}, '
            f'"engine_start_seconds": {healthy - began:.3f}}}\n'
        )

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), self.grace)
        except asyncio.TimeoutError:
            log.info("%s: still running %gs after SIGTERM; SIGKILL", self.state.name, self.grace)
        _kill_group(proc.pid)  # the whole group: vLLM's engine core and workers are children of its API server

    async def stop(self) -> None:
        self.stopping = True
        await self._kill()
