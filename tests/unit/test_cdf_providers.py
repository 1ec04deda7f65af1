"""The offline CDF labellers (``annotate.scorer_feedback``): templated critiques and pairwise
verdicts from a real scorer, the best-of-k refinement's choice and request, and their config
entries in the annotator's file."""

from __future__ import annotations

import json

import pytest

from tiller.learner.annotate.base import GenerationView
from tiller.learner.annotate.config import build_providers, parse_config
from tiller.learner.annotate.scorer_feedback import (
    ScorerCritique,
    ScorerCritiqueConfig,
    ScorerPairwise,
    ScorerPairwiseConfig,
    ScorerRefinement,
    ScorerRefinementConfig,
    best_refinement,
)
from tiller.server.formats.sections import ConfigError

HAPPY = "What a wonderful, lovely, delightful film. I loved it."
GRIM = "A terrible, awful, boring mess. I hated every minute."
FLAT = "The film is ninety minutes long."


def view(
    gid: str, text: str, *, group: str = "g", index: int = 0, adapter: str = "", version: int = 0,
    prompt: str = "The movie", chat: str = "", feedback: str = "",
) -> GenerationView:  # fmt: skip
    return GenerationView(
        seq=index, id=gid, group_id=group, sample_index=index, prompt=prompt, chat_json=chat,
        rendered_prompt=prompt, feedback=feedback, adapter=adapter, adapter_version=version,
        output_text=text, finish_reason="stop", created_at=0.0,
    )  # fmt: skip


def critic(**kw: object) -> ScorerCritique:
    args: dict[str, object] = dict(
        provider_name="crit", scorer="sentiment", goal="critical and negative",
        higher_is_better=False, threshold=-0.5,
    )  # fmt: skip
    return ScorerCritique(ScorerCritiqueConfig(**(args | kw)))


async def test_critique_says_where_the_score_must_move_or_that_it_arrived() -> None:
    notes = await critic().annotate([view("h", HAPPY), view("g", GRIM, index=1)])
    assert [(n.generation_id, n.kind, n.provider, n.error) for n in notes] == [
        ("h", "critique", "crit", ""),
        ("g", "critique", "crit", ""),
    ]
    happy, grim = (float(n.raw) for n in notes)
    assert happy > 0.5 and grim < -0.5  # VADER's compound scores, kept in raw
    assert notes[0].value == (
        f"The text scores {happy:+.2f} on sentiment; it needs a lower score: make it more "
        "critical and negative."
    )
    assert notes[1].value == (
        f"The text scores {grim:+.2f} on sentiment, already critical and negative: keep it so, "
        "and fluent."
    )
    # No threshold: every text is told to move; higher_is_better flips the direction.
    up = critic(threshold=None, higher_is_better=True, goal="warm", template="{direction}!")
    assert [n.value for n in await up.annotate([view("g", GRIM)])] == ["higher!"]


def test_critique_config_errors_name_the_provider_and_field() -> None:
    with pytest.raises(ValueError, match=r"'crit': template '\{mood\}' is not a template"):
        critic(template="{mood}")
    with pytest.raises(ValueError, match="'crit': goal is empty"):
        critic(goal=" ")
    with pytest.raises(ValueError, match="'crit': unknown scorer 'sentimant'"):
        critic(scorer="sentimant")


async def test_pairwise_pairs_consecutive_samples_and_picks_by_score() -> None:
    judge = ScorerPairwise(
        ScorerPairwiseConfig(provider_name="pw", scorer="sentiment", higher_is_better=False)
    )
    batch = [
        view("a1", HAPPY, group="g1"), view("b1", GRIM, group="g1", index=1),
        view("a2", GRIM, group="g2"), view("b2", HAPPY, group="g2", index=1),
        view("a3", FLAT, group="g3"), view("b3", FLAT + " ", group="g3", index=1),
        view("odd", HAPPY, group="g4"),  # alone in its request: nothing to compare with
    ]  # fmt: skip
    notes = await judge.annotate(batch)
    got = [(n.generation_id, n.generation_id_b, n.kind, n.value) for n in notes]
    assert got == [
        ("a1", "b1", "preference", {"winner": "b"}),  # the grim one is better here
        ("a2", "b2", "preference", {"winner": "a"}),
        ("a3", "b3", "preference", {"winner": "tie"}),
    ]
    assert set(json.loads(notes[0].raw)) == {"score_a", "score_b"}
    # Within min_margin a clear difference is still a tie.
    wide = ScorerPairwise(
        ScorerPairwiseConfig(provider_name="pw", scorer="sentiment", min_margin=5.0)
    )
    assert [n.value for n in await wide.annotate(batch[:2])] == [{"winner": "tie"}]


