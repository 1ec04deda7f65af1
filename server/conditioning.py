"""How a checked request becomes engine input: its conditioning rendered into the prompt, the
steering it runs with, and its prompt token ids within the server's and the model's limits.

Pure functions of the request, the resolved adapter and the engine's tokenizer; no state.
"""

from __future__ import annotations

from .adapters import LoadedAdapter
from .config import Limits
from .engine import Engine
from .formats.errors import FailedPrecondition, InvalidArgument, LimitExceeded
from .formats.heads import is_identity, resolve_weights
from .formats.prompt import ChatTurn, render_chat, render_text
from .values import GenerateRequest, Steer

# Clients (the ``tiller`` CLI) look for this text to fall back to a plain prompt.
NO_CHAT_TEMPLATE = "the model has no chat template: send a plain prompt instead"


def render_prompt(
    engine: Engine, req: GenerateRequest, adapter: LoadedAdapter, feedback: str
) -> str:
    """The prompt text for ``req`` conditioned on ``feedback`` (empty: the adapter's default tag,
    or none). Chat requests go through the model's chat template; a template error is the
    request's ``InvalidArgument`` (field ``chat``), as is a model without one."""
    cond = adapter.conditioning
    feedback = feedback or (cond.default_tag if cond else None) or ""
    if req.chat is not None:
        turns: tuple[ChatTurn, ...] = req.chat
        if feedback and cond is not None:
            turns = render_chat(turns, feedback, cond)
        messages = [{"role": t.role, "content": t.content} for t in turns]
        if getattr(engine.tokenizer, "chat_template", "") is None:
            raise InvalidArgument(NO_CHAT_TEMPLATE, field="chat")
        try:
            text = engine.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # templates are model data; their errors are the request's
            raise InvalidArgument(f"chat could not be rendered: {e}", field="chat") from e
        return str(text)
    assert req.prompt is not None
    if feedback and cond is not None:
        return render_text(req.prompt, feedback, cond)
    return req.prompt


def resolve_steer(
    req: GenerateRequest, adapter: LoadedAdapter
) -> tuple[Steer | None, tuple[tuple[str, float], ...]]:
    """The steering to run (None: leave the logits alone) and the weights it applies.

    Without ``attributes`` the heads' default weights apply; default weights that select the
    base head alone cost nothing. Attributes for an adapter without heads: ``FailedPrecondition``.
    """
    heads = adapter.heads
    if heads is None:
        if req.attributes:
            raise FailedPrecondition(
                f"{'adapter ' + repr(adapter.name) if adapter.name else 'the base model'} "
                "lists attributes but ships no steering heads (tiller-heads.json)"
            )
        return None, ()
    assert adapter.path is not None
    weights = resolve_weights(heads, req.attributes)
    applied = tuple(zip(heads.names, weights, strict=True))
    if not req.attributes and is_identity(heads, weights):
        return None, applied
    return Steer(str(adapter.path.resolve()), weights), applied


def prompt_token_ids(
    engine: Engine, limits: Limits, rendered: str, req: GenerateRequest, max_tokens: int
) -> tuple[int, ...]:
    """``rendered`` tokenized (special tokens unless it came from a chat template). Raises
    ``LimitExceeded`` above the server's prompt cap and ``InvalidArgument`` when the prompt plus
    ``max_tokens`` do not fit the model's context."""
    special = req.chat is None  # chat templates carry their own special tokens
    ids = engine.tokenizer.encode(rendered, add_special_tokens=special)
    cap = limits.max_prompt_tokens
    if cap is not None and len(ids) > cap:
        raise LimitExceeded(
            f"prompt is {len(ids)} tokens after conditioning; the server limit is {cap}",
            field="chat" if req.chat is not None else "prompt",
        )
    limit = engine.max_model_len
    if len(ids) >= limit:
        raise InvalidArgument(
            f"prompt is {len(ids)} tokens; the model's context is {limit}",
            field="chat" if req.chat is not None else "prompt",
        )
    if len(ids) + max_tokens > limit:
        raise InvalidArgument(
            f"sampling.max_tokens {max_tokens} + {len(ids)} prompt tokens exceeds "
            f"the context of {limit}; at most {limit - len(ids)} fit",
            field="sampling.max_tokens",
        )
    return tuple(ids)
