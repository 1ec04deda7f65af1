"""Request checks. Each failure names the field and, where there is a set, the allowed values."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .adapters import LoadedAdapter
from .config import Limits
from .formats.errors import InvalidArgument, LimitExceeded
from .values import GenerateRequest, ResolvedSampling, Sampling

_ROLES = ("system", "user", "assistant")


def _finite(value: float, field: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{field} must be a finite number, got {value}", field=field)
    return value


# The sampling fields a model's generation_config.json may default (vLLM's own reading of it).
MODEL_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


def resolve_sampling(
    s: Sampling, limits: Limits, model_defaults: Mapping[str, Any] | None = None
) -> ResolvedSampling:
    """Fill defaults and check ranges: what the request gives, else the model's own defaults
    (``model_defaults``: its generation_config.json, as ``vllm serve`` applies them), else
    neutral ones. ``seed`` is drawn here when the client gave none."""
    if model_defaults:
        given = {k: v for k in MODEL_DEFAULTS if (v := model_defaults.get(k)) is not None}
        s = replace(s, **{k: v for k, v in given.items() if getattr(s, k) is None})
    max_tokens = limits.default_max_tokens if s.max_tokens is None else s.max_tokens
    if max_tokens <= 0:
        raise InvalidArgument(
            f"sampling.max_tokens must be > 0, got {max_tokens}", field="sampling.max_tokens"
        )
    if max_tokens > limits.max_tokens_cap:
        raise LimitExceeded(
            f"sampling.max_tokens {max_tokens} exceeds the server limit {limits.max_tokens_cap}",
            field="sampling.max_tokens",
        )
    temperature = _finite(1.0 if s.temperature is None else s.temperature, "sampling.temperature")
    if temperature < 0:
        raise InvalidArgument(
            f"sampling.temperature must be >= 0, got {temperature}", field="sampling.temperature"
        )
    top_p = _finite(1.0 if s.top_p is None else s.top_p, "sampling.top_p")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgument(
            f"sampling.top_p must be in (0, 1], got {top_p}", field="sampling.top_p"
        )
    top_k = 0 if s.top_k is None else s.top_k
    if top_k < -1:
        raise InvalidArgument(
            f"sampling.top_k must be -1, 0 (off) or positive, got {top_k}", field="sampling.top_k"
        )
    n = 1 if s.n is None else s.n
    if n < 1:
        raise InvalidArgument(f"sampling.n must be >= 1, got {n}", field="sampling.n")
    if n > limits.max_n:
        raise LimitExceeded(
            f"sampling.n {n} exceeds the server limit {limits.max_n}", field="sampling.n"
        )
    if n > 1 and temperature == 0:
        raise InvalidArgument(
            "sampling.n > 1 needs sampling.temperature > 0 (greedy samples would be identical)",
            field="sampling.n",
        )
    rep = _finite(
        1.0 if s.repetition_penalty is None else s.repetition_penalty, "sampling.repetition_penalty"
    )
    if rep <= 0:
        raise InvalidArgument(
            f"sampling.repetition_penalty must be > 0, got {rep}",
            field="sampling.repetition_penalty",
        )
    if len(s.stop) > limits.max_stop_strings:
        raise LimitExceeded(
            f"sampling.stop has {len(s.stop)} strings; the limit is {limits.max_stop_strings}",
            field="sampling.stop",
        )
    if any(not x for x in s.stop):
        raise InvalidArgument("sampling.stop strings must be non-empty", field="sampling.stop")
    if s.logprobs is not None and not 0 <= s.logprobs <= limits.max_logprobs:
        raise InvalidArgument(
            f"sampling.logprobs must be in [0, {limits.max_logprobs}], got {s.logprobs}",
            field="sampling.logprobs",
        )
    seed = secrets.randbits(31) if s.seed is None else s.seed
    if seed >= 2**63:
        raise InvalidArgument("sampling.seed must be < 2^63", field="sampling.seed")
    return ResolvedSampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=s.stop,
        n=n,
        repetition_penalty=rep,
        logprobs=s.logprobs,
        structured=s.structured,
        ignore_eos=s.ignore_eos,
    )


def check_input(req: GenerateRequest, limits: Limits) -> None:
    """Exactly one of prompt / chat, non-empty, with known roles."""
    if req.prompt is None and req.chat is None:
        raise InvalidArgument("one of prompt or chat is required", field="prompt")
    if req.prompt is not None and not req.prompt.strip():
        raise InvalidArgument("prompt is empty", field="prompt")
    if req.chat is not None:
        if not req.chat:
            raise InvalidArgument("chat has no messages", field="chat.messages")
        if len(req.chat) > limits.max_chat_messages:
            raise LimitExceeded(
                f"chat has {len(req.chat)} messages; the limit is {limits.max_chat_messages}",
                field="chat.messages",
            )
        for i, turn in enumerate(req.chat):
            if turn.role not in _ROLES:
                raise InvalidArgument(
                    f"chat.messages[{i}].role {turn.role!r} is not one of: {', '.join(_ROLES)}",
                    field=f"chat.messages[{i}].role",
                )
        if not any(t.role == "user" for t in req.chat):
            raise InvalidArgument("chat needs at least one user message", field="chat.messages")


def _tags_of(adapter: LoadedAdapter) -> tuple[str, ...]:
    return adapter.conditioning.tags if adapter.conditioning else ()


def _who(adapter: LoadedAdapter) -> str:
    return f"adapter '{adapter.name}@v{adapter.version}'" if adapter.name else "the base model"


def check_feedback(req: GenerateRequest, adapter: LoadedAdapter, limits: Limits) -> None:
    """``feedback`` and ``feedback_mix`` tags must be in the serving adapter's vocabulary."""
    tags = _tags_of(adapter)
    allowed = ", ".join(repr(t) for t in tags) if tags else "none (it has no feedback tags)"
    if req.feedback and req.feedback not in tags:
        raise InvalidArgument(
            f"unknown feedback tag {req.feedback!r}; {_who(adapter)} accepts: {allowed}",
            field="feedback",
        )
    if req.feedback and req.feedback_mix:
        raise InvalidArgument("give feedback or feedback_mix, not both", field="feedback_mix")
    if len(req.feedback_mix) > limits.max_feedback_mix:
        raise LimitExceeded(
            f"feedback_mix has {len(req.feedback_mix)} tags; the limit is "
            f"{limits.max_feedback_mix}",
            field="feedback_mix",
        )
    for tag, weight in req.feedback_mix:
        if tag not in tags:
            raise InvalidArgument(
                f"unknown feedback tag {tag!r} in feedback_mix; {_who(adapter)} accepts: {allowed}",
                field="feedback_mix",
            )
        _finite(weight, f"feedback_mix[{tag!r}]")
    if req.feedback_mix:
        if sum(w for _, w in req.feedback_mix) <= 0:
            raise InvalidArgument(
                "feedback_mix weights must sum to > 0 (e.g. 1.5 and -0.5)", field="feedback_mix"
            )
        if (req.sampling.n or 1) != 1:
            raise InvalidArgument(
                "feedback_mix serves n = 1; send separate requests", field="sampling.n"
            )
        if (req.sampling.repetition_penalty or 1.0) != 1.0:
            raise InvalidArgument(
                "sampling.repetition_penalty is not supported with feedback_mix (it depends on "
                "each condition's prompt and would break the shared sampling)",
                field="sampling.repetition_penalty",
            )


def check_attributes(req: GenerateRequest, adapter: LoadedAdapter, limits: Limits) -> None:
    """Attribute names must be the adapter's; weights finite and within the configured bound."""
    if len(req.attributes) > limits.max_attributes:
        raise LimitExceeded(
            f"attributes has {len(req.attributes)} entries; the limit is {limits.max_attributes}",
            field="attributes",
        )
    valid = adapter.attributes
    allowed = ", ".join(repr(a) for a in valid) if valid else "none (it has no steering heads)"
    for name, weight in req.attributes:
        if name not in valid:
            raise InvalidArgument(
                f"unknown attribute {name!r}; {_who(adapter)} accepts: {allowed}",
                field="attributes",
            )
        _finite(weight, f"attributes[{name!r}]")
        if abs(weight) > limits.max_attribute_weight:
            raise InvalidArgument(
                f"attributes[{name!r}] = {weight} is outside "
                f"[-{limits.max_attribute_weight}, {limits.max_attribute_weight}]",
                field="attributes",
            )
