"""``tiller annotate``: the annotator sidecar process."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import click

from .config import AnnotatorConfig, build_providers, load_config
from .runner import Annotator


async def _main(config: AnnotatorConfig, once: bool, timeout_s: float) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tiller.server.formats.logstore import connect

    db = connect(config.db)
    annotator = Annotator(
        db,
        build_providers(config),
        batch_size=config.batch_size,
        retry_delay_s=config.retry_delay_s,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    console = Console(stderr=True)
    start_backlog = annotator.backlogs()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as progress:
        tasks = {
            name: progress.add_task(name, total=max(n, 1), note="")
            for name, n in start_backlog.items()
        }

        def show(a: Annotator) -> None:
            try:
                backlogs = a.backlogs()
            except Exception as e:  # a busy or locked log must not stop the annotator
                console.print(f"[yellow]backlog unavailable: {e}[/yellow]")
                return
            for name, st in a.states.items():
                left = backlogs[name]
                total = st.processed + left
                note = f"errors: {st.failures} {st.last_error[:40]}" if st.failures else ""
                progress.update(tasks[name], total=max(total, 1), completed=st.processed, note=note)

        if once:
            deadline = time.monotonic() + timeout_s
            while not stop.is_set():
                await annotator.drain()
                show(annotator)
                if not any(annotator.backlogs().values()):
                    break
                if time.monotonic() > deadline:
                    console.print("[red]annotate --once: timed out with a backlog left[/red]")
                    db.conn.close()
                    return 1
                await asyncio.sleep(min(config.retry_delay_s, 1.0))
        else:
            await annotator.run(stop, config.poll_interval_s, on_progress=show)
    db.conn.close()
    return 0


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="Annotator TOML (see tiller.learner.annotate.config).",
)
@click.option(
    "--db",
    type=click.Path(path_type=Path),
    default=None,
    help="Override the config's generation log path.",
)
@click.option("--once", is_flag=True, help="Process the backlog, then exit.")
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=3600.0,
    show_default=True,
    help="With --once: give up (exit 1) if the backlog is not done by then.",
)
def annotate(config_path: Path, db: Path | None, once: bool, timeout_s: float) -> None:
    """Follow the generation log and label new generations with the configured providers."""
    try:
        config = load_config(config_path, os.environ)
    except ValueError as e:  # a ConfigError naming the file, the key and the expected type
        raise click.ClickException(str(e)) from None
    if db is not None:
        config = replace(config, db=db)
    raise SystemExit(asyncio.run(_main(config, once, timeout_s)))
