"""``tiller learn``: the continuous learner process, and its history."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import click

from tiller.server.formats.sections import field_default

from ..heads_trainer import HeadsTrainConfig
from ..objectives.cmpo import CMPOConfig
from .config import LearnConfig, load_config


async def _main(config: LearnConfig, progress: bool) -> int:
    from rich.console import Console

    from tiller.server.formats.logstore import connect

    from .loop import Learner

    console = Console(stderr=True)
    db = connect(config.db)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    learner = Learner(
        config, db, report=lambda line: console.log(line, highlight=False), progress=progress
    )
    objective = "cmpo heads" if config.heads else config.train.objective
    console.log(
        f"learning {config.adapter} ({objective} on {config.data.kind} data) "
        f"from {config.db}; registry {config.registry}"
    )
    return await learner.run(stop)


@click.group(invoke_without_command=True)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Learner TOML config (see tiller.learner.learn.config).",
)
@click.option("--max-iterations", type=int, default=None, help="Stop after this many.")
@click.option("--no-progress", is_flag=True, help="No training progress bars.")
@click.pass_context
def learn(
    ctx: click.Context, config_path: Path | None, max_iterations: int | None, no_progress: bool
) -> None:
    """Train, gate, publish and promote adapter versions from the annotated log, continuously."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("--config is required")
    logging.basicConfig(level=logging.WARNING)
    try:
        config = load_config(config_path, os.environ)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if max_iterations is not None:
        config = replace(config, max_iterations=max_iterations)
    done = asyncio.run(_main(config, progress=not no_progress))
    click.echo(f"{done} iterations recorded", err=True)
    if any(t.name == "tiller-train" for t in threading.enumerate()):
        # Stopped mid-training: the checkpoints hold the run and the next start resumes it.
        # Leave now; tearing the interpreter down under a running torch thread aborts.
        click.echo("stopped during training; the next start resumes from its checkpoint", err=True)
        sys.stderr.flush()
        os._exit(0)


@learn.command()
@click.option(
    "--db", "db_path", type=click.Path(path_type=Path, dir_okay=False, exists=True), required=True
)
@click.option("--adapter", default=None, help="Only this adapter.")
def history(db_path: Path, adapter: str | None) -> None:
    """The learner's iterations: status, data, loss, gate numbers, the version sampled and the
    feedback-to-served time (median / max seconds from a label landing in the log to the version
    trained on it being served)."""
    from rich.console import Console
    from rich.table import Table

    from tiller.server.formats.logstore import iterations, open_readonly

    rows = iterations(open_readonly(db_path), adapter)
    table = Table(
        "adapter",
        "iter",
        "status",
        "version",
        "sampled",
        "examples",
        "loss",
        "gate",
        "fb→served s",
        "reason",
    )
    for r in rows:
        gate = (
            ""
            if r["gate_passed"] is None
            else f"{_num(r['candidate_value'])} vs {_num(r['incumbent_value'])}"
        )
        table.add_row(
            r["adapter"],
            str(r["iteration"]),
            r["status"],
            f"v{r['version']}" if r["version"] is not None else "",
            _sampled(r.get("sampled_version")),  # .get: a table an older Tiller wrote
            str(r["examples"]),
            _num(r["final_loss"]),
            gate,
            _served(r.get("feedback_to_served_median_s"), r.get("feedback_to_served_max_s")),
            (r["reason"] or "")[:60],
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: whole rows, not the 80 columns rich assumes
        console = Console(width=max(console.width, 160))
    console.print(table)


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _sampled(version: int | None) -> str:
    """The version an iteration's active sampling used (0 is the base model)."""
    return "" if version is None else "base" if version == 0 else f"v{version}"


def _served(median: float | None, longest: float | None) -> str:
    """Feedback-to-served seconds, median / max."""
    return "" if median is None or longest is None else f"{median:.1f} / {longest:.1f}"


@learn.command()
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    required=True,
    help="Base model directory (the trunk stays frozen).",
)
@click.option(
    "--pairs",
    "pairs_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="JSONL preference pairs with attribute_weights (CMPO power-set λ).",
)
@click.option(
    "--attribute", "attributes", multiple=True, required=True, help="Head names, in order."
)
@click.option("--base-model", default="", help="Base model id recorded in the heads manifest.")
@click.option(
    "--rank", type=int, default=field_default(HeadsTrainConfig, "rank"), show_default=True
)
@click.option(
    "--epochs", type=int, default=field_default(HeadsTrainConfig, "epochs"), show_default=True
)
@click.option("--lr", type=float, default=field_default(HeadsTrainConfig, "lr"), show_default=True)
@click.option("--beta", type=float, default=field_default(CMPOConfig, "beta"), show_default=True)
@click.option(
    "--label-smoothing",
    type=float,
    default=field_default(CMPOConfig, "label_smoothing"),
    show_default=True,
)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def heads(
    model_dir: Path,
    pairs_path: Path,
    attributes: tuple[str, ...],
    base_model: str,
    rank: int,
    epochs: int,
    lr: float,
    beta: float,
    label_smoothing: float,
    out: Path,
) -> None:
    """Train CMPO plural heads (low-rank, frozen trunk) into OUT, ready to publish or serve."""
    from ..data.jsonl import load_pairs
    from ..heads_trainer import HeadsTrainConfig, train_heads
    from ..objectives.cmpo import CMPOConfig

    try:
        cfg = HeadsTrainConfig(
            attributes=attributes,
            base_model=base_model or model_dir.name,
            rank=rank,
            epochs=epochs,
            lr=lr,
            objective=CMPOConfig(beta=beta, label_smoothing=label_smoothing),
        )
        result = train_heads(model_dir, load_pairs(pairs_path), cfg, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    last = result.history[-1]
    click.echo(f"wrote {out}: {result.steps} steps, final loss {last['loss']:.4f}", err=True)
