"""What the learner's integration tests share: a server for the learner to drive, and the
learner run with an annotator beside it (as the sidecar would be)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

from tests.conftest import ServerProc, start_server
from tiller.learner.annotate.runner import Annotator
from tiller.learner.learn.config import LearnConfig
from tiller.learner.learn.loop import Learner
from tiller.server.formats.logstore import connect


def start_learn_server(
    tiny_model: Path, root: Path, adapter_root: Path | None = None
) -> tuple[ServerProc, Path, Path]:
    """A logging server following a fresh registry under ``root``, admin on; the gate's
    candidates load from ``adapter_root`` (the learners' workdirs)."""
    db, registry = root / "log.sqlite", root / "registry"
    registry.mkdir(parents=True)
    roots = ("--adapter-root", str(adapter_root)) if adapter_root else ()
    srv = start_server(
        tiny_model, root / "server", "--log-db", str(db), "--registry", str(registry),
        "--registry-poll", "0.2", "--enable-admin", *roots,
    )  # fmt: skip
    return srv, db, registry


async def run_learner(
    cfg: LearnConfig, providers: Sequence[object], timeout: float = 300
) -> list[str]:
    """The learner with an annotator of ``providers`` beside it until it is done; its report
    lines."""
    annotator = Annotator(connect(cfg.db), list(providers), batch_size=64)  # type: ignore[arg-type]
    lines: list[str] = []
    stop = asyncio.Event()

    async def annotate() -> None:
        while not stop.is_set():
            await annotator.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    side = asyncio.create_task(annotate())
    try:
        learner = Learner(cfg, connect(cfg.db), report=lines.append, progress=False)
        await asyncio.wait_for(learner.run(stop), timeout)
    finally:
        stop.set()
        await side
    return lines
