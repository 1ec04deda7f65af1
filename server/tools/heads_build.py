"""Make steering-heads artifacts: for tests, benchmarks and operators (``tiller heads ...``).

- ``init_heads``: a ``base`` head plus k heads from the base head and seeded noise (low-rank
  ``B·A`` or a full perturbation).
- ``difference_head``: a head from the difference of two artifacts' heads
  (``W_0 + (W_plus - W_minus)``; low-rank stays low-rank by stacking the factors).
- ``train_class_head``: a low-rank head fitted to put probability on a class of tokens
  (the steerability demonstration).
- ``lexical_heads``: rank-1 heads that raise the logits of a word list by a set amount (steer
  toward a topic in seconds, no training).

Each writes ``tiller-heads.json`` + ``heads.safetensors`` into a directory; ``write_version``
wraps that into an adapter version directory with its ``tiller-manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..formats.heads import (
    HeadsError,
    HeadsManifest,
    HeadSpec,
    load_tensors,
    read_heads,
    save_heads,
)
from ..formats.manifest import Manifest, write_manifest


def model_dims(model_dir: Path) -> tuple[int, int]:
    """(hidden_size, vocab_size) from an HF ``config.json``."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["hidden_size"]), int(cfg["vocab_size"])


def base_head(model_dir: Path) -> torch.Tensor:
    """The model's LM head ``W_0`` [vocab, hidden] (the embedding when tied)."""
    from safetensors import safe_open

    names = ("lm_head.weight", "model.embed_tokens.weight")
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for n in names:
                if n in keys:
                    return st.get_tensor(n).float()
    raise HeadsError(f"no lm_head.weight or model.embed_tokens.weight in {model_dir}")


def init_heads(
    model_dir: Path,
    out: Path,
    attributes: Sequence[str],
    *,
    kind: str = "lowrank",
    rank: int = 8,
    scale: float = 0.05,
    seed: int = 0,
    base_name: str = "base",
) -> HeadsManifest:
    """``base`` (default weight 1) plus one head per attribute (default weight 0):
    ``W_j = W_0 + B_j·A_j`` with ``A_j ~ N(0, 1/hidden)``, ``B_j ~ N(0, scale²)`` (lowrank) or
    ``W_j = W_0 + N(0, scale²/hidden)`` (full). Seeded: the same call writes the same bytes."""
    hidden, vocab = model_dims(model_dir)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    specs = [HeadSpec(base_name, "base", 0, 1.0)]
    w0 = base_head(model_dir) if kind == "full" else None
    for name in attributes:
        if kind == "lowrank":
            tensors[f"{name}.A"] = torch.randn(rank, hidden, generator=g) / hidden**0.5
            tensors[f"{name}.B"] = torch.randn(vocab, rank, generator=g) * scale
            specs.append(HeadSpec(name, "lowrank", rank, 0.0))
        elif kind == "full":
            assert w0 is not None
            noise = torch.randn(vocab, hidden, generator=g) * (scale / hidden**0.5)
            tensors[f"{name}.W"] = w0[:vocab] + noise
            specs.append(HeadSpec(name, "full", 0, 0.0))
        else:
            raise HeadsError(f"kind {kind!r} is not one of: lowrank, full")
    manifest = HeadsManifest(model_dir.name, hidden, vocab, tuple(specs))
    save_heads(out, manifest, tensors)
    return manifest


def _delta(directory: Path, name: str) -> tuple[str, list[torch.Tensor]]:
    """Head ``name`` of an artifact as W_j - W_0: ("lowrank", [B, A]) / ("full", [W]) /
    ("base", [])."""
    manifest = read_heads(directory)
    spec = {h.name: h for h in manifest.heads}.get(name)
    if spec is None:
        raise HeadsError(f"{directory} has no head {name!r}; it has: {', '.join(manifest.names)}")
    t = load_tensors(directory)
    if spec.kind == "lowrank":
        return "lowrank", [t[f"{name}.B"], t[f"{name}.A"]]
    if spec.kind == "full":
        return "full", [t[f"{name}.W"]]
    return "base", []


