"""Security and limits at the RPC edge, on one real server with mTLS, bearer tokens with roles,
a separate admin port, a Prometheus endpoint and JSON logs."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.certs import Pki, make_pki
from tests.conftest import ServerProc, start_server, stop_server
from tests.ports import wait_announced
from tiller.client import AsyncClient, Client, ClientTls, StreamChunk, TillerClientError
from tiller.client.client import RetryPolicy
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
NO_RETRY = RetryPolicy(attempts=0)


@dataclass
class Secured:
    srv: ServerProc
    pki: Pki
    tokens: dict[str, str]  # name -> value
    admin_target: str
    metrics_url: str

    def tls(self, *, client_cert: bool = True) -> ClientTls:
        p = self.pki
        if client_cert:
            return ClientTls.from_files(str(p.ca), str(p.client_cert), str(p.client_key))
        return ClientTls.from_files(str(p.ca))

    def client(self, token: str | None, *, target: str | None = None, **kw: object) -> Client:
        value = self.tokens[token] if token else None
        return Client(
            target or self.srv.target,
            token=value,
            tls=self.tls(),
            timeout=60,
            retry=NO_RETRY,
            **kw,  # type: ignore[arg-type]
        )


@pytest.fixture(scope="module")
def secured(
    tiny_model: Path, lora_versions: list[Path], tmp_path_factory: pytest.TempPathFactory, server
) -> Iterator[Secured]:
    # `server` (the session one) is requested so that the two never start concurrently.
    work = tmp_path_factory.mktemp("secured")
    pki = make_pki(work / "pki")
    tokens = {n: secrets.token_urlsafe(24) for n in ("app", "other", "reader", "admin")}
    import hashlib

    entries = [
        ("app", ["generate", "feedback"], 2, True),
        ("other", ["generate"], 0, False),
        ("reader", ["feedback"], 0, False),
        ("admin", ["admin"], 0, False),
    ]
    lines = []
    for name, roles, limit, plain in entries:
        secret = (
            f'token = "{tokens[name]}"'
            if plain
            else f'sha256 = "{hashlib.sha256(tokens[name].encode()).hexdigest()}"'
        )
        lines += ["[[tokens]]", f'name = "{name}"', secret, f"roles = {json.dumps(roles)}"]
        lines.append(f"max_concurrent = {limit}")
    token_file = work / "tokens.toml"
    token_file.write_text("\n".join(lines) + "\n")
    creds = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    srv = start_server(
        tiny_model,
        work / "srv",
        "--adapter",
        f"detox={lora_versions[0]}",
        "--log-db",
        str(work / "log.sqlite"),
        "--tokens",
        str(token_file),
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        "--admin-port",
        "0",
        "--adapter-root",
        str(lora_versions[0].parent),
        "--metrics-port",
        "0",
        "--max-prompt-tokens",
        "40",
        "--max-request-seconds",
        "8",
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
        credentials=creds,
    )
    admin_port = wait_announced(srv.proc, srv.logs, "admin", timeout=30)
    metrics_port = wait_announced(srv.proc, srv.logs, "metrics", timeout=30)
    yield Secured(
        srv,
        pki,
        tokens,
        f"127.0.0.1:{admin_port}",
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.logs()[-4000:]


def _err(fn: Callable[[], object]) -> TillerClientError:
    with pytest.raises(TillerClientError) as info:
        fn()
    return info.value


def _code(fn: Callable[[], object]) -> CODE:
    return _err(fn).code


def test_tokens_and_roles(secured: Secured) -> None:
    with secured.client("app") as c:
        assert c.generate("hi", max_tokens=2).completion_tokens > 0
        assert c.adapters()  # any valid token may list
    with secured.client(None) as c:
        assert _code(lambda: c.generate("hi", max_tokens=2)) == CODE.UNAUTHENTICATED
        assert _code(lambda: c.adapters()) == CODE.UNAUTHENTICATED
    tls = secured.tls()
    with Client(secured.srv.target, token="not-a-token", tls=tls, retry=NO_RETRY) as c:
        e = _err(lambda: c.generate("hi", max_tokens=2))
        assert e.code == CODE.UNAUTHENTICATED and "not-a-token" not in e.message
    with secured.client("reader") as c:
        e = _err(lambda: c.generate("hi", max_tokens=2))
        assert e.code == CODE.PERMISSION_DENIED and "'generate'" in e.message
        # feedback is its role: the call gets past the edge to the service
        assert _code(lambda: c.submit_feedback("gen-nope", score=1.0)) == CODE.NOT_FOUND
    with secured.client("other") as c:
        assert _code(lambda: c.submit_feedback("gen-nope", score=1.0)) == CODE.PERMISSION_DENIED


def _admin_call(secured: Secured, target: str, token: str | None) -> grpc.RpcError:
    creds = grpc.ssl_channel_credentials(
        secured.pki.ca.read_bytes(),
        secured.pki.client_key.read_bytes(),
        secured.pki.client_cert.read_bytes(),
    )
    md = (("authorization", f"Bearer {secured.tokens[token]}"),) if token else ()
    with grpc.secure_channel(target, creds) as ch:
        admin = pb_grpc.TillerAdminStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            admin.RollbackAdapter(pb.RollbackAdapterRequest(name="detox"), metadata=md, timeout=10)
    return info.value


def test_admin_is_on_its_own_port_and_needs_the_admin_role(secured: Secured) -> None:
    # Not served on the main port at all, whatever the token.
    assert _admin_call(secured, secured.srv.target, "admin").code() == CODE.UNIMPLEMENTED
    assert _admin_call(secured, secured.admin_target, None).code() == CODE.UNAUTHENTICATED
    assert _admin_call(secured, secured.admin_target, "app").code() == CODE.PERMISSION_DENIED
    # With the admin role the call reaches the adapter table.
    e = _admin_call(secured, secured.admin_target, "admin")
    assert e.code() == CODE.FAILED_PRECONDITION and "no earlier version" in e.details()


def test_load_adapter_only_inside_the_adapter_roots(secured: Secured, tmp_path: Path) -> None:
    creds = grpc.ssl_channel_credentials(
        secured.pki.ca.read_bytes(),
        secured.pki.client_key.read_bytes(),
        secured.pki.client_cert.read_bytes(),
    )
    md = (("authorization", f"Bearer {secured.tokens['admin']}"),)
    with grpc.secure_channel(secured.admin_target, creds) as ch:
        admin = pb_grpc.TillerAdminStub(ch)
        for path in ("/etc", str(tmp_path), "/proc/self/../../etc"):
            with pytest.raises(grpc.RpcError) as info:
                admin.LoadAdapter(pb.LoadAdapterRequest(name="x", path=path), metadata=md)
            assert info.value.code() == CODE.PERMISSION_DENIED, info.value.details()
            assert "outside the adapter roots" in info.value.details()


def test_tls_is_required_and_mtls_needs_a_client_cert(secured: Secured, tmp_path: Path) -> None:
    target = secured.srv.target
    token = secured.tokens["app"]
    with Client(target, token=token, timeout=10, retry=NO_RETRY) as c:  # plaintext
        assert _code(lambda: c.generate("hi", max_tokens=2)) == CODE.UNAVAILABLE
    no_cert = secured.tls(client_cert=False)
    with Client(target, token=token, tls=no_cert, timeout=10, retry=NO_RETRY) as c:
        assert _code(lambda: c.generate("hi", max_tokens=2)) == CODE.UNAVAILABLE
    stranger = make_pki(tmp_path / "other-ca", ca_name="another-ca")
    wrong_ca = ClientTls.from_files(str(stranger.ca))
    with Client(target, token=token, tls=wrong_ca, timeout=10, retry=NO_RETRY) as c:
        assert _code(lambda: c.generate("hi", max_tokens=2)) == CODE.UNAVAILABLE


def test_concurrency_cap_per_token(secured: Secured) -> None:
    started = threading.Barrier(3)
    release = threading.Event()

    def hold() -> None:
        with secured.client("app") as c:
            it = c.stream("hold the line", max_tokens=1990, temperature=0.0, timeout=None)
            next(it)
            started.wait()
            release.wait()
            it.close()  # cancels on the server: frees the permit

    # Cap 2 for 'app'. The holders stream greedily (1990 tokens, longer than the 8 s request
    # cap); the third call is made as soon as both have their first chunk.
    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=60)
        with secured.client("app") as c:
            e = _err(lambda: c.generate("third", max_tokens=2))
        assert e.code == CODE.RESOURCE_EXHAUSTED and "'app'" in e.message
        with secured.client("other") as c:  # other tokens are unaffected
            assert c.generate("meanwhile", max_tokens=2).completion_tokens > 0
    finally:
        release.set()
        for t in threads:
            t.join(timeout=60)
    with secured.client("app") as c:  # permits come back when the RPCs end
        assert c.generate("again", max_tokens=2).completion_tokens > 0


def test_prompt_token_cap_and_request_time_cap(secured: Secured) -> None:
    with secured.client("app") as c:
        e = _err(lambda: c.generate("word " * 60, max_tokens=2))
        assert e.code == CODE.RESOURCE_EXHAUSTED and "server limit is 40" in e.message
    # The cap must not depend on how fast the machine generates: this client stops reading
    # after the first chunk for longer than the 8 s cap, and advertises a 1 KiB stream window
    # with no BDP probing (gRPC would otherwise grow the window until a fast server had sent
    # all 1990 chunks), so HTTP/2 flow control holds the server's stream open until the cap
    # ends the RPC.
    small_window = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))
    with secured.client("app", options=small_window) as c:
        chunks: list[object] = []
        with pytest.raises(TillerClientError) as info:
            for ch in c.stream("go on", max_tokens=1990, temperature=0.0):
                if not chunks:
                    time.sleep(10)
                chunks.append(ch)
        assert info.value.code == CODE.DEADLINE_EXCEEDED
        assert 0 < len(chunks) < 1990  # it was streaming, held back, when the cap ended it
        # ... and the engine request went with it (other tests' cancelled RPCs may still be
        # winding down on a loaded machine: wait for the server to settle, boundedly).
        settle = time.monotonic() + 120
        while c.status().engine_unfinished and time.monotonic() < settle:
            time.sleep(0.05)
        assert c.status().engine_unfinished == 0


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples by (name, labels); every ``tiller_*`` sample carries the one served model name
    as ``model_name``, which is checked here and left out of the key."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    models = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            if s.name.startswith("tiller_"):
                models.add(labels.pop("model_name", ""))
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    assert len(models) == 1 and "" not in models, models
    return out


def test_metrics_count_real_requests(secured: Secured) -> None:
    before = _scrape(secured.metrics_url)
    ok = (("code", "OK"), ("method", "Generate"))
    with secured.client("app") as c:
        for i in range(3):
            c.generate(f"count {i}", max_tokens=4, temperature=0.0)
        g = c.generate("tagged", adapter="detox", feedback="Lowest Toxicity", max_tokens=4)
        list(c.stream("streamed", max_tokens=4))
    with secured.client(None) as c:
        _code(lambda: c.generate("no token", max_tokens=2))
    after = _scrape(secured.metrics_url)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("tiller_requests_total", ok) == 4
    stream_ok = (("code", "OK"), ("method", "GenerateStream"))
    assert delta("tiller_requests_total", stream_ok) == 1
    unauth = (("code", "UNAUTHENTICATED"), ("method", "Generate"))
    assert delta("tiller_requests_total", unauth) == 1
    assert delta("tiller_request_duration_seconds_count", (("method", "Generate"),)) == 5
    assert delta("tiller_stream_first_chunk_seconds_count") == 1
    assert delta("tiller_generated_tokens_total") >= 4 + g.completion_tokens
    assert delta("tiller_generate_requests_by_steering_total", (("kind", "feedback"),)) == 1
    assert delta("tiller_generate_requests_by_steering_total", (("kind", "none"),)) == 4
    assert after[("tiller_adapter_active_version", (("adapter", "detox"),))] == 1
    assert after[("tiller_log_written_total", ())] >= 5
    assert after[("tiller_log_dropped_total", ())] == 0
    for gauge in (
        "tiller_in_flight_requests",
        "tiller_engine_queue_depth",
        "tiller_log_queue_depth",
    ):
        assert (gauge, ()) in after


def test_logs_are_json_and_never_hold_a_token(secured: Secured) -> None:
    with secured.client("app") as c:
        c.generate("log me", max_tokens=2)
    with Client(
        secured.srv.target,
        token="wrong-" + secured.tokens["app"],
        tls=secured.tls(),
        retry=NO_RETRY,
    ) as c:
        _code(lambda: c.generate("no", max_tokens=2))
    text = secured.srv.logs()
    for value in secured.tokens.values():
        assert value not in text
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert {"ts", "level", "logger", "msg"} <= set(records[-1])
    edge = [r for r in records if r["logger"] == "tiller.edge"]
    assert any(r.get("code") == "UNAUTHENTICATED" for r in edge)
    assert any(r.get("token_name") == "app" and r.get("code") == "OK" for r in edge)


# ---------------------------------------------------------------- the HTTP API, same edge


def _http(secured: Secured, *, client_cert: bool = True) -> httpx.Client:
    p = secured.pki
    ctx = ssl.create_default_context(cafile=str(p.ca))
    if client_cert:
        ctx.load_cert_chain(str(p.client_cert), str(p.client_key))
    return httpx.Client(verify=ctx, timeout=60)


def _oa(secured: Secured, token: str | None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{secured.srv.http_port}/v1",
        api_key=secured.tokens[token] if token else "not-a-token",
        http_client=_http(secured),
        max_retries=0,
    )


def _http_status(fn: Callable[[], object]) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    return info.value


def test_http_tokens_roles_and_tls(secured: Secured) -> None:
    url = f"https://127.0.0.1:{secured.srv.http_port}/v1"
    with _http(secured) as h:
        none = h.post(f"{url}/completions", json={"model": "tiny-llama", "prompt": "x"})
    assert none.status_code == 401 and "Bearer" in none.json()["error"]["message"]
    with _oa(secured, None) as oa:
        e = _http_status(lambda: oa.completions.create(model="tiny-llama", prompt="x"))
        assert e.status_code == 401
    with _oa(secured, "reader") as oa:  # feedback only
        e = _http_status(lambda: oa.completions.create(model="tiny-llama", prompt="x"))
        assert e.status_code == 403 and "'generate'" in e.message
        assert oa.models.list().data[0].id == "tiny-llama"  # any valid token
    with _oa(secured, "app") as oa:
        r = oa.completions.create(model="tiny-llama", prompt="hello", max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens > 0
        long = "word " * 60
        e = _http_status(lambda: oa.completions.create(model="tiny-llama", prompt=long))
        assert e.status_code == 413 and "limit is 40" in e.message
    other = secured.tokens["other"]  # generate only
    with _http(secured) as h:
        fb = h.post(
            f"{url}/feedback",
            json={"generation_id": "gen-x", "score": 1.0},
            headers={"authorization": f"Bearer {other}"},
        )
    assert fb.status_code == 403
    with (
        _http(secured, client_cert=False) as h,
        pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
    ):
        h.get(f"{url}/models", headers={"authorization": f"Bearer {other}"}).raise_for_status()


def test_http_concurrency_cap_is_429(secured: Secured) -> None:
    """The 'app' token's cap of 2 counts HTTP requests too: a third gets 429."""
    with _oa(secured, "app") as a, _oa(secured, "app") as b, _oa(secured, "app") as c:
        s1 = a.completions.create(model="tiny-llama", prompt="hold", max_tokens=1990,
                                  temperature=0.0, stream=True)  # fmt: skip
        s2 = b.completions.create(model="tiny-llama", prompt="hold", max_tokens=1990,
                                  temperature=0.0, stream=True)  # fmt: skip
        try:
            next(iter(s1)), next(iter(s2))
            e = _http_status(lambda: c.completions.create(model="tiny-llama", prompt="third"))
            assert e.status_code == 429 and "'app'" in e.message
        finally:
            s1.close()
            s2.close()
        deadline = time.monotonic() + 30  # the server sees the disconnects and frees the permits
        while True:
            try:
                r = c.completions.create(model="tiny-llama", prompt="again", max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "permits were not released"
                time.sleep(0.2)
        assert r.usage is not None and r.usage.completion_tokens > 0


def test_http_requests_are_in_the_metrics(secured: Secured) -> None:
    before = _scrape(secured.metrics_url)
    with _oa(secured, "app") as oa:
        oa.chat.completions.create(
            model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        list(oa.completions.create(model="tiny-llama", prompt="s", max_tokens=3, stream=True))
    with _oa(secured, None) as oa:
        _http_status(lambda: oa.completions.create(model="tiny-llama", prompt="x"))
    after = _scrape(secured.metrics_url)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert delta("tiller_requests_total", (("code", "200"), ("method", "ChatCompletions"))) == 1
    assert delta("tiller_requests_total", (("code", "200"), ("method", "Completions"))) == 1
    assert delta("tiller_requests_total", (("code", "401"), ("method", "Completions"))) == 1
    assert delta("tiller_stream_first_chunk_seconds_count") == 1
    assert delta("tiller_generate_requests_by_steering_total", (("kind", "none"),)) == 2


def test_background_priority_needs_the_admin_role(secured: Secured) -> None:
    with secured.client("app") as c:
        e = _err(lambda: c.generate("learner work", max_tokens=2, priority="background"))
    assert e.code == CODE.PERMISSION_DENIED and "'admin'" in e.message
    with _oa(secured, "app") as oa:
        err = _http_status(
            lambda: oa.completions.create(
                model="tiny-llama", prompt="x", max_tokens=2, extra_body={"priority": "background"}
            )
        )
        assert err.status_code == 403 and "'admin'" in err.message
        ok = oa.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
        assert ok.usage is not None


async def test_sessions_check_token_role_priority_and_permits_per_generation(
    secured: Secured,
) -> None:
    def client(token: str | None) -> AsyncClient:
        value = secured.tokens[token] if token else None
        tls = secured.tls()
        return AsyncClient(secured.srv.target, token=value, tls=tls, timeout=60, multiplex=True)

    async def error(c: AsyncClient, **kw: object) -> TillerClientError:
        with pytest.raises(TillerClientError) as info:
            async for _ in c.stream("x", max_tokens=2, **kw):  # type: ignore[arg-type]
                pass
        return info.value

    # Each refused session must end with its own status: a gRPC client still writing when a
    # bidirectional call ends can read INTERNAL instead (the edge guards against it).
    for _ in range(20):
        async with client(None) as c:
            assert (await error(c)).code == CODE.UNAUTHENTICATED
        async with client("reader") as c:  # feedback only
            assert (await error(c)).code == CODE.PERMISSION_DENIED

    async def when_permits_free(c: AsyncClient) -> list[StreamChunk]:
        """A 2-token stream, retried while 'app' is at its cap (permits of RPCs that ended a
        moment ago, here or in an earlier test, come back asynchronously)."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return [ch async for ch in c.stream("again", max_tokens=2)]
            except TillerClientError as again:
                assert again.code == CODE.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                await asyncio.sleep(0.1)

    async with client("app") as c:
        e = await error(c, priority="background")
        assert e.code == CODE.PERMISSION_DENIED and "'admin'" in e.message
        await when_permits_free(c)
        # cap 2 for 'app': each generation of the session takes a permit
        held = [
            c.stream(f"hold {i}", max_tokens=1990, temperature=0.0, ignore_eos=True)
            for i in range(2)
        ]
        for s in held:
            await anext(s)
        e = await error(c)
        assert e.code == CODE.RESOURCE_EXHAUSTED and "'app'" in e.message
        for s in held:
            await s.aclose()  # cancels those generations: their permits come back
        chunks = await when_permits_free(c)
        assert chunks[-1].final
