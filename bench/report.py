"""The results document → the table printed at the end of `python -m bench`. Pure."""

from __future__ import annotations

from typing import Any, Optional

from bench.stats import fmt_ratio, fmt_seconds, ratio
from modelservice.gateway.metrics import UNTOUCHED_REASONS

Row = tuple[str, str, str, str, str, str]  # figure, value, baseline, ratio, goal, met
HEAD: Row = ("figure", "value", "baseline (same run)", "ratio", "goal", "met")
GOALS = {
    "materialize_ratio": 1.3,
    "idle_writes": 0,
    "rss_mb": 150,
    "latency_ratio": 2.0,
    "stream_share": 0.90,
    "wake_overhead": 0.300,
    "engine_overhead_p50": 1.0,
}


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _mark(ok: Optional[bool]) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


def _mb(mib: Optional[float]) -> str:
    return "-" if mib is None else f"{mib * 1.048576:.0f} MB"


def _num(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _lat(s: Optional[dict]) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{fmt_seconds(s['p50'])} / {fmt_seconds(s['p95'])} / {fmt_seconds(s['p99'])}"


def _lat2(s: Optional[dict]) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{fmt_seconds(s['p50'])} / {fmt_seconds(s['p99'])}"


def operator_rows(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for n, entry in res.get("sizes", {}).items():
        op, bare = entry.get("operator", {}), entry.get("bare", {})
        t_op, t_bare = op.get("total_seconds"), bare.get("total_seconds")
        r = ratio(t_op, t_bare)
        incomplete = op.get("ready", 0) < int(n) or bare.get("ready", 0) < int(n)
        rows.append(
            (
                f"N={n}: first create -> all Ready" + (" (INCOMPLETE)" if incomplete else ""),
                fmt_seconds(t_op),
                f"bare client {fmt_seconds(t_bare)}",
                fmt_ratio(r),
                f"<= {GOALS['materialize_ratio']}x",
                _mark(None if r is None or incomplete else r <= GOALS["materialize_ratio"]),
            )
        )
        for who, d in (("operator", op), ("bare client", bare)):
            if d.get("error"):
                rows.append((f"N={n}: {who} phase failed", d["error"][:50], "", "", "", "NO"))
            elif d.get("ready", 0) < int(n):
                rows.append(
                    (
                        f"N={n}: {who}: not Ready before the timeout",
                        str(int(n) - d.get("ready", 0)),
                        "see 'stuck' in the JSON",
                        "",
                        "0",
                        "NO",
                    )
                )
        rows.append(
            (
                f"N={n}: per-object create -> Ready p50/p95/p99",
                _lat(op.get("latency")),
                _lat(bare.get("latency")),
                fmt_ratio(ratio(_get(op, "latency", "p50"), _get(bare, "latency", "p50"))),
                "",
                "",
            )
        )
        rows.append(
            (
                f"N={n}: apiserver requests per object (writes)",
                f"{_num(_get(op, 'api', 'requests_per_object'))} ({_num(_get(op, 'api', 'writes_per_object'))})",
                f"{_num(_get(bare, 'api', 'requests_per_object'))} ({_num(_get(bare, 'api', 'writes_per_object'))})",
                fmt_ratio(ratio(_get(op, "api", "writes_per_object"), _get(bare, "api", "writes_per_object"))),
                "",
                "",
            )
        )
        rows.append(
            (
                f"N={n}: operator's own writes per object (its counter)",
                _num(op.get("operator_writes_per_object"), 2),
                "bare client: 2 applies",
                "",
                "",
                "",
            )
        )
        if "idle" in op:
            idle = op["idle"]
            w = idle.get("operator_writes")
            api_w = idle.get("apiserver_writes_on_operator_resources")
            rows.append(
                (
                    f"N={n}: writes while idle {idle['seconds']:.0f}s (operator counter / apiserver on its resources)",
                    f"{_num(w, 0)} / {_num(api_w, 0)}",
                    f"all components {_num(idle.get('apiserver_writes_all'), 0)}",
                    "",
                    "0",
                    _mark(None if w is None else (w == 0 and (api_w or 0) == 0)),
                )
            )
            rows.append(
                (
                    f"N={n}: reconciles / CPU while idle",
                    f"{_num(idle.get('reconciles'), 0)} / {fmt_seconds(idle.get('cpu_seconds'))}",
                    "",
                    "",
                    "",
                    "",
                )
            )
        if "repair" in op:
            rep = op["repair"]
            rows.append(
                (
                    f"N={n}: repair deleted Service+Deployment p50/p99",
                    _lat2(rep.get("both")),
                    f"ReplicaSet ctrl, pod {_lat2(rep.get('pod_by_replicaset_controller'))}",
                    fmt_ratio(ratio(_get(rep, "both", "p50"), _get(rep, "pod_by_replicaset_controller", "p50"))),
                    "",
                    "",
                )
            )
            if rep.get("missed"):
                rows.append((f"N={n}: repairs not seen within 30 s", str(rep["missed"]), "", "", "0", "NO"))
        if "idle" in op or "repair" in op:
            peak = op.get("rss_peak_mib")
            rows.append(
                (
                    f"N={n}: operator peak RSS (VmHWM)",
                    _mb(peak),
                    f"empty operator {_mb(op.get('rss_empty_mib'))}",
                    "",
                    f"<= {GOALS['rss_mb']} MB",
                    _mark(None if peak is None else peak * 1.048576 <= GOALS["rss_mb"]),
                )
            )
            rows.append(
                (
                    f"N={n}: operator CPU materializing (whole run)",
                    f"{fmt_seconds(op.get('cpu_seconds'))} ({fmt_seconds(op.get('cpu_seconds_total'))})",
                    f"bare client {fmt_seconds(bare.get('client_cpu_seconds'))}",
                    fmt_ratio(ratio(op.get("cpu_seconds"), bare.get("client_cpu_seconds"))),
                    "",
                    "",
                )
            )
    return rows


DATA_PLANE_ALTERNATIVES = ("envoy-model", "py-aiohttp", "py-asyncio")  # bench/peers.py, for the data-plane decision


def peer_rows(c: str, entry: dict[str, Any]) -> list[Row]:
    """Beside vllm-router (issue 14): added p50 within 1.5x of its own at c=1; requests per proxy CPU-second at
    least its own at c=64 and 256. Envoy's figures beside them, for the data-plane decision (docs/benchmarks.md)."""
    if "vllm-router" not in entry:
        return []
    rows: list[Row] = []
    g, v = _get(entry, "added", "gateway", "p50"), _get(entry, "added", "vllm-router", "p50")
    e = _get(entry, "added", "envoy", "p50")
    goal = c == "1"
    rows.append(
        (
            f"c={c}: added p50, gateway vs vllm-router",
            fmt_seconds(g),
            f"vllm-router {fmt_seconds(v)}, envoy {fmt_seconds(e)}",
            fmt_ratio(ratio(g, v) if g is not None and v and v > 0 else None),
            "<= 1.5x" if goal else "",
            _mark(None if not goal or g is None or v is None else g <= 1.5 * max(v, 0.0)) if goal else "",
        )
    )
    cpu = {p: (entry.get(p) or {}).get("requests_per_cpu_second") for p in ("gateway", "vllm-router", "envoy", "nginx")}
    goal = c in ("64", "256")
    rows.append(
        (
            f"c={c}: requests per proxy CPU-second, gateway",
            _num(cpu["gateway"], 0),
            f"vllm-router {_num(cpu['vllm-router'], 0)}, envoy {_num(cpu['envoy'], 0)}, nginx {_num(cpu['nginx'], 0)}",
            fmt_ratio(ratio(cpu["gateway"], cpu["vllm-router"])),
            ">= 1x" if goal else "",
            _mark(
                None if cpu["gateway"] is None or cpu["vllm-router"] is None else cpu["gateway"] >= cpu["vllm-router"]
            )
            if goal
            else "",
        )
    )
    # The data-plane decision's figures (docs/benchmarks.md): Envoy routing by the body's model, and the floors of a
    # Python proxy (bench/proxy_floor.py), each beside vllm-router's requests per CPU-second of the same run.
    alt = {p: (entry.get(p) or {}).get("requests_per_cpu_second") for p in DATA_PLANE_ALTERNATIVES}
    if any(v is not None for v in alt.values()):
        rows.append(
            (
                f"c={c}: req per CPU-s, Envoy by model / Python floors",
                " / ".join(_num(v, 0) for v in alt.values()),
                " / ".join(alt),
                " / ".join(fmt_ratio(ratio(v, cpu["vllm-router"])) for v in alt.values()),
                "",
                "",
            )
        )
    return rows


def gateway_rows(res: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    if res.get("error"):
        rows.append(("gateway benchmark", "FAILED", res["error"][:60], "", "", "NO"))
    lat = res.get("latency", {})
    for c, entry in lat.get("by_concurrency", {}).items():
        direct = entry.get("direct", {})
        rows.append(
            (
                f"c={c}: direct to stub p50/p99 ({direct.get('throughput_rps', 0):.0f} req/s)",
                _lat2(direct.get("latency")),
                "",
                "",
                "",
                "",
            )
        )
        for q in ("p50", "p99"):
            g, x = _get(entry, "added", "gateway", q), _get(entry, "added", "nginx", q)
            r = ratio(g, x) if (g is not None and x is not None and x > 0) else None
            rows.append(
                (
                    f"c={c}: added latency {q}, gateway",
                    fmt_seconds(g),
                    f"nginx {fmt_seconds(x)}",
                    fmt_ratio(r),
                    f"<= {GOALS['latency_ratio']}x",
                    _mark(None if g is None or x is None else (g <= GOALS["latency_ratio"] * max(x, 0.0))),
                )
            )
        gw, ng = entry.get("gateway", {}), entry.get("nginx", {})
        rows.append(
            (
                f"c={c}: throughput req/s, gateway",
                f"{gw.get('throughput_rps', 0):.0f}",
                f"nginx {ng.get('throughput_rps', 0):.0f}",
                "",
                "",
                "",
            )
        )
        rows += peer_rows(c, entry)
        errs = sum(v.get("errors", 0) for k, v in entry.items() if k != "added")  # every path the run measured
        if errs:
            rows.append((f"c={c}: failed requests", str(errs), "", "", "0", "NO"))
    st = res.get("streaming")
    if st:
        g, d = _get(st, "gateway", "tokens_per_second"), _get(st, "direct", "tokens_per_second")
        share = ratio(g, d)
        rows.append(
            (
                f"{st.get('streams')} streams: tokens/s delivered, gateway",
                _num(g, 0),
                f"direct {_num(d, 0)}",
                "-" if share is None else f"{share:.0%}",
                f">= {GOALS['stream_share']:.0%}",
                _mark(None if share is None else share >= GOALS["stream_share"]),
            )
        )
        rows.append(
            (
                f"{st.get('streams')} streams: time to first token p50/p99, gateway",
                _lat2(_get(st, "gateway", "ttft")),
                f"direct {_lat2(_get(st, 'direct', 'ttft'))}",
                "",
                "",
                "",
            )
        )
        peak = _get(st, "gateway_rss_peak_mib")
        rows.append(
            (
                f"gateway peak RSS under {st.get('streams')} streams",
                _mb(peak),
                f"idle gateway {_mb(_get(st, 'gateway_rss_idle_mib'))}",
                "",
                "",
                "",
            )
        )
    rows += workers_rows(res.get("workers") or {})
    cold = res.get("cold_start")
    if cold:
        o, b = cold.get("overhead"), cold.get("direct_overhead")
        rows.append(
            (
                f"scale from zero x{_get(o, 'n') or 0}: first byte - pod Ready p50/p99",
                _lat2(o),
                f"direct client {_lat2(b)}",
                "",
                f"<= {GOALS['wake_overhead'] * 1000:.0f} ms",
                _mark(None if not o or o.get("p99") is None else o["p99"] <= GOALS["wake_overhead"]),
            )
        )
        rows.append(
            (
                "  of which EndpointSlice ctrl (pod Ready -> slice ready) p50/p99",
                _lat2(cold.get("slice_lag")),
                "",
                "",
                "",
                "",
            )
        )
        rows.append(
            ("  of which gateway (slice ready -> first byte) p50/p99", _lat2(cold.get("gateway_share")), "", "", "", "")
        )
        rows.append(("scale from zero: request -> first byte p50/p99", _lat2(cold.get("total")), "", "", "", ""))
        if cold.get("failures"):
            rows.append(("scale from zero: failed cycles", str(cold["failures"]), "", "", "0", "NO"))
    return rows


def engine_rows(res: dict[str, Any]) -> list[Row]:
    if res.get("error"):
        return [("real-engine scale from zero", "failed", res["error"][:80], "", "", "NO")]
    o = res.get("overhead")
    rows: list[Row] = [
        (
            f"scale from zero x{_get(o, 'n') or 0} ({res.get('engine')}): request -> first token, minus the engine's "
            "own start, p50/p99",
            _lat2(o),
            f"engine's own start {_lat2(res.get('engine_start'))}",
            "",
            f"p50 <= {GOALS['engine_overhead_p50']:g} s",
            _mark(None if not o or o.get("p50") is None else o["p50"] <= GOALS["engine_overhead_p50"]),
        ),
        ("  request -> engine process started p50/p99", _lat2(res.get("request_to_process_start")), "", "", "", ""),
        (
            f"  engine's first /health 200 -> first token p50/p99 (startup probe every "
            f"{res.get('startup_probe_period_seconds')} s)",
            _lat2(res.get("healthy_to_first_token")),
            "",
            "",
            "",
            "",
        ),
        ("  request -> first token p50/p99", _lat2(res.get("request_to_first_token")), "", "", "", ""),
    ]
    if res.get("failures"):
        rows.append(("real-engine scale from zero: failed cycles", str(res["failures"]), "", "", "0", "NO"))
    return rows


def gpu_pool_rows(res: dict[str, Any], value: str = "park") -> list[Row]:
    """A parking policy (`park`, or `park@N`: with --prestop-seconds N) beside the idle-timer policy, same trace,
    same run (issue #13's goals)."""
    if res.get("error"):
        return [("GPU pool trace", "failed", res["error"][:80], "", "", "NO")]
    pols = res.get("policies", {})
    park, base = pols.get(value) or {}, pols.get("idle-timer") or {}
    load = res.get("load_seconds") or 0.0

    def num(v: Any, fmt: str = "{:.0f}") -> str:
        return "-" if v is None else fmt.format(v)

    cold_p99 = (park.get("ttft_cold") or {}).get("p99")
    cs_park, cs_base = park.get("cold_starts"), base.get("cold_starts")
    return [
        (
            "requests failed or timed out (park | idle-timer)",
            num(park.get("failed")),
            num(base.get("failed")),
            "",
            "0 while an idle GPU could serve",
            _mark(None if not park else park.get("failed") == 0),
        ),
        (
            "TTFT of requests to a model at zero p50/p99",
            _lat2(park.get("ttft_cold")),
            _lat2(base.get("ttft_cold")),
            "",
            f"p99 <= load {load:g} s + 2 s",
            _mark(None if cold_p99 is None else cold_p99 <= load + 2.0),
        ),
        (
            "GPU-seconds held idle while another model waited for a GPU",
            num(park.get("gpu_seconds_idle_while_waiting")),
            num(base.get("gpu_seconds_idle_while_waiting")),
            "",
            "~0",
            _mark(None if not park else park.get("gpu_seconds_idle_while_waiting", 1e9) <= 2 * SAMPLE_SLACK),
        ),
        (
            "  of which at most as many as waiting pods asked for",
            num(park.get("gpu_seconds_idle_while_waiting_needed")),
            num(base.get("gpu_seconds_idle_while_waiting_needed")),
            "",
            "",
            "",
        ),
        (
            "  of which by pods already going away (parked, stopping)",
            num(park.get("gpu_seconds_idle_while_waiting_stopping")),
            num(base.get("gpu_seconds_idle_while_waiting_stopping")),
            "",
            "",
            "",
        ),
        (
            "GPU-seconds held idle, total",
            num(park.get("gpu_seconds_idle")),
            num(base.get("gpu_seconds_idle")),
            "",
            "",
            "",
        ),
        (
            "cold starts (model pods created)",
            num(cs_park),
            num(cs_base),
            "" if not cs_park or not cs_base else f"{cs_park / cs_base:.2f}x",
            "<= idle-timer's + 20 %",
            _mark(None if not cs_park or not cs_base else cs_park <= 1.2 * cs_base),
        ),
        (
            "tries sent elsewhere, untouched (not sent | unread | refused)",
            _untouched(park),
            _untouched(base),
            "",
            "",
            "",
        ),
    ]


def _untouched(policy: dict[str, Any]) -> str:
    """The gateway's modelservice_gateway_untouched_tries over the run: requests that met an engine stopping (or
    refusing) and went elsewhere instead of failing."""
    t = policy.get("gateway_untouched_tries")
    return "-" if not t else " | ".join(f"{t.get(k, 0):.0f}" for k in UNTOUCHED_REASONS)


SAMPLE_SLACK = 4.0  # GPU-seconds: a few 0.5 s samples at 4 GPUs around each park (the ledger's resolution)


def workers_rows(w: dict[str, Any]) -> list[Row]:
    """--gateway-workers: per worker count, gateway and wrk CPU per request, throughput and p50; the ratio is the
    median over rounds of (N workers / 1 worker) in the same round."""
    rows: list[Row] = []
    counts = [str(n) for n in w.get("workers", [])]
    if not counts:
        return rows
    base = counts[0]
    paced = w.get("paced", {})
    rows.append(
        ("c=1 direct to stub p50 (subtract for added latency)", fmt_seconds(w.get("direct_c1_p50")), "", "", "", "")
    )
    for mode, what in (
        ("c1", "c=1"),
        ("closed", f"c={w.get('concurrency')} closed loop"),
        ("paced", f"c={w.get('concurrency')} paced at {paced.get('offered_rps', 0):.0f} req/s"),
    ):
        for n in counts:
            e, b = _get(w, mode, n) or {}, _get(w, mode, base) or {}
            rows.append(
                (
                    f"{n} worker(s), {what}: gateway CPU ms/request",
                    _num(e.get("gateway_cpu_ms_per_request"), 3),
                    f"wrk {_num(e.get('loadgen_cpu_ms_per_request'), 3)} ms/req; "
                    f"{e.get('throughput_rps') or 0:.0f} req/s; gateway {_num(e.get('gateway_cores_busy'), 2)} "
                    f"cores; p50 {fmt_seconds(e.get('p50'))}; RSS {_mb(e.get('gateway_rss_mib'))}",
                    fmt_ratio(
                        e.get("paired_cpu_ratio")
                        if e.get("paired_cpu_ratio") is not None
                        else ratio(e.get("gateway_cpu_ms_per_request"), b.get("gateway_cpu_ms_per_request"))
                    ),
                    "",
                    "NO" if e.get("errors") else "",
                )
            )
    return rows


def render(rows: list[Row]) -> str:
    widths = [max(len(r[i]) for r in [HEAD, *rows]) for i in range(len(HEAD))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(HEAD, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def table(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    parts = [
        f"machine: {m.get('nproc')} x {m.get('cpu')}, {m.get('mem_gib')} GiB; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_start', ()))}",
        f"command: {doc.get('command')}",
    ]
    res = doc.get("results", {})
    if "operator" in res:
        o = res["operator"]
        parts += [
            "",
            f"OPERATOR (workers = bare client concurrency = {o.get('concurrency')}; "
            f"--resync-seconds {o.get('resync_seconds'):g})",
            render(operator_rows(o)),
        ]
    if "gateway" in res:
        g = res["gateway"]
        parts += [
            "",
            f"GATEWAY (loadgen {g.get('loadgen', '?')}; nginx {g.get('nginx_version', '?')}, 1 worker)",
            render(gateway_rows(g)),
        ]
    if "metering" in res:
        from bench.metering_bench import rows as metering_rows

        parts += [
            "",
            "METERING AND QUOTAS ON vs OFF (two gateways, interleaved rounds)",
            *metering_rows(res["metering"]),
        ]
    if "engine" in res:
        parts += [
            "",
            "REAL ENGINE (the node agent runs it from the rendered pod spec)",
            render(engine_rows(res["engine"])),
        ]
    if "gpu_pool" in res:
        g = res["gpu_pool"]
        for value in [p for p in g.get("policies") or {"park": {}} if p.startswith("park")]:
            parts += [
                "",
                f"GPU POOL ({g.get('models')} models on {g.get('gpus')} GPUs, trace {g.get('trace')}, load "
                f"{g.get('load_seconds')} s, scaleToZeroAfter {g.get('scale_to_zero_after')}; value = {value}, "
                "baseline = idle-timer)",
                render(gpu_pool_rows(g, value)),
            ]
    if "routing" in res:
        from bench.routing import rows as routing_rows

        parts += [
            "",
            "ROUTING (multi-turn chat trace, 2 real vLLM replicas with prefix caching, open loop)",
            *routing_rows(res["routing"]),
        ]
    if "adapters" in res:
        from bench.adapters import rows as adapters_rows

        parts += [
            "",
            "LORA ADAPTERS (2 real vLLM replicas, tiny adapters loaded at run time by our gateway; docs/lora.md)",
            *adapters_rows(res["adapters"]),
        ]
    return "\n".join(parts)
