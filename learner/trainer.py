"""The one training loop: examples + objective config -> a LoRA adapter directory.

``train`` loads the base model, wraps it with a peft LoRA (or continues ``init_adapter``),
tokenises every example once, and runs AdamW with gradient accumulation and clipping. The
reference model of the DPO family and of ALT's KL term is the *same* model with its adapter
disabled (``model.disable_adapter()`` under ``torch.no_grad()``, eval mode): the base weights,
never a second copy. When continuing an ``init_adapter`` the reference is still the base model,
the fixed p_0 of ALT and π_θ0 of OAIF, not the adapter's starting point.

Sequence layout (one batch): ``[left pad][prompt][completion][right pad]``. Prompts are left-
padded to a common width P, so every completion starts at column P and the logits at columns
P-1 .. P+T-2 predict its T tokens; position ids skip the padding. A sequence longer than
``max_length`` loses tokens from the left of its prompt (the completion is cut on the right only
if it alone exceeds ``max_length - 1``).

Reproducibility: the data order of epoch e is a permutation drawn from its own generator seeded
by (seed, e), and the whole run is seeded; on CPU the same config and data give bit-identical
adapters. A checkpoint (adapter, optimizer, scheduler, torch RNG states, step, data order, history)
is written every ``checkpoint_every`` optimizer steps into ``checkpoint_dir/step-NNNNNNNN`` via a
temporary directory and one rename, so a kill -9 leaves either the old or the new checkpoint.
``train(..., resume=True)`` restarts from the latest one and reaches the same final weights as an
uninterrupted run. One trainer per ``checkpoint_dir`` at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .data.examples import PreferencePair, SFTExample
from .objectives.alt import ALTConfig, alt_loss
from .objectives.cdpo import CDPOConfig, cdpo_loss
from .objectives.dpo import DPOConfig, dpo_loss
from .objectives.ipo import IPOConfig, ipo_loss
from .objectives.sft import SFTConfig, sft_loss, token_logps
from .objectives.slic import SLiCConfig, slic_loss

ObjectiveConfig = ALTConfig | SFTConfig | DPOConfig | IPOConfig | SLiCConfig | CDPOConfig
OBJECTIVES: dict[str, type[Any]] = {
    "alt": ALTConfig,
    "sft": SFTConfig,
    "dpo": DPOConfig,
    "ipo": IPOConfig,
    "slic": SLiCConfig,
    "cdpo": CDPOConfig,
}
PAIR_OBJECTIVES = frozenset({"dpo", "ipo", "slic", "cdpo"})
# Fields that may change between a run and its resumption without changing the result.
# (gradient_checkpointing recomputes the same float32 ops in the same order: the same weights.)
_RESUME_FREE = (
    "device",
    "checkpoint_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "gradient_checkpointing",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. ``objective_config=None`` means the defaults of
    ``objective``; a config of another objective's type raises ``ValueError``.

    ``max_steps`` (optimizer steps) overrides ``epochs``; one step consumes
    ``batch_size * grad_accum`` examples (pairs count as one). LoRA fields are ignored when
    ``train`` continues an ``init_adapter`` (its own config applies). ``checkpoint_every=0``
    disables checkpoints. ``gradient_checkpointing`` keeps only each decoder layer's input for the
    backward pass and recomputes the rest (~1/3 more compute, less memory: SmolLM2-135M, 32
    sequences x 128 tokens, peaked above 7.3 GiB RSS without it and at 6.7 GiB with it); it does
    not change the result.

    ``precision``: ``fp32`` trains in float32; ``bf16`` keeps float32 weights on the CPU and runs
    the forward and backward passes under bfloat16 autocast (CPUs with native bf16 matmuls:
    SmolLM2-135M, 16 x 80 tokens, LoRA q,k,v,o, one DPO-sized step 7.5 s → 5.1 s on this
    machine's avx512_bf16 cores), and loads the model in bfloat16 on CUDA. ``auto``: bf16 on a
    CUDA device that supports it, fp32 on the CPU (bit-exact resumption, float32 references).
    ``fast``: bf16 wherever the hardware multiplies bf16 natively (``native_bf16``: CUDA, or a
    CPU with AVX512-BF16/AMX), fp32 elsewhere: on an AVX2-only CPU bf16 autocast is emulated
    and a step took ~20x longer than in fp32. The shipped align configs use it.
    """

    objective: str = "dpo"
    objective_config: ObjectiveConfig | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    layers_to_transform: tuple[int, ...] | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear"] = "linear"
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    max_length: int = 512
    append_eos: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fast", "fp32", "bf16"] = "auto"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        expected = OBJECTIVES.get(self.objective)
        if expected is None:
            raise ValueError(f"unknown objective {self.objective!r}; one of: {sorted(OBJECTIVES)}")
        if self.objective_config is None:
            object.__setattr__(self, "objective_config", expected())
        elif not isinstance(self.objective_config, expected):
            raise ValueError(
                f"objective {self.objective!r} needs a {expected.__name__}, "
                f"got {type(self.objective_config).__name__}"
            )
        for name in ("lora_r", "batch_size", "grad_accum", "epochs", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None (got {self.max_steps})")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (got {self.max_length})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of: auto, cpu, cuda")
        if self.precision not in ("auto", "fast", "fp32", "bf16"):
            raise ValueError(f"precision {self.precision!r} is not one of: auto, fast, fp32, bf16")
        if self.checkpoint_every < 0 or (self.checkpoint_every and self.checkpoint_dir is None):
            raise ValueError("checkpoint_every must be >= 0 and needs checkpoint_dir when > 0")

    @property
    def loss_config(self) -> ObjectiveConfig:
        assert self.objective_config is not None  # set in __post_init__
        return self.objective_config


