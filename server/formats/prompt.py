"""Feedback-prefix conditioning: turn (feedback tag, prompt) into what the engine sees.

Pure functions, unit-tested byte for byte. The template comes from the adapter's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import Conditioning


@dataclass(frozen=True)
class ChatTurn:
    """One chat message (role: system, user or assistant)."""

    role: str
    content: str


def render_text(prompt: str, feedback: str, cond: Conditioning) -> str:
    """``template`` with ``{feedback}`` and ``{prompt}`` filled, then the separator.

    The prompt is substituted last, so braces inside it are never interpreted.
    """
    return (
        cond.template.replace("{feedback}", feedback).replace("{prompt}", prompt) + cond.separator
    )


def render_chat(
    turns: tuple[ChatTurn, ...], feedback: str, cond: Conditioning
) -> tuple[ChatTurn, ...]:
    """Condition a chat on ``feedback`` where the manifest says.

    ``prefix``: the last user turn's content is rendered with ``render_text``.
    ``system``: ``system_template`` becomes the system message (before an existing one's text).
    """
    if cond.placement == "system":
        note = cond.system_template.replace("{feedback}", feedback)
        if turns and turns[0].role == "system":
            first = ChatTurn("system", f"{note}\n\n{turns[0].content}")
            return (first, *turns[1:])
        return (ChatTurn("system", note), *turns)
    last_user = max(i for i, t in enumerate(turns) if t.role == "user")
    rendered = ChatTurn("user", render_text(turns[last_user].content, feedback, cond))
    return (*turns[:last_user], rendered, *turns[last_user + 1 :])
