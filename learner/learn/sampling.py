"""Many generations through the server at bounded concurrency (sampling, gate, evaluation)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from tiller.client import AsyncClient


async def generate_each(
    client: AsyncClient, jobs: Sequence[tuple[str, Mapping[str, Any]]], concurrency: int
) -> list[list[str]]:
    """For each ``(prompt, generate kwargs)`` job, the texts of its samples, in job order."""
    sem = asyncio.Semaphore(concurrency)

    async def one(prompt: str, kw: Mapping[str, Any]) -> list[str]:
        async with sem:
            g = await client.generate(prompt, **kw)
        return [c.text for c in g.completions]

    return list(await asyncio.gather(*(one(p, kw) for p, kw in jobs)))
