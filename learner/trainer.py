"""The one training loop: examples + objective config -> a LoRA adapter directory.

``train`` loads the base model, wraps it with a peft LoRA (or continues ``init_adapter``),
tokenises every example once (``batches``), and runs AdamW with gradient accumulation and
clipping over the objective's loss (``batch_loss``; the reference is the same model with its
adapter disabled).

Reproducibility: the data order of each epoch is a seeded permutation (``batches``) and the whole
run is seeded; on CPU the same config and data give bit-identical adapters. Every
``checkpoint_every`` optimizer steps a checkpoint is written atomically (``checkpoints``);
``train(..., resume=True)`` restarts from the latest one and reaches the same final weights as
an uninterrupted run. One trainer per ``checkpoint_dir`` at a time.

Several processes: ``train`` runs through ``accelerate.Accelerator``. With one process (a plain
call) that changes nothing; launched by ``accelerate launch`` (or with ``processes > 1``, which
launches itself: ``distributed``) it trains data-parallel with DDP on the same global batch:
each process takes every N-th of a step's ``grad_accum`` micro-batches, scales its loss by N so
DDP's gradient mean is the one-process gradient, and the logged metrics are summed across
processes. Only rank 0 writes checkpoints and the adapter; every rank resumes from them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from .batch_loss import batch_loss, reference_logps
from .batches import Item, indices, permutation, tokenize
from .checkpoints import (
    fingerprint,
    latest_checkpoint,
    remove_partial,
    restore_checkpoint,
    save_checkpoint,
)
from .data.examples import PreferencePair, SFTExample
from .objectives.alt import ALTConfig
from .objectives.cdpo import CDPOConfig
from .objectives.dpo import DPOConfig
from .objectives.ipo import IPOConfig
from .objectives.sft import SFTConfig
from .objectives.slic import SLiCConfig
from .precision import bf16_autocast, train_device

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. ``objective_config=None`` means the defaults of
    ``objective``; a config of another objective's type raises ``ValueError``.

    ``max_steps`` (optimizer steps) overrides ``epochs``; one step consumes
    ``batch_size * grad_accum`` examples (pairs count as one). LoRA fields are ignored when
    ``train`` continues an ``init_adapter`` (its own config applies). ``checkpoint_every=0``
    disables checkpoints. ``gradient_checkpointing`` keeps only each decoder layer's input for the
    backward pass and recomputes the rest (~1/3 more compute, less memory); it does not change
    the result.

    ``precision``: ``fp32`` trains in float32; ``bf16`` keeps float32 weights on the CPU and runs
    the forward and backward passes under bfloat16 autocast (faster on CPUs with native bf16
    matmuls), and loads the model in bfloat16 on CUDA. ``auto``: bf16 on a CUDA device that
    supports it, fp32 on the CPU (bit-exact resumption, float32 references). ``fast``: bf16
    wherever the hardware multiplies bf16 natively (``precision.native_bf16``), fp32 elsewhere,
    where bf16 autocast is emulated and many times slower. The shipped align configs use it.

    ``processes``: data-parallel processes for one run. ``train`` called with ``processes > 1``
    outside a multi-process run launches itself on that many (``accelerate launch``, DDP; gloo
    on the CPU, ``distributed``) and returns rank 0's result. The global batch stays
    ``batch_size * grad_accum`` (``grad_accum`` must be a multiple of ``processes``), so the
    losses match a one-process run up to float rounding. ``accelerate_config``: an
    ``accelerate`` config file for that launch (e.g. FSDP, ``deploy/config/accelerate-fsdp.yaml``).
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
    processes: int = 1
    accelerate_config: Path | None = None

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
        for name in (
            "lora_r",
            "batch_size",
            "grad_accum",
            "epochs",
            "keep_checkpoints",
            "processes",
        ):
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
        if self.grad_accum % self.processes:
            raise ValueError(
                f"grad_accum ({self.grad_accum}) must be a multiple of processes "
                f"({self.processes}): each process takes grad_accum / processes micro-batches"
            )
        if self.accelerate_config is not None and self.processes == 1:
            raise ValueError("accelerate_config needs processes > 1 (it configures the launch)")
        if self.checkpoint_every < 0 or (self.checkpoint_every and self.checkpoint_dir is None):
            raise ValueError("checkpoint_every must be >= 0 and needs checkpoint_dir when > 0")

    @property
    def loss_config(self) -> ObjectiveConfig:
        assert self.objective_config is not None  # set in __post_init__
        return self.objective_config


@dataclass(frozen=True)
class TrainResult:
    """``history``: one dict per optimizer step (``step``, ``lr``, ``loss`` and the objective's
    metrics averaged over the step's micro-batches of all processes; losses are measured before
    that step's update). ``samples_per_s`` counts the examples all processes trained on over the
    loop time."""

    adapter_dir: Path
    steps: int
    final_loss: float
    samples_per_s: float
    history: tuple[dict[str, float], ...] = field(repr=False)
    resumed_from_step: int | None = None


def _load_model(
    model_dir: Path, cfg: TrainConfig, init_adapter: Path | None, device: torch.device, to: bool
) -> Any:
    """The peft model for a run on ``device``; ``to``: moved there (FSDP places the shards)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = (
        torch.bfloat16 if device.type == "cuda" and bf16_autocast(cfg, device) else torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if to:
        base = base.to(device)
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
    items: Sequence[Item],
    cfg: TrainConfig,
    step: int,
    device: torch.device,
    pad: int,
    ref_logps: Tensor | None,
    accelerator: Accelerator,
) -> dict[str, float]:
    """Forward/backward over this process's share of step ``step``'s ``grad_accum``
    micro-batches (every N-th of N processes); metrics averaged over all processes' shares."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = range(rank, cfg.grad_accum, world)
    record: dict[str, float] = {}
    for n, micro in enumerate(mine):
        first = (step * cfg.grad_accum + micro) * cfg.batch_size
        idx = indices(len(items), cfg.seed, first, cfg.batch_size)
        ref = ref_logps[idx] if ref_logps is not None else None
        # DDP all-reduces on this process's last micro-batch only; it averages over the
        # processes, so scaling by ``world`` leaves the one-process mean over micro-batches.
        last = n == len(mine) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss, metrics = batch_loss(model, [items[i] for i in idx], cfg, device, pad, ref)
            (loss * world / cfg.grad_accum).backward()
        for k, v in metrics.items():
            record[k] = record.get(k, 0.0) + v / cfg.grad_accum
    if world > 1:  # every process has the same keys in the same order
        mine_sums = torch.tensor(list(record.values()), dtype=torch.float64, device=device)
        summed = accelerator.reduce(mine_sums, "sum")
        record = dict(zip(record, summed.tolist(), strict=True))
    return record


def _accelerator(cfg: TrainConfig) -> tuple[Accelerator, torch.device]:
    """The run's ``Accelerator`` and device: ``cfg.device`` in a single process, the
    accelerator's (this rank's GPU, or the CPU) in a multi-process run."""
    from accelerate import Accelerator

    accelerator = Accelerator(device_placement=False)
    if accelerator.num_processes == 1:
        return accelerator, train_device(cfg)
    device = accelerator.device
    if cfg.device != "auto" and device.type != cfg.device:
        raise ValueError(f"device {cfg.device!r}, but this run was launched on {device.type}")
    if cfg.grad_accum % accelerator.num_processes:
        raise ValueError(
            f"grad_accum ({cfg.grad_accum}) must be a multiple of the number of processes "
            f"({accelerator.num_processes}): each takes grad_accum / processes micro-batches"
        )
    return accelerator, device


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

    ``config.processes > 1`` outside a multi-process run: launched on that many processes
    (``distributed.launch``); otherwise ``train_here``.
    """
    from . import distributed

    if config.processes > 1 and not distributed.launched():
        return distributed.launch(model_dir, examples, config, out_dir, init_adapter, resume=resume)
    return train_here(model_dir, examples, config, out_dir, init_adapter, resume=resume)


