"""``tiller align``: run the online-alignment loop from one config file."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import click

from tiller.server.tools.models import DEFAULT_CACHE

from .config import load_config


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="Align TOML config (e.g. deploy/align/alt-sentiment.toml).",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Run directory [default: runs/<name>-<time>].",
)
@click.option("--duration", type=float, default=None, help="Override duration_s (seconds).")
@click.option(
    "--max-iterations", type=int, default=None, help="End after this many learner iterations."
)
@click.option(
    "--evaluate-only",
    is_flag=True,
    help="Evaluate an existing --run-dir again (server only, its active version); no training.",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_CACHE,
    show_default=True,
    help="Where the default model is converted once.",
)
def align(
    config_path: Path,
    run_dir: Path | None,
    duration: float | None,
    max_iterations: int | None,
    evaluate_only: bool,
    cache_dir: Path,
) -> None:
    """Serve, annotate, train, gate, publish and hot-swap, continuously; then evaluate."""
    from rich.console import Console

    from .children import resolve_model
    from .run import run

    try:
        cfg = load_config(config_path)
    except ValueError as e:  # a ConfigError naming the file, the key and the expected type
        raise click.ClickException(str(e)) from None
    if duration is not None:
        cfg = replace(cfg, duration_s=duration)
    if max_iterations is not None:
        cfg = replace(cfg, learner={**cfg.learner, "max_iterations": max_iterations})
    if evaluate_only and run_dir is None:
        raise click.UsageError("--evaluate-only needs --run-dir (the run to evaluate)")
    root = run_dir or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = root.resolve()
    console = Console(stderr=True)
    try:
        model = resolve_model(cfg.model, cfg.base, cache_dir)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    console.log(f"tiller align {cfg.name}: {model.name}, {cfg.duration_s:.0f} s, run dir {root}")
    raise SystemExit(
        run(
            cfg,
            config_path,
            root,
            model,
            lambda m: console.log(m, highlight=False),
            evaluate_only=evaluate_only,
        )
    )
