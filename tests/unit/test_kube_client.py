"""modelservice.kube against a scripted API server (aiohttp on 127.0.0.1): the watch protocol's awkward cases and the
credentials that change under a running process. The real API server is exercised by tests/integration; these are
the cases it cannot be made to produce on demand (a 1 MiB event line, a drop mid-line, a token rotated now).

Nothing here waits on the wall clock: the server answers from a script, token ages are judged on injected clocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import aiohttp
import pytest
import yaml
from aiohttp import web

from modelservice.kube import ApiError, Credentials, CredentialsError, Kube, TokenSource, WatchExpired, load_credentials

PODS = "/api/v1/namespaces/ns/pods"


def pod(name: str, rv: int, **annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv), "annotations": annotations}}


def line(event_type: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": event_type, "object": obj}).encode() + b"\n"


class Drop:
    """Script step: cut the connection here (an API server restart)."""


class Hold:
    """Script step: keep the stream open with nothing more to say (a quiet cluster), until the client leaves."""


class FakeApiServer:
    """Answers LISTs from `lists` and watches from `watches`, in order; records every request it saw.

    A watch script is either an int (answer with that HTTP status) or a list of steps: bytes are written as they are
    (several lines at once, or half a line), Drop cuts the connection, Hold keeps it open; a script that runs out
    ends the watch as the API server does at timeoutSeconds."""

    def __init__(self) -> None:
        self.lists: list[dict[str, Any]] = []
        self.watches: list[Any] = []
        self.requests: list[web.BaseRequest] = []
        self.reject: set[str] = set()  # bearer tokens answered with 401
        self.url = ""
        self._runner: Optional[web.AppRunner] = None

    def auth(self, request: web.BaseRequest) -> str:
        return request.headers.get("Authorization", "")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests.append(request)
        if self.auth(request).removeprefix("Bearer ") in self.reject:
            return web.json_response(
                {"kind": "Status", "code": 401, "reason": "Unauthorized", "message": "Unauthorized"}, status=401
            )
        if request.query.get("watch") != "1":
            body = self.lists.pop(0) if self.lists else {"metadata": {"resourceVersion": "1"}, "items": []}
            return web.json_response(body)
        script = self.watches.pop(0) if self.watches else [Hold()]
        if isinstance(script, int):
            return web.json_response({"kind": "Status", "code": script, "message": f"scripted {script}"}, status=script)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        for step in script:
            if isinstance(step, Drop):
                assert request.transport is not None
                request.transport.abort()
                return resp
            if isinstance(step, Hold):
                await asyncio.Event().wait()  # until the client disconnects (the handler is cancelled)
            await resp.write(step)
        await resp.write_eof()
        return resp

    async def __aenter__(self) -> "FakeApiServer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def watch_requests(self) -> list[web.BaseRequest]:
        return [r for r in self.requests if r.query.get("watch") == "1"]


async def served(scenario: Callable[[FakeApiServer], Any]) -> Any:
    """The scenario against a fresh scripted apiserver, stopped after it."""
    async with FakeApiServer() as server:
        return await scenario(server)


async def take(events: AsyncIterator[tuple[str, dict[str, Any]]], n: int) -> list[tuple[str, str]]:
    """The next n events as (type, name or resourceVersion)."""
    out = []
    async for event_type, obj in events:
        meta = obj.get("metadata", {})
        out.append((event_type, meta.get("name") or meta.get("resourceVersion", "")))
        if len(out) == n:
            return out
    raise AssertionError(f"the watch ended after {out}")


def client(server: FakeApiServer, **kw: Any) -> Kube:
    kube = Kube(Credentials(server=server.url, token=kw.pop("token", None)), **kw)
    kube.retry_delay = 0  # the resumption after a drop is what is tested, not its pause
    return kube


# ---- the watch protocol -------------------------------------------------------------------------------------------


async def test_watch_line_larger_than_aiohttp_line_limit_arrives_whole() -> None:
    """aiohttp's readline refuses lines past its 64 KiB buffer; a watch event holds a whole object (a pod with a
    large annotation). The line comes in many chunks, with the next event in the same write as its end."""
    big = "x" * (1024 * 1024)

    async def scenario(server: FakeApiServer) -> None:
        raw = line("MODIFIED", pod("big", 3, blob=big)) + line("MODIFIED", pod("small", 4))
        server.watches = [[raw[:1000], raw[1000:500_000], raw[500_000:]]]
        kube = client(server)
        events = kube.watch(PODS)
        assert await take(events, 4) == [("LISTING", ""), ("SYNCED", ""), ("MODIFIED", "big"), ("MODIFIED", "small")]
        await events.aclose()
        await kube.close()

    await served(scenario)

    # The object itself, intact (not only its name).
    async def whole(server: FakeApiServer) -> dict[str, Any]:
        server.watches = [[line("MODIFIED", pod("big", 3, blob=big))]]
        kube = client(server)
        async for _, obj in kube.watch_once(PODS, "1"):
            await kube.close()
            return obj
        raise AssertionError("no event")

    assert (await served(whole))["metadata"]["annotations"]["blob"] == big


async def test_bookmarks_move_the_resume_point_and_are_not_reported() -> None:
    async def scenario(server: FakeApiServer) -> None:
        server.lists = [{"metadata": {"resourceVersion": "10"}, "items": [pod("a", 9)]}]
        server.watches = [
            [line("BOOKMARK", {"metadata": {"resourceVersion": "50"}})],  # then the server times out
            [line("ADDED", pod("b", 51))],
        ]
        kube = client(server)
        events = kube.watch(PODS, label_selector="app=x", timeout_seconds=7)
        assert await take(events, 4) == [("LISTING", ""), ("ADDED", "a"), ("SYNCED", ""), ("ADDED", "b")]
        await events.aclose()
        await kube.close()
        first, second = server.watch_requests()[:2]
        assert first.query["resourceVersion"] == "10" and second.query["resourceVersion"] == "50"
        assert first.query["allowWatchBookmarks"] == "true" and first.query["timeoutSeconds"] == "7"
        assert first.query["labelSelector"] == "app=x"
        assert len([r for r in server.requests if "watch" not in r.query]) == 1  # resumed, not relisted

    await served(scenario)


async def test_watch_once_reports_bookmarks() -> None:
    """The harness's node agent tracks the resourceVersion itself: it needs the BOOKMARKs."""

    async def scenario(server: FakeApiServer) -> list[tuple[str, str]]:
        server.watches = [[line("BOOKMARK", {"metadata": {"resourceVersion": "50"}}), line("DELETED", pod("a", 51))]]
        kube = client(server)
        seen = [(t, o["metadata"]["resourceVersion"]) async for t, o in kube.watch_once(PODS, "10")]
        await kube.close()
        return seen

    assert await served(scenario) == [("BOOKMARK", "50"), ("DELETED", "51")]


