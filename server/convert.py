"""Wire <-> internal values. The only server module that imports the generated ``*_pb2``."""

from __future__ import annotations

from pathlib import Path

from tiller.protos.tiller.v1 import tiller_pb2 as pb

from .adapters import LoadedAdapter
from .config import AdapterSource
from .errors import InvalidArgument, NotFound
from .formats.prompt import ChatTurn
from .logrecords import FeedbackInput
from .registry import RegistryRef
from .service import Status
from .values import (
    AdapterPick,
    Delta,
    Finish,
    GenerateRequest,
    GenerateResult,
    Sampling,
    ServedBy,
    StreamEnd,
    StreamStart,
    Timing,
    TokenLogprob,
)

_FINISH = {
    Finish.NONE: pb.FINISH_REASON_UNSPECIFIED,
    Finish.STOP: pb.FINISH_REASON_STOP,
    Finish.LENGTH: pb.FINISH_REASON_LENGTH,
    Finish.ABORT: pb.FINISH_REASON_ABORT,
}


def _opt(msg: object, name: str) -> object | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


def request_from_pb(m: pb.GenerateRequest) -> GenerateRequest:
    s = m.sampling
    sampling = Sampling(
        max_tokens=_opt(s, "max_tokens"),  # type: ignore[arg-type]
        temperature=_opt(s, "temperature"),  # type: ignore[arg-type]
        top_p=_opt(s, "top_p"),  # type: ignore[arg-type]
        top_k=_opt(s, "top_k"),  # type: ignore[arg-type]
        seed=_opt(s, "seed"),  # type: ignore[arg-type]
        stop=tuple(s.stop),
        n=_opt(s, "n"),  # type: ignore[arg-type]
        repetition_penalty=_opt(s, "repetition_penalty"),  # type: ignore[arg-type]
        logprobs=_opt(s, "logprobs"),  # type: ignore[arg-type]
        ignore_eos=s.ignore_eos,
    )
    which = m.WhichOneof("input")
    chat = None
    if which == "chat":
        chat = tuple(ChatTurn(x.role, x.content) for x in m.chat.messages)
    return GenerateRequest(
        prompt=m.prompt if which == "prompt" else None,
        chat=chat,
        sampling=sampling,
        feedback=m.feedback,
        feedback_mix=tuple(sorted(m.feedback_mix.items())),
        attributes=tuple(sorted(m.attributes.items())),
        adapter=AdapterPick(
            m.adapter.name, m.adapter.version if m.adapter.HasField("version") else None
        ),
        log=m.log if m.HasField("log") else None,
        request_id=m.request_id,
        background=m.priority == pb.PRIORITY_BACKGROUND,
    )


def feedback_from_pb(m: pb.SubmitFeedbackRequest) -> FeedbackInput:
    return FeedbackInput(
        generation_id=m.generation_id,
        score=m.score if m.HasField("score") else None,
        tag=m.tag,
        critique=m.critique,
        refinement=m.refinement,
        chosen_id=m.preference.chosen_generation_id,
        rejected_id=m.preference.rejected_generation_id,
        idempotency_key=m.idempotency_key,
        source=m.source,
    )


def feedback_to_pb(feedback_id: str, duplicate: bool) -> pb.SubmitFeedbackResponse:
    return pb.SubmitFeedbackResponse(feedback_id=feedback_id, duplicate=duplicate)


def _served(s: ServedBy) -> pb.AdapterServed:
    return pb.AdapterServed(name=s.name, version=s.version, base_model=s.base_model)


def _timings(t: Timing) -> pb.Timings:
    return pb.Timings(
        queue_s=t.queue_s, time_to_first_token_s=t.time_to_first_token_s, total_s=t.total_s
    )


def _logprobs(items: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=t.token_id,
            token=t.token,
            logprob=t.logprob,
            top=[
                pb.TopLogprob(token_id=a.token_id, token=a.token, logprob=a.logprob) for a in t.top
            ],
        )
        for t in items
    ]


