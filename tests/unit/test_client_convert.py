"""Client keyword arguments -> wire request, and the CLI's NAME=WEIGHT parsing."""

from __future__ import annotations

import click
import pytest

from tiller.client.cli import _weights
from tiller.client.convert import build_request


def test_text_prompt_and_sampling() -> None:
    r = build_request(
        "hi",
        feedback="Lowest Toxicity",
        max_tokens=8,
        temperature=0.0,
        seed=3,
        stop=["\n"],
        adapter="detox",
        adapter_version=2,
        log=False,
        request_id="r1",
    )
    assert r.WhichOneof("input") == "prompt" and r.prompt == "hi"
    assert r.sampling.max_tokens == 8 and r.sampling.HasField("temperature")
    assert r.sampling.temperature == 0.0 and r.sampling.seed == 3
    assert not r.sampling.HasField("top_p")
    assert list(r.sampling.stop) == ["\n"]
    assert (r.adapter.name, r.adapter.version) == ("detox", 2)
    assert r.HasField("log") and not r.log
    assert r.feedback == "Lowest Toxicity" and r.request_id == "r1"


def test_chat_prompt_and_weights() -> None:
    r = build_request(
        [{"role": "user", "content": "q"}],
        feedback_mix={"A": 1.5, "B": -0.5},
        attributes={"verbosity": -0.3},
    )
    assert r.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in r.chat.messages] == [("user", "q")]
    assert dict(r.feedback_mix) == {"A": 1.5, "B": -0.5}
    assert dict(r.attributes) == pytest.approx({"verbosity": -0.3})
    assert not r.adapter.HasField("version")


def test_cli_weights() -> None:
    assert _weights(("Lowest Toxicity=1.5", "a=b=-2"), "--mix") == {
        "Lowest Toxicity": 1.5,
        "a=b": -2.0,
    }
    with pytest.raises(click.BadParameter):
        _weights(("novalue",), "--mix")
    with pytest.raises(click.BadParameter):
        _weights(("x=abc",), "--mix")


def test_priority_maps_to_the_enum_and_refuses_others() -> None:
    from tiller.client.convert import build_request
    from tiller.protos.tiller.v1 import tiller_pb2 as pb

    assert build_request("x").priority == pb.PRIORITY_INTERACTIVE
    assert build_request("x", priority="background").priority == pb.PRIORITY_BACKGROUND
    with pytest.raises(ValueError, match="priority"):
        build_request("x", priority="urgent")