def train_here(
    model_dir: Path,
    examples: Sequence[SFTExample] | Sequence[PreferencePair],
    config: TrainConfig,
    out_dir: Path,
    init_adapter: Path | None = None,
    *,
    resume: bool = False,
) -> TrainResult:
    """``train`` in this process: alone, or as one of the processes ``accelerate launch``
    started, training data-parallel with the others (``config.processes`` is not consulted)."""
    from accelerate.utils import DistributedType
    from tqdm import tqdm
    from transformers import AutoTokenizer

    torch.manual_seed(config.seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    items = tokenize(examples, tok, config, pairs=config.objective in PAIR_OBJECTIVES)
    accelerator, device = _accelerator(config)
    main = accelerator.is_main_process
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and config.checkpoint_every:
        log.warning("FSDP: no checkpoints (the optimizer state is sharded); a killed run restarts")
    model = _load_model(model_dir, config, init_adapter, device, to=not fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    peft = accelerator.unwrap_model(model)  # what saves, restores and disables the adapter
    params = [p for p in model.parameters() if p.requires_grad]
    per_step = config.batch_size * config.grad_accum
    total = config.max_steps or config.epochs * -(-len(items) // per_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, total))
    fp = fingerprint(config, items, init_adapter)
    history: list[dict[str, float]] = []
    start, resumed = 0, None
    ckpt = None
    if resume and config.checkpoint_dir is not None and not fsdp:
        if main:
            remove_partial(config.checkpoint_dir)  # left by a killed run
        accelerator.wait_for_everyone()
        ckpt = latest_checkpoint(config.checkpoint_dir)
    if ckpt is not None:
        state = restore_checkpoint(ckpt, peft, optimizer, scheduler, fp)
        start = resumed = int(state["step"])
        history = list(state["history"])
        expected = state["data_order"]
        if permutation(len(items), config.seed, expected["epoch"]) != expected["permutation"]:
            raise ValueError(f"checkpoint {ckpt}: data order differs from this run's")
    ref_logps = None
    if config.objective in PAIR_OBJECTIVES and start < total:
        shard = (accelerator.process_index, accelerator.num_processes)
        ref_logps = reference_logps(model, items, config, device, pad, shard)
        if accelerator.num_processes > 1:  # each row was computed by one process, zeros elsewhere
            ref_logps = accelerator.reduce(ref_logps, "sum")
    model.train()
    quiet = not (config.progress and main)
    bar = tqdm(total=total, initial=start, disable=quiet, desc=config.objective)
    began = time.perf_counter()
    for step in range(start, total):
        optimizer.zero_grad(set_to_none=True)
        record = {"step": float(step + 1), "lr": scheduler.get_last_lr()[0]}
        record.update(
            _optimizer_step(model, items, config, step, device, pad, ref_logps, accelerator)
        )
        if config.max_grad_norm is not None:
            if fsdp:  # the global norm of the sharded gradients
                norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            record["grad_norm"] = float(norm)
        optimizer.step()
        scheduler.step()
        history.append(record)
        shown = ("loss", "rewards/margins", "kl", "nll")
        bar.set_postfix({k: f"{record[k]:.4f}" for k in shown if k in record}, refresh=False)
        bar.update(1)
        done = step + 1
        due = config.checkpoint_every and done % config.checkpoint_every == 0 and done < total
        if due and main and not fsdp:
            assert config.checkpoint_dir is not None
            epoch = done * per_step // len(items)
            order = {"epoch": epoch, "permutation": permutation(len(items), config.seed, epoch)}
            state = {"step": done, "fingerprint": fp, "data_order": order, "history": history}
            keep = config.keep_checkpoints
            save_checkpoint(config.checkpoint_dir, peft, optimizer, scheduler, state, keep)
            log.info("rank %d wrote checkpoint step %d", accelerator.process_index, done)
    elapsed = time.perf_counter() - began
    bar.close()
    out_dir = Path(out_dir)
    # Under FSDP the full weights are gathered by every process (a collective), kept on rank 0.
    full = {"state_dict": accelerator.get_state_dict(model)} if fsdp else {}
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        peft.save_pretrained(out_dir, safe_serialization=True, **full)
        log.info("rank %d wrote the adapter to %s", accelerator.process_index, out_dir)
    accelerator.wait_for_everyone()  # the adapter is complete when any process returns
    trained = (total - start) * per_step
    return TrainResult(
        adapter_dir=out_dir,
        steps=total,
        final_loss=history[-1]["loss"] if history else float("nan"),
        samples_per_s=trained / elapsed if elapsed > 0 else 0.0,
        history=tuple(history),
        resumed_from_step=resumed,
    )
