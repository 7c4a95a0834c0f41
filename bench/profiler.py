"""py-spy on a running process (operator or gateway) while a benchmark loads it, summarised as the top frames.

`pip install py-spy` into the venv (root, or ptrace allowed, is needed to attach). Without it, profiling is skipped
with a note in the results. Samples are on-CPU only (py-spy drops idle threads), so "% of samples" is the share of
the process's busy time spent in (inclusive) or directly at (self) a frame.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("bench")


@dataclass
class Profile:
    proc: subprocess.Popen
    out: Path


def _py_spy() -> Optional[str]:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, max_seconds: float, rate: int = 100) -> Optional[Profile]:
    exe = _py_spy()
    if exe is None:
        log.warning("profiling skipped: py-spy is not installed (.venv/bin/pip install py-spy)")
        return None
    out = out.with_suffix(".txt")
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        "--duration",
        str(int(max_seconds) + 1),
        "--nonblocking",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return Profile(proc, out)


async def stop(p: Profile) -> dict[str, Any]:
    """SIGINT makes py-spy write what it has; then summarise."""
    if p.proc.poll() is None:
        p.proc.send_signal(signal.SIGINT)
    try:
        await asyncio.to_thread(p.proc.wait, 30)
    except subprocess.TimeoutExpired:
        p.proc.kill()
        await asyncio.to_thread(p.proc.wait, 10)
    err = (p.proc.stderr.read().decode(errors="replace") if p.proc.stderr else "")[-500:]
    try:
        text = p.out.read_text()
    except OSError:
        return {"error": f"py-spy wrote no profile: {err.strip()}"}
    return {"file": str(p.out), **summarize(text)}


def _frame(raw: str) -> str:
    """'handle (aiohttp/web_protocol.py:123)' → 'aiohttp/web_protocol.py:123 handle', site-packages prefix dropped."""
    raw = raw.strip()
    if raw.endswith(")") and " (" in raw:
        func, loc = raw[:-1].rsplit(" (", 1)
        for marker in ("site-packages/", "/operator/", "/lib/python3"):
            if marker in loc:
                loc = loc.split(marker, 1)[1]
                if marker == "/lib/python3":
                    loc = "stdlib/" + loc.split("/", 1)[-1]
                break
        return f"{loc} {func}"
    return raw


def summarize(collapsed: str, top: int = 15) -> dict[str, Any]:
    """Collapsed stacks ('f1;f2;f3 count' per line, root first) → total samples and the top frames by inclusive
    and by self share. A frame is counted once per stack even if it recurses."""
    total = 0
    inclusive: dict[str, int] = {}
    self_: dict[str, int] = {}
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        self_[frames[-1]] = self_.get(frames[-1], 0) + n

    def ranked(d: dict[str, int]) -> list[dict[str, Any]]:
        return (
            [{"frame": f, "pct": round(100 * c / total, 1)} for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
            if total
            else []
        )

    return {"samples": total, "self": ranked(self_), "inclusive": ranked(inclusive)}
