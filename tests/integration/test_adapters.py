"""Feedback-prefix conditioning through a LoRA adapter's manifest, versions and pinning."""

from __future__ import annotations

import pytest

from tiller.client import Client


@pytest.fixture(scope="module")
def client(target: str) -> Client:
    with Client(target, timeout=120) as c:
        yield c


def test_list_adapters(client: Client) -> None:
    rows = {a.name: a for a in client.adapters()}
    # The session server's own adapters (other tests may load more through the admin RPCs).
    assert {"base", "detox"} <= set(rows)
    assert rows["base"].is_default and rows["base"].feedback_tags == ()
    detox = rows["detox"]
    assert detox.versions == (1, 2) and detox.active_version == 2
    assert detox.feedback_tags[0] == "Lowest Toxicity" and len(detox.feedback_tags) == 5


def test_feedback_renders_the_alt_prefix_and_uses_the_adapter(client: Client) -> None:
    g = client.generate(
        "The movie was", adapter="detox", feedback="Lowest Toxicity", max_tokens=8, temperature=0.0
    )
    assert g.rendered_prompt == "Lowest Toxicity input: The movie was<|separator|>"
    assert (g.adapter, g.adapter_version) == ("detox", 2)
    other = client.generate(
        "The movie was", adapter="detox", feedback="Maximum Toxicity", max_tokens=8, temperature=0.0
    )
    assert other.rendered_prompt.startswith("Maximum Toxicity input: ")
    assert other.prompt_tokens != g.prompt_tokens or other.text != g.text


def test_lora_weights_change_the_output(client: Client) -> None:
    prompt = "Lowest Toxicity input: The movie was<|separator|>"
    base = client.generate(prompt, max_tokens=16, temperature=0.0)
    v2 = client.generate(prompt, adapter="detox", max_tokens=16, temperature=0.0)
    v1 = client.generate(prompt, adapter="detox", adapter_version=1, max_tokens=16, temperature=0.0)
    assert v1.adapter_version == 1 and v2.adapter_version == 2
    outs = {base.completions[0].token_ids, v1.completions[0].token_ids, v2.completions[0].token_ids}
    assert len(outs) == 3, "base, v1 and v2 should each generate differently"
    # ...and each is stable: the adapter, not noise, made the difference.
    again = client.generate(
        prompt, adapter="detox", adapter_version=1, max_tokens=16, temperature=0.0
    )
    assert again.completions[0].token_ids == v1.completions[0].token_ids


def test_feedback_in_chat_goes_to_the_last_user_turn(client: Client) -> None:
    g = client.generate(
        [{"role": "user", "content": "hi"}],
        adapter="detox",
        feedback="Moderate Toxicity",
        max_tokens=4,
        temperature=0.0,
    )
    assert g.rendered_prompt == (
        "<|user|>Moderate Toxicity input: hi<|separator|><|end|><|assistant|>"
    )