@pytest.mark.parametrize("how", ["ERROR event", "HTTP status"])
async def test_410_gone_mid_watch_relists(how: str) -> None:
    async def scenario(server: FakeApiServer) -> None:
        server.lists = [
            {"metadata": {"resourceVersion": "10"}, "items": [pod("a", 9)]},
            {"metadata": {"resourceVersion": "90"}, "items": [pod("b", 80)]},
        ]
        gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 10 (60)"}
        server.watches = [
            [line("MODIFIED", pod("a", 11)), line("ERROR", gone)] if how == "ERROR event" else 410,
            [line("ADDED", pod("c", 91))],
        ]
        kube = client(server)
        events = kube.watch(PODS)
        expected = [("LISTING", ""), ("ADDED", "a"), ("SYNCED", "")]
        expected += [("MODIFIED", "a")] if how == "ERROR event" else []
        expected += [("LISTING", ""), ("ADDED", "b"), ("SYNCED", ""), ("ADDED", "c")]
        assert await take(events, len(expected)) == expected
        await events.aclose()
        await kube.close()
        assert server.watch_requests()[-1].query["resourceVersion"] == "90"  # watching from the new list

    await served(scenario)


async def test_a_relisting_watch_tells_the_controller() -> None:
    """watching.start: on_synced once, when every watch has listed; on_relist each time one lists again (kopf's
    ModelService watch had the same gap, so the controller relists ModelServices: Controller._relist_soon)."""
    from modelservice import watching

    async def scenario(server: FakeApiServer) -> None:
        gone = line("ERROR", {"kind": "Status", "code": 410})
        server.watches = [[gone], [gone]]  # then the watch holds: a quiet cluster
        kube = client(server)
        synced, relisted = [], asyncio.Event()
        relists: list[int] = []

        def on_relist() -> None:
            relists.append(1)
            if len(relists) == 2:
                relisted.set()

        tasks = watching.start(
            kube, [(PODS, None, lambda event, obj: None)], lambda: synced.append(1), on_relist=on_relist
        )
        await asyncio.wait_for(relisted.wait(), 60)  # a bound on failure only; it comes at once
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kube.close()
        assert (len(synced), len(relists)) == (1, 2)
        assert len([r for r in server.requests if "watch" not in r.query]) == 3  # the first list and two relists

    await served(scenario)


