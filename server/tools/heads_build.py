"""Make steering-heads artifacts: for tests, benchmarks and operators (``tiller heads ...``).

- ``init_heads``: a ``base`` head plus k heads from the base head and seeded noise (low-rank
  ``B·A`` or a full perturbation).
- ``difference_head``: a head from the difference of two artifacts' heads
  (``W_0 + (W_plus - W_minus)``; low-rank stays low-rank by stacking the factors).
- ``train_class_head``: a low-rank head fitted to put probability on a class of tokens
  (the steerability demonstration).

Each writes ``tiller-heads.json`` + ``heads.safetensors`` into a directory; ``write_version``
wraps that into an adapter version directory with its ``tiller-manifest.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

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
