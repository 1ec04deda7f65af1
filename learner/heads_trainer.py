"""CMPO plural-head training: low-rank attribute heads on a frozen trunk, written in the format
the server's steering processor loads (``tiller.server.formats.heads``).

The trunk (and any LoRA already merged into the given model) stays frozen, so every
completion's last hidden states are computed once, without gradients; training then
touches only the head factors A_j [r, H] and B_j [V, r] (W_j = W_0 + B_j·A_j), which is cheap
enough for many epochs on a CPU. The trunk runs where the learner's frozen models run
(``fluency.load_scoring_model``: the learner's device, bfloat16 where it multiplies that
natively), sharing the gate's copy of the base when one is loaded. B starts at zero: before
the first step every λ with Σλ = 1 reproduces the base model, the reference of the cDPO loss
(``objectives.cmpo``).

Each ``PreferencePair`` must carry ``attribute_weights`` (CMPO's power-set λ, see
``data.cmpo``); attributes outside ``HeadsTrainConfig.attributes`` raise ``ValueError``.
Seeded and reproducible on CPU; not resumable (a run takes seconds to minutes).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiller.server.formats.heads import HeadsManifest, HeadSpec, save_heads

from .batches import encode
from .data.examples import PreferencePair
from .fluency import load_scoring_model
from .objectives.cmpo import CMPOConfig, cmpo_loss, mixed_logits
from .trainer import TrainConfig


@dataclass(frozen=True)
class HeadsTrainConfig:
    attributes: tuple[str, ...]
    base_model: str
    rank: int = 8
    objective: CMPOConfig = field(default_factory=CMPOConfig)
    lr: float = 5e-3
    epochs: int = 3
    batch_size: int = 8
    max_grad_norm: float | None = 1.0
    seed: int = 0
    max_length: int = 256
    init_std: float = 0.02
    progress: bool = True
    # Keep the frozen base logits h·W_0ᵀ of every distinct sequence when they fit in this many
    # GiB (float32 [tokens, vocab]): each step then skips the [tokens, H] x [H, V] matmul.
    logits_cache_gib: float = 2.0
    # Where the frozen trunk runs and its dtype (``TrainConfig.device`` / ``.precision`` values,
    # read by ``precision.inference_device`` / ``.inference_dtype``); the heads train in float32.
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of: auto, cpu, cuda")
        if self.precision not in ("auto", "fast", "fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r} is not one of: auto, fast, fp32, bf16")
        if not self.attributes or len(set(self.attributes)) != len(self.attributes):
            raise ValueError("attributes must be distinct names, at least one")
        for name in ("rank", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class HeadsResult:
    out_dir: Path
    steps: int
    history: tuple[dict[str, float], ...]
    samples_per_s: float


@dataclass(frozen=True)
class _Seq:
    h: Tensor  # [T, H] hidden states predicting the completion tokens
    targets: Tensor  # [T]
    ref_logp: float  # summed log-prob under the base head
    base: Tensor | None = None  # [T, V] base logits h·W_0ᵀ, kept when they fit the cache budget


def _weights(pair: PreferencePair, names: Sequence[str]) -> list[float]:
    given = dict(pair.attribute_weights)
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"pair {pair.source!r}: unknown attribute {unknown[0]!r}; heads: {names}")
    if not given:
        raise ValueError(f"pair {pair.source!r} has no attribute_weights (CMPO needs them)")
    return [float(given.get(n, 0.0)) for n in names]


def _hidden(model: Any, w0: Tensor, p: Sequence[int], c: Sequence[int], keep_logits: bool) -> _Seq:
    """Hidden states, targets and reference log-prob of prompt ids ``p`` + completion ids ``c``.

    The trunk runs on ``model``'s device in its dtype; the states come back as float32 on the
    CPU. The reference logits are h·W_0ᵀ in float32 (``w0`` on the model's device), the same
    product the heads' policy computes, so at B = 0 policy and reference agree exactly."""
    ids = torch.tensor([list(p) + list(c)], device=w0.device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False, **extra)
    h = out.hidden_states[-1][0, len(p) - 1 : -1].float()  # final (normed) states before targets
    targets = torch.tensor(c)
    logits = h @ w0.T
    ref = torch.log_softmax(logits, -1).gather(1, targets.to(w0.device)[:, None])
    return _Seq(
        h.cpu().clone(),
        targets,
        float(ref.sum()),
        logits.cpu().clone() if keep_logits else None,
    )


def _forward_params(model: Any) -> Any:
    return inspect.signature(model.forward).parameters


def _policy_logps(seqs: Sequence[_Seq], lam: Tensor, w0: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Summed log-probs of each sequence under its row of ``lam`` ([S, k])."""
    h = torch.cat([s.h for s in seqs])
    rows = torch.cat([lam[i].expand(len(s.targets), -1) for i, s in enumerate(seqs)])
    kept = [s.base for s in seqs]
    base = torch.cat(kept) if all(x is not None for x in kept) else None
    logp = torch.log_softmax(mixed_logits(h, w0, a, b, rows, base), -1)
    tok = logp.gather(1, torch.cat([s.targets for s in seqs])[:, None])[:, 0]
    return torch.stack([part.sum() for part in tok.split([len(s.targets) for s in seqs])])


def _initial(
    directory: Path, names: Sequence[str], rank: int, dims: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """A [k, r, H] and B [k, V, r] stacked from a heads directory, checked against the config."""
    from tiller.server.formats.heads import load_tensors, read_heads

    manifest = read_heads(directory)
    got = [(h.name, h.kind, h.rank) for h in manifest.heads]
    want = [(n, "lowrank", rank) for n in names]
    if got != want:
        raise ValueError(f"heads in {directory} are {got}; this run trains {want}")
    if (manifest.hidden_size, manifest.vocab_size) != dims:
        raise ValueError(f"heads in {directory} do not fit this model (hidden, vocab) {dims}")
    t = load_tensors(directory)
    a = torch.stack([t[f"{n}.A"].float() for n in names])
    b = torch.stack([t[f"{n}.B"].float() for n in names])
    return a.clone(), b.clone()


def train_heads(
    model_dir: Path,
    pairs: Sequence[PreferencePair],
    cfg: HeadsTrainConfig,
    out_dir: Path,
    *,
    init_heads: Path | None = None,
) -> HeadsResult:
    """Train k low-rank heads on ``pairs`` and save them (``tiller-heads.json`` +
    ``heads.safetensors``) into ``out_dir``; default weights are uniform (1/k each).
    ``init_heads``: a directory with heads of the same attributes and rank to continue from
    (the online loop's served version); otherwise A is random and B zero (the base model)."""
    from tqdm import tqdm

    if not pairs:
        raise ValueError("no training pairs")
    torch.manual_seed(cfg.seed)
    names = list(cfg.attributes)
    lam = torch.tensor([_weights(p, names) for p in pairs])  # [P, k]
    tok, model = load_scoring_model(model_dir, device=cfg.device, precision=cfg.precision)
    tc = TrainConfig(objective="cdpo", max_length=cfg.max_length, progress=False)
    # One trunk forward per distinct (prompt, completion): CMPO data repeats each generation in
    # many pairs (every other sample of its prompt, both directions, each attribute subset).
    head = model.get_output_embeddings().weight.detach().float()  # on the trunk's device
    vocab, hidden = head.shape
    distinct = dict.fromkeys((p.prompt, c) for p in pairs for c in (p.chosen, p.rejected))
    encoded = {key: encode(tok, *key, tc) for key in distinct}
    tokens = sum(len(c) for _, c in encoded.values())
    keep = tokens * vocab * 4 <= cfg.logits_cache_gib * 2**30
    with torch.no_grad():  # not inference_mode: these tensors feed autograd later
        bar = tqdm(encoded.items(), disable=not cfg.progress, desc="cmpo trunk")
        cache = {key: _hidden(model, head, p, c, keep) for key, (p, c) in bar}
    chosen = [cache[p.prompt, p.chosen] for p in pairs]
    rejected = [cache[p.prompt, p.rejected] for p in pairs]
    w0 = head.cpu().clone()  # the heads train on the CPU in float32
    del model, head  # the trunk is freed here unless the gate still holds the base model
    k, r = len(names), cfg.rank
    gen = torch.Generator().manual_seed(cfg.seed)
    a = torch.randn(k, r, hidden, generator=gen) * cfg.init_std
    b = torch.zeros(k, vocab, r)
    if init_heads is not None:
        a, b = _initial(init_heads, names, r, (hidden, vocab))
    a.requires_grad_()
    b.requires_grad_()
    optimizer = torch.optim.AdamW([a, b], lr=cfg.lr, weight_decay=0.0)
    conf = torch.tensor([p.label_confidence for p in pairs])
    ref_c = torch.tensor([s.ref_logp for s in chosen])
    ref_r = torch.tensor([s.ref_logp for s in rejected])
    len_c = torch.tensor([float(len(s.targets)) for s in chosen])
    per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    history: list[dict[str, float]] = []
    bar = tqdm(total=cfg.epochs * per_epoch, disable=not cfg.progress, desc="cmpo heads")
    began = time.perf_counter()
    for epoch in range(cfg.epochs):
        order = torch.randperm(
            len(pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch)
        )
        for start in range(0, len(pairs), cfg.batch_size):
            idx = order[start : start + cfg.batch_size].tolist()
            pol_c = _policy_logps([chosen[i] for i in idx], lam[idx], w0, a, b)
            pol_r = _policy_logps([rejected[i] for i in idx], lam[idx], w0, a, b)
            loss, metrics = cmpo_loss(
                pol_c, pol_r, ref_c[idx], ref_r[idx], cfg.objective,
                label_confidence=conf[idx], chosen_lengths=len_c[idx],
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                metrics["grad_norm"] = float(
                    torch.nn.utils.clip_grad_norm_([a, b], cfg.max_grad_norm)
                )
            optimizer.step()
            history.append({"step": float(len(history) + 1), **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - began
    manifest = HeadsManifest(
        base_model=cfg.base_model,
        hidden_size=hidden,
        vocab_size=vocab,
        heads=tuple(HeadSpec(n, "lowrank", r, 1.0 / k) for n in names),
    )
    tensors = {}
    for j, n in enumerate(names):
        tensors[f"{n}.A"] = a[j].detach().clone()
        tensors[f"{n}.B"] = b[j].detach().clone()
    save_heads(Path(out_dir), manifest, tensors)
    return HeadsResult(
        out_dir=Path(out_dir),
        steps=len(history),
        history=tuple(history),
        samples_per_s=cfg.epochs * len(pairs) / elapsed if elapsed > 0 else 0.0,
    )
