"""Many generations through the server at bounded concurrency, and active mode's sampling.

``GenerationJob`` is one ``Generate`` request as a value; ``generate_each`` sends a list of
them. The learner's active mode (``sample_jobs``) draws prompts from the pool each iteration
(``SamplingRun``: what one iteration's sampling did); held-out generation
(``tiller.learner.heldout``) builds its jobs from a sampling spec.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tiller.client import AsyncClient

if TYPE_CHECKING:
    from .config import SampleConfig
    from .served import Served


@dataclass(frozen=True, kw_only=True)
class GenerationJob:
    """One ``Generate`` request. ``None`` leaves a setting to the server (``seed``: a random
    one; ``log``: the server's default, which logs)."""

    prompt: str
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float | None = None
    seed: int | None = None
    adapter: str = ""
    adapter_version: int | None = None
    feedback: str = ""
    feedback_mix: tuple[tuple[str, float], ...] = ()  # instead of ``feedback``; n must be 1
    attributes: tuple[tuple[str, float], ...] = ()
    log: bool | None = None

    def request_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``AsyncClient.generate`` (the client's own API)."""
        return {
            "n": self.n,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "adapter": self.adapter,
            "adapter_version": self.adapter_version,
            "feedback": self.feedback,
            "feedback_mix": dict(self.feedback_mix) if self.feedback_mix else None,
            "attributes": dict(self.attributes) if self.attributes else None,
            "log": self.log,
            "priority": "background",  # the learner's work waits behind users' requests
        }


@dataclass(frozen=True)
class SamplingRun:
    """One iteration's active sampling, as its record keeps it: the version sampled (0: the base
    model, as the log writes it), when, whether it ran ahead beside the previous iteration's
    training and gate (``pipelined``), and per log shard the seqs ``after < seq <= upto`` of
    the generations logged meanwhile."""

    version: int
    started_at: float
    finished_at: float
    pipelined: bool
    after: Mapping[str, int]
    upto: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "pipelined": self.pipelined,
            "generations": {k: [self.after.get(k, 0), v] for k, v in self.upto.items()},
        }


async def generate_each(
    client: AsyncClient, jobs: Sequence[GenerationJob], concurrency: int
) -> list[list[str]]:
    """For each job, the texts of its samples, in job order; at most ``concurrency`` requests
    in flight. The first server error propagates (``TillerClientError``)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(job: GenerationJob) -> list[str]:
        async with sem:
            g = await client.generate(job.prompt, **job.request_kwargs())
        return [c.text for c in g.completions]

    return list(await asyncio.gather(*(one(j) for j in jobs)))


def sample_jobs(s: SampleConfig, iteration: int, adapter: str, now: Served) -> list[GenerationJob]:
    """Active mode's requests for ``iteration``: a seeded draw of ``per_iteration`` prompts
    from the pool, logged, from the served version (the base before the first), with its
    feedback tags and attribute weights taken in turn prompt by prompt when it has them."""
    rng = random.Random(s.seed * 1_000_003 + iteration)
    prompts = rng.sample(s.prompts, min(s.per_iteration, len(s.prompts)))
    tags: tuple[str, ...] = ()
    weights: tuple[tuple[tuple[str, float], ...], ...] = ()
    if now.version is not None and now.manifest is not None:
        if now.manifest.conditioning is not None:
            given = (s.feedback,) if isinstance(s.feedback, str) else s.feedback
            tags = tuple(t for t in given if t)
        if now.manifest.attributes:
            weights = tuple(tuple(w.items()) for w in s.attributes)
    return [
        GenerationJob(
            prompt=p,
            n=s.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            adapter=adapter if now.version is not None else "",
            adapter_version=now.version,
            feedback=tags[i % len(tags)] if tags else "",
            attributes=weights[i % len(weights)] if weights else (),
        )
        for i, p in enumerate(prompts)
    ]