def refine_cfg(**kw: object) -> ScorerRefinementConfig:
    args: dict[str, object] = dict(
        provider_name="ref", scorer="sentiment", base_url="http://127.0.0.1:9/v1", model="tiny",
    )  # fmt: skip
    return ScorerRefinementConfig(**(args | kw))


def test_best_refinement_beats_the_original_by_more_than_the_margin_or_is_the_original() -> None:
    low = refine_cfg(higher_is_better=False)
    resamples = [(0.2, "meh"), (-0.6, "grim"), (-0.6, "grim too"), (0.9, "happy")]
    assert best_refinement("orig", 0.5, resamples, low) == "grim"  # the first of the best
    assert best_refinement("orig", -0.7, resamples, low) == "orig"  # none is lower
    assert best_refinement("orig", -0.5, resamples, refine_cfg(higher_is_better=False)) == "grim"
    margin = refine_cfg(higher_is_better=False, min_margin=0.1)
    assert best_refinement("orig", -0.5, resamples, margin) == "orig"  # 0.1 better: not more
    assert best_refinement("orig", 0.5, resamples, refine_cfg()) == "happy"
    assert best_refinement("orig", 0.5, [], refine_cfg()) == "orig"


def test_refinement_resamples_the_generations_own_policy_unlogged_in_the_background() -> None:
    ref = ScorerRefinement(refine_cfg(k=3, repetition_penalty=1.2, extra_body={"x": 1}))
    create, kw = ref._request(view("a", "text", adapter="critic", version=4, feedback="Bad"))
    assert create == ref._client.completions.create
    assert kw["model"] == "critic@v4" and kw["prompt"] == "The movie" and kw["n"] == 3
    assert kw["extra_body"] == {
        "x": 1, "log": False, "priority": "background", "feedback": "Bad",
        "repetition_penalty": 1.2,
    }  # fmt: skip
    turns = [{"role": "user", "content": "Hi"}]
    create, kw = ref._request(view("b", "text", prompt="", chat=json.dumps(turns)))
    assert create == ref._client.chat.completions.create
    assert kw["model"] == "tiny" and kw["messages"] == turns and "prompt" not in kw
    with pytest.raises(ValueError, match="'ref': k, max_tokens and max_concurrency"):
        refine_cfg(k=0)


def test_annotator_file_builds_the_offline_providers_and_names_bad_fields() -> None:
    raw = {
        "db": "log.sqlite",
        "providers": [
            {"name": "c", "type": "scorer_critique", "scorer": "sentiment", "goal": "calm"},
            {"name": "r", "type": "scorer_refinement", "scorer": "length",
             "base_url": "http://x/v1", "model": "m", "api_key_env": "TOKEN"},
            {"name": "p", "type": "scorer_pairwise", "scorer": "length"},
        ],
    }  # fmt: skip
    cfg = parse_config(raw, {"TOKEN": "secret"})
    assert cfg.providers[1].api_key == "secret" and cfg.providers[1].provider_name == "r"
    kinds = [type(p) for p in build_providers(cfg)]
    assert kinds == [ScorerCritique, ScorerRefinement, ScorerPairwise]
    bad = {**raw, "providers": [{**raw["providers"][1], "kk": 3}]}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"providers\[0\] \(r\).*kk"):
        parse_config(bad, {})
    bad = {**raw, "providers": [{"name": "c", "type": "scorer_critique", "scorer": "sentiment"}]}
    with pytest.raises(ConfigError, match="goal"):
        parse_config(bad, {})
