"""Internal request/response values. The wire (protobuf) never travels past ``convert.py``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .formats.prompt import ChatTurn


class Finish(Enum):
    NONE = "none"
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class Sampling:
    """Sampling as the client asked; ``None`` = server default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int | None = None
    repetition_penalty: float | None = None
    logprobs: int | None = None  # top alternatives per token; None = no logprobs
    ignore_eos: bool = False  # generate past end-of-sequence up to max_tokens
    # vLLM's structured outputs (exactly one of json, regex, choice, grammar): HTTP API only
    structured: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class AdapterPick:
    name: str = ""
    version: int | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """A generation request after wire decoding, before validation."""

    prompt: str | None = None
    chat: tuple[ChatTurn, ...] | None = None
    sampling: Sampling = field(default_factory=Sampling)
    feedback: str = ""
    feedback_mix: tuple[tuple[str, float], ...] = ()
    attributes: tuple[tuple[str, float], ...] = ()
    adapter: AdapterPick = field(default_factory=AdapterPick)
    log: bool | None = None
    request_id: str = ""
    background: bool = False  # scheduled after every waiting interactive request


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling with every default filled in and validated."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: tuple[str, ...]
    n: int
    repetition_penalty: float
    logprobs: int | None = None
    structured: Mapping[str, Any] | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class ServedBy:
    name: str
    version: int
    base_model: str


@dataclass(frozen=True)
class EngineRequest:
    """What the engine runs: token ids already rendered and checked, plus the LoRA to apply."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: ResolvedSampling
    lora_name: str | None = None
    lora_id: int | None = None
    lora_path: str | None = None
    mix: MixMember | None = None
    steer: Steer | None = None
    priority: int = 0  # vLLM's: lower is scheduled first (background: BACKGROUND_PRIORITY)
    # Deliver output every this many tokens (the first token at once, the last with the end):
    # None = every step. Unary requests need no per-token wake-ups.
    stream_interval: int | None = None


BACKGROUND_PRIORITY = 1  # interactive requests have vLLM's default, 0
UNARY_STREAM_INTERVAL = 16  # tokens per output of a unary request (see EngineRequest)


@dataclass(frozen=True)
class Steer:
    """Attribute steering: λ (in the heads' order) over the heads artifact in ``heads``."""

    heads: str
    weights: tuple[float, ...]


@dataclass(frozen=True)
class MixMember:
    """This engine request is member ``member`` of a feedback-mix group of ``size`` siblings."""

    group: str
    member: int
    size: int
    weight: float


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob under the distribution it was sampled from, with the top
    alternatives (most likely first)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New output of one completion since the previous step."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish: Finish
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked


@dataclass(frozen=True)
class Prepared:
    """A validated request ready for the engine, with what the response must report."""

    request_id: str
    engine_request: EngineRequest
    rendered_prompt: str
    served_by: ServedBy
    generation_ids: tuple[str, ...]
    accepted_at: float
    siblings: tuple[EngineRequest, ...] = ()  # feedback mix: one engine request per tag
    attributes: tuple[tuple[str, float], ...] = ()  # the weights applied (defaults filled in)


@dataclass(frozen=True)
class Timing:
    queue_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class CompletionResult:
    index: int
    generation_id: str
    text: str
    token_ids: tuple[int, ...]
    finish: Finish
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    request_id: str
    completions: tuple[CompletionResult, ...]
    prompt_tokens: int
    completion_tokens: int
    served_by: ServedBy
    timing: Timing
    rendered_prompt: str
    seed: int
    logged: bool = False


@dataclass(frozen=True)
class StreamStart:
    """First event of a stream: who serves it and with which seed."""

    request_id: str
    served_by: ServedBy
    seed: int
    generation_ids: tuple[str, ...]
    rendered_prompt: str


@dataclass(frozen=True)
class StreamEnd:
    """Last event of a stream."""

    prompt_tokens: int
    completion_tokens: int
    timing: Timing
    logged: bool = False


StreamEvent = StreamStart | Delta | StreamEnd
