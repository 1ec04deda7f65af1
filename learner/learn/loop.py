"""``tiller learn``'s loop: (sample) → wait for the trigger → build data → train → gate →
publish → promote, one iteration at a time, each recorded in ``learner_iterations``.

An iteration, one stage module each:

1. Active mode (``[sample]``, ``sampling``): sample prompts from the pool through the server,
   logged, with the version being served (and its feedback tag when it has a conditioning).
2. ``trigger``: wait until ``trigger.min_annotations`` new annotations of the data's provider
   arrived and, in active mode, every generation this iteration sampled has been labelled by it
   (or ``max_interval_s`` passed with at least one new annotation).
3. ``dataset``: build the dataset (``DataConfig``); fewer than ``trigger.min_examples``
   examples → the iteration is recorded as ``skipped`` and the next one starts (sampling
   again). Otherwise the data is frozen: a restarted iteration trains on the same examples.
4. ``train``: a LoRA (continuing the active version's adapter when ``continue_training``), with
   checkpoints in ``workdir/iter-NNNN/ckpt``: a learner killed mid-training resumes there.
5. ``gate_runs`` (``[gate]``): the candidate is loaded into the server as
   ``<adapter>-candidate`` pinned to the iteration number (admin ``LoadAdapter``) and compared
   with the served version (``gate``).
6. ``publish``: an immutable version with the verdict, the training metrics, the objective and
   its hyper-parameters and the data window in its manifest; promoted only if the gate passed
   (no gate → always), then awaited until the server serves it.

ALT in active mode starts from a *conditioning-only* version (v1: the base weights with the tag
template, no LoRA), published and promoted before the first iteration. ALT samples with
exemplar feedback from the start, and the first candidate is gated against the base *prompted*
with the tags, so a trained version must beat what the tag words alone already do.

The annotation cursor is the ``annotation_seq`` of the last recorded iteration (per shard with
several log shards, ``learner.shards``), so a restart continues after the last finished
iteration. One learner per adapter at a time.

Pipelining (``pipeline = true``, active mode): once iteration k's data is frozen, iteration
k+1's sampling starts in the background, so its sampling and labelling overlap k's training,
gate and publish; k+1's trigger then waits only for the labels still missing. Those samples come
from the version served while k trains (k-1's: an on-policy lag of one, as in asynchronous RL),
so k+1's on-policy filter keeps the generations of the version it sampled, not of the one served
when it builds (which it still continues training from and is gated against), and drops the pairs
k trained on when k's version is the one served. The cursors do not change: k+1 consumes the
labels after k's frozen cursor. Sampling run ahead is not persisted: a restarted learner samples
again (the earlier samples stay in the log). Every record keeps its sampling's version and times
(``sampled_version``, ``details.sampling``; the sampling of a frozen iteration is kept in its
work directory beside the data), and a promoted version's feedback-to-served time: from each
label of its window landing in the log to the server serving the version (median and max).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import sqlite_utils

from tiller.client import AsyncClient
from tiller.server.formats.logstore import IterationRecord, last_iteration, record_iteration

from ..data.examples import PreferencePair
from ..fluency import Scorer, load_scoring_model
from ..shards import Cursor, LogShards, cursor_of, total
from ..trainer import TrainResult
from . import dataset
from .config import LearnConfig
from .dataset import IterationData
from .gate import Verdict
from .gate_runs import GateResult, GateRuns
from .publish import (
    DataWindow,
    Published,
    feedback_to_served,
    publish_bootstrap,
    publish_iteration,
)
from .sampling import SamplingRun, generate_each, sample_jobs
from .served import Served, served
from .train import candidate_dir, in_daemon_thread, metrics, train_iteration, workdir
from .trigger import Sampled, generation_seqs, wait_for_trigger, window_label_times

log = logging.getLogger("tiller.learn")


class Stopped(Exception):
    """The learner was asked to stop while waiting."""


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
        self.db = db  # the learner's own records (and the log itself without shards)
        self.log = LogShards(db, cfg.shards)
        self.report = report
        self.progress = progress
        self._client: AsyncClient | None = None
        self._admin: AsyncClient | None = None
        self._fluency: Scorer | None = None
        # The next iteration's sampling run ahead (pipeline): its number, what it sampled from
        self._ahead: tuple[int, asyncio.Future[tuple[Served, SamplingRun]]] | None = None
        self._failures = 0  # failed iterations in a row (their retries back off)
        self.gate_runs = GateRuns(cfg, cfg.gate, self.fluency_model) if cfg.gate else None

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

    def fluency_model(self) -> Scorer:
        """The base model for the gate's perplexity check, loaded on first use."""
        if self._fluency is None:
            t = self.cfg.train  # the heads trunk loads with the same keys: one shared copy
            self._fluency = load_scoring_model(
                self.cfg.model, device=t.device, precision=t.precision
            )
        return self._fluency

    # -------------------------------------------------------------------- one iteration

    async def sample(
        self, iteration: int, now: Served, *, pipelined: bool = False
    ) -> tuple[Served, SamplingRun]:
        """Active mode's sampling from ``now``. Run ahead (``pipelined``) it starts no gate
        runs: the current iteration's gate is still using those."""
        s = self.cfg.sample
        assert s is not None
        if self.gate_runs is not None and not pipelined:
            self.gate_runs.start_ahead(self.client, now)  # beside the sampling, same batches
        began, before = time.time(), generation_seqs(self.log.shards())
        texts = await generate_each(
            self.client, sample_jobs(s, iteration, self.cfg.adapter, now), s.concurrency
        )
        n = sum(len(t) for t in texts)
        beside = f", beside iteration {iteration - 1}" if pipelined else ""
        self.report(
            f"iteration {iteration}: sampled {n} generations from "
            f"{now.label(self.cfg.adapter)}{beside}"
        )
        upto = generation_seqs(self.log.shards())
        return now, SamplingRun(now.version or 0, began, time.time(), pipelined, before, upto)

    def start_ahead(self, iteration: int, stop: asyncio.Event) -> None:
        """Pipeline: start ``iteration``'s sampling now, from the version served now."""
        cfg = self.cfg
        if not cfg.pipeline or cfg.sample is None or stop.is_set() or self._ahead is not None:
            return
        if cfg.max_iterations is not None and iteration > cfg.max_iterations:
            return
        run = asyncio.ensure_future(self.sample(iteration, served(cfg), pipelined=True))
        self._ahead = (iteration, run)

    async def _sampling(self, iteration: int, now: Served) -> tuple[Served, SamplingRun] | None:
        """``iteration``'s sampling: the one run ahead for it, else sampled now (active mode)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead[0] == iteration:
                return await ahead[1]
            await _cancel(ahead[1])
        return await self.sample(iteration, now) if self.cfg.sample is not None else None

    async def collect(
        self, iteration: int, cursor: Cursor, started: float, stop: asyncio.Event
    ) -> tuple[IterationData, SamplingRun | None]:
        """Sample (or take the sampling run ahead), wait for the trigger and build the data (not
        yet frozen); the on-policy version is the sampled one."""
        now = served(self.cfg)
        got = await self._sampling(iteration, now)
        policy, run = got if got is not None else (now, None)
        sampled = None
        if run is not None and self.cfg.data.source != "feedback":
            sampled = Sampled(dict(run.after), dict(run.upto))  # app feedback comes on its own
        last = last_iteration(self.db, self.cfg.adapter)
        since = float(last["finished_at"]) if last else started
        hi = await wait_for_trigger(self.log.shards, self.cfg, cursor, since, stop, sampled)
        if stop.is_set():
            raise Stopped
        skipped: Counter[str] = Counter()
        with self.log.union() as log_db:
            examples = await dataset.build_async(
                log_db, self.cfg, policy, skipped, client=self.client, scorer=self.fluency_model
            )
        if run is not None and run.pipelined:
            examples = self._untrained(iteration, examples, now, skipped)
        return IterationData(examples, hi, dict(skipped), now), run

    def _untrained(
        self, iteration: int, examples: dataset.Examples, now: Served, skipped: Counter[str]
    ) -> dataset.Examples:
        """A pipelined iteration's on-policy pairs without those the previous iteration trained
        on when its version is the one served (both sampled one version: the first two
        iterations); a rejected or failed one's pairs stay, as without pipelining."""
        if not self.cfg.data.on_policy or not examples:
            return examples
        if not isinstance(examples[0], PreferencePair):
            return examples  # ALT replays its window of versions by design
        last = last_iteration(self.db, self.cfg.adapter)
        if last is None or int(last["iteration"]) != iteration - 1:
            return examples
        if last["status"] != "promoted" or last["version"] != now.version:
            return examples
        prev = dataset.load_frozen(workdir(self.cfg, iteration - 1))
        if prev is None:
            return examples
        seen = {(p.chosen_id, p.rejected_id) for p in prev.examples}  # type: ignore[union-attr]
        pairs: list[PreferencePair] = list(examples)  # type: ignore[arg-type]
        kept = [p for p in pairs if (p.chosen_id, p.rejected_id) not in seen]
        if len(kept) < len(pairs):
            skipped["trained_before"] += len(pairs) - len(kept)
        return kept

    async def iteration(
        self, iteration: int, cursor: Cursor, stop: asyncio.Event
    ) -> IterationRecord:
        """Run one iteration (module docstring) and return its record."""
        started, work = time.time(), workdir(self.cfg, iteration)
        data = dataset.load_frozen(work)
        if data is None:
            data, run = await self.collect(iteration, cursor, started, stop)
            sampling = run.to_json() if run is not None else None
            if len(data.examples) < self.cfg.trigger.min_examples:
                return self._skipped(iteration, started, data, sampling)
            _keep_sampling(work, sampling)
            dataset.freeze(work, data)
        else:  # a restarted iteration: same data, same starting point
            sampling = _kept_sampling(work)
            n = len(data.examples)
            self.report(f"iteration {iteration}: resuming with its {n} frozen examples")
        self.start_ahead(iteration + 1, stop)
        result = await self.train(iteration, data)
        gated = await self.gate(iteration, result, data.served)
        out = await self.publish(iteration, cursor, data, result, gated, sampling)
        verdict = gated.verdict if gated is not None else None
        rec = _record(self.cfg, iteration, started, data, result, out, verdict)
        rec = replace(
            rec,
            sampled_version=None if sampling is None else sampling["version"],
            details={**(rec.details or {}), **({"sampling": sampling} if sampling else {})},
        )
        if out.served_at is not None:
            times = window_label_times(self.log.shards(), self.cfg, cursor, data.cursor)
            median, longest = feedback_to_served(times, out.served_at)
            rec = replace(
                rec,
                served_at=out.served_at,
                feedback_to_served_median_s=median,
                feedback_to_served_max_s=longest,
            )
            if median is not None:
                self.report(
                    f"iteration {iteration}: feedback to served {median:.1f}s median, "
                    f"{longest:.1f}s max ({len(times)} labels)"
                )
        if self.log.single:
            return rec
        return replace(rec, details={**(rec.details or {}), **self._cursors(data.cursor)})

    async def train(self, iteration: int, data: IterationData) -> TrainResult:
        objective = "cmpo heads" if self.cfg.heads else self.cfg.train.objective
        n = len(data.examples)
        self.report(f"iteration {iteration}: training {objective} on {n} examples")
        return await in_daemon_thread(train_iteration, self.cfg, iteration, data, self.progress)

    async def gate(self, iteration: int, result: TrainResult, now: Served) -> GateResult | None:
        """The gate's verdict on the trained candidate (None without a gate)."""
        if self.gate_runs is None:
            return None
        cand = candidate_dir(self.cfg, iteration, result.adapter_dir)
        gated = await self.gate_runs.judge(self.client, self.admin, iteration, cand, now)
        v = gated.verdict
        self.report(
            f"iteration {iteration}: gate {'passed' if v.passed else 'FAILED'} "
            f"(candidate {v.candidate['value']}, served {v.incumbent['value']}"
            f"{'; ' + '; '.join(v.reasons) if v.reasons else ''})"
        )
        return gated

    async def publish(
        self,
        iteration: int,
        cursor: Cursor,
        data: IterationData,
        result: TrainResult,
        gated: GateResult | None,
        sampling: dict[str, Any] | None = None,
    ) -> Published:
        """Publish the trained adapter, promoted unless the gate failed; a promoted candidate's
        gate run is kept as the next gate's incumbent run."""
        cfg = self.cfg
        numbers = metrics(result)
        if gated is not None:
            numbers["gate"] = gated.verdict.to_json()
        window = DataWindow(
            iteration, (total(cursor), data.annotation_seq), len(data.examples),
            data.served.version, data.skipped, None if self.log.single else data.cursor,
            None if sampling is None else sampling["version"],
        )  # fmt: skip
        verdict = gated.verdict if gated is not None else None
        client = self.client if cfg.server else None
        out = await publish_iteration(cfg, client, result.adapter_dir, window, numbers, verdict)
        if out.reused:
            self.report(
                f"iteration {iteration}: already published as {out.path.name} before a crash"
            )
        if gated is not None and self.gate_runs is not None and out.status == "promoted":
            self.gate_runs.keep_promoted(out.version, gated.candidate_run)
        self.report(f"iteration {iteration}: {out.status} {cfg.adapter}@v{out.version}")
        return out

    def _skipped(
        self,
        iteration: int,
        started: float,
        data: IterationData,
        sampling: dict[str, Any] | None,
    ) -> IterationRecord:
        n, skipped = len(data.examples), dict(data.skipped)
        reason = f"{n} examples < min_examples {self.cfg.trigger.min_examples}"
        self.report(f"iteration {iteration}: skipped ({reason}; skipped: {skipped})")
        extra = {"sampling": sampling} if sampling else {}
        return IterationRecord(
            adapter=self.cfg.adapter, iteration=iteration, status="skipped", started_at=started,
            finished_at=time.time(), annotation_seq=data.annotation_seq, examples=n,
            reason=reason, details={"skipped": skipped, **extra, **self._cursors(data.cursor)},
            sampled_version=None if sampling is None else sampling["version"],
        )  # fmt: skip

    def _cursors(self, cursor: Cursor) -> dict[str, Cursor]:
        """A record's per-shard cursors (none in the one-file layout: annotation_seq is it)."""
        return {} if self.log.single else {"shard_cursors": cursor}

    # -------------------------------------------------------------------- the loop

    async def bootstrap(self) -> None:
        """ALT in active mode with nothing served yet: publish and promote the conditioning-only
        version (module docstring), reusing one a crashed start published."""
        cfg = self.cfg
        if cfg.data.kind != "alt" or cfg.sample is None or served(cfg).version is not None:
            return
        version = await publish_bootstrap(cfg, self.client if cfg.server else None)
        self.report(
            f"bootstrap: {cfg.adapter}@v{version} serves the base model with the tag template "
            "(no LoRA): ALT samples with exemplar feedback from the first iteration"
        )

    async def run(self, stop: asyncio.Event) -> int:
        """Iterate until ``stop`` or ``max_iterations``; returns the iterations recorded."""
        done = 0
        try:
            await self.bootstrap()
            if self.gate_runs is not None:
                self.report(self.gate_runs.placement)
            g = self.cfg.gate
            if g is not None and g.measures_perplexity:
                # Load the gate's scoring model before any iteration: a gate run started beside
                # the sampling loads it in a worker thread while the trainer's thread imports
                # transformers, whose lazy imports are not thread-safe.
                await asyncio.to_thread(self.fluency_model)
            while not stop.is_set():
                last = last_iteration(self.db, self.cfg.adapter)
                iteration = int(last["iteration"]) + 1 if last else 1
                if self.cfg.max_iterations is not None and iteration > self.cfg.max_iterations:
                    break
                cursor = self._last_cursor(last)
                try:
                    rec = await self._one(iteration, cursor, stop)
                except Stopped:
                    break
                record_iteration(self.db, rec)
                done += 1
        finally:
            await self._drop_ahead()
            if self._ahead is not None:  # a pipelined sampling nobody will use
                await _cancel(self._ahead[1])
                self._ahead = None
            await self.close()
            self.log.close()
        return done

    @staticmethod
    def _last_cursor(last: dict[str, Any] | None) -> Cursor:
        if last is None:
            return {}
        return cursor_of(int(last["annotation_seq"]), json.loads(last["details_json"] or "{}"))

    async def _one(self, iteration: int, cursor: Cursor, stop: asyncio.Event) -> IterationRecord:
        """One iteration's record; a failure is recorded (and retried with the same data, after
        a wait that doubles with each failure in a row: ``failure_backoff``)."""
        started = time.time()
        try:
            rec = await _until_stopped(self.iteration(iteration, cursor, stop), stop)
            self._failures = 0
            return rec
        except Stopped:
            raise
        except Exception as e:
            log.exception("iteration %d failed", iteration)
            self._failures += 1
            wait = failure_backoff(self.cfg.trigger.poll_s, self._failures)
            self.report(
                f"iteration {iteration}: FAILED: {type(e).__name__}: {e} "
                f"({self._failures} in a row; retrying in {wait:.0f} s)"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            return IterationRecord(
                adapter=self.cfg.adapter, iteration=iteration, status="failed",
                started_at=started, finished_at=time.time(), annotation_seq=total(cursor),
                reason=f"{type(e).__name__}: {e}", details=self._cursors(cursor) or None,
            )  # fmt: skip
        finally:
            await self._drop_ahead()  # a skipped or failed iteration leaves its runs unused

    async def _drop_ahead(self) -> None:
        if self.gate_runs is not None:
            await self.gate_runs.drop_ahead()


MAX_FAILURE_BACKOFF_S = 60.0


def failure_backoff(poll_s: float, failures: int) -> float:
    """Seconds to wait after the ``failures``-th failed iteration in a row: ``poll_s``, doubling
    with each further failure, at most ``MAX_FAILURE_BACKOFF_S`` (a server that is down or
    restarting is not hammered with iterations)."""
    return float(min(MAX_FAILURE_BACKOFF_S, max(poll_s, poll_s * 2 ** (failures - 1))))


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it; its error, if it had one, is nobody's."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


_SAMPLING = "sampling.json"  # beside the frozen data: the iteration's sampling, for its record


def _keep_sampling(work: Path, sampling: dict[str, Any] | None) -> None:
    """Write the iteration's sampling before its data is frozen, so a restarted iteration
    records it too."""
    work.mkdir(parents=True, exist_ok=True)
    tmp = work / (_SAMPLING + ".tmp")
    tmp.write_text(json.dumps(sampling))
    tmp.replace(work / _SAMPLING)


def _kept_sampling(work: Path) -> dict[str, Any] | None:
    path = work / _SAMPLING
    if not path.exists():
        return None
    kept: dict[str, Any] | None = json.loads(path.read_text())
    return kept


async def _until_stopped(
    work: Coroutine[Any, Any, IterationRecord], stop: asyncio.Event
) -> IterationRecord:
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


def _record(
    cfg: LearnConfig,
    iteration: int,
    started: float,
    data: IterationData,
    result: TrainResult,
    out: Published,
    verdict: Verdict | None,
) -> IterationRecord:
    """The row of a trained iteration."""
    return IterationRecord(
        adapter=cfg.adapter,
        iteration=iteration,
        status=out.status,
        started_at=started,
        finished_at=time.time(),
        annotation_seq=data.annotation_seq,
        examples=len(data.examples),
        steps=result.steps,
        final_loss=result.final_loss,
        samples_per_s=result.samples_per_s,
        version=out.version,
        gate_passed=None if verdict is None else verdict.passed,
        candidate_value=None if verdict is None else verdict.candidate["value"],
        incumbent_value=None if verdict is None else verdict.incumbent["value"],
        candidate_distinct2=None if verdict is None else verdict.candidate["distinct2"],
        win_rate=None if verdict is None else verdict.win_rate,
        reason="; ".join(verdict.reasons) if verdict else "",
        details={
            "swap_s": out.swap_s,
            "skipped": dict(data.skipped),
            "history": result.history[-1:],
            "resumed_from_step": result.resumed_from_step,
        },
    )
