"""Sampling and steering validation: every rule names its field."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tiller.server.adapters import LoadedAdapter
from tiller.server.config import Limits
from tiller.server.errors import InvalidArgument, LimitExceeded
from tiller.server.formats.manifest import Conditioning, Manifest
from tiller.server.formats.prompt import ChatTurn
from tiller.server.validation import (
    check_attributes,
    check_feedback,
    check_input,
    resolve_sampling,
)
from tiller.server.values import GenerateRequest, Sampling

LIMITS = Limits(
    max_tokens_cap=100, default_max_tokens=64, max_n=4, max_feedback_mix=2, max_attribute_weight=5.0
)
BASE = LoadedAdapter("", 0, None, None, None)
TAGGED = LoadedAdapter(
    "detox",
    2,
    Path("/x"),
    1,
    Manifest(
        name="detox",
        version=2,
        base_model="m",
        conditioning=Conditioning(tags=("Lowest Toxicity", "Maximum Toxicity")),
        attributes=("helpfulness", "verbosity"),
    ),
)


def test_defaults_are_filled() -> None:
    s = resolve_sampling(Sampling(), LIMITS)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.n) == (
        LIMITS.default_max_tokens,
        1.0,
        1.0,
        0,
        1,
    )
    assert 0 <= s.seed < 2**31


def test_limits_reject_a_default_above_the_cap() -> None:
    with pytest.raises(ValueError, match="default_max_tokens"):
        Limits(max_tokens_cap=10, default_max_tokens=20)


def test_given_seed_is_kept() -> None:
    assert resolve_sampling(Sampling(seed=1234), LIMITS).seed == 1234


@pytest.mark.parametrize(
    ("sampling", "error", "field"),
    [
        (Sampling(max_tokens=0), InvalidArgument, "sampling.max_tokens"),
        (Sampling(max_tokens=-3), InvalidArgument, "sampling.max_tokens"),
        (Sampling(max_tokens=101), LimitExceeded, "sampling.max_tokens"),
        (Sampling(temperature=-0.1), InvalidArgument, "sampling.temperature"),
        (Sampling(temperature=math.nan), InvalidArgument, "sampling.temperature"),
        (Sampling(top_p=0.0), InvalidArgument, "sampling.top_p"),
        (Sampling(top_p=1.5), InvalidArgument, "sampling.top_p"),
        (Sampling(top_k=-2), InvalidArgument, "sampling.top_k"),
        (Sampling(n=0), InvalidArgument, "sampling.n"),
        (Sampling(n=5), LimitExceeded, "sampling.n"),
        (Sampling(n=2, temperature=0.0), InvalidArgument, "sampling.n"),
        (Sampling(repetition_penalty=0.0), InvalidArgument, "sampling.repetition_penalty"),
        (Sampling(repetition_penalty=math.inf), InvalidArgument, "sampling.repetition_penalty"),
        (Sampling(stop=("",)), InvalidArgument, "sampling.stop"),
        (Sampling(stop=tuple("x" * (i + 1) for i in range(17))), LimitExceeded, "sampling.stop"),
    ],
)
def test_bad_sampling(sampling: Sampling, error: type[Exception], field: str) -> None:
    with pytest.raises(error) as info:
        resolve_sampling(sampling, LIMITS)
    assert info.value.field == field  # type: ignore[attr-defined]
    assert field.split(".")[-1] in str(info.value)


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (GenerateRequest(), "prompt"),
        (GenerateRequest(prompt="   "), "prompt"),
        (GenerateRequest(chat=()), "chat.messages"),
        (GenerateRequest(chat=(ChatTurn("robot", "x"),)), "chat.messages[0].role"),
        (GenerateRequest(chat=(ChatTurn("system", "x"),)), "chat.messages"),
    ],
)
def test_bad_input(req: GenerateRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_input(req, LIMITS)
    assert info.value.field == field


def test_feedback_tag_on_base_model_lists_no_tags() -> None:
    with pytest.raises(InvalidArgument, match="base model accepts: none") as info:
        check_feedback(GenerateRequest(prompt="x", feedback="Lowest Toxicity"), BASE, LIMITS)
    assert info.value.field == "feedback"


def test_misspelt_tag_lists_the_vocabulary() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_feedback(GenerateRequest(prompt="x", feedback="Lowest Toxcity"), TAGGED, LIMITS)
    msg = str(info.value)
    assert "'Lowest Toxcity'" in msg and "detox@v2" in msg and "'Maximum Toxicity'" in msg


def test_feedback_mix_rules() -> None:
    ok = GenerateRequest(prompt="x", feedback_mix=(("Lowest Toxicity", 1.5),))
    check_feedback(ok, TAGGED, LIMITS)
    with pytest.raises(InvalidArgument, match="feedback_mix"):
        check_feedback(GenerateRequest(prompt="x", feedback_mix=(("nope", 1.0),)), TAGGED, LIMITS)
    with pytest.raises(InvalidArgument, match="finite"):
        check_feedback(
            GenerateRequest(prompt="x", feedback_mix=(("Lowest Toxicity", math.inf),)),
            TAGGED,
            LIMITS,
        )
    with pytest.raises(LimitExceeded):
        check_feedback(
            GenerateRequest(prompt="x", feedback_mix=(("a", 1.0), ("b", 1.0), ("c", 1.0))),
            TAGGED,
            LIMITS,
        )
    with pytest.raises(InvalidArgument, match="not both"):
        check_feedback(
            GenerateRequest(
                prompt="x", feedback="Lowest Toxicity", feedback_mix=(("Lowest Toxicity", 1.0),)
            ),
            TAGGED,
            LIMITS,
        )


def test_attribute_rules() -> None:
    check_attributes(GenerateRequest(prompt="x", attributes=(("verbosity", -0.3),)), TAGGED, LIMITS)
    with pytest.raises(InvalidArgument, match="'helpfulness', 'verbosity'"):
        check_attributes(GenerateRequest(prompt="x", attributes=(("humor", 1.0),)), TAGGED, LIMITS)
    with pytest.raises(InvalidArgument, match="finite"):
        check_attributes(
            GenerateRequest(prompt="x", attributes=(("verbosity", math.nan),)), TAGGED, LIMITS
        )
    with pytest.raises(InvalidArgument, match="outside"):
        check_attributes(
            GenerateRequest(prompt="x", attributes=(("verbosity", 6.0),)), TAGGED, LIMITS
        )


def test_the_model_s_sampling_defaults_fill_what_the_request_leaves_unset() -> None:
    model = {"temperature": 0.2, "top_p": 0.9, "min_p": 0.1, "max_tokens": 7}
    s = resolve_sampling(Sampling(top_p=0.5), LIMITS, model)
    assert s.temperature == 0.2 and s.top_p == 0.5  # the request wins where it says
    assert s.max_tokens == LIMITS.default_max_tokens  # only the fields Tiller takes from it
    neutral = resolve_sampling(Sampling(), LIMITS, {})
    assert neutral.temperature == 1.0 and neutral.top_p == 1.0
    with pytest.raises(InvalidArgument, match="temperature"):
        resolve_sampling(Sampling(), LIMITS, {"temperature": -1.0})  # checked like a request's
