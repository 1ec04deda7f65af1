"""Build a tiny random Llama (plus a locally trained BPE tokenizer) for tests and benchmarks.

The shapes satisfy vLLM's CPU attention (head_dim 64). Weights are seeded, so two builds with the
same seed are identical. No network access is needed.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|separator|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]


def _training_text() -> list[str]:
    import asyncio
    import email
    import json as json_mod

    lines: list[str] = []
    for module in (asyncio, email, json_mod, inspect):
        lines.extend(inspect.getsource(module).splitlines())
    return [line for line in lines if line.strip()]


def build_tiny_llama(out_dir: Path, *, seed: int = 0, vocab_size: int = 1024) -> Path:
    """Write a tiny Llama (hidden 128, 2 heads of 64, 2 layers) and its tokenizer into ``out_dir``.

    Returns ``out_dir``. Idempotent: an existing complete build is left as it is.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    if (out_dir / "tiller_tiny.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Larger-than-default init makes the random model's distributions peaked, so greedy
    # decoding is stable and different prompts give visibly different outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tiller_tiny.json").write_text(json.dumps({"seed": seed, "vocab": vocab_size}))
    return out_dir


def build_tiny_reward_model(
    model_dir: Path, out_dir: Path, *, seed: int = 0, num_labels: int = 1
) -> Path:
    """A tiny random ``LlamaForSequenceClassification`` (``num_labels`` logits, seeded N(0, 0.08)
    weights) with the shape and tokenizer of ``model_dir`` (a ``build_tiny_llama`` directory),
    written into ``out_dir``: a reward model for tests. Returns ``out_dir``; idempotent."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    out_dir = Path(out_dir)
    if (out_dir / "tiller_tiny.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    config = AutoConfig.from_pretrained(model_dir, num_labels=num_labels)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "tiller_tiny.json").write_text(json.dumps({"seed": seed, "num_labels": num_labels}))
    return out_dir


def build_random_lora(
    model_dir: Path,
    out: Path,
    *,
    seed: int,
    std: float = 0.3,
    layers: tuple[int, ...] | None = None,
    rank: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """A peft LoRA (default r=8 on q_proj/v_proj) with seeded N(0, std) weights (safetensors).

    Stands in for a trained adapter in tests and benchmarks: large enough to change outputs.
    ``layers``: only these decoder layers get LoRA (peft's ``layers_to_transform``).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        init_lora_weights=False,
        layers_to_transform=list(layers) if layers is not None else None,
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out
