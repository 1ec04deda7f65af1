"""``tiller learn``'s loop: (sample) → wait for the trigger → build data → train → gate →
publish → promote, one iteration at a time, each recorded in ``learner_iterations``.

An iteration:

1. Active mode (``[sample]``): sample prompts from the pool through the server, logged, with
   the version being served (and its feedback tag when it has a conditioning).
2. Wait until ``trigger.min_annotations`` new annotations of the data's provider arrived and,
   in active mode, every generation this iteration sampled has been labelled by it (or
   ``max_interval_s`` passed with at least one new annotation).
3. Build the dataset (``DataConfig``); fewer than ``trigger.min_examples`` examples → the
   iteration is recorded as ``skipped`` and the next one starts (sampling again).
4. Train a LoRA (continuing the active version's adapter when ``continue_training``), with
   checkpoints in ``workdir/iter-NNNN/ckpt``: a learner killed mid-training resumes there.
5. Gate (``[gate]``): the candidate is loaded into the server as ``<adapter>-candidate`` pinned
   to the iteration number (admin ``LoadAdapter``) and compared with the served version.
6. Publish an immutable version with the verdict, the training metrics, the objective and its
   hyper-parameters and the data window in its manifest; promote it only if the gate passed
   (no gate → always), then wait until the server serves it.

ALT in active mode starts from a *conditioning-only* version (v1: the base weights with the tag
template, no LoRA), published and promoted before the first iteration. ALT samples with
exemplar feedback from the start, and the first candidate is gated against the base *prompted*
with the tags, so a trained version must beat what the tag words alone already do.

The annotation cursor is the ``annotation_seq`` of the last recorded iteration, so a restart
continues after the last finished iteration. One learner per adapter at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from tiller.client import AsyncClient
from tiller.server.formats import logstore as runs
from tiller.server.formats.manifest import (
    DEFAULT_TEMPLATE,
    Conditioning,
    Manifest,
    load_manifest,
    write_manifest,
)
from tiller.server.formats.publish import Release, publish
from tiller.server.formats.registry import list_versions, promote, read_state, version_path

from ..data.alt import AltConfig, ReplayWindow, build_alt
from ..data.cmpo import cmpo_pairs
from ..data.examples import PreferencePair, SFTExample
from ..data.jsonl import load_pairs, load_sft, save_pairs, save_sft
from ..data.pairs import feedback_pairs, generations_by_id, judge_pairs, score_pairs
from ..fluency import Scorer, load_scoring_model
from ..heads_trainer import train_heads
from ..trainer import TrainResult, train
from .config import LearnConfig
from .gate import Side, SideRun, Verdict, run_gate, run_side
from .sampling import generate_each

log = logging.getLogger("tiller.learn")
T = TypeVar("T")


class Stopped(Exception):
    """The learner was asked to stop while waiting."""


CANDIDATE_SUFFIX = "-candidate"


@dataclass(frozen=True)
class Served:
    """The version being served: ``version=None`` before the first promotion (the base)."""

    version: int | None
    path: Path | None
    manifest: Manifest | None


def conditioning(cfg: LearnConfig) -> Conditioning | None:
    if cfg.data.kind != "alt":
        return None
    return Conditioning(
        tags=cfg.data.tags,
        template=cfg.data.template or DEFAULT_TEMPLATE,
        separator=cfg.data.separator,
    )


def served(cfg: LearnConfig) -> Served:
    active = read_state(cfg.registry, cfg.adapter).active
    if active is None:
        return Served(None, None, None)
    path = version_path(cfg.registry, cfg.adapter, active)
    return Served(active, path, load_manifest(path))


def new_annotations(db: sqlite_utils.Database, cfg: LearnConfig, after: int) -> tuple[int, int]:
    """(count, highest seq) of usable labels after ``after``: annotations of the data's
    provider, or app feedback rows for ``source='feedback'`` (their seq in the feedback table)."""
    if cfg.data.kind == "pairs" and cfg.data.source == "feedback":
        sql = "SELECT count(*), max(seq) FROM feedback WHERE seq > ?"
        args: list[Any] = [after]
    else:
        sql = (
            "SELECT count(*), max(seq) FROM annotations "
            "WHERE seq > ? AND provider = ? AND coalesce(error, '') = ''"
        )
        args = [after, cfg.data.provider]
    n, hi = db.execute(sql, args).fetchone()
    return int(n), int(hi) if hi is not None else after


def unlabelled(db: sqlite_utils.Database, provider: str, after_seq: int, upto_seq: int) -> int:
    """How many generations logged with ``after_seq < seq <= upto_seq`` have no annotation
    (a label or an error) of ``provider`` yet, as either side of a pairwise judgement."""
    sql = (
        "SELECT count(*) FROM generations g WHERE g.seq > ? AND g.seq <= ? AND NOT EXISTS ("
        "SELECT 1 FROM annotations a WHERE a.provider = ? "
        "AND (a.generation_id = g.id OR a.generation_id_b = g.id))"
    )
    return int(db.execute(sql, [after_seq, upto_seq, provider]).fetchone()[0])


def last_generation_seq(db: sqlite_utils.Database) -> int:
    return int(db.execute("SELECT coalesce(max(seq), 0) FROM generations").fetchone()[0])


def _find_version(
    registry: Path, adapter: str, match: Callable[[dict[str, Any]], bool]
) -> int | None:
    """The newest version whose manifest's ``data_window`` satisfies ``match``."""
    for v in reversed(list_versions(registry, adapter)):
        extra = load_manifest(version_path(registry, adapter, v), verify=False).extra
        if match(extra.get("data_window", {})):
            return v
    return None


