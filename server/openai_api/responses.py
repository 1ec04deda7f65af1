"""Response bodies and stream chunks of the OpenAI-compatible API, from the service's values.

Every response carries a ``tiller`` object (an extra field the OpenAI SDK keeps): the request id,
the generation ids to send feedback against, the adapter version served, the seed and whether
the generations are durably logged. Streams send it on their first chunk and, with ``logged``,
on their last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ..values import (
    Delta,
    Finish,
    GenerateResult,
    ServedBy,
    StreamEnd,
    StreamStart,
    TokenLogprob,
)

# JSON has no -inf: a token the sampling distribution excludes gets vLLM's stand-in value.
_NEG_INF = -9999.0
_FINISH = {Finish.STOP: "stop", Finish.LENGTH: "length", Finish.ABORT: "abort"}


def model_name(served: ServedBy) -> str:
    """How ``/v1/models`` names what served a request: the base model or ``name@vN``."""
    return f"{served.name}@v{served.version}" if served.name else served.base_model


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _NEG_INF


def _finish(f: Finish) -> str | None:
    return _FINISH.get(f)


def tiller_info(start: StreamStart | GenerateResult, logged: bool | None) -> dict[str, Any]:
    ids = (
        start.generation_ids
        if isinstance(start, StreamStart)
        else tuple(c.generation_id for c in start.completions)
    )
    info: dict[str, Any] = {
        "request_id": start.request_id,
        "generation_ids": list(ids),
        "adapter": start.served_by.name,
        "adapter_version": start.served_by.version,
        "base_model": start.served_by.base_model,
        "seed": start.seed,
    }
    if logged is not None:
        info["logged"] = logged
    return info


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---------------------------------------------------------------- logprobs


def text_logprobs(items: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The completions API's logprobs: parallel lists, ``text_offset`` in characters."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [_finite(t.logprob) for t in items],
        "top_logprobs": [{a.token: _finite(a.logprob) for a in t.top} for t in items],
        "text_offset": offsets,
    }


def chat_logprobs(items: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat API's logprobs: one entry per token with its bytes and top alternatives."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": _finite(t.logprob),
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {
                        "token": a.token,
                        "logprob": _finite(a.logprob),
                        "bytes": list(a.token.encode()),
                    }
                    for a in t.top
                ],
            }
            for t in items
        ]
    }


# ---------------------------------------------------------------- whole responses


def completion(
    results: Sequence[GenerateResult], created: int, want_logprobs: bool
) -> dict[str, Any]:
    """``text_completion`` for one or several prompts (choices numbered across prompts)."""
    first = results[0]
    choices: list[dict[str, Any]] = []
    for r in results:
        for c in r.completions:
            choices.append(
                {
                    "index": len(choices),
                    "text": c.text,
                    "finish_reason": _finish(c.finish),
                    "logprobs": text_logprobs(c.logprobs) if want_logprobs else None,
                }
            )
    info = tiller_info(first, first.logged)
    if len(results) > 1:
        info["generation_ids"] = [c.generation_id for r in results for c in r.completions]
        info["request_ids"] = [r.request_id for r in results]
        info["logged"] = all(r.logged for r in results)
    return {
        "id": f"cmpl-{first.request_id}",
        "object": "text_completion",
        "created": created,
        "model": model_name(first.served_by),
        "choices": choices,
        "usage": usage(
            sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        ),
        "tiller": info,
    }


def chat(result: GenerateResult, created: int, want_logprobs: bool) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": created,
        "model": model_name(result.served_by),
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": _finish(c.finish),
                "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
            }
            for c in result.completions
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
        "tiller": tiller_info(result, result.logged),
    }


# ---------------------------------------------------------------- streams


class StreamEncoder:
    """One stream's events as SSE chunks (``start`` first, then ``delta_sse``, then ``end``)."""

    def __init__(self, kind: str, created: int, want_logprobs: bool, include_usage: bool) -> None:
        self.chat = kind == "chat"
        self.created = created
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self._start: StreamStart | None = None
        self._id = ""
        self._model = ""
        self._offsets: dict[int, int] = {}
        self._info_pending = False  # completions send the tiller object on their first chunk
        self._prefix = b""  # the envelope up to the choices list, as SSE

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self._model,
            "choices": choices,
        }

    def start(self, event: StreamStart) -> list[dict[str, Any]]:
        self._start = event
        self._id = f"{'chatcmpl' if self.chat else 'cmpl'}-{event.request_id}"
        self._model = model_name(event.served_by)
        envelope = json.dumps(self._chunk([]), separators=(",", ":")).encode()
        self._prefix = b"data: " + envelope.removesuffix(b"]}")  # ends with '"choices":['
        assert envelope.endswith(b'"choices":[]}')
        if not self.chat:
            self._info_pending = True
            return []
        # Chat streams open each choice with the assistant role, as OpenAI's do.
        opening = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            for i in range(len(event.generation_ids))
        ]
        if self.want_logprobs:
            for c in opening:
                c["logprobs"] = None
        body = self._chunk(opening)
        body["tiller"] = tiller_info(event, None)
        return [body]

    def delta_sse(self, d: Delta) -> bytes:
        """One delta as an SSE event. The envelope is encoded once per stream and only the
        choice per event (the hot path: one event per engine step and completion)."""
        assert self._start is not None, "start() first"
        choice = self._choice(d)
        if self._info_pending:
            self._info_pending = False
            body = self._chunk([choice])
            body["tiller"] = tiller_info(self._start, None)
            return sse(body)
        return self._prefix + json.dumps(choice, separators=(",", ":")).encode() + b"]}\n\n"

    def _choice(self, d: Delta) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": d.index, "finish_reason": _finish(d.finish)}
        if self.chat:
            choice["delta"] = {"content": d.text} if d.text else {}
            if self.want_logprobs:
                choice["logprobs"] = chat_logprobs(d.logprobs)
        else:
            choice["text"] = d.text
            offset = self._offsets.get(d.index, 0)
            choice["logprobs"] = text_logprobs(d.logprobs, offset) if self.want_logprobs else None
            self._offsets[d.index] = offset + sum(len(t.token) for t in d.logprobs)
        return choice

    def end(self, event: StreamEnd) -> dict[str, Any]:
        """The last chunk: no choices, the usage (when asked for) and ``tiller.logged``."""
        assert self._start is not None
        body = self._chunk([])
        if self.include_usage:
            body["usage"] = usage(event.prompt_tokens, event.completion_tokens)
        body["tiller"] = tiller_info(self._start, event.logged)
        return body


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