@dataclass(frozen=True)
class TrainResult:
    """``history``: one dict per optimizer step (``step``, ``lr``, ``loss`` and the objective's
    metrics averaged over micro-batches; losses are measured before that step's update).
    ``samples_per_s`` counts the examples this process trained on over its loop time."""

    adapter_dir: Path
    steps: int
    final_loss: float
    samples_per_s: float
    history: tuple[dict[str, float], ...] = field(repr=False)
    resumed_from_step: int | None = None


_Seq = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, completion ids)


@dataclass(frozen=True)
class _Item:
    seqs: tuple[_Seq, ...]  # 1 for SFT/ALT, 2 (chosen, rejected) for pairs
    weight: float = 1.0
    confidence: float = 1.0


@dataclass(frozen=True)
class _Batch:
    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor  # [B, T] completion tokens, right-padded
    label_mask: Tensor  # [B, T]

    def to(self, device: torch.device) -> _Batch:
        return _Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _encode(tok: Any, prompt: str, completion: str, cfg: TrainConfig) -> _Seq:
    """Token ids of ``prompt`` and ``completion`` (+ EOS), at most ``max_length`` together.

    Tokenised separately, as the server generates completion tokens after prompt tokens. The
    prompt gets the tokenizer's special tokens (BOS) unless it already starts with BOS text.
    """
    bos = tok.bos_token
    special = not (bos and prompt.startswith(bos))  # a rendered chat prompt carries its own BOS
    p = list(tok(prompt, add_special_tokens=special).input_ids)
    c = list(tok(completion, add_special_tokens=False).input_ids)
    if cfg.append_eos and tok.eos_token_id is not None:
        c.append(tok.eos_token_id)
    if not c:
        raise ValueError(f"completion {completion!r} has no tokens (and append_eos is off)")
    if not p:
        p = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    c = c[: cfg.max_length - 1]
    return tuple(p[-(cfg.max_length - len(c)) :]), tuple(c)


