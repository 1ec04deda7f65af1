"""A fake OpenAI-compatible judge that misbehaves on command, for the annotator's fault tests.

A real judge cannot be made to send garbage, stall or refuse connections on cue, so this one
does. It serves ``POST /v1/chat/completions`` on one port and ``POST /mode`` (body: the mode
name) on a second, control port, so that the judge's port can be closed (``down``) and opened
again while the control port stays up. Both ports are bound by the server itself (port 0).

In ``healthy`` mode it answers like a real judge reading the shipped templates: a pairwise
prompt gets the letter of the longer response (the same verdict in both orders, with
first-token log-probabilities), a tag prompt gets one of its categories, anything else a short
text. ``reject_structured`` answers 400 to any request carrying ``structured_outputs``, as an
OpenAI-compatible API other than vLLM does, and healthily otherwise.
"""

from __future__ import annotations

import asyncio
import re
import threading
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ENDPOINT_MODES = ("down", "503", "500", "429", "stall", "trickle")
GARBAGE_MODES = (
    "not_json",
    "html",
    "empty",
    "no_choices",
    "empty_choices",
    "no_message",
    "null_content",
    "huge",
    "no_option",
    "bad_request",
)
MODES = ("healthy", "reject_structured", *ENDPOINT_MODES, *GARBAGE_MODES)


def _completion(content: str | None, logprobs: dict[str, float] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": content},
    }
    if logprobs:
        first = max(logprobs, key=lambda t: logprobs[t])
        top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in logprobs.items()]
        choice["logprobs"] = {
            "content": [{"token": first, "logprob": logprobs[first], "top_logprobs": top}]
        }
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": "judge",
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _block(prompt: str, tag: str) -> str | None:
    m = re.search(f"<{tag}>\n(.*?)\n</{tag}>", prompt, re.DOTALL)
    return m.group(1) if m else None


def healthy_answer(prompt: str, want_logprobs: bool) -> dict[str, Any]:
    """What a sensible judge answers to a prompt filled from a shipped template."""
    a, b = _block(prompt, "response_A"), _block(prompt, "response_B")
    if a is not None and b is not None:
        letter = "A" if (len(a), a) >= (len(b), b) else "B"
        other = "B" if letter == "A" else "A"
        return _completion(letter, {letter: -0.1, other: -2.4} if want_logprobs else None)
    cats = re.search(r"Categories: (.*)", prompt)
    response = _block(prompt, "response") or ""
    if cats:
        options = [c.strip() for c in cats.group(1).split(";")]
        return _completion(options[len(response) % len(options)])
    return _completion("Clear and on topic.")


@dataclass
class FakeJudge:
    """Run with ``start()`` / ``stop()``; ``base_url`` is what a judge config points at."""

    mode: str = "healthy"
    requests: list[dict[str, Any]] = field(default_factory=list)  # bodies received, in order
    port: int = 0
    control_port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _api_site: web.TCPSite | None = None
    _api_runner: web.AppRunner | None = None
    _control_runner: web.AppRunner | None = None
    _release: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        prompt = body["messages"][-1]["content"]
        mode = self.mode
        if mode == "down":  # a kept-alive connection from before the outage: reset it
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        if mode == "reject_structured":
            if "structured_outputs" in body:
                msg = "Unrecognized request argument supplied: structured_outputs"
                return web.json_response(
                    {"error": {"message": msg, "type": "invalid_request_error"}}, status=400
                )
            mode = "healthy"
        if mode == "healthy":
            return web.json_response(healthy_answer(prompt, bool(body.get("logprobs"))))
        if mode in ("503", "500", "429"):
            return web.json_response({"error": {"message": f"fake {mode}"}}, status=int(mode))
        if mode == "bad_request":
            msg = "This model's maximum context length is 8 tokens"
            return web.json_response({"error": {"message": msg}}, status=400)
        if mode == "stall":
            assert self._release is not None
            await self._release.wait()
            return web.json_response({"error": {"message": "released"}}, status=503)
        if mode == "trickle":  # headers at once, then a byte a second: never a whole body
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            assert self._release is not None
            while not self._release.is_set():
                await resp.write(b" ")
                await asyncio.sleep(1.0)
            return resp
        if mode == "not_json":
            return web.Response(text='{"choices": [ oops', content_type="application/json")
        if mode == "html":
            return web.Response(
                text="<html><body>Bad gateway</body></html>", content_type="text/html"
            )
        if mode == "empty":
            return web.Response(body=b"", content_type="application/json")
        if mode == "no_choices":
            return web.json_response({"id": "x", "object": "chat.completion"})
        if mode == "empty_choices":
            return web.json_response({"id": "x", "choices": []})
        if mode == "no_message":
            return web.json_response({"choices": [{"index": 0, "finish_reason": "stop"}]})
        if mode == "null_content":
            return web.json_response(_completion(None))
        if mode == "no_option":
            return web.json_response(_completion("I cannot decide between these."))
        if mode == "huge":  # a valid completion, 4 MiB long, streamed
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(b'{"choices": [{"index": 0, "message": {"content": "')
            for _ in range(64):
                await resp.write(b"A" * 65536)
            await resp.write(b'"}}]}')
            return resp
        raise AssertionError(f"unknown mode {mode}")

    async def _set_mode(self, request: web.Request) -> web.Response:
        await self._switch((await request.text()).strip())
        return web.Response(text=self.mode)

    async def _switch(self, mode: str) -> None:
        if mode not in MODES:
            raise web.HTTPBadRequest(text=f"mode must be one of {MODES}")
        assert self._release is not None
        self._release.set()  # stalled requests end
        self._release = asyncio.Event()
        self.mode = mode
        if mode == "down" and self._api_site is not None:
            await self._api_site.stop()  # connections are refused from now on
            self._api_site = None
        if mode != "down" and self._api_site is None:
            await self._open_api()

    async def _open_api(self) -> None:
        assert self._api_runner is not None
        self._api_site = web.TCPSite(self._api_runner, "127.0.0.1", self.port, reuse_address=True)
        await self._api_site.start()
        sock = self._api_site._server.sockets[0]  # type: ignore[union-attr]
        self.port = sock.getsockname()[1]

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        self._release = asyncio.Event()
        api = web.Application(client_max_size=1 << 24)
        api.router.add_post("/v1/chat/completions", self._chat)
        self._api_runner = web.AppRunner(api, handler_cancellation=True)
        await self._api_runner.setup()
        await self._open_api()
        control = web.Application()
        control.router.add_post("/mode", self._set_mode)
        self._control_runner = web.AppRunner(control)
        await self._control_runner.setup()
        site = web.TCPSite(self._control_runner, "127.0.0.1", 0)
        await site.start()
        self.control_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> FakeJudge:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True, name="fake-openai")
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fake judge did not start")
        return self

    def set_mode(self, mode: str) -> None:
        """Switch the mode through the control port, as an outside process would."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.control_port}/mode", data=mode.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.read().decode() == mode

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def close() -> None:
            assert self._release is not None
            self._release.set()
            for runner in (self._api_runner, self._control_runner):
                if runner is not None:
                    await runner.cleanup()

        asyncio.run_coroutine_threadsafe(close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(30)

    def structured_requests(self) -> int:
        return sum("structured_outputs" in r for r in self.requests)

    def __enter__(self) -> FakeJudge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
