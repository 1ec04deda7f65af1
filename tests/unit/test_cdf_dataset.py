"""The CDF iteration's dataset (``learn.dataset``) on a real SQLite log: the served version's
feedback only, difficulty from the base model's perplexity of the logged answers (the tiny
model), routing into terciles, the rewrite request, and the pairs of each route."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import sqlite_utils

from tests.unit.test_datasets import annotate, gen
from tiller.learner.annotate.base import Annotation
from tiller.learner.data.cdf import answer_perplexities, route_feedback
from tiller.learner.fluency import load_scoring_model, perplexity
from tiller.learner.learn import dataset
from tiller.learner.learn.config import DataConfig, LearnConfig
from tiller.learner.learn.served import Served
from tiller.learner.trainer import TrainConfig
from tiller.server.formats.logstore import connect
from tiller.server.formats.prompt import ChatTurn

PROMPTS = [f"Review {i}:" for i in range(6)]


def config(tmp_path: Path, model: Path, **data: object) -> LearnConfig:
    return LearnConfig(
        db=tmp_path / "log.sqlite", registry=tmp_path / "reg", workdir=tmp_path / "work",
        adapter="critic", model=model, base_model="tiny", server="127.0.0.1:1",
        train=TrainConfig(objective="dpo", device="cpu"),
        data=DataConfig(
            kind="cdf", provider="ref", critique_provider="crit", refinement_provider="ref",
            preference_provider="pw", **data,
        ),
    )  # fmt: skip


@pytest.fixture
def log(tmp_path: Path) -> sqlite_utils.Database:
    """Two samples per prompt from critic@v2, plus one stale sample from critic@v1; each
    first sample critiqued and refined, each pair judged (the second sample wins)."""
    db = connect(tmp_path / "log.sqlite")
    for i, p in enumerate(PROMPTS):
        gen(db, f"a{i}", f" it was fine {i}", prompt=p, group=f"G{i}", adapter="critic", version=2)
        gen(db, f"b{i}", f" it was bad {i}", prompt=p, group=f"G{i}", index=1, adapter="critic",
            version=2)  # fmt: skip
    gen(db, "old", " stale", prompt="Review 9:", group="O", adapter="critic", version=1)
    gen(db, "old2", " staler", prompt="Review 9:", group="O", index=1, adapter="critic", version=1)
    firsts = [*(f"a{i}" for i in range(6)), "old"]
    annotate(db, *(Annotation(g, "crit", "critique", f"darker {g}") for g in firsts))
    annotate(db, *(Annotation(g, "ref", "refinement", f" refined {g}") for g in firsts))
    annotate(
        db,
        *(Annotation(f"a{i}", "pw", "preference", {"winner": "b"}, generation_id_b=f"b{i}")
          for i in range(6)),
        Annotation("old", "pw", "preference", {"winner": "a"}, generation_id_b="old2"),
    )  # fmt: skip
    return db


def test_cdf_dataset_routes_the_served_versions_feedback_by_base_perplexity(
    log: sqlite_utils.Database, tmp_path: Path, tiny_model: Path
) -> None:
    cfg = config(tmp_path, tiny_model)
    skipped: Counter[str] = Counter()
    fb = dataset._cdf_feedback(log, cfg, Served(2, None, None), skipped)
    assert skipped == {"off_policy": 3}  # critic@v1's critique, refinement and verdict
    assert list(fb.population) == PROMPTS
    assert [g.id for g in fb.population["Review 3:"]] == ["a3", "b3"]

    scorer = load_scoring_model(tiny_model, device="cpu")
    ppl = answer_perplexities(scorer, fb.population)
    assert set(ppl) == set(PROMPTS)
    want = perplexity(scorer, [("Review 3:", " it was fine 3"), ("Review 3:", " it was bad 3")])
    assert ppl["Review 3:"] == pytest.approx(want) and want > 1.0

    plan = route_feedback(fb, ppl, skipped)
    order = sorted(PROMPTS, key=ppl.__getitem__)
    assert [plan.route[p] for p in order] == ["easy"] * 2 + ["medium"] * 2 + ["hard"] * 2
    easy = {g.user_prompt for g, _ in plan.critiques}
    assert easy == set(order[:2]) and {g.user_prompt for g, _ in plan.refinements} == set(
        order[2:4]
    )
    assert {a.user_prompt for a, _, _ in plan.verdicts if a} == set(order[4:])

    # The easy route's rewrite request: the template filled once, the prompt continued again.
    g, critique = plan.critiques[0]
    req = dataset.rewrite_request(cfg, g, critique)
    assert req == (
        f"{g.prompt}{g.output_text}\n\nFeedback on the text above: {critique}\n"
        f"The same text, rewritten to follow the feedback:\n{g.prompt}"
    )
    pairs = plan.pairs([f" rewritten {i}" for i in range(2)], dataset._cdf_config(cfg), skipped)
    sources = [p.source.split(":")[1] for p in pairs]
    assert sources == ["easy", "easy", "medium", "medium", "hard", "hard"]
    assert pairs[0].chosen == " rewritten 0" and pairs[0].rejected == g.output_text
    assert pairs[0].rejected_id == g.id and pairs[0].chosen_id == ""
    assert pairs[2].chosen.startswith(" refined a") and pairs[4].chosen.startswith(" it was bad")


def test_cdf_dataset_keeps_everything_off_policy_and_builds_chat_rewrites(
    log: sqlite_utils.Database, tmp_path: Path, tiny_model: Path
) -> None:
    cfg = config(tmp_path, tiny_model, on_policy=False)
    skipped: Counter[str] = Counter()
    fb = dataset._cdf_feedback(log, cfg, Served(2, None, None), skipped)
    assert not skipped and "Review 9:" in fb.population

    chat = (ChatTurn("system", "Be brief."), ChatTurn("user", "Rate it"))
    gen(log, "c", "Fine.", chat=chat, adapter="critic", version=2)
    view = next(iter(dataset.generations_by_id(log, ["c"]).values()))
    req = dataset.rewrite_request(cfg, view, "Be harsher.")
    assert req[:2] == [{"role": t.role, "content": t.content} for t in chat]
    assert req[2] == {"role": "assistant", "content": "Fine."}
    assert req[3]["role"] == "user" and "Be harsher." in req[3]["content"]
    assert json.dumps(req)  # a tiller.client prompt: plain messages