def published_by(cfg: LearnConfig, window: dict[str, Any]) -> Path | None:
    """The version this iteration already published, if a learner killed between publishing and
    recording it left one: the same iteration number over the same annotation window. Reusing
    it makes a restarted iteration publish exactly once."""
    keys = ("iteration", "annotation_seq")
    v = _find_version(
        cfg.registry, cfg.adapter, lambda got: all(got.get(k) == window[k] for k in keys)
    )
    return None if v is None else version_path(cfg.registry, cfg.adapter, v)


def bootstrap_version(registry: Path, adapter: str) -> int | None:
    """The adapter's conditioning-only bootstrap version (ALT), if one was published."""
    return _find_version(registry, adapter, lambda got: bool(got.get("bootstrap")))


def _pair_ids(p: PreferencePair) -> tuple[str, str] | None:
    """(chosen id, rejected id) from a pair's ``source``: ``<kind>:<provider>:<a>><b>``, with
    ``:<attributes>`` after it for CMPO pairs."""
    parts = p.source.split(":")
    for ids in reversed(parts[1:]):
        chosen, sep, rejected = ids.partition(">")
        if sep:
            return chosen, rejected
    return None


def on_policy(
    db: sqlite_utils.Database, pairs: list[PreferencePair], adapter: str, version: int
) -> list[PreferencePair]:
    """The pairs whose two generations were both sampled from ``adapter@v{version}``."""
    ids = {p: _pair_ids(p) for p in pairs}
    gens = generations_by_id(db, (i for pair in ids.values() if pair for i in pair))

    def fresh(i: str) -> bool:
        g = gens.get(i)
        return g is not None and g.adapter == adapter and g.adapter_version == version

    return [p for p, pair in ids.items() if pair and fresh(pair[0]) and fresh(pair[1])]