async def test_watch_once_raises_watch_expired_on_410() -> None:
    async def scenario(server: FakeApiServer) -> None:
        server.watches = [[line("ERROR", {"kind": "Status", "code": 410})]]
        kube = client(server)
        with pytest.raises(WatchExpired):
            async for _ in kube.watch_once(PODS, "10"):
                pass
        await kube.close()

    await served(scenario)


async def test_other_error_events_are_raised_with_their_status() -> None:
    """An ERROR that is not 410 is the server refusing the watch (e.g. 500 from an etcd failure): the caller's
    backoff decides (watching.keep_watching), not a tight loop here."""

    async def scenario(server: FakeApiServer) -> None:
        server.watches = [[line("ERROR", {"kind": "Status", "code": 500, "message": "etcdserver: request timed out"})]]
        kube = client(server)
        events = kube.watch(PODS)
        assert await take(events, 2) == [("LISTING", ""), ("SYNCED", "")]
        with pytest.raises(ApiError) as e:
            await events.__anext__()
        assert e.value.status == 500 and "etcdserver" in e.value.message
        await kube.close()

    await served(scenario)


async def test_forbidden_watch_is_raised() -> None:
    async def scenario(server: FakeApiServer) -> None:
        server.watches = [403]
        kube = client(server)
        events = kube.watch(PODS)
        await take(events, 2)
        with pytest.raises(ApiError) as e:
            await events.__anext__()
        assert e.value.status == 403
        await kube.close()

    await served(scenario)


async def test_connection_drop_resumes_from_the_last_complete_event() -> None:
    """The server goes away halfway through a line: that half is not an event, and the watch resumes from the
    resourceVersion of the last whole one, without a relist."""

    async def scenario(server: FakeApiServer) -> None:
        server.lists = [{"metadata": {"resourceVersion": "10"}, "items": []}]
        half = line("MODIFIED", pod("b", 13))
        server.watches = [[line("ADDED", pod("a", 12)) + half[:20], Drop()], [half]]
        alive: list[int] = []
        kube = client(server)
        events = kube.watch(PODS, on_alive=lambda: alive.append(1))
        assert await take(events, 4) == [("LISTING", ""), ("SYNCED", ""), ("ADDED", "a"), ("MODIFIED", "b")]
        await events.aclose()
        await kube.close()
        assert [r.query["resourceVersion"] for r in server.watch_requests()] == ["10", "12"]
        assert len(server.requests) == 3  # one LIST, two watches
        # list, each connect and each event said "the API server answers" (liveness reads this)
        assert len(alive) == 1 + 2 + 2

    await served(scenario)


async def test_the_watch_timeout_is_the_clients_default() -> None:
    """The operator sets it from --watch-dead-after: each resumption is a liveness signal on a quiet cluster."""

    async def scenario(server: FakeApiServer) -> None:
        server.watches = [[], [line("ADDED", pod("x", 2))]]  # the first ends at its timeout, quietly
        kube = client(server, watch_timeout=3)
        events = kube.watch(PODS)
        assert await take(events, 3) == [("LISTING", ""), ("SYNCED", ""), ("ADDED", "x")]
        await events.aclose()
        await kube.close()
        assert [r.query["timeoutSeconds"] for r in server.watch_requests()] == ["3", "3"]

    await served(scenario)


async def test_pages_follow_the_continue_token() -> None:
    async def scenario(server: FakeApiServer) -> None:
        server.lists = [
            {"metadata": {"resourceVersion": "5", "continue": "c1"}, "items": [pod("a", 1)]},
            {"metadata": {"resourceVersion": "5"}, "items": [pod("b", 2)]},
        ]
        kube = client(server)
        names = [i["metadata"]["name"] async for p in kube.pages(PODS, limit=1) for i in p["items"]]
        await kube.close()
        assert names == ["a", "b"]
        assert [(r.query["limit"], r.query.get("continue")) for r in server.requests] == [("1", None), ("1", "c1")]

    await served(scenario)


# ---- credentials that change ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.wall = datetime(2030, 1, 1, tzinfo=timezone.utc)

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.wall += timedelta(seconds=seconds)


def tokens_seen(server: FakeApiServer) -> list[str]:
    return [server.auth(r).removeprefix("Bearer ") for r in server.requests]


