"""Feedback-prefix conditioning through a LoRA adapter's manifest, versions and pinning."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from tests.conftest import make_lora_version
from tiller.client import AsyncClient, Client, TillerClientError


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


async def test_an_adapter_on_some_layers_is_served_as_peft_computes_it(
    client: Client, target: str, tiny_model: Path, tmp_path: Path
) -> None:
    # LoRA on the top decoder layer only (the learner's ``layers_to_transform``, which makes a
    # training step cheaper): the server applies it there and nowhere else, as peft does.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = make_lora_version(
        tiny_model, tmp_path / "top" / "v0001", name="top", version=1, seed=11, layers=(1,)
    )
    prompt = "def parse(self, data):"
    async with AsyncClient(target, timeout=120) as admin:
        await admin.load_adapter("top", str(out))
        # Loaded is staged, not routed: an unpinned request names what to do.
        with pytest.raises(TillerClientError) as info:
            client.generate(prompt, adapter="top", max_tokens=8)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "adapter 'top' has no active version; loaded versions: 1" in info.value.message
        await admin.activate_adapter("top", 1)
    served = client.generate(prompt, adapter="top", max_tokens=8, temperature=0.0)
    base = client.generate(prompt, max_tokens=8, temperature=0.0)

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), out
    ).eval()
    assert {m.split(".layers.")[1].split(".")[0] for m in model.targeted_module_names} == {"1"}
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)
    expected = tuple(ref[0, ids.shape[1] :].tolist())
    assert served.completions[0].token_ids == expected[: len(served.completions[0].token_ids)]
    assert served.completions[0].token_ids != base.completions[0].token_ids


async def test_base_requests_stay_base_beside_requests_for_every_lora_slot(
    target: str, tiny_model: Path, tmp_path: Path
) -> None:
    # vLLM's CPU LoRA ops read "no adapter" (index -1) as the last of its max_loras (4) slots:
    # a base request batched with adapter requests got that slot's delta once four adapters
    # were in use. tiller.server.cpu_lora's grouped ops give it none.
    prompt = "def parse(self, data):"
    async with AsyncClient(target, timeout=120) as c:
        for i in range(4):
            out = make_lora_version(
                tiny_model, tmp_path / f"slot{i}" / "v0001", name=f"slot{i}", version=1, seed=40 + i
            )
            await c.load_adapter(f"slot{i}", str(out))
            await c.activate_adapter(f"slot{i}", 1)

        async def base_beside(adapters: list[str]) -> tuple[int, ...]:
            # One base request in the same batches as four others (same shapes both times).
            base, *others = await asyncio.gather(
                c.generate(prompt, max_tokens=12, temperature=0.0),
                *(c.generate(prompt, adapter=a, max_tokens=24, temperature=0.0) for a in adapters),
            )
            if adapters[0]:
                assert len({o.completions[0].token_ids for o in others}) == 4
            return base.completions[0].token_ids

        alone = await base_beside([""] * 4)
        assert await base_beside([f"slot{i}" for i in range(4)]) == alone


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