def build_dataset(
    db: sqlite_utils.Database, cfg: LearnConfig, now: Served, skipped: Counter[str]
) -> list[SFTExample] | list[PreferencePair]:
    d = cfg.data
    if d.kind == "alt":
        cond = conditioning(cfg)
        assert cond is not None
        alt = AltConfig(
            conditioning=cond,
            provider=d.provider,
            window=ReplayWindow(last_versions=d.replay_versions),
            allow_truncated=d.allow_truncated,
            unknown_tags="skip",
            balance=d.balance,
            seed=cfg.train.seed,
        )
        examples: list[SFTExample] = build_alt(db, alt, skipped=skipped)
        return examples[-d.max_examples :] if d.max_examples else examples
    if d.kind == "cmpo":
        pairs = cmpo_pairs(
            db,
            d.provider,
            d.attributes,
            max_subset_size=d.max_subset_size,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
        )
    elif d.source == "judge":
        pairs = judge_pairs(
            db,
            d.provider,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
            tie_margin=d.judge_tie_margin,
        )
    elif d.source == "score":
        pairs = score_pairs(
            db,
            d.provider,
            higher_is_better=d.higher_is_better,
            min_margin=d.min_margin,
            pairing=d.pairing,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
        )
    else:
        pairs = feedback_pairs(db, allow_truncated=d.allow_truncated, skipped=skipped)
    if d.on_policy and (d.kind == "cmpo" or d.source != "feedback"):
        name = cfg.adapter if now.version is not None else ""
        kept = on_policy(db, pairs, name, now.version or 0)
        skipped["off_policy"] += len(pairs) - len(kept)
        pairs = kept
    return pairs[-d.max_examples :] if d.max_examples else pairs


@dataclass(frozen=True)
class Frozen:
    """An iteration's inputs, written before training so a restarted learner trains on the
    same examples from the same served version (and resumes from its checkpoint)."""

    data: list[Any]
    annotation_seq: int
    skipped: Counter[str]
    served: Served


def freeze(work: Path, data: list[Any], hi: int, skipped: Counter[str], now: Served) -> None:
    work.mkdir(parents=True, exist_ok=True)
    pairs = bool(data) and isinstance(data[0], PreferencePair)
    (save_pairs if pairs else save_sft)(work / "data.jsonl", data)
    meta = {
        "kind": "pairs" if pairs else "sft",
        "annotation_seq": hi,
        "skipped": dict(skipped),
        "served_version": now.version,
        "served_path": str(now.path) if now.path else None,
    }
    tmp = work / "frozen.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(work / "frozen.json")  # the marker: data.jsonl is complete once this exists


def load_frozen(work: Path) -> Frozen | None:
    marker = work / "frozen.json"
    if not marker.exists():
        return None
    meta = json.loads(marker.read_text())
    load = load_pairs if meta["kind"] == "pairs" else load_sft
    path = Path(meta["served_path"]) if meta["served_path"] else None
    now = Served(meta["served_version"], path, load_manifest(path) if path else None)
    return Frozen(
        list(load(work / "data.jsonl")), int(meta["annotation_seq"]), Counter(meta["skipped"]), now
    )


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


