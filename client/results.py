"""Result types the client returns (plain frozen dataclasses, never protobuf)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's logprob under the distribution it was sampled from (after steering,
    mixing, penalties, temperature, top-k/top-p), with its top alternatives, likeliest first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    index: int
    generation_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop", "length", "abort"
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when asked (``logprobs=k``)


@dataclass(frozen=True)
class Generation:
    """One Generate call. ``text`` is the first sample's; all samples are in ``completions``."""

    request_id: str
    completions: tuple[Completion, ...]
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    adapter_version: int
    base_model: str
    rendered_prompt: str
    seed: int
    time_to_first_token_s: float
    total_s: float
    logged: bool = False  # committed to the server's generation log: ids are durable

    @property
    def text(self) -> str:
        return self.completions[0].text

    @property
    def generation_id(self) -> str:
        return self.completions[0].generation_id


@dataclass(frozen=True)
class FeedbackReceipt:
    feedback_id: str
    duplicate: bool  # the idempotency key was seen before; nothing new was stored


@dataclass(frozen=True, slots=True)  # slots: one is built per streamed token, 40% faster
class StreamChunk:
    index: int
    generation_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    final: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logged: bool = False
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    base_model: str
    active_version: int
    versions: tuple[int, ...]
    feedback_tags: tuple[str, ...]
    attributes: tuple[str, ...]
    is_default: bool


@dataclass(frozen=True)
class ServerStatus:
    model: str
    in_flight: int
    engine_unfinished: int
    draining: bool
    version: str
    log_queue_depth: int = 0
    log_written: int = 0
    log_lost: int = 0