async def test_token_file_is_read_again_after_its_ttl_and_at_once_after_a_401(tmp_path: Path) -> None:
    """Projected service-account tokens rotate (kubelet rewrites the file): a token read once would be refused
    the day it expires."""
    token_file = tmp_path / "token"
    token_file.write_text("one\n")
    clock = Clock()

    async def scenario(server: FakeApiServer) -> None:
        creds = Credentials(server=server.url, token_file=str(token_file))
        kube = Kube(creds, tokens=TokenSource(creds, clock=lambda: clock.t))
        await kube.get("/version")
        token_file.write_text("two\n")
        clock.advance(59)
        await kube.get("/version")  # within the TTL: not read again
        clock.advance(1)
        await kube.get("/version")
        token_file.write_text("three\n")
        server.reject.add("two")  # revoked before our TTL ran out: the 401 makes us read again, and retry once
        assert await kube.get("/version") == {"metadata": {"resourceVersion": "1"}, "items": []}
        await kube.close()
        assert tokens_seen(server) == ["one", "one", "two", "two", "three"]

    await served(scenario)


async def test_a_static_token_refused_is_an_error_not_a_retry() -> None:
    async def scenario(server: FakeApiServer) -> None:
        server.reject.add("fixed")
        kube = client(server, token="fixed")
        with pytest.raises(ApiError) as e:
            await kube.get("/version")
        await kube.close()
        assert e.value.status == 401 and len(server.requests) == 1

    await served(scenario)


PLUGIN = textwrap.dedent("""\
    #!{python}
    # A kubeconfig exec credential plugin: a new token each run (tok-1, tok-2, ...), valid for $TTL seconds from
    # the time the test's clock gives in $NOW. It records what the client asked for.
    import json, os, sys
    state = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")
    runs = (int(open(state).read()) if os.path.exists(state) else 0) + 1
    open(state, "w").write(str(runs))
    info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
    open(state + ".info", "w").write(json.dumps({{"info": info, "args": sys.argv[1:], "greeting": os.environ.get("GREETING")}}))
    if os.environ.get("FAIL"):
        sys.exit("the identity provider said no")
    status = {{"token": "tok-%d" % runs}}
    if os.environ.get("TTL"):
        import datetime
        now = datetime.datetime.fromisoformat(open(os.path.join(os.path.dirname(state), "now")).read())
        status["expirationTimestamp"] = (now + datetime.timedelta(seconds=int(os.environ["TTL"]))).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}}))
""")