def _tokenize(examples: Sequence[Any], tok: Any, cfg: TrainConfig) -> list[_Item]:
    pairs = cfg.objective in PAIR_OBJECTIVES
    want = PreferencePair if pairs else SFTExample
    items = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, want):
            raise TypeError(
                f"objective {cfg.objective!r} trains on {want.__name__}; "
                f"example {i} is a {type(ex).__name__}"
            )
        if isinstance(ex, PreferencePair):
            seqs = (
                _encode(tok, ex.prompt, ex.chosen, cfg),
                _encode(tok, ex.prompt, ex.rejected, cfg),
            )
            items.append(_Item(seqs, confidence=ex.label_confidence))
        else:
            items.append(_Item((_encode(tok, ex.prompt, ex.completion, cfg),), weight=ex.weight))
    if not items:
        raise ValueError("no training examples")
    return items


def _collate(seqs: Sequence[_Seq], pad: int) -> _Batch:
    width = max(len(p) for p, _ in seqs)
    tail = max(len(c) for _, c in seqs)
    ids, att, labels, lmask = [], [], [], []
    for p, c in seqs:
        left, right = width - len(p), tail - len(c)
        ids.append([pad] * left + list(p) + list(c) + [pad] * right)
        att.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        labels.append(list(c) + [pad] * right)
        lmask.append([1] * len(c) + [0] * right)
    attention = torch.tensor(att)
    return _Batch(
        input_ids=torch.tensor(ids),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        labels=torch.tensor(labels),
        label_mask=torch.tensor(lmask),
    )


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA device with bf16 support, or a CPU
    with AVX512-BF16 or AMX. Elsewhere bf16 autocast is emulated and far slower than float32
    (AVX2-only EPYC here: one SmolLM2 DPO step ~200 s under bf16 autocast vs ~10 s in fp32)."""
    from tiller.server.device import cpu_has_native_bf16  # the one detector (serving uses it)

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def bf16_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether a run with ``cfg`` on ``device`` trains under bf16 (``TrainConfig.precision``)."""
    if cfg.precision == "auto":
        return device.type == "cuda" and native_bf16(device)
    if cfg.precision == "fast":
        return native_bf16(device)
    return cfg.precision == "bf16"


