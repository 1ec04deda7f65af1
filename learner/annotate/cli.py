"""``tiller annotate``: the annotator sidecar process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .config import AnnotatorConfig, build_providers, load_config
from .runner import Annotator


class _Shards:
    """One ``Annotator`` per log shard (one for the single ``db``), sharing the providers; a
    shard that appears later (a new replica) is picked up at the next poll."""

    def __init__(self, config: AnnotatorConfig) -> None:
        self.config = config
        self.providers = build_providers(config)
        self.annotators: dict[str, Annotator] = {}
        self.refresh()

    def refresh(self) -> None:
        from tiller.server.formats.logstore import connect

        from ..shards import resolve

        c = self.config
        paths = [c.db] if c.db is not None else resolve(c.shards)
        for path in paths:
            name = "" if c.db is not None else path.stem
            if name not in self.annotators and (c.db is not None or path.exists()):
                self.annotators[name] = Annotator(
                    connect(path),
                    self.providers,
                    batch_size=c.batch_size,
                    retry_delay_s=c.retry_delay_s,
                )

    def backlogs(self) -> dict[str, int]:
        return {
            _task(shard, name): n
            for shard, a in self.annotators.items()
            for name, n in a.backlogs().items()
        }

    async def drain(self) -> None:
        await asyncio.gather(*(a.drain() for a in self.annotators.values()))

    def close(self) -> None:
        for a in self.annotators.values():
            a.db.conn.close()


def _task(shard: str, provider: str) -> str:
    return f"{shard}: {provider}" if shard else provider


async def _main(config: AnnotatorConfig, once: bool, timeout_s: float) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    shards = _Shards(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def show() -> None:
            for shard, a in shards.annotators.items():
                try:
                    backlogs = a.backlogs()
                except Exception as e:  # a busy or locked log must not stop the annotator
                    console.print(f"[yellow]backlog unavailable: {e}[/yellow]")
                    continue
                for name, st in a.states.items():
                    key = _task(shard, name)
                    left = backlogs[name]
                    total = st.processed + left
                    note = f"errors: {st.failures} {st.last_error[:40]}" if st.failures else ""
                    if key not in tasks:
                        tasks[key] = progress.add_task(key, total=max(total, 1), note="")
                    progress.update(tasks[key], total=max(total, 1), completed=st.processed,
                                    note=note)  # fmt: skip

        try:
            show()
            deadline = time.monotonic() + timeout_s
            while not stop.is_set():
                shards.refresh()
                await shards.drain()
                show()
                if once:
                    if not any(shards.backlogs().values()):
                        break
                    if time.monotonic() > deadline:
                        console.print("[red]annotate --once: timed out with a backlog left[/red]")
                        return 1
                    await asyncio.sleep(min(config.retry_delay_s, 1.0))
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), config.poll_interval_s)
        finally:
            shards.close()
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
    help="Override the config's generation log path (and its shards).",
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
        config = replace(config, db=db, shards=())
    raise SystemExit(asyncio.run(_main(config, once, timeout_s)))
