"""Pure helpers: percentiles, Prometheus text, /proc readings. No I/O except the /proc readers at the bottom."""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels]  # (metric name, sorted label pairs)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default); None for no values. q in [0, 100]."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, Optional[float]]:
    """n, p50, p95, p99, mean and max of a list of numbers (seconds, tokens, ...)."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": (sum(values) / len(values)) if values else None,
        "max": max(values) if values else None,
    }


def ratio(value: Optional[float], baseline: Optional[float]) -> Optional[float]:
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


def parse_prometheus(text: str, names: Optional[Iterable[str]] = None) -> dict[Sample, float]:
    """Prometheus text exposition → {(name, labels): value}, by prometheus_client's parser. `names` keeps only those
    samples; their lines are picked out before parsing (the apiserver's page is large, and we want a few metrics)."""
    wanted = set(names) if names is not None else None
    if wanted is not None:
        text = "\n".join(
            line
            for line in text.splitlines()
            if line and line[0] != "#" and line.split("{", 1)[0].split(" ", 1)[0] in wanted
        )
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if wanted is None or sample.name in wanted:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def counter_delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """after - before per series (a series new in `after` counts from 0); zero deltas are dropped."""
    out = {}
    for key, value in after.items():
        d = value - before.get(key, 0.0)
        if d:
            out[key] = d
    return out


def group_sum(samples: dict[Sample, float], name: str, by: Sequence[str]) -> dict[tuple[str, ...], float]:
    """Sum the series of one metric by some of their labels, e.g. apiserver_request_total by (verb, resource)."""
    out: dict[tuple[str, ...], float] = {}
    for (n, labels), value in samples.items():
        if n != name:
            continue
        d = dict(labels)
        key = tuple(d.get(b, "") for b in by)
        out[key] = out.get(key, 0.0) + value
    return out


# Verbs as the apiserver labels them in apiserver_request_total (APPLY is server-side apply's PATCH).
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION", "CREATE", "UPDATE"})


def apiserver_requests(delta: dict[Sample, float]) -> dict[str, dict[str, float]]:
    """Delta of apiserver_request_total → {"verb resource[/subresource]": count}, split into reads and writes."""
    reads: dict[str, float] = {}
    writes: dict[str, float] = {}
    for (verb, resource, sub), value in group_sum(
        delta, "apiserver_request_total", ("verb", "resource", "subresource")
    ).items():
        key = f"{verb} {resource}{'/' + sub if sub else ''}"
        (writes if verb in WRITE_VERBS else reads)[key] = value
    return {"reads": reads, "writes": writes}


def proc_status_kib(pid: int, field: str) -> Optional[int]:
    """A kB field of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current RSS) in KiB; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_stat_cpu(stat: str, ticks: int) -> float:
    """utime + stime seconds from the text of /proc/<pid>/stat (fields 14 and 15; comm may contain spaces)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_cpu_seconds(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_stat_cpu(f.read(), os.sysconf("SC_CLK_TCK"))
    except OSError:
        return None


def fmt_seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(value) < 1:
        return f"{value * 1000:.1f} ms" if abs(value) < 0.1 else f"{value * 1000:.0f} ms"
    return f"{value:.2f} s" if abs(value) < 100 else f"{value:.0f} s"


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"
