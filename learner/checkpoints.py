"""Training checkpoints: written atomically, found, and restored only into the same run.

A checkpoint (adapter, optimizer, scheduler, torch RNG states, step, data order, history) lives
in ``checkpoint_dir/step-NNNNNNNN``. It is written into a temporary directory, fsynced and made
visible by one rename, so a kill -9 leaves either the old or the new checkpoint. One trainer per
``checkpoint_dir`` at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .batches import Item

if TYPE_CHECKING:
    from .trainer import TrainConfig

# Fields that may change between a run and its resumption without changing the result.
# (gradient_checkpointing recomputes the same float32 ops in the same order: the same weights;
# processes changes only the order of float sums: a run may resume on another number.)
RESUME_FREE = (
    "device",
    "processes",
    "accelerate_config",
    "checkpoint_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "gradient_checkpointing",
)


def fingerprint(cfg: TrainConfig, items: Sequence[Item], init_adapter: Path | None) -> str:
    """What a checkpoint must match to be resumed: the settings that change the result, the
    init adapter and the tokenised data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(init_adapter).encode())
    for it in items:
        h.update(repr(it).encode())
    return h.hexdigest()


def save_checkpoint(
    root: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int
) -> Path:
    """Write ``step-{state['step']}`` under ``root`` and keep the newest ``keep`` checkpoints."""
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


def remove_partial(root: Path) -> None:
    """Delete the temporary directories a killed run left under ``root``."""
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def restore_checkpoint(
    ckpt: Path, model: Any, optimizer: Any, scheduler: Any, fp: str
) -> dict[str, Any]:
    """Load ``ckpt`` into the model, optimizer, scheduler and torch RNGs; return its state.
    ``ValueError`` when it was written for another fingerprint (config, data or init adapter)."""
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
