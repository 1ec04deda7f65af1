"""Client-side wire conversion: keyword arguments -> request messages, responses -> dataclasses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tiller.protos.tiller.v1 import tiller_pb2 as pb

from .results import (
    AdapterInfo,
    Completion,
    Generation,
    ServerStatus,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
)

_FINISH = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}


_PRIORITY = {"interactive": pb.PRIORITY_INTERACTIVE, "background": pb.PRIORITY_BACKGROUND}


def build_request(
    prompt: str | Sequence[Mapping[str, str]],
    *,
    feedback: str = "",
    feedback_mix: Mapping[str, float] | None = None,
    attributes: Mapping[str, float] | None = None,
    adapter: str = "",
    adapter_version: int | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    n: int | None = None,
    repetition_penalty: float | None = None,
    logprobs: int | None = None,
    ignore_eos: bool = False,
    log: bool | None = None,
    request_id: str = "",
    priority: str = "interactive",
) -> pb.GenerateRequest:
    """A ``GenerateRequest``; ``prompt`` is text or a list of ``{"role", "content"}`` messages."""
    req = pb.GenerateRequest(feedback=feedback, request_id=request_id)
    if isinstance(prompt, str):
        req.prompt = prompt
    else:
        req.chat.SetInParent()
        for m in prompt:
            req.chat.messages.add(role=m["role"], content=m["content"])
    s = req.sampling
    optional: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "n": n,
        "repetition_penalty": repetition_penalty,
        "logprobs": logprobs,
    }
    for name, value in optional.items():
        if value is not None:
            setattr(s, name, value)
    s.stop.extend(stop)
    s.ignore_eos = ignore_eos
    req.feedback_mix.update(feedback_mix or {})
    req.attributes.update(attributes or {})
    if adapter:
        req.adapter.name = adapter
    if adapter_version is not None:
        req.adapter.version = adapter_version
    if log is not None:
        req.log = log
    if priority not in _PRIORITY:
        raise ValueError(f"priority must be one of {', '.join(_PRIORITY)}, got {priority!r}")
    req.priority = _PRIORITY[priority]
    return req


def _logprobs(items: Sequence[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(
            t.token_id,
            t.token,
            t.logprob,
            tuple(TopLogprob(a.token_id, a.token, a.logprob) for a in t.top),
        )
        for t in items
    )


def generation(r: pb.GenerateResponse) -> Generation:
    return Generation(
        request_id=r.request_id,
        completions=tuple(
            Completion(
                index=c.index,
                generation_id=c.generation_id,
                text=c.text,
                token_ids=tuple(c.token_ids),
                finish_reason=_FINISH.get(c.finish_reason) or "stop",
                logprobs=_logprobs(c.logprobs),
            )
            for c in r.completions
        ),
        prompt_tokens=r.usage.prompt_tokens,
        completion_tokens=r.usage.completion_tokens,
        adapter=r.adapter.name,
        adapter_version=r.adapter.version,
        base_model=r.adapter.base_model,
        rendered_prompt=r.rendered_prompt,
        seed=r.seed,
        time_to_first_token_s=r.timings.time_to_first_token_s,
        total_s=r.timings.total_s,
        logged=r.logged,
    )


_NO_USAGE = pb.Usage()  # a chunk's usage before the final one


def chunk(c: pb.GenerateChunk) -> StreamChunk:
    # Called once per streamed token: positional, and no work for absent logprobs.
    final = c.HasField("usage")
    u = c.usage if final else _NO_USAGE
    return StreamChunk(
        c.index, c.generation_id, c.text_delta, tuple(c.token_ids), _FINISH.get(c.finish_reason),
        final, u.prompt_tokens, u.completion_tokens, c.logged,
        _logprobs(c.logprobs) if c.logprobs else (),
    )  # fmt: skip


def adapters(r: pb.ListAdaptersResponse) -> list[AdapterInfo]:
    return [
        AdapterInfo(
            name=a.name,
            base_model=a.base_model,
            active_version=a.active_version,
            versions=tuple(v.version for v in a.versions),
            feedback_tags=tuple(a.feedback_tags),
            attributes=tuple(a.attributes),
            is_default=a.is_default,
        )
        for a in r.adapters
    ]


def status(r: pb.ServerStatus) -> ServerStatus:
    return ServerStatus(
        model=r.model,
        in_flight=r.in_flight,
        engine_unfinished=r.engine_unfinished,
        draining=r.draining,
        version=r.version,
        log_queue_depth=r.log_queue_depth,
        log_written=r.log_written,
        log_lost=r.log_lost,
    )
