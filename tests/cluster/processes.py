"""Child processes of the tests: stopping one the way a kubelet stops a container (a signal, a grace period, then
SIGKILL), and telling why one that should be serving exited."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Callable, Optional

from tests.cluster.wait import wait_for


def stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
    """Send `sig` (after SIGCONT: a test may have frozen it), wait `grace` seconds, then SIGKILL. No-op if gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def children(pid: int) -> list[int]:
    """The direct children of a process (a gateway's --workers, nginx's worker), from /proc."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Exited(RuntimeError):
    """A process we started exited while we waited for it to serve; the message holds the end of its log."""


START_TRIES = 3


def port_taken(exc: Exited) -> bool:
    """It exited because a port chosen for it (free_port: free when chosen) was taken before it could bind it, by a
    process starting beside it or an outgoing connection's ephemeral port: choose again and retry."""
    return "address already in use" in str(exc).lower()


def start_serving(
    spawn: Callable[[], None],
    healthy: Callable[[], bool],
    new_ports: Callable[[], None],
    *,
    timeout: float,
    message: str,
) -> None:
    """spawn() the process, then wait until healthy() (which raises Exited if it is gone); if it exited because a
    port was taken (port_taken), choose new ports and spawn it again, up to START_TRIES times."""
    for attempt in range(1, START_TRIES + 1):
        spawn()
        try:
            wait_for(healthy, timeout=timeout, interval=0.2, message=message, fatal=(Exited,))
            return
        except Exited as e:
            if not port_taken(e) or attempt == START_TRIES:
                raise
            new_ports()
