"""The training stage: a LoRA (or, for CMPO, plural heads) on the iteration's data, continuing
the served version when configured, and the loadable candidate copy the gate serves."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

from tiller.server.formats.manifest import Manifest, write_manifest

from ..data.examples import PreferencePair
from ..heads_trainer import train_heads
from ..trainer import TrainResult, train
from .config import LearnConfig
from .dataset import IterationData
from .served import conditioning

T = TypeVar("T")
CANDIDATE_SUFFIX = "-candidate"


def workdir(cfg: LearnConfig, iteration: int) -> Path:
    """The iteration's directory: frozen data, checkpoints, the trained adapter, the candidate."""
    return cfg.workdir / f"iter-{iteration:04d}"


def objective(cfg: LearnConfig) -> str:
    return "cmpo" if cfg.heads else cfg.train.objective


def train_iteration(
    cfg: LearnConfig, iteration: int, data: IterationData, progress: bool
) -> TrainResult:
    """Train on ``data`` (blocking; run it with ``in_daemon_thread``). LoRA training keeps
    checkpoints in ``<workdir>/ckpt`` and resumes from them after a restart; with
    ``train.processes > 1`` it runs on that many processes (``learner.distributed``), this
    process waiting for them, so sampling, the gate and publishing stay here, once."""
    work, now = workdir(cfg, iteration), data.served
    if cfg.heads is not None:  # CMPO: plural heads, continuing the served ones
        t = cfg.train  # as the gate's fluency model: the trunk shares its copy
        heads = replace(cfg.heads, progress=progress, device=t.device, precision=t.precision)
        init = None
        if cfg.continue_training and now.manifest is not None:
            init = now.path if now.manifest.attributes else None
        pairs: Sequence[PreferencePair] = data.examples  # type: ignore[assignment]
        h = train_heads(cfg.model, pairs, heads, work / "adapter", init_heads=init)
        last = h.history[-1]["loss"] if h.history else float("nan")
        return TrainResult(h.out_dir, h.steps, last, h.samples_per_s, h.history)
    init = None
    if cfg.continue_training and now.manifest is not None and now.manifest.has_lora:
        init = now.path
    tc = replace(
        cfg.train,
        checkpoint_dir=work / "ckpt",
        checkpoint_every=max(1, (cfg.train.max_steps or 8) // 4),
        progress=progress,
    )
    return train(cfg.model, data.examples, tc, work / "adapter", init_adapter=init, resume=True)


def metrics(result: TrainResult) -> dict[str, Any]:
    """The training numbers a published manifest records."""
    return {
        "final_loss": result.final_loss,
        "samples_per_s": result.samples_per_s,
        "steps": result.steps,
        "first_step": result.history[0] if result.history else {},
        "last_step": result.history[-1] if result.history else {},
    }


def hyperparameters(cfg: LearnConfig) -> dict[str, Any]:
    """The trainer's config as JSON, without the per-run fields."""
    t = asdict(cfg.heads) if cfg.heads else asdict(cfg.train)
    for key in ("checkpoint_dir", "progress", "device", "processes", "accelerate_config"):
        t.pop(key, None)
    out: dict[str, Any] = json.loads(json.dumps(t, default=str))
    return out


def candidate_dir(cfg: LearnConfig, iteration: int, adapter_dir: Path) -> Path:
    """A loadable copy of the trained adapter, named ``<adapter>-candidate`` v``iteration``."""
    out = adapter_dir.parent / "candidate"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(adapter_dir, out)
    manifest = Manifest(
        name=cfg.adapter + CANDIDATE_SUFFIX,
        version=iteration,
        base_model=cfg.base_model,
        conditioning=conditioning(cfg),
        attributes=cfg.data.attributes,
        has_lora=(out / "adapter_config.json").is_file(),
    )
    write_manifest(out, manifest)
    return out


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a daemon thread: a stopping learner does not wait for a training run
    (unlike ``asyncio.to_thread``, whose executor is joined at exit); its checkpoints make
    the next start resume it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        try:
            out = fn(*args)
        except BaseException as e:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, out, None)

    threading.Thread(target=work, name="tiller-train", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