def difference_head(
    model_dir: Path,
    plus: tuple[Path, str],
    minus: tuple[Path, str],
    out: Path,
    name: str,
    *,
    base_name: str = "base",
) -> HeadsManifest:
    """An artifact with ``base`` and ``name`` = ``W_0 + (W_plus - W_minus)``: the direction from
    one head to another, applied to the base model (e.g. tuned adapter's head minus the base).
    Low-rank minus low-rank stays low-rank (rank r_plus + r_minus)."""
    hidden, vocab = model_dims(model_dir)
    kp, tp = _delta(*plus)
    km, tm = _delta(*minus)
    tensors: dict[str, torch.Tensor] = {}
    if "full" not in (kp, km):
        bs = [tp[0]] if kp == "lowrank" else []
        as_ = [tp[1]] if kp == "lowrank" else []
        if km == "lowrank":
            bs.append(-tm[0])
            as_.append(tm[1])
        if not bs:
            raise HeadsError("both heads are the base head: their difference is zero")
        tensors[f"{name}.B"], tensors[f"{name}.A"] = torch.cat(bs, 1), torch.cat(as_, 0)
        spec = HeadSpec(name, "lowrank", int(tensors[f"{name}.A"].shape[0]), 0.0)
    else:
        w0 = base_head(model_dir)[:vocab]

        def full(kind: str, t: list[torch.Tensor]) -> torch.Tensor:
            return t[0] if kind == "full" else w0 + (t[0] @ t[1] if kind == "lowrank" else 0)

        tensors[f"{name}.W"] = w0 + full(kp, tp) - full(km, tm)
        spec = HeadSpec(name, "full", 0, 0.0)
    manifest = HeadsManifest(
        model_dir.name, hidden, vocab, (HeadSpec(base_name, "base", 0, 1.0), spec)
    )
    save_heads(out, manifest, tensors)
    return manifest