class Learner:
    """Runs iterations until ``stop`` is set or ``max_iterations`` were recorded.

    ``report`` receives one human-readable line per event (the CLI shows them); ``progress``
    turns the trainer's progress bar on. Not thread-safe; one learner per adapter.
    """

    def __init__(
        self,
        cfg: LearnConfig,
        db: sqlite_utils.Database,
        *,
        report: Callable[[str], None] = log.info,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.db = db
        self.report = report
        self.progress = progress
        self._client: AsyncClient | None = None
        self._admin: AsyncClient | None = None
        self._fluency: Scorer | None = None
        # The gate's run of a promoted candidate, as (version, run): the next gate's incumbent.
        self._promoted_run: tuple[int, SideRun] | None = None
        # The base model's gate run (for ``max_base_perplexity_ratio``): it never changes.
        self._base_run: SideRun | None = None
        # Gate runs started beside this iteration's sampling (``runs_ahead``), by role.
        self._ahead: dict[str, asyncio.Future[SideRun]] = {}

    # -------------------------------------------------------------------- server calls

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(self.cfg.server, token=self.cfg.token, timeout=300.0)
        return self._client

    @property
    def admin(self) -> AsyncClient:
        """Admin calls go to ``admin_server`` when the server serves admin on its own port."""
        if not self.cfg.admin_server:
            return self.client
        if self._admin is None:
            self._admin = AsyncClient(self.cfg.admin_server, token=self.cfg.token, timeout=300.0)
        return self._admin

    async def close(self) -> None:
        for c in (self._client, self._admin):
            if c is not None:
                await c.close()

    async def sample(self, iteration: int, now: Served) -> int:
        s = self.cfg.sample
        assert s is not None
        rng = random.Random(s.seed * 1_000_003 + iteration)
        prompts = rng.sample(s.prompts, min(s.per_iteration, len(s.prompts)))
        kw: dict[str, Any] = {
            "n": s.n,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "repetition_penalty": s.repetition_penalty,
        }
        tags: tuple[str, ...] = ()
        weights: tuple[Any, ...] = ()
        if now.version is not None:
            kw |= {"adapter": self.cfg.adapter, "adapter_version": now.version}
            if now.manifest is not None and now.manifest.conditioning is not None:
                tags = (s.feedback,) if isinstance(s.feedback, str) else s.feedback
                tags = tuple(t for t in tags if t)
            if now.manifest is not None and now.manifest.attributes:
                weights = s.attributes
        jobs = [
            (
                p,
                kw
                | ({"feedback": tags[i % len(tags)]} if tags else {})
                | ({"attributes": dict(weights[i % len(weights)])} if weights else {}),
            )
            for i, p in enumerate(prompts)
        ]
        return sum(len(t) for t in await generate_each(self.client, jobs, s.concurrency))

    async def wait_served(self, version: int, timeout_s: float = 120.0) -> float:
        """Seconds until the server's active version of the adapter is ``version``."""
        began = time.monotonic()
        while True:
            for a in await self.client.adapters():
                if a.name == self.cfg.adapter and a.active_version == version:
                    return time.monotonic() - began
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"the server did not serve {self.cfg.adapter}@v{version}")
            await asyncio.sleep(0.2)

    def _incumbent(self, now: Served) -> Side:
        """The gate's incumbent: the served version, or the base model before the first. It
        carries the conditioning, so the base model's side can be derived from it."""
        g = self.cfg.gate
        assert g is not None
        if now.version is None:
            return self._base()
        has_heads = now.manifest is not None and bool(now.manifest.attributes)
        weights = tuple(g.attributes.items()) if has_heads else ()
        return Side(self.cfg.adapter, now.version, conditioning(self.cfg), weights)

    def _known_incumbent_run(self, now: Served) -> SideRun | None:
        known = self._promoted_run
        return known[1] if known and known[0] == now.version else None

    def _base(self) -> Side:
        return Side("", 0, conditioning(self.cfg))

    def runs_ahead(self, now: Served) -> dict[str, asyncio.Future[SideRun]]:
        """Start the gate runs it does not know yet (they run beside this iteration's sampling,
        in the same server batches): the incumbent's, and with ``max_base_perplexity_ratio``
        the base model's when the incumbent is a version."""
        g = self.cfg.gate
        if g is None:
            return {}
        sides: dict[str, Side] = {}
        if self._known_incumbent_run(now) is None:
            sides["incumbent"] = self._incumbent(now)
        if g.max_base_perplexity_ratio > 0 and self._base_run is None and now.version is not None:
            sides["base"] = self._base()
        return {
            role: asyncio.ensure_future(run_side(self.client, side, g, self.fluency_model))
            for role, side in sides.items()
        }

    async def gate(
        self,
        iteration: int,
        cand: Path,
        now: Served,
        ahead: dict[str, asyncio.Future[SideRun]] | None = None,
    ) -> tuple[Verdict, SideRun]:
        """The verdict on the candidate, and the candidate's run (kept if it is promoted).
        ``ahead``: the runs ``runs_ahead`` started."""
        g = self.cfg.gate
        assert g is not None
        name = self.cfg.adapter + CANDIDATE_SUFFIX
        await self.admin.load_adapter(name, str(cand))
        # Activating the candidate name retires its older candidates (memory stays bounded).
        await self.admin.activate_adapter(name, iteration)
        weights = tuple(g.attributes.items())
        candidate = Side(name, iteration, attributes=weights if self.cfg.heads else ())
        ahead = ahead or {}
        known, source = self._known_incumbent_run(now), "promoted"
        if known is None and "incumbent" in ahead:
            known, source = await ahead["incumbent"], "sampling"
        if self._base_run is None and "base" in ahead:
            self._base_run = await ahead["base"]
        # Without a base run, run_gate makes it (the incumbent's, or beside the other sides);
        # it is kept, so no later gate generates it again.
        verdict, run, self._base_run = await run_gate(
            self.client, candidate, self._incumbent(now), g, self.fluency_model,
            incumbent_run=known, base_run=self._base_run,
        )  # fmt: skip
        return replace(verdict, incumbent_source=source if known is not None else ""), run

    def fluency_model(self) -> Scorer:
        """The base model for the gate's perplexity check, loaded on first use."""
        if self._fluency is None:
            self._fluency = load_scoring_model(self.cfg.model)
        return self._fluency

    # -------------------------------------------------------------------- one iteration

    async def wait_for_trigger(
        self, cursor: int, since: float, stop: asyncio.Event, sampled: tuple[int, int] | None
    ) -> int:
        """The annotation seq to train up to, once the trigger fired. ``sampled``: the seq
        range of this iteration's own generations, which must all be labelled first (a
        dataset built from half of them would be small and, after on-policy filtering,
        often empty)."""
        t = self.cfg.trigger
        while not stop.is_set():
            n, hi = new_annotations(self.db, self.cfg, cursor)
            ready = n >= t.min_annotations and (
                sampled is None or unlabelled(self.db, self.cfg.data.provider, *sampled) == 0
            )
            if ready or (n > 0 and time.time() - since >= t.max_interval_s):
                return hi
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), t.poll_s)
        return cursor

    def _train(self, iteration: int, data: list[Any], now: Served) -> TrainResult:
        work = self.cfg.workdir / f"iter-{iteration:04d}"
        if self.cfg.heads is not None:  # CMPO: plural heads, continuing the served ones
            heads = replace(self.cfg.heads, progress=self.progress)
            init = None
            if self.cfg.continue_training and now.manifest is not None:
                init = now.path if now.manifest.attributes else None
            h = train_heads(self.cfg.model, data, heads, work / "adapter", init_heads=init)
            last = h.history[-1]["loss"] if h.history else float("nan")
            return TrainResult(h.out_dir, h.steps, last, h.samples_per_s, h.history)
        init = None
        if self.cfg.continue_training and now.manifest is not None and now.manifest.has_lora:
            init = now.path
        tc = replace(
            self.cfg.train,
            checkpoint_dir=work / "ckpt",
            checkpoint_every=max(1, (self.cfg.train.max_steps or 8) // 4),
            progress=self.progress,
        )
        return train(self.cfg.model, data, tc, work / "adapter", init_adapter=init, resume=True)

    async def iteration(
        self, iteration: int, cursor: int, stop: asyncio.Event
    ) -> runs.IterationRecord:
        cfg = self.cfg
        started = time.time()
        now = served(cfg)
        record = partial(
            runs.IterationRecord, adapter=cfg.adapter, iteration=iteration, started_at=started
        )
        work = cfg.workdir / f"iter-{iteration:04d}"
        frozen = load_frozen(work)
        if frozen is not None:  # a restarted iteration: same data, same starting point
            data, hi, skipped, now = (
                frozen.data,
                frozen.annotation_seq,
                frozen.skipped,
                frozen.served,
            )
            self.report(f"iteration {iteration}: resuming with its {len(data)} frozen examples")
        else:
            sampled = None
            if cfg.sample is not None:
                self._ahead = self.runs_ahead(now)
                before = last_generation_seq(self.db)
                n = await self.sample(iteration, now)
                self.report(
                    f"iteration {iteration}: sampled {n} generations from {_label(cfg, now)}"
                )
                if cfg.data.source != "feedback":  # app feedback arrives on its own time
                    sampled = (before, last_generation_seq(self.db))
            last = runs.last_iteration(self.db, cfg.adapter)
            since = float(last["finished_at"]) if last else started
            hi = await self.wait_for_trigger(cursor, since, stop, sampled)
            if stop.is_set():
                raise Stopped
            skipped = Counter()
            data = build_dataset(self.db, cfg, now, skipped)
            if len(data) < cfg.trigger.min_examples:
                reason = f"{len(data)} examples < min_examples {cfg.trigger.min_examples}"
                self.report(f"iteration {iteration}: skipped ({reason}; skipped: {dict(skipped)})")
                return record(
                    status="skipped",
                    finished_at=time.time(),
                    annotation_seq=hi,
                    examples=len(data),
                    reason=reason,
                    details={"skipped": dict(skipped)},
                )
            freeze(work, data, hi, skipped, now)
        objective = "cmpo heads" if cfg.heads else cfg.train.objective
        self.report(f"iteration {iteration}: training {objective} on {len(data)} examples")
        result = await in_daemon_thread(self._train, iteration, data, now)
        metrics: dict[str, Any] = {
            "final_loss": result.final_loss,
            "samples_per_s": result.samples_per_s,
            "steps": result.steps,
            "first_step": result.history[0] if result.history else {},
            "last_step": result.history[-1] if result.history else {},
        }
        verdict, cand_run = None, None
        if cfg.gate is not None:
            cand = candidate_dir(cfg, iteration, result.adapter_dir)
            verdict, cand_run = await self.gate(iteration, cand, now, self._ahead)
            metrics["gate"] = verdict.to_json()
            self.report(
                f"iteration {iteration}: gate {'passed' if verdict.passed else 'FAILED'} "
                f"(candidate {verdict.candidate['value']}, served {verdict.incumbent['value']}"
                f"{'; ' + '; '.join(verdict.reasons) if verdict.reasons else ''})"
            )
        release = Release(
            base_model=cfg.base_model,
            base_model_dir=cfg.model,
            conditioning=conditioning(cfg),
            attributes=cfg.data.attributes,
            objective="cmpo" if cfg.heads else cfg.train.objective,
            hyperparameters=_hyperparameters(cfg),
            data_window={
                "iteration": iteration,
                "annotation_seq": [cursor, hi],
                "examples": len(data),
                "served_version": now.version,
                "skipped": dict(skipped),
            },
            metrics=metrics,
        )
        path = published_by(cfg, dict(release.data_window))
        if path is None:
            path = publish(cfg.registry, cfg.adapter, result.adapter_dir, release)
        else:
            self.report(f"iteration {iteration}: already published as {path.name} before a crash")
        version = load_manifest(path).version
        status: runs.Status = "published"
        swap_s = None
        if verdict is None or verdict.passed:
            promote(cfg.registry, cfg.adapter, version)
            status = "promoted"
            if cand_run is not None:
                self._promoted_run = (version, cand_run)
            if cfg.server:
                swap_s = await self.wait_served(version)
        elif verdict is not None:
            status = "rejected"
        self.report(f"iteration {iteration}: {status} {cfg.adapter}@v{version}")
        return record(
            status=status,
            finished_at=time.time(),
            annotation_seq=hi,
            examples=len(data),
            steps=result.steps,
            final_loss=result.final_loss,
            samples_per_s=result.samples_per_s,
            version=version,
            gate_passed=None if verdict is None else verdict.passed,
            candidate_value=None if verdict is None else verdict.candidate["value"],
            incumbent_value=None if verdict is None else verdict.incumbent["value"],
            candidate_distinct2=None if verdict is None else verdict.candidate["distinct2"],
            win_rate=None if verdict is None else verdict.win_rate,
            reason="; ".join(verdict.reasons) if verdict else "",
            details={
                "swap_s": swap_s,
                "skipped": dict(skipped),
                "history": result.history[-1:],
                "resumed_from_step": result.resumed_from_step,
            },
        )

    async def _drop_ahead(self) -> None:
        ahead, self._ahead = self._ahead, {}
        for run in ahead.values():
            if not run.done():
                run.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await run
            elif not run.cancelled():
                run.exception()  # retrieved: an unused run's error is not an iteration's

    @staticmethod
    async def _until_stopped(work: Any, stop: asyncio.Event) -> runs.IterationRecord:
        """Await ``work`` unless ``stop`` comes first: then cancel it (sampling and gate calls
        end at once; a training thread runs on, its checkpoints make the next start resume)."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise Stopped

    async def bootstrap(self) -> None:
        """ALT in active mode with nothing served yet: publish and promote the conditioning-only
        version (module docstring), reusing one a crashed start published."""
        cfg = self.cfg
        if cfg.data.kind != "alt" or cfg.sample is None or served(cfg).version is not None:
            return
        version = bootstrap_version(cfg.registry, cfg.adapter)
        if version is None:
            release = Release(
                base_model=cfg.base_model,
                base_model_dir=cfg.model,
                conditioning=conditioning(cfg),
                objective="none",
                data_window={"bootstrap": True},
            )
            version = load_manifest(publish(cfg.registry, cfg.adapter, None, release)).version
        promote(cfg.registry, cfg.adapter, version)
        if cfg.server:
            await self.wait_served(version)
        self.report(
            f"bootstrap: {cfg.adapter}@v{version} serves the base model with the tag template "
            "(no LoRA): ALT samples with exemplar feedback from the first iteration"
        )

    async def run(self, stop: asyncio.Event) -> int:
        """Iterate until ``stop`` or ``max_iterations``; returns the iterations recorded."""
        done = 0
        try:
            await self.bootstrap()
            g = self.cfg.gate
            if g is not None and g.measures_perplexity:
                # Load the gate's scoring model here, before any iteration: a gate run started
                # beside the sampling loads it in a worker thread while the trainer's thread
                # imports transformers, and transformers' lazy imports are not thread-safe (a
                # run lost an iteration to "ImportError: cannot import name 'AutoTokenizer'").
                await asyncio.to_thread(self.fluency_model)
            while not stop.is_set():
                last = runs.last_iteration(self.db, self.cfg.adapter)
                iteration = int(last["iteration"]) + 1 if last else 1
                if self.cfg.max_iterations is not None and iteration > self.cfg.max_iterations:
                    break
                cursor = int(last["annotation_seq"]) if last else 0
                started = time.time()
                try:
                    rec = await self._until_stopped(self.iteration(iteration, cursor, stop), stop)
                except Stopped:
                    break
                except Exception as e:  # recorded, then retried with the same data
                    log.exception("iteration %d failed", iteration)
                    self.report(f"iteration {iteration}: FAILED: {type(e).__name__}: {e}")
                    rec = runs.IterationRecord(
                        adapter=self.cfg.adapter,
                        iteration=iteration,
                        status="failed",
                        started_at=started,
                        finished_at=time.time(),
                        annotation_seq=cursor,
                        reason=f"{type(e).__name__}: {e}",
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.cfg.trigger.poll_s)
                await self._drop_ahead()  # a skipped or failed iteration leaves its run unused
                runs.record_iteration(self.db, rec)
                done += 1
        finally:
            await self._drop_ahead()
            await self.close()
        return done


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


def _label(cfg: LearnConfig, now: Served) -> str:
    return f"{cfg.adapter}@v{now.version}" if now.version is not None else "the base model"


def _hyperparameters(cfg: LearnConfig) -> dict[str, Any]:
    t = asdict(cfg.heads) if cfg.heads else asdict(cfg.train)
    for key in ("checkpoint_dir", "progress", "device"):
        t.pop(key, None)
    return json.loads(json.dumps(t, default=str))