def _completion_logits(model: Any, b: _Batch, autocast: bool = False) -> Tensor:
    """``[B, T, V]`` logits aligned with ``b.labels`` (computed only at completion positions),
    float32; ``autocast``: the forward runs under CPU bfloat16 autocast."""
    t = b.labels.shape[1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(
            input_ids=b.input_ids,
            attention_mask=b.attention_mask,
            position_ids=b.position_ids,
            use_cache=False,
            logits_to_keep=t + 1,
        )
    return out.logits[:, :-1].float()


@contextmanager
def _reference(model: Any) -> Iterator[None]:
    """The base model (adapter off, eval mode, no grad): the reference policy."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        model.train(was_training)


def _summed_logps(model: Any, b: _Batch, amp: bool) -> Tensor:
    """``[B]``: each sequence's summed completion log-prob under ``model`` as it is now."""
    return (token_logps(_completion_logits(model, b, amp), b.labels) * b.label_mask).sum(-1)


def _reference_logps(
    model: Any, items: Sequence[_Item], cfg: TrainConfig, device: torch.device, pad: int
) -> Tensor:
    """``[n, 2]``: each pair's (chosen, rejected) summed completion log-prob under the reference.

    The reference is fixed, so the DPO family needs these once, not once per epoch (its forward
    is about a quarter of a step's compute). Computed before the first step in fixed batches,
    so a resumed run gets the same values."""
    amp = device.type == "cpu" and bf16_autocast(cfg, device)
    out = []
    with _reference(model):
        for start in range(0, len(items), cfg.batch_size):
            chunk = items[start : start + cfg.batch_size]
            b = _collate([it.seqs[0] for it in chunk] + [it.seqs[1] for it in chunk], pad)
            b = b.to(device)
            lp = _summed_logps(model, b, amp)
            out.append(torch.stack(lp.chunk(2), dim=1))
    return torch.cat(out)


def _loss(
    model: Any,
    items: Sequence[_Item],
    cfg: TrainConfig,
    device: torch.device,
    pad: int,
    ref_logps: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """``ref_logps``: ``[len(items), 2]`` from ``_reference_logps`` (pair objectives)."""
    obj = cfg.loss_config
    seqs = [it.seqs[0] for it in items] + [it.seqs[1] for it in items if len(it.seqs) == 2]
    b = _collate(seqs, pad).to(device)
    # CUDA bf16 is the model's dtype (``_load_model``); on the CPU it is autocast.
    amp = device.type == "cpu" and bf16_autocast(cfg, device)
    if isinstance(obj, ALTConfig | SFTConfig):
        weights = torch.tensor([it.weight for it in items], device=device)
        logits = _completion_logits(model, b, amp)
        if isinstance(obj, SFTConfig):
            return sft_loss(logits, b.labels, b.label_mask, obj, weights)
        ref = None
        if obj.beta > 0:
            with _reference(model):
                ref = _completion_logits(model, b, amp)
        return alt_loss(logits, ref, b.labels, b.label_mask, obj, weights)
    if ref_logps is None:
        raise ValueError(f"objective {cfg.objective!r} needs the reference log-probs")
    logps = _summed_logps(model, b, amp)
    pc, pr = logps.chunk(2)
    rc, rr = ref_logps.to(device).unbind(1)
    lc, lr = b.label_mask.sum(-1).chunk(2)
    if isinstance(obj, DPOConfig):
        return dpo_loss(pc, pr, rc, rr, obj, chosen_lengths=lc)
    if isinstance(obj, IPOConfig):
        return ipo_loss(pc, pr, rc, rr, obj, chosen_lengths=lc, rejected_lengths=lr)
    if isinstance(obj, SLiCConfig):
        return slic_loss(pc, pr, rc, rr, obj, chosen_lengths=lc)
    conf = torch.tensor([it.confidence for it in items], device=device)
    return cdpo_loss(pc, pr, rc, rr, obj, label_confidence=conf, chosen_lengths=lc)


def _load_model(model_dir: Path, cfg: TrainConfig, init_adapter: Path | None) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    device = _device(cfg)
    dtype = (
        torch.bfloat16 if device.type == "cuda" and bf16_autocast(cfg, device) else torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if cfg.gradient_checkpointing:
        # Non-reentrant: works although no input requires grad (only the LoRA weights do). It is
        # active in train mode only, so the reference pass (eval, no grad) is not recomputed.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        return PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers_to_transform) if cfg.layers_to_transform else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return [int(i) for i in torch.randperm(n, generator=gen)]


def _indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count-1`` of the stream epoch 0 ++ epoch 1 ++ ..."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = _permutation(n, seed, epoch)
        out.extend(perm[offset : offset + count - len(out)])
    return out


def _fingerprint(cfg: TrainConfig, items: Sequence[_Item], init_adapter: Path | None) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k not in _RESUME_FREE}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(init_adapter).encode())
    for it in items:
        h.update(repr(it).encode())
    return h.hexdigest()


def _lr_factor(cfg: TrainConfig, total: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps`` (never 0), then constant or linear decay to 0."""
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _optimizer_step(
    model: Any,
    items: Sequence[_Item],
    cfg: TrainConfig,
    step: int,
    device: torch.device,
    pad: int,
    ref_logps: Tensor | None = None,
) -> dict[str, float]:
    """Forward/backward over ``grad_accum`` micro-batches of step ``step``; metrics averaged."""
    record: dict[str, float] = {}
    for micro in range(cfg.grad_accum):
        first = (step * cfg.grad_accum + micro) * cfg.batch_size
        idx = _indices(len(items), cfg.seed, first, cfg.batch_size)
        ref = ref_logps[idx] if ref_logps is not None else None
        loss, metrics = _loss(model, [items[i] for i in idx], cfg, device, pad, ref)
        (loss / cfg.grad_accum).backward()
        for k, v in metrics.items():
            record[k] = record.get(k, 0.0) + v / cfg.grad_accum
    return record


def _save_checkpoint(
    root: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}
    torch.save(blob, tmp / "trainer_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    for f in tmp.rglob("*"):  # data on disk before the rename makes the checkpoint visible
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``root`` (temp dirs never count)."""
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def _restore(ckpt: Path, model: Any, optimizer: Any, scheduler: Any, fp: str) -> dict[str, Any]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state: dict[str, Any] = json.loads((ckpt / "trainer_state.json").read_text())
    if state["fingerprint"] != fp:
        raise ValueError(f"checkpoint {ckpt} was written for another config, data or init adapter")
    weights = load_file(ckpt / "adapter_model.safetensors")
    set_peft_model_state_dict(model, weights)
    blob = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(blob["rng"]["cuda"]))
    return state


def train(
    model_dir: Path,
    examples: Sequence[SFTExample] | Sequence[PreferencePair],
    config: TrainConfig,
    out_dir: Path,
    init_adapter: Path | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` and save it (peft, safetensors) into ``out_dir``.

    ``examples`` must be ``SFTExample`` for ``alt``/``sft`` and ``PreferencePair`` for the DPO
    family (``TypeError`` otherwise). With ``resume`` and a checkpoint in
    ``config.checkpoint_dir``, training continues from the latest one (``ValueError`` if it was
    written for another config/data); without one it starts afresh. Not thread-safe: it seeds
    torch's global RNG.
    """
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(config.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = _tokenize(examples, tok, config)
    device = _device(config)
    model = _load_model(model_dir, config, init_adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_step = config.batch_size * config.grad_accum
    total = config.max_steps or config.epochs * -(-len(items) // per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, total))
    fp = _fingerprint(config, items, init_adapter)
    history: list[dict[str, float]] = []
    start, resumed = 0, None
    ckpt = None
    if resume and config.checkpoint_dir is not None:
        for stale in config.checkpoint_dir.glob(".tmp-step-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        ckpt = latest_checkpoint(config.checkpoint_dir)
    if ckpt is not None:
        state = _restore(ckpt, model, optimizer, scheduler, fp)
        start = resumed = int(state["step"])
        history = list(state["history"])
        expected = state["data_order"]
        if _permutation(len(items), config.seed, expected["epoch"]) != expected["permutation"]:
            raise ValueError(f"checkpoint {ckpt}: data order differs from this run's")
    ref_logps = None
    if config.objective in PAIR_OBJECTIVES and start < total:
        ref_logps = _reference_logps(model, items, config, device, pad)
    model.train()
    bar = tqdm(total=total, initial=start, disable=not config.progress, desc=config.objective)
    began = time.perf_counter()
    for step in range(start, total):
        optimizer.zero_grad(set_to_none=True)
        record = {"step": float(step + 1), "lr": scheduler.get_last_lr()[0]}
        record.update(_optimizer_step(model, items, config, step, device, pad, ref_logps))
        if config.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            record["grad_norm"] = float(norm)
        optimizer.step()
        scheduler.step()
        history.append(record)
        shown = ("loss", "rewards/margins", "kl", "nll")
        bar.set_postfix({k: f"{record[k]:.4f}" for k in shown if k in record}, refresh=False)
        bar.update(1)
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total:
            assert config.checkpoint_dir is not None
            epoch = done * per_step // len(items)
            order = {"epoch": epoch, "permutation": _permutation(len(items), config.seed, epoch)}
            state = {"step": done, "fingerprint": fp, "data_order": order, "history": history}
            keep = config.keep_checkpoints
            _save_checkpoint(config.checkpoint_dir, model, optimizer, scheduler, state, keep)
    elapsed = time.perf_counter() - began
    bar.close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    trained = (total - start) * per_step
    return TrainResult(
        adapter_dir=out_dir,
        steps=total,
        final_loss=history[-1]["loss"] if history else float("nan"),
        samples_per_s=trained / elapsed if elapsed > 0 else 0.0,
        history=tuple(history),
        resumed_from_step=resumed,
    )
