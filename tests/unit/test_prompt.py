"""The feedback-prefix renderer, byte for byte."""

from __future__ import annotations

import pytest

from tiller.server.formats.manifest import Conditioning, ManifestError
from tiller.server.formats.prompt import ChatTurn, render_chat, render_text

TAGS = ("Lowest Toxicity", "Maximum Toxicity")


def test_alt_default_template_is_feedback_input_prompt_then_separator() -> None:
    cond = Conditioning(tags=TAGS)
    got = render_text("The movie was", "Lowest Toxicity", cond)
    assert got == "Lowest Toxicity input: The movie was<|separator|>"
    assert got.encode() == b"Lowest Toxicity input: The movie was<|separator|>"


def test_custom_template_and_separator() -> None:
    cond = Conditioning(tags=TAGS, template="[{feedback}] {prompt}", separator="\n###\n")
    assert render_text("hi", "Maximum Toxicity", cond) == "[Maximum Toxicity] hi\n###\n"


def test_braces_and_placeholders_in_prompt_are_left_alone() -> None:
    cond = Conditioning(tags=TAGS)
    prompt = "use {feedback} and {prompt} and {0} literally"
    assert render_text(prompt, "Lowest Toxicity", cond) == (
        "Lowest Toxicity input: use {feedback} and {prompt} and {0} literally<|separator|>"
    )


def test_unicode_prompt_is_exact() -> None:
    cond = Conditioning(tags=TAGS, separator="")
    assert render_text("café – ☕", "Lowest Toxicity", cond) == "Lowest Toxicity input: café – ☕"


def test_chat_prefix_renders_the_last_user_turn_only() -> None:
    cond = Conditioning(tags=TAGS)
    turns = (
        ChatTurn("system", "be nice"),
        ChatTurn("user", "first"),
        ChatTurn("assistant", "ok"),
        ChatTurn("user", "second"),
    )
    out = render_chat(turns, "Lowest Toxicity", cond)
    assert out[:3] == turns[:3]
    assert out[3] == ChatTurn("user", "Lowest Toxicity input: second<|separator|>")


def test_chat_system_placement_adds_or_merges_the_system_message() -> None:
    cond = Conditioning(tags=TAGS, placement="system", system_template="Feedback: {feedback}")
    plain = render_chat((ChatTurn("user", "q"),), "Maximum Toxicity", cond)
    assert plain == (ChatTurn("system", "Feedback: Maximum Toxicity"), ChatTurn("user", "q"))
    merged = render_chat((ChatTurn("system", "S"), ChatTurn("user", "q")), "Lowest Toxicity", cond)
    assert merged[0] == ChatTurn("system", "Feedback: Lowest Toxicity\n\nS")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"template": "{prompt} only"},
        {"template": "{feedback} only"},
        {"placement": "middle"},
        {"default_tag": "Unknown"},
    ],
)
def test_bad_conditioning_is_rejected(kwargs: dict[str, str]) -> None:
    with pytest.raises(ManifestError):
        Conditioning(tags=TAGS, **kwargs)  # type: ignore[arg-type]


def test_duplicate_tags_rejected() -> None:
    with pytest.raises(ManifestError, match="duplicates"):
        Conditioning(tags=("a", "a"))
