"""Gate runs: each side generating the held-out prompts (``heldout``), the judge, the verdict
(``run_gate``), and the one cache of runs the learner keeps between iterations (``GateRuns``).

Gate runs are deterministic for a gate config (same prompts, seeds, sampling), so three are
kept rather than generated again: the base model's run (the anchor of
``max_base_perplexity_ratio`` and ``min_base_distinct2_ratio``; it never changes), the run of
the candidate that was promoted (the next gate's incumbent: same weights, only the adapter name
differs), and the runs started
beside an iteration's sampling (``GateRuns.start_ahead``: they share the server's batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from tiller.client import AsyncClient
from tiller.server.formats.logstore import GenerationView

from ..annotate.judge import LLMJudge
from ..fluency import Scorer, perplexity
from ..heldout import Condition, HeldoutRun, generate, guided_pair, score
from .config import LearnConfig
from .gate import GateConfig, Side, Verdict, decide, distinct_n, evaluate
from .served import Served, conditioning
from .train import CANDIDATE_SUFFIX


def conditions(side: Side, cfg: GateConfig) -> list[Condition]:
    """What ``side`` generates: one held-out condition per gate tag, guided with
    ``gate.guidance``. The base model gets a tag rendered into the prompt, unguided
    (``ValueError`` without a conditioning to render it with)."""
    out = []
    mixes = guided_pair(cfg.high_tag, cfg.low_tag, cfg.guidance)
    for tag in cfg.tags:
        if side.name:
            mix = mixes.get(tag, ())
            out.append(
                Condition(side.label, side.name, side.version, tag, None, side.attributes, mix)
            )
        elif tag and side.conditioning is None:
            raise ValueError("the gate needs a conditioning to render tags for the base model")
        else:
            out.append(Condition(side.label, feedback=tag, render=side.conditioning))
    return out


Texts = tuple[tuple[str, str, str], ...]  # (tag, prompt, text) per generation, stable order


def head_conditions(side: Side, cfg: GateConfig) -> list[Condition]:
    """What ``side`` generates for the ``gate.heads`` checks: one condition per check at its
    weights for a side with weights; none for a side without heads (its main texts serve)."""
    if not side.attributes:
        return []
    return [
        Condition(
            f"{side.label} {h.label}",
            side.name,
            side.version,
            attributes=tuple(h.attributes.items()),
        )
        for h in cfg.heads
    ]


async def generate_side(
    client: AsyncClient, side: Side, cfg: GateConfig
) -> tuple[Texts, tuple[float, ...], tuple[tuple[Texts, tuple[float, ...]], ...]]:
    """(tag, prompt, text) for every gate tag × prompt × sample, in a stable order, each
    text's score from the gate's scorer (empty without one), and the same (texts, scores) for
    each ``gate.heads`` check (``head_conditions``; a side without heads: its main texts,
    scored by the check's scorer). Each text is scored only by the scorers that judge it."""
    main_conds, head_conds = conditions(side, cfg), head_conditions(side, cfg)
    runs = await generate(client, [*main_conds, *head_conds], cfg.prompts, cfg.sampling)

    def texts_of(rs: Sequence[HeldoutRun]) -> Texts:
        return tuple((r.condition.feedback, s.prompt, s.text) for r in rs for s in r.samples)

    @functools.cache  # the base side's main texts serve every check: score each text once
    def scored(texts: Texts, scorer: str | None) -> tuple[float, ...]:
        return tuple(score([t for _, _, t in texts], (scorer,))[scorer]) if scorer else ()

    main = texts_of(runs[: len(main_conds)])
    heads_texts = (
        [texts_of([r]) for r in runs[len(main_conds) :]] if head_conds else [main] * len(cfg.heads)
    )
    heads = tuple((t, scored(t, h.scorer)) for t, h in zip(heads_texts, cfg.heads, strict=True))
    return main, scored(main, cfg.scorer), heads


def _view(i: int, group: str, prompt: str, text: str, side: str) -> GenerationView:
    return GenerationView(
        seq=i,
        id=f"gate-{side}-{i}",
        group_id=group,
        sample_index=0,
        prompt=prompt,
        chat_json="",
        rendered_prompt=prompt,
        feedback="",
        adapter="",
        adapter_version=0,
        output_text=text,
        finish_reason="stop",
        created_at=0.0,
    )


async def judge_win_rate(
    judge: LLMJudge,
    candidate: Sequence[tuple[str, str, str]],
    incumbent: Sequence[tuple[str, str, str]],
) -> tuple[float | None, int]:
    """The candidate's win rate over the incumbent, row by row (same prompt, tag and sample);
    returns (rate or None when no verdict parsed, verdicts counted)."""
    views = []
    for i, ((_, prompt, a), (_, _, b)) in enumerate(zip(candidate, incumbent, strict=True)):
        views += [_view(2 * i, f"g{i}", prompt, a, "c"), _view(2 * i + 1, f"g{i}", prompt, b, "i")]
    notes = await judge.annotate(views)
    points = []
    for note in notes:
        if note.error or not isinstance(note.value, dict):
            continue
        winner = note.value.get("winner")
        points.append(1.0 if winner == "a" else 0.0 if winner == "b" else 0.5)
    return (sum(points) / len(points) if points else None), len(points)


@dataclass(frozen=True)
class SideRun:
    """One side's gate generations and their perplexity under the base (``None``: not measured).

    A promoted candidate's run is the next gate's incumbent run: same prompts, seeds and
    sampling, same weights, only the adapter name differs (``run_gate``'s ``incumbent_run``)."""

    texts: Texts
    perplexity: float | None = None
    scores: tuple[float, ...] = ()  # the scorer's value of each text (empty without a scorer)
    heads: tuple[tuple[Texts, tuple[float, ...]], ...] = ()  # per ``gate.heads`` check

    @property
    def distinct2(self) -> float:
        return distinct_n([t for _, _, t in self.texts])


async def run_side(
    client: AsyncClient,
    side: Side,
    cfg: GateConfig,
    fluency: Callable[[], Scorer] | None = None,
) -> SideRun:
    """Generate with ``side``; with a perplexity bound set, measure the perplexity too."""
    return (await run_sides(client, (side,), cfg, fluency))[0]


async def run_sides(
    client: AsyncClient,
    sides: Sequence[Side],
    cfg: GateConfig,
    fluency: Callable[[], Scorer] | None = None,
) -> list[SideRun]:
    """``run_side`` for each of ``sides``. All sides generate at once: the server batches
    their requests together (one batch of 128 beside the serving load, not two of 64), and
    only then does the base model score their perplexities, one side after the other."""
    if cfg.measures_perplexity and fluency is None:
        raise ValueError("gate.max_perplexity_ratio needs the base model to score with")
    # one held-out call per side: each side keeps its own ``concurrency`` requests in flight
    runs = await asyncio.gather(*(generate_side(client, side, cfg) for side in sides))
    if not cfg.measures_perplexity or fluency is None:
        return [SideRun(texts, scores=scores, heads=heads) for texts, scores, heads in runs]
    model = await asyncio.to_thread(fluency)
    out = []
    for texts, scores, heads in runs:
        pairs = [(p, t) for _, p, t in texts]
        ppl = await asyncio.to_thread(perplexity, model, pairs)
        out.append(SideRun(texts, ppl, scores, heads))
    return out


class GateOutcome(NamedTuple):
    """``run_gate``'s result: the verdict, the candidate's run (the next gate's incumbent run
    if it is promoted) and the base model's run it measured against (``None``: none), which
    does not change and can be passed back as ``base_run``."""

    verdict: Verdict
    candidate: SideRun
    base: SideRun | None


async def run_gate(
    client: AsyncClient,
    candidate: Side,
    incumbent: Side,
    cfg: GateConfig,
    fluency: Callable[[], Scorer] | None = None,
    *,
    incumbent_run: SideRun | None = None,
    base_run: SideRun | None = None,
) -> GateOutcome:
    """Generate with both sides, score, judge, decide. ``fluency`` returns the base model for
    the perplexity checks (called only when one is set; may cache). ``incumbent_run``: the
    incumbent's run from an earlier gate with this config (it was that gate's promoted
    candidate); it is used instead of generating again, which halves the gate's cost after a
    promotion; without it, both sides generate at once (``run_sides``). ``base_run``: the base
    model's run with this config, for the base-anchored checks (when the incumbent is not
    the base and none is given, the base generates beside the other sides; when the incumbent
    is the base, its run is the base's)."""
    base: Side | None = None
    if cfg.anchors_on_base and base_run is None and incumbent.name:
        base = Side("", 0, incumbent.conditioning)
    todo = [candidate] + ([incumbent] if incumbent_run is None else []) + ([base] if base else [])
    done = await run_sides(client, todo, cfg, fluency)
    cand = done[0]
    inc = incumbent_run if incumbent_run is not None else done[1]
    if base is not None:
        base_run = done[-1]
    elif base_run is None and not incumbent.name:
        base_run = inc  # the incumbent is the base model
    win_rate = None
    if cfg.judge is not None:
        win_rate, _ = await judge_win_rate(LLMJudge(cfg.judge), cand.texts, inc.texts)
    verdict = decide(
        evaluate(candidate, cand.texts, cfg, cand.perplexity, cand.scores or None, cand.heads),
        evaluate(incumbent, inc.texts, cfg, inc.perplexity, inc.scores or None, inc.heads),
        cfg,
        win_rate,
        base_perplexity=base_run.perplexity if base_run is not None else None,
        base_distinct2=base_run.distinct2 if base_run is not None else None,
    )
    return GateOutcome(replace(verdict, incumbent_reused=incumbent_run is not None), cand, base_run)


@dataclass(frozen=True)
class GateResult:
    """The verdict on an iteration's candidate, and the candidate's run (kept if promoted)."""

    verdict: Verdict
    candidate_run: SideRun


@dataclass(frozen=True)
class _Promoted:
    version: int
    run: SideRun


class GateRuns:
    """The gate runs a learner keeps (module docstring). Not thread-safe: one event loop."""

    def __init__(self, cfg: LearnConfig, gate: GateConfig, fluency: Callable[[], Scorer]) -> None:
        self.cfg = cfg
        self.gate = gate
        self.fluency = fluency
        self.base: SideRun | None = None
        self._promoted: _Promoted | None = None
        self._ahead: dict[str, asyncio.Future[SideRun]] = {}  # role -> run in flight

    def base_side(self) -> Side:
        return Side("", 0, conditioning(self.cfg))

    def incumbent_side(self, now: Served) -> Side:
        """The served version, or the base model before the first. It carries the
        conditioning, so the base model's side can be derived from it."""
        if now.version is None:
            return self.base_side()
        has_heads = now.manifest is not None and bool(now.manifest.attributes)
        weights = tuple(self.gate.attributes.items()) if has_heads else ()
        return Side(self.cfg.adapter, now.version, conditioning(self.cfg), weights)

    def promoted_run(self, now: Served) -> SideRun | None:
        """The run of the served version when this learner's gate promoted it."""
        p = self._promoted
        return p.run if p is not None and p.version == now.version else None

    def keep_promoted(self, version: int, run: SideRun) -> None:
        self._promoted = _Promoted(version, run)

    def start_ahead(self, client: AsyncClient, now: Served) -> None:
        """Start the runs the next gate needs and that are not known yet: the incumbent's, and
        with a base-anchored check the base model's when the incumbent is a version."""
        sides: dict[str, Side] = {}
        if self.promoted_run(now) is None:
            sides["incumbent"] = self.incumbent_side(now)
        if self.gate.anchors_on_base and self.base is None and now.version is not None:
            sides["base"] = self.base_side()
        self._ahead = {
            role: asyncio.ensure_future(run_side(client, side, self.gate, self.fluency))
            for role, side in sides.items()
        }

    async def drop_ahead(self) -> None:
        """Forget the runs started ahead (a skipped or failed iteration leaves them unused)."""
        ahead, self._ahead = self._ahead, {}
        for run in ahead.values():
            if not run.done():
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run
            elif not run.cancelled():
                run.exception()  # retrieved: an unused run's error is not an iteration's

    @property
    def placement(self) -> str:
        """Where the candidate is served, in the learner's words: loaded on every replica in
        ``gate.replicas``, or pinned to the one server that loads it and generates with it."""
        replicas = self.gate.replicas
        if replicas:
            return (
                f"gate: candidate loaded on {len(replicas)} replicas ({', '.join(replicas)}); "
                f"gate requests go to {self.cfg.server}"
            )
        admin = self.cfg.admin_server
        via = f" (loaded through its admin address {admin})" if admin else ""
        return f"gate: pinned to {self.cfg.server}{via}"

    async def serve_candidate(
        self, admin: AsyncClient, name: str, iteration: int, cand: Path
    ) -> None:
        """Load the candidate directory ``cand`` as ``name`` v``iteration`` and activate it:
        through ``admin``, or with ``gate.replicas`` on every replica (all or an error).
        Activating the candidate name retires its older candidates on each server, so at most
        the active and the previous candidate stay loaded."""

        async def on(server: AsyncClient) -> None:
            await server.load_adapter(name, str(cand))
            await server.activate_adapter(name, iteration)

        if not self.gate.replicas:
            await on(admin)
            return

        async def on_replica(address: str) -> None:
            async with AsyncClient(address, token=self.cfg.token, timeout=300.0) as replica:
                await on(replica)

        await asyncio.gather(*(on_replica(a) for a in self.gate.replicas))

    async def judge(
        self, client: AsyncClient, admin: AsyncClient, iteration: int, cand: Path, now: Served
    ) -> GateResult:
        """Serve the candidate in ``cand`` as ``<adapter>-candidate`` v``iteration``
        (``serve_candidate``) and gate it against the served version, reusing every run this
        cache knows."""
        name = self.cfg.adapter + CANDIDATE_SUFFIX
        await self.serve_candidate(admin, name, iteration, cand)
        weights = tuple(self.gate.attributes.items())
        candidate = Side(name, iteration, attributes=weights if self.cfg.heads else ())
        known, source = self.promoted_run(now), "promoted"
        if known is None and "incumbent" in self._ahead:
            known, source = await self._ahead["incumbent"], "sampling"
        if self.base is None and "base" in self._ahead:
            self.base = await self._ahead["base"]
        # Without a base run, run_gate makes it (the incumbent's, or beside the other sides);
        # it is kept, so no later gate generates it again.
        verdict, run, self.base = await run_gate(
            client, candidate, self.incumbent_side(now), self.gate, self.fluency,
            incumbent_run=known, base_run=self.base,
        )  # fmt: skip
        verdict = replace(
            verdict,
            incumbent_source=source if known is not None else "",
            placement=self.placement,
        )
        return GateResult(verdict, run)
