"""CDF as a learner loop mode on a live server and the tiny model: the offline labellers write
critiques, best-of-k refinements (resampled through the server's OpenAI-compatible API) and
pairwise verdicts; the learner routes prompts by perplexity terciles, has the served policy
rewrite the easy route's answers through the server, and trains DPO on all three routes' pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProc, stop_server
from tests.learning import run_learner, start_learn_server
from tiller.client import AsyncClient, Client
from tiller.learner.annotate.scorer_feedback import (
    ScorerCritique,
    ScorerCritiqueConfig,
    ScorerPairwise,
    ScorerPairwiseConfig,
    ScorerRefinement,
    ScorerRefinementConfig,
)
from tiller.learner.data.jsonl import load_pairs
from tiller.learner.fluency import load_scoring_model
from tiller.learner.learn import dataset
from tiller.learner.learn.config import DataConfig, LearnConfig, SampleConfig, TriggerConfig
from tiller.learner.learn.served import Served
from tiller.learner.learn.train import workdir
from tiller.learner.trainer import TrainConfig
from tiller.server.formats import logstore as runs
from tiller.server.formats.logstore import connect, last_generation_seq, next_generations

PROMPTS = tuple(f"The film number {i} was" for i in range(9))
SCORER = "readability"  # continuous on the tiny model's gibberish: few ties


@pytest.fixture(scope="module")
def cdf_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProc, Path, Path]]:
    srv, db, registry = start_learn_server(tiny_model, tmp_path_factory.mktemp("cdf"))
    yield srv, db, registry
    stop_server(srv)


def refiner(srv: ServerProc, tiny_model: Path, k: int = 4) -> ScorerRefinement:
    return ScorerRefinement(
        ScorerRefinementConfig(
            provider_name="ref", scorer=SCORER, base_url=srv.base_url, model=tiny_model.name,
            k=k, max_tokens=12,
        )
    )  # fmt: skip


def _count(db: Path) -> int:
    return int(connect(db).execute("SELECT count(*) FROM generations").fetchone()[0])


def _last(db: Path) -> int:
    return last_generation_seq(connect(db))


async def test_refinement_resamples_the_policy_through_the_server_unlogged(
    cdf_server: tuple[ServerProc, Path, Path], tiny_model: Path
) -> None:
    srv, db, _ = cdf_server
    before = _last(db)
    with Client(srv.target) as c:
        c.generate("The refinement test film was", n=2, max_tokens=12)
    views = next_generations(connect(db), before, 10)
    assert [v.prompt for v in views] == ["The refinement test film was"] * 2
    logged = _count(db)
    notes = await refiner(srv, tiny_model, k=3).annotate(views)
    assert [(n.generation_id, n.kind, n.error) for n in notes] == [
        (v.id, "refinement", "") for v in views
    ]
    for n, v in zip(notes, views, strict=True):
        raw = json.loads(n.raw)
        assert len(raw["resamples"]) == 3  # k fresh samples, all scored
        best_found = n.value != v.output_text
        assert best_found == (max(raw["resamples"]) > raw["original"])
    assert _count(db) == logged  # resamples are not generations of the policy to label
    # A version the server does not serve is that item's error, not a server-wide fault.
    gone = type(views[0])(**{**views[0].__dict__, "adapter": "critic", "adapter_version": 7})
    (note,) = await refiner(srv, tiny_model).annotate([gone])
    assert note.value is None and note.error.startswith("policy not served")


async def test_cdf_learner_iteration_trains_on_pairs_of_all_three_routes(
    cdf_server: tuple[ServerProc, Path, Path], tiny_model: Path, tmp_path: Path
) -> None:
    srv, db, registry = cdf_server
    cfg = LearnConfig(
        db=db, registry=registry, workdir=tmp_path / "work", adapter="critic", model=tiny_model,
        base_model="tiny-llama", server=srv.target,
        train=TrainConfig(
            objective="dpo", lr=1e-3, lora_r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"),
            batch_size=4, max_steps=2, max_length=96, progress=False,
        ),
        data=DataConfig(
            kind="cdf", provider="ref", critique_provider="crit", refinement_provider="ref",
            preference_provider="pw", rewrite_max_tokens=12,
        ),
        trigger=TriggerConfig(min_annotations=1, min_examples=3, poll_s=0.1),
        sample=SampleConfig(prompts=PROMPTS, per_iteration=9, n=2, max_tokens=12),
        max_iterations=1,
    )  # fmt: skip
    providers = [
        ScorerCritique(ScorerCritiqueConfig(provider_name="crit", scorer=SCORER, goal="simple")),
        refiner(srv, tiny_model),
        ScorerPairwise(ScorerPairwiseConfig(provider_name="pw", scorer=SCORER)),
    ]
    before = _last(db)
    lines = await run_learner(cfg, providers, 600)

    (rec,) = runs.iterations(connect(db), "critic")
    assert rec["status"] == "promoted", lines
    pairs = load_pairs(workdir(cfg, 1) / "data.jsonl")  # what the iteration trained on
    assert rec["examples"] == len(pairs) and rec["steps"] == 2
    routes = {p.source.split(":")[1] for p in pairs}
    assert routes == {"easy", "medium", "hard"}, [p.source for p in pairs]
    # Only the sampling was logged: no rewrite, no resample (the log may hold the other test's).
    assert len(next_generations(connect(db), before, 10**6)) == 18
    logged = {g.id: g for g in next_generations(connect(db), 0, 10**6)}
    for p in pairs:
        rejected = logged[p.rejected_id]
        assert p.prompt == rejected.rendered_prompt and p.rejected == rejected.output_text
        assert (rejected.adapter, rejected.adapter_version) == ("", 0)  # on-policy: the base
        if p.source.startswith("cdf:hard:"):
            assert p.chosen == logged[p.chosen_id].output_text
        else:
            assert p.chosen_id == "" and p.chosen != p.rejected

    # build (blocking, its own client and scorer) and build_async (for a loop that awaits it)
    # give the same routes from the same log; only the easy route's rewrites are sampled anew.
    # Both read the log as it is now: the annotator ran on after the iteration's trigger (which
    # waits for the refinements only), so the iteration's own data may have seen fewer labels.
    served = Served(None, None, None)
    blocking = dataset.build(connect(db), cfg, served, Counter())
    assert {p.source.split(":")[1] for p in blocking} == {"easy", "medium", "hard"}
    client = AsyncClient(srv.target)
    try:
        again = await dataset.build_async(
            connect(db), cfg, served, Counter(), client=client,
            scorer=lambda: load_scoring_model(tiny_model, device="cpu"),
        )  # fmt: skip
    finally:
        await client.close()
    assert [p.source for p in again] == [p.source for p in blocking]
    fixed = [p for p in blocking if not p.source.startswith("cdf:easy:")]
    assert [p for p in again if not p.source.startswith("cdf:easy:")] == fixed