def exec_kubeconfig(tmp_path: Path, server: str, api_version: str, **env: str) -> Path:
    plugin = tmp_path / "bin" / "get-token"
    plugin.parent.mkdir(exist_ok=True)
    plugin.write_text(PLUGIN.format(python=sys.executable))
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "cloud",
        "contexts": [{"name": "cloud", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [
            {
                "name": "u",
                "user": {
                    "exec": {
                        "apiVersion": api_version,
                        "command": "./bin/get-token",
                        "args": ["--cluster", "c"],
                        "env": [{"name": "GREETING", "value": "hi"}]
                        + [{"name": k, "value": v} for k, v in env.items()],
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return path


def plugin_runs(tmp_path: Path) -> int:
    return int((tmp_path / "bin" / "runs").read_text())


@pytest.mark.parametrize("api_version", ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"])
async def test_exec_plugin_token_is_fetched_again_when_it_expires(tmp_path: Path, api_version: str) -> None:
    clock = Clock()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "now").write_text(clock.wall.isoformat())

    async def scenario(server: FakeApiServer) -> None:
        creds = load_credentials(str(exec_kubeconfig(tmp_path, server.url, api_version, TTL="600")))
        assert creds.default_namespace == "team-a"
        tokens = TokenSource(creds, now=lambda: clock.wall)
        kube = Kube(creds, tokens=tokens)
        await kube.get("/version")
        clock.advance(500)
        await kube.get("/version")  # still valid: the plugin is not run again
        assert plugin_runs(tmp_path) == 1
        clock.advance(95)  # within EXPIRY_SKEW of the expirationTimestamp: fetched before it is refused
        (tmp_path / "bin" / "now").write_text(clock.wall.isoformat())
        await kube.get("/version")
        assert tokens.expiration == datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=595 + 600)
        await kube.close()
        assert tokens_seen(server) == ["tok-1", "tok-1", "tok-2"]
        asked = json.loads((tmp_path / "bin" / "runs.info").read_text())
        assert asked == {
            "info": {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}},
            "args": ["--cluster", "c"],
            "greeting": "hi",
        }

    await served(scenario)


async def test_exec_plugin_is_run_once_for_many_401s(tmp_path: Path) -> None:
    """A token revoked early (no expirationTimestamp, or a clock skew): every request in flight gets a 401; the
    plugin runs once and each request is retried with the new token."""

    async def scenario(server: FakeApiServer) -> None:
        creds = load_credentials(str(exec_kubeconfig(tmp_path, server.url, "client.authentication.k8s.io/v1")))
        kube = Kube(creds)
        await asyncio.gather(*(kube.get("/version") for _ in range(3)))  # the first requests: one run between them
        assert plugin_runs(tmp_path) == 1
        server.reject.add("tok-1")
        await asyncio.gather(*(kube.get("/version") for _ in range(5)))
        await kube.close()
        assert plugin_runs(tmp_path) == 2
        assert tokens_seen(server).count("tok-2") == 5 and tokens_seen(server).count("tok-1") == 3 + 5

    await served(scenario)


async def test_exec_plugin_failure_names_the_plugin_and_its_words(tmp_path: Path) -> None:
    async def scenario(server: FakeApiServer) -> None:
        creds = load_credentials(
            str(exec_kubeconfig(tmp_path, server.url, "client.authentication.k8s.io/v1", FAIL="1"))
        )
        kube = Kube(creds)
        with pytest.raises(CredentialsError, match=r"get-token.*exited with 1: the identity provider said no"):
            await kube.get("/version")
        await kube.close()
        assert server.requests == []

    await served(scenario)


async def test_exec_plugin_of_an_unsupported_api_version_is_refused_with_the_supported_ones(tmp_path: Path) -> None:
    creds = load_credentials(
        str(exec_kubeconfig(tmp_path, "http://127.0.0.1:1", "client.authentication.k8s.io/v1alpha1"))
    )
    with pytest.raises(CredentialsError, match="v1alpha1.*not supported.*client.authentication.k8s.io/v1,"):
        await TokenSource(creds).get()


# ---- loading credentials ----------------------------------------------------------------------------------------


def test_kubeconfig_files_merge_in_order_and_paths_are_relative_to_their_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "config").write_text(
        yaml.safe_dump(
            {
                "current-context": "dev",
                "contexts": [{"name": "dev", "context": {"cluster": "k", "user": "me"}}],
                "clusters": [
                    {"name": "k", "cluster": {"server": "https://k:6443/", "certificate-authority": "ca.crt"}}
                ],
            }
        )
    )
    (tmp_path / "b" / "config").write_text(
        yaml.safe_dump(
            {
                "current-context": "other",
                "clusters": [{"name": "k", "cluster": {"server": "https://shadowed"}}],
                "users": [
                    {
                        "name": "me",
                        "user": {"tokenFile": "token", "client-certificate": "me.crt", "client-key": "me.key"},
                    }
                ],
            }
        )
    )
    creds = load_credentials(os.pathsep.join([str(tmp_path / "a" / "config"), str(tmp_path / "b" / "config")]))
    assert creds.server == "https://k:6443"
    assert creds.ca_path == str(tmp_path / "a" / "ca.crt")
    assert (creds.token_file, creds.certificate_path) == (str(tmp_path / "b" / "token"), str(tmp_path / "b" / "me.crt"))


def test_in_cluster_credentials_read_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelservice.kube as kube_module

    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "namespace").write_text("modelservice-system")
    monkeypatch.setattr(kube_module, "SA_TOKEN", str(tmp_path / "token"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    creds = load_credentials()
    assert (creds.server, creds.token_file, creds.ca_path, creds.default_namespace) == (
        "https://[fd00::1]:443",
        str(tmp_path / "token"),
        str(tmp_path / "ca.crt"),
        "modelservice-system",
    )
    # A kubeconfig named explicitly wins over the service account.
    with pytest.raises(CredentialsError, match="no current-context"):
        load_credentials(str(tmp_path / "missing"))


def test_auth_provider_users_are_told_to_use_an_exec_plugin(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "g",
                "contexts": [{"name": "g", "context": {"cluster": "k", "user": "gcp"}}],
                "clusters": [{"name": "k", "cluster": {"server": "https://k"}}],
                "users": [{"name": "gcp", "user": {"auth-provider": {"name": "gcp"}}}],
            }
        )
    )
    with pytest.raises(CredentialsError, match="exec plugin"):
        load_credentials(str(path))


async def test_unreachable_server_is_a_client_error() -> None:
    """What watching.keep_watching and the controller catch as 'the API server is away'."""
    kube = Kube(Credentials(server="http://127.0.0.1:1"))
    with pytest.raises(aiohttp.ClientError):
        await kube.get("/version")
    await kube.close()