def train_class_head(
    model_dir: Path,
    out: Path,
    name: str,
    token_ids: Sequence[int],
    texts: Sequence[str],
    *,
    rank: int = 4,
    steps: int = 200,
    lr: float = 0.05,
    seed: int = 0,
    base_name: str = "base",
) -> HeadsManifest:
    """A low-rank head fitted (Adam, on the trunk's hidden states over ``texts``) to raise the
    probability of ``token_ids``, with an L2 penalty on its logit change. Weights
    ``{base: 1-λ, name: λ}`` then interpolate (0<λ<1) or extrapolate (λ>1, λ<0) the effect."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hidden, vocab = model_dims(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hs = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok.encode(text)])
            hs.append(model.model(ids).last_hidden_state[0])
    h = torch.cat(hs)
    w0 = base_head(model_dir)[:vocab]
    x = h @ w0.T
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(rank, hidden, generator=g) / hidden**0.5).requires_grad_()
    b = torch.zeros(vocab, rank, requires_grad=True)
    cls = torch.tensor(sorted(set(token_ids)))
    opt = torch.optim.Adam([a, b], lr=lr)
    for _ in range(steps):
        delta = (h @ a.T) @ b.T
        logp = torch.log_softmax(x + delta, -1)
        loss = -torch.logsumexp(logp[:, cls], -1).mean() + 1e-3 * delta.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    manifest = HeadsManifest(
        model_dir.name,
        hidden,
        vocab,
        (HeadSpec(base_name, "base", 0, 1.0), HeadSpec(name, "lowrank", rank, 0.0)),
    )
    save_heads(out, manifest, {f"{name}.A": a.detach(), f"{name}.B": b.detach()})
    return manifest


# Assistant-style text whose hidden states calibrate ``lexical_heads`` (what h·a ≈ 1 is fit on).
CALIBRATION = (
    (
        "How do I store basil?",
        "Keep the stems in a glass of water on the counter, loosely "
        "covered, and change the water every day. Basil turns black in the fridge.",
    ),
    (
        "Explain rainbows.",
        "Sunlight bends as it enters a raindrop, reflects off the back and "
        "bends again on the way out. Each colour bends by a different amount, so they fan out.",
    ),
    (
        "Tell me about owls.",
        "Owls are birds of prey that hunt mostly at night. Their large eyes "
        "face forward and their soft feathers let them fly almost without a sound.",
    ),
    (
        "Give me three tips for sleeping better.",
        "1. Go to bed at the same time every night. "
        "2. Keep the bedroom cool and dark. 3. Avoid screens and coffee late in the day.",
    ),
    (
        "What is a prime number?",
        "A prime number is a whole number greater than one that can "
        "only be divided evenly by one and itself, such as 2, 3, 5, 7 and 11.",
    ),
    (
        "Write a short poem about the city.",
        "Streetlights hum above the rain,\nbuses sigh and "
        "start again,\nwindows glow in rows of gold,\nstories that the night has told.",
    ),
    (
        "How does a bicycle stay upright?",
        "Mostly through steering: when a bike leans, the rider "
        "and the fork turn the front wheel into the lean, which brings the wheels back under it.",
    ),
    (
        "Summarise the water cycle.",
        "Water evaporates, rises and cools into clouds, falls as "
        "rain or snow, and flows through rivers and the ground back to the sea.",
    ),
)


def word_token_ids(tokenizer: Any, words: Sequence[str]) -> tuple[list[int], list[str]]:
    """The single-token spellings of ``words`` (with and without a leading space, lower and
    capitalised): their token ids, and the words that have none (they cannot be boosted)."""
    ids: set[int] = set()
    missing = []
    for word in words:
        found = set()
        for v in {word, f" {word}", word.capitalize(), f" {word.capitalize()}"}:
            t = tokenizer.encode(v, add_special_tokens=False)
            if len(t) == 1:
                found.add(t[0])
        ids |= found
        if not found:
            missing.append(word)
    return sorted(ids), missing


def lexical_heads(
    model_dir: Path,
    out: Path,
    words: Mapping[str, Sequence[str]],
    *,
    strength: float = 4.0,
    ridge: float = 100.0,
    base_name: str = "base",
) -> tuple[HeadsManifest, dict[str, list[str]]]:
    """``base`` plus one rank-1 head per attribute, ``W_j = W_0 + strength·e_words·aᵀ``, where
    ``e_words`` is 1 on the tokens of the attribute's words and ``a`` is fitted (ridge least
    squares on the model's own hidden states over ``CALIBRATION``) so that ``h·a ≈ 1``.

    Weights ``{base: 1-λ, name: λ}`` (or ``{name: 1}`` for λ = 1) then give the base model's
    logits plus about ``λ·strength`` on those tokens. Returns the manifest and, per attribute,
    the words with no single-token spelling (left out). ``HeadsError`` when an attribute has
    no boostable word."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hidden, vocab = model_dims(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    token_sets, missing = {}, {}
    for name, ws in words.items():
        token_sets[name], missing[name] = word_token_ids(tok, ws)
        if not token_sets[name]:
            raise HeadsError(f"attribute {name!r}: none of {list(ws)} is a single token")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hs = []
    with torch.no_grad():
        for question, answer in CALIBRATION:
            turns = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            text = (
                tok.apply_chat_template(turns, tokenize=False)
                if tok.chat_template
                else f"{question}\n{answer}"
            )
            ids = torch.tensor([tok.encode(text, add_special_tokens=not tok.chat_template)])
            hs.append(model.model(ids).last_hidden_state[0])
    h = torch.cat(hs)
    a = torch.linalg.solve(h.T @ h + ridge * torch.eye(hidden), h.T @ torch.ones(len(h)))
    tensors: dict[str, torch.Tensor] = {}
    specs = [HeadSpec(base_name, "base", 0, 1.0)]
    for name, ids in token_sets.items():
        b = torch.zeros(vocab, 1)
        b[torch.tensor(ids)] = strength
        tensors[f"{name}.A"], tensors[f"{name}.B"] = a[None, :].clone(), b
        specs.append(HeadSpec(name, "lowrank", 1, 0.0))
    manifest = HeadsManifest(model_dir.name, hidden, vocab, tuple(specs))
    save_heads(out, manifest, tensors)
    return manifest, missing


def write_version(directory: Path, name: str, version: int, base_model: str) -> Path:
    """Make ``directory`` (holding a heads artifact, and optionally a peft LoRA) an adapter
    version: writes ``tiller-manifest.json`` with the heads' attributes and every file's sha256."""
    heads = read_heads(directory)
    write_manifest(
        directory,
        Manifest(
            name=name,
            version=version,
            base_model=base_model,
            attributes=heads.names,
            has_lora=(directory / "adapter_model.safetensors").is_file(),
        ),
    )
    return directory