def result_to_pb(r: GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=r.request_id,
        completions=[
            pb.Completion(
                index=c.index,
                generation_id=c.generation_id,
                text=c.text,
                token_ids=c.token_ids,
                finish_reason=_FINISH[c.finish],
                completion_tokens=len(c.token_ids),
                logprobs=_logprobs(c.logprobs),
            )
            for c in r.completions
        ],
        usage=pb.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens),
        adapter=_served(r.served_by),
        timings=_timings(r.timing),
        rendered_prompt=r.rendered_prompt,
        seed=r.seed,
        logged=r.logged,
    )


class ChunkEncoder:
    """Turns one stream's events into ``GenerateChunk`` messages (it remembers the ids)."""

    def __init__(self) -> None:
        self._start: StreamStart | None = None
        self._first = True

    def encode(self, event: StreamStart | Delta | StreamEnd) -> pb.GenerateChunk | None:
        if isinstance(event, StreamStart):
            self._start = event
            return None
        assert self._start is not None
        start = self._start
        if isinstance(event, Delta):
            chunk = pb.GenerateChunk(
                request_id=start.request_id,
                index=event.index,
                generation_id=start.generation_ids[event.index],
                text_delta=event.text,
                token_ids=event.token_ids,
                finish_reason=_FINISH[event.finish],
            )
            if event.logprobs:  # once per token: no empty list when none were asked for
                chunk.logprobs.extend(_logprobs(event.logprobs))
        else:
            chunk = pb.GenerateChunk(
                request_id=start.request_id,
                usage=pb.Usage(
                    prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens
                ),
                timings=_timings(event.timing),
                logged=event.logged,
            )
        if self._first:
            chunk.adapter.CopyFrom(_served(start.served_by))
            chunk.seed = start.seed
            self._first = False
        return chunk


def adapters_to_pb(
    rows: list[tuple[str, int, list[LoadedAdapter], bool]], base_model: str
) -> pb.ListAdaptersResponse:
    out = pb.ListAdaptersResponse()
    for name, active, versions, is_default in rows:
        info = out.adapters.add(
            name=name, base_model=base_model, active_version=active, is_default=is_default
        )
        # The active version describes the name; the newest one if none is active yet.
        top = next((v for v in versions if v.version == active), versions[-1])
        if top.conditioning is not None:
            info.feedback_tags.extend(top.conditioning.tags)
            info.prompt_template = top.conditioning.template
        info.attributes.extend(top.attributes)
        for v in versions:
            info.versions.add(
                version=v.version,
                state="active" if v.version == active else "loaded",
                sha256=(
                    v.manifest.files.get("adapter_model.safetensors", "") if v.manifest else ""
                ),
                created_at=v.manifest.created_at if v.manifest else "",
            )
    return out


def adapter_info(
    rows: list[tuple[str, int, list[LoadedAdapter], bool]], name: str, base_model: str
) -> pb.AdapterInfo:
    for info in adapters_to_pb(rows, base_model).adapters:
        if info.name == name:
            return info
    raise NotFound(f"adapter {name!r} is not loaded", field="name")


def adapter_source(m: pb.LoadAdapterRequest) -> AdapterSource | RegistryRef:
    """A path load or a registry reference; ``InvalidArgument`` naming the missing field."""
    if not m.name:
        raise InvalidArgument("LoadAdapter needs name (the served name)", field="name")
    which = m.WhichOneof("source")
    if which == "registry":
        if m.registry.version < 1:
            raise InvalidArgument(
                "LoadAdapter registry.version must be >= 1", field="registry.version"
            )
        return RegistryRef(m.name, m.registry.name or m.name, m.registry.version)
    if not m.path:
        raise InvalidArgument("LoadAdapter needs a registry reference or a path", field="path")
    return AdapterSource(m.name, Path(m.path))


def status_to_pb(s: Status, model: str, version: str) -> pb.ServerStatus:
    return pb.ServerStatus(
        model=model,
        in_flight=s.in_flight,
        engine_unfinished=s.engine_unfinished,
        draining=s.draining,
        version=version,
        log_queue_depth=s.log_queue_depth,
        log_written=s.log_written,
        log_lost=s.log_lost,
    )
