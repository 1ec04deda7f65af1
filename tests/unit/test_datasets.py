"""Dataset builders on a real SQLite generation log: ALT, preference pairs, CMPO, CDF, JSONL."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import sqlite_utils

from tiller.learner.annotate.base import Annotation
from tiller.learner.annotate.follow import commit, next_batch
from tiller.learner.data.alt import AltConfig, ReplayWindow, build_alt, data_window
from tiller.learner.data.cdf import CdfConfig, cdf_pairs, greedy_perplexity, terciles
from tiller.learner.data.cmpo import cmpo_pairs, power_set_weights, preferred_on
from tiller.learner.data.examples import PreferencePair, SFTExample
from tiller.learner.data.jsonl import JsonlError, load_pairs, load_sft, save_pairs, save_sft
from tiller.learner.data.pairs import feedback_pairs, judge_pairs, score_pairs
from tiller.server.formats.logstore import connect
from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.prompt import ChatTurn, render_text
from tiller.server.logrecords import (
    FeedbackInput,
    GenerationRecord,
    insert_generations,
    record_feedback,
)
from tiller.server.values import GenerateRequest, ResolvedSampling

COND = Conditioning(tags=("Good", "Bad"))
SAMPLING = ResolvedSampling(
    max_tokens=64, temperature=1.0, top_p=1.0, top_k=0, seed=0, stop=(), n=1,
    repetition_penalty=1.0,
)  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> sqlite_utils.Database:
    return connect(tmp_path / "log.sqlite")


def gen(
    db: sqlite_utils.Database,
    gid: str,
    output: str,
    *,
    prompt: str = "p",
    group: str | None = None,
    index: int = 0,
    finish: str = "stop",
    feedback: str = "",
    adapter: str = "detox",
    version: int = 1,
    chat: tuple[ChatTurn, ...] | None = None,
) -> None:
    """Log one generation through the server's own record writer."""
    req = GenerateRequest(prompt=None if chat else prompt, chat=chat, feedback=feedback)
    rec = GenerationRecord(
        id=gid,
        request_id=group or gid,
        group_id=group or gid,
        sample_index=index,
        request=req,
        rendered_prompt=render_text(prompt, feedback, COND) if feedback else prompt,
        adapter=adapter,
        adapter_version=version,
        base_model="tiny",
        sampling=SAMPLING,
        output_text=output,
        output_token_ids=(1, 2),
        finish_reason=finish,
        prompt_tokens=3,
        latency_s=0.1,
        ttft_s=0.01,
    )
    assert insert_generations([rec])(db)


def annotate(db: sqlite_utils.Database, *notes: Annotation) -> None:
    """Commit annotations the way the annotator does (one provider per call)."""
    assert len({n.provider for n in notes}) == 1
    commit(db, notes[0].provider, next_batch(db, 0, 10**6), list(notes))


def tag(gid: str, value: str | None, provider: str = "rm", error: str = "") -> Annotation:
    return Annotation(gid, provider, "tag", value, error=error)


def sft(prompt: str, completion: str, source: str, weight: float = 1.0) -> SFTExample:
    return SFTExample(prompt=prompt, completion=completion, weight=weight, source=source)


def pp(
    prompt: str,
    chosen: str,
    rejected: str,
    source: str,
    confidence: float = 1.0,
    weights: tuple[tuple[str, float], ...] = (),
    *,
    ids: tuple[str, str] = ("", ""),
) -> PreferencePair:
    """An expected pair; ``ids``: (chosen id, rejected id), the generations it was built from."""
    return PreferencePair(prompt, chosen, rejected, weights, confidence, source, *ids)


# ------------------------------------------------------------------------------------ ALT


def test_alt_renders_the_received_tag_and_rejects_unfinished(db: sqlite_utils.Database) -> None:
    gen(db, "g1", "o1", prompt="p1", feedback="Good")  # sampled with exemplar feedback
    gen(db, "g2", "o2", prompt="p2", finish="length")
    gen(db, "g3", "o3", prompt="p3")
    gen(db, "g4", "o4", prompt="p4")
    gen(db, "g5", "o5", prompt="p5")
    gen(db, "g6", "o6", prompt="p6", finish="abort")
    gen(db, "g7", "o7", prompt="p7")
    annotate(
        db,
        tag("g1", "Bad"),
        tag("g2", "Good"),
        tag("g3", "Good"),
        tag("g4", None, error="judge said nothing"),
        tag("g6", "Good"),
    )
    annotate(db, tag("g7", "Good", provider="other"))
    skipped: Counter[str] = Counter()
    out = build_alt(db, AltConfig(conditioning=COND, provider="rm"), skipped=skipped)
    assert out == [
        sft("Bad input: p1<|separator|>", "o1", "g1"),
        sft("Good input: p3<|separator|>", "o3", "g3"),
    ]
    assert skipped == {"truncated": 1, "unfinished": 1}
    cfg = AltConfig(conditioning=COND, provider="rm", allow_truncated=True)
    assert [e.source for e in build_alt(db, cfg)] == ["g1", "g2", "g3"]


def test_alt_untagged_reference_and_contrast_prompts(db: sqlite_utils.Database) -> None:
    cond = Conditioning(tags=("A", "B", "C", "D"), template="{feedback}: {prompt}", separator="")
    for i in range(8):
        gen(db, f"g{i}", f"o{i}", prompt=f"p{i}")
        annotate(db, tag(f"g{i}", "ABCD"[i % 4]))
    cfg = AltConfig(conditioning=cond, provider="rm", reference="untagged", contrast_tags=2)
    out = build_alt(db, cfg)
    for i, ex in enumerate(out):
        label = "ABCD"[i % 4]
        assert ex.prompt == f"{label}: p{i}" and ex.reference_prompt == f"p{i}"
        others = [p.split(":")[0] for p in ex.contrast_prompts]
        assert len(set(others)) == 2 and label not in others
        assert all(p.endswith(f": p{i}") for p in ex.contrast_prompts)
    assert build_alt(db, cfg) == out  # seeded
    drawn = {p for ex in out for p in ex.contrast_prompts}
    assert len({p.split(":")[0] for p in drawn}) == 4  # every tag is somebody's contrast
    plain = build_alt(db, AltConfig(conditioning=cond, provider="rm"))
    assert all(ex.reference_prompt is None and ex.contrast_prompts == () for ex in plain)
    with pytest.raises(ValueError, match="contrast_tags"):
        AltConfig(conditioning=cond, provider="rm", contrast_tags=4)
    with pytest.raises(ValueError, match="reference"):
        AltConfig(conditioning=cond, provider="rm", reference="none")  # type: ignore[arg-type]


def test_alt_from_app_feedback_tags_takes_the_latest(db: sqlite_utils.Database) -> None:
    gen(db, "g1", "o1", prompt="p1")
    gen(db, "g2", "o2", prompt="p2")
    for fb in (
        FeedbackInput(generation_id="g1", tag="Bad"),
        FeedbackInput(generation_id="g1", tag="Good"),
        FeedbackInput(generation_id="g2", score=1.0),
        FeedbackInput(chosen_id="g2", rejected_id="g1", tag="Good"),
    ):
        record_feedback(fb)(db)
    out = build_alt(db, AltConfig(conditioning=COND, provider=None))
    assert out == [sft("Good input: p1<|separator|>", "o1", "g1")]


def test_alt_unknown_tags_fail_loudly_or_are_skipped(db: sqlite_utils.Database) -> None:
    gen(db, "g1", "o1")
    annotate(db, tag("g1", "Meh"))
    with pytest.raises(ValueError, match=r"tag 'Meh'.*vocabulary: Good, Bad"):
        build_alt(db, AltConfig(conditioning=COND, provider="rm"))
    skipped: Counter[str] = Counter()
    cfg = AltConfig(conditioning=COND, provider="rm", unknown_tags="skip")
    assert build_alt(db, cfg, skipped=skipped) == []
    assert skipped == {"unknown_tag": 1}


def test_alt_chats_go_through_render_chat_and_the_chat_template(
    db: sqlite_utils.Database,
) -> None:
    turns = (ChatTurn("system", "be brief"), ChatTurn("user", "hi"), ChatTurn("assistant", "yo"))
    turns += (ChatTurn("user", "again"),)
    gen(db, "c1", "out", chat=turns)
    annotate(db, tag("c1", "Good"))

    def template(messages: Sequence[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    out = build_alt(db, AltConfig(conditioning=COND, provider="rm"), chat_template=template)
    assert out == [
        sft(
            "<system>be brief<user>hi<assistant>yo<user>Good input: again<|separator|><assistant>",
            "out",
            "c1",
        )
    ]
    system = Conditioning(tags=("Good", "Bad"), placement="system")
    out = build_alt(db, AltConfig(conditioning=system, provider="rm"), chat_template=template)
    assert out[0].prompt == "<system>Good\n\nbe brief<user>hi<assistant>yo<user>again<assistant>"
    with pytest.raises(ValueError, match="c1 is a chat"):
        build_alt(db, AltConfig(conditioning=COND, provider="rm"))


def test_alt_replay_window(db: sqlite_utils.Database) -> None:
    plan = [
        ("a0", "", 0), ("a1", "detox", 1), ("a2", "detox", 1), ("a3", "detox", 2),
        ("a4", "detox", 3), ("b1", "other", 5), ("a5", "detox", 3),
    ]  # fmt: skip
    for gid, adapter, version in plan:
        gen(db, gid, f"o-{gid}", adapter=adapter, version=version)
    annotate(db, *(tag(gid, "Good") for gid, _, _ in plan))

    def ids(adapters: tuple[str, ...] | None, **window: int) -> list[str]:
        cfg = AltConfig(
            conditioning=COND, provider="rm", adapters=adapters, window=ReplayWindow(**window)
        )
        return [e.source for e in build_alt(db, cfg)]

    chain = ("detox", "")
    assert ids(chain) == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert ids(chain, last_versions=2) == ["a3", "a4", "a5"]
    assert ids(chain, last_generations=2) == ["a4", "a5"]
    assert ids(chain, last_versions=2, last_generations=2) == ["a4", "a5"]
    assert ids(chain, last_generations=50) == ["a0", "a1", "a2", "a3", "a4", "a5"]
    assert ids(None, last_versions=1) == ["b1"]
    assert ids(None, last_generations=3) == ["a4", "b1", "a5"]
    cfg = AltConfig(
        conditioning=COND, provider="rm", adapters=chain, window=ReplayWindow(last_versions=2)
    )
    assert data_window(db, cfg) == {
        "first_seq": 4,
        "last_seq": 7,
        "generations": 3,
        "adapter_versions": ["detox@v2", "detox@v3"],
        "provider": "rm",
        "last_versions": 2,
        "last_generations": None,
    }
    with pytest.raises(ValueError, match="last_versions must be >= 1"):
        ReplayWindow(last_versions=0)


def test_alt_balancing_per_tag(db: sqlite_utils.Database) -> None:
    for i, t in enumerate(["Good", "Bad", "Good", "Good"]):
        gen(db, f"g{i}", f"o{i}", prompt=f"p{i}")
        annotate(db, tag(f"g{i}", t))
    weighted = build_alt(db, AltConfig(conditioning=COND, provider="rm", balance="weight"))
    assert [(e.source, e.weight) for e in weighted] == [
        ("g0", pytest.approx(2 / 3)),
        ("g1", 2.0),
        ("g2", pytest.approx(2 / 3)),
        ("g3", pytest.approx(2 / 3)),
    ]
    assert math.isclose(sum(e.weight for e in weighted if e.source != "g1"), 2.0)
    skipped: Counter[str] = Counter()
    cfg = AltConfig(conditioning=COND, provider="rm", balance="downsample", seed=3)
    down = build_alt(db, cfg, skipped=skipped)
    assert len(down) == 2 and "g1" in [e.source for e in down]
    assert [e.source for e in down] == sorted(e.source for e in down)  # log order kept
    assert all(e.weight == 1.0 for e in down) and skipped == {"balance": 2}
    assert build_alt(db, cfg) == down  # seeded: the same sample every time
    picks = set()
    for s in range(20):
        cfg = AltConfig(conditioning=COND, provider="rm", balance="downsample", seed=s)
        picks |= {e.source for e in build_alt(db, cfg)} - {"g1"}
    assert picks == {"g0", "g2", "g3"}  # every Good sample can be the one kept


# ------------------------------------------------------------------------------------ pairs


def test_judge_pairs(db: sqlite_utils.Database) -> None:
    for n, (x, y) in enumerate([("x1", "x2"), ("x3", "x4"), ("x5", "x6"), ("x7", "x8")]):
        gen(db, f"j{2 * n + 1}", x, group=f"G{n}", prompt=f"q{n}")
        gen(db, f"j{2 * n + 2}", y, group=f"G{n}", prompt=f"q{n}", index=1)
    gen(db, "j4b", "x4", group="G1", prompt="q1", index=2, finish="length")
    gen(db, "m1", "m1", prompt="r1")
    gen(db, "m2", "m2", prompt="r2")
    gen(db, "s1", "same", group="S", prompt="s")
    gen(db, "s2", "same", group="S", prompt="s", index=1)

    def pref(a: str, b: str, value: object, error: str = "") -> Annotation:
        return Annotation(a, "judge", "preference", value, generation_id_b=b, error=error)

    annotate(
        db,
        pref("j1", "j2", {"winner": "a", "p_a": 0.8}),
        pref("j3", "j4b", {"winner": "b"}),
        pref("j5", "j6", {"winner": "tie", "p_a": 0.5}),
        pref("j7", "j8", {"winner": "a", "p_a": 0.3}),
        pref("m1", "m2", {"winner": "a"}),
        pref("s1", "s2", {"winner": "b"}),
        pref("j1", "j3", None, error="no A/B verdict"),
        pref("j2", "j4", {"winner": "maybe"}),
    )
    skipped: Counter[str] = Counter()
    assert judge_pairs(db, "judge", skipped=skipped) == [
        pp("q0", "x1", "x2", "judge:judge:j1>j2", 0.8, ids=("j1", "j2")),
        pp("q1", "x4", "x3", "judge:judge:j4b>j3", 1.0, ids=("j4b", "j3")),
        pp("q3", "x7", "x8", "judge:judge:j7>j8", 0.5, ids=("j7", "j8")),
    ]
    assert skipped == {"tie": 1, "prompt_mismatch": 1, "identical": 1, "malformed": 1}
    strict = judge_pairs(db, "judge", allow_truncated=False)
    assert [p.source for p in strict] == ["judge:judge:j1>j2", "judge:judge:j7>j8"]
    assert [(p.chosen_id, p.rejected_id) for p in strict] == [("j1", "j2"), ("j7", "j8")]
    assert judge_pairs(db, "nobody") == []


def test_judge_ties_decided_by_the_order_averaged_probability(db: sqlite_utils.Database) -> None:
    for n in range(4):
        gen(db, f"t{2 * n + 1}", f"a{n}", group=f"T{n}", prompt=f"q{n}")
        gen(db, f"t{2 * n + 2}", f"b{n}", group=f"T{n}", prompt=f"q{n}", index=1)

    def pref(a: str, b: str, value: object) -> Annotation:
        return Annotation(a, "judge", "preference", value, generation_id_b=b)

    annotate(
        db,
        pref("t1", "t2", {"winner": "tie", "p_a": 0.46}),  # B preferred once order is averaged
        pref("t3", "t4", {"winner": "tie", "p_a": 0.505}),  # too close to call
        pref("t5", "t6", {"winner": "tie"}),  # no probabilities: stays a tie
        pref("t7", "t8", {"winner": "tie", "p_a": 1.5}),  # out of range
    )
    skipped: Counter[str] = Counter()
    assert judge_pairs(db, "judge", skipped=skipped) == []
    assert skipped == {"tie": 3, "malformed": 1}
    skipped.clear()
    pairs = judge_pairs(db, "judge", skipped=skipped, tie_margin=0.02)
    assert pairs == [pp("q0", "b0", "a0", "judge:judge:t2>t1", 0.54, ids=("t2", "t1"))]
    assert skipped == {"tie": 2, "malformed": 1}


def test_score_pairs(db: sqlite_utils.Database) -> None:
    for i in range(3):
        gen(db, f"s{i}", f"S{i}", group="S", index=i, prompt="qs")
    gen(db, "t0", "T0", group="T", prompt="qt")
    gen(db, "t1", "T1", group="T", index=1, prompt="qt")
    gen(db, "u0", "U0", group="U", prompt="qu")
    annotate(
        db,
        *(Annotation(f"s{i}", "tox", "score", s) for i, s in enumerate([0.1, 0.5, 0.45])),
        Annotation("t0", "tox", "score", 1.0),
        Annotation("t1", "tox", "score", 1.0),
        Annotation("u0", "tox", "score", None, error="scorer failed"),
    )
    skipped: Counter[str] = Counter()
    up = score_pairs(db, "tox", higher_is_better=True, min_margin=0.1, skipped=skipped)
    assert up == [
        pp("qs", "S1", "S0", "score:tox:s1>s0", ids=("s1", "s0")),
        pp("qs", "S2", "S0", "score:tox:s2>s0", ids=("s2", "s0")),
    ]
    assert skipped == {"small_margin": 2}
    down = score_pairs(db, "tox", higher_is_better=False, min_margin=0.1)
    assert down == [
        pp("qs", "S0", "S1", "score:tox:s0>s1", ids=("s0", "s1")),
        pp("qs", "S0", "S2", "score:tox:s0>s2", ids=("s0", "s2")),
    ]
    every = score_pairs(db, "tox", higher_is_better=True)
    assert [p.source for p in every] == ["score:tox:s1>s0", "score:tox:s2>s0", "score:tox:s1>s2"]
    best = score_pairs(db, "tox", higher_is_better=True, pairing="best_worst")
    assert best == [pp("qs", "S1", "S0", "score:tox:s1>s0", ids=("s1", "s0"))]
    with pytest.raises(ValueError, match="min_margin"):
        score_pairs(db, "tox", higher_is_better=True, min_margin=-1)


def test_feedback_pairs(db: sqlite_utils.Database) -> None:
    for gid in "abcd":
        gen(db, gid, gid.upper(), prompt="q")
    gen(db, "e", "E", prompt="q", feedback="Good")  # other rendered prompt
    gen(db, "f", "F", prompt="q")
    first, _ = record_feedback(FeedbackInput(chosen_id="a", rejected_id="b"))(db)
    record_feedback(FeedbackInput(chosen_id="a", rejected_id="b", idempotency_key="k2"))(db)
    record_feedback(FeedbackInput(chosen_id="c", rejected_id="d"))(db)
    record_feedback(FeedbackInput(chosen_id="d", rejected_id="c"))(db)
    record_feedback(FeedbackInput(chosen_id="e", rejected_id="f"))(db)
    record_feedback(FeedbackInput(generation_id="a", score=1.0))(db)
    skipped: Counter[str] = Counter()
    expected = pp("q", "A", "B", f"feedback:{first}", ids=("a", "b"))
    assert feedback_pairs(db, skipped=skipped) == [expected]
    assert skipped == {"duplicate": 1, "contradictory": 2, "prompt_mismatch": 1}


def test_on_policy_keeps_pairs_by_their_generation_ids(db: sqlite_utils.Database) -> None:
    from tiller.learner.learn.dataset import on_policy

    gen(db, "a", "A", group="G", version=2)
    gen(db, "b", "B", group="G", index=1, version=2)
    gen(db, "c", "C", group="H", version=1)
    fresh = PreferencePair("p", "A", "B", source="any text", chosen_id="a", rejected_id="b")
    stale = PreferencePair("p", "A", "C", chosen_id="a", rejected_id="c")
    unknown = PreferencePair("p", "A", "B", chosen_id="a", rejected_id="nope")
    no_ids = PreferencePair("p", "A", "B", source="score:rm:a>b")  # a source is never parsed
    assert on_policy(db, [fresh, stale, unknown, no_ids], "detox", 2) == [fresh]
    assert on_policy(db, [fresh, stale], "detox", 1) == []


# ------------------------------------------------------------------------------------ CMPO


def test_cmpo_power_set_weights_two_and_three_attributes() -> None:
    assert power_set_weights(("h", "c"), ("h", "c")) == [
        (("h", 1.0), ("c", 0.0)),
        (("h", 0.0), ("c", 1.0)),
        (("h", 0.5), ("c", 0.5)),
    ]
    third = 1 / 3
    assert power_set_weights(("h", "c", "v"), ("h", "c", "v")) == [
        (("h", 1.0), ("c", 0.0), ("v", 0.0)),
        (("h", 0.0), ("c", 1.0), ("v", 0.0)),
        (("h", 0.0), ("c", 0.0), ("v", 1.0)),
        (("h", 0.5), ("c", 0.5), ("v", 0.0)),
        (("h", 0.5), ("c", 0.0), ("v", 0.5)),
        (("h", 0.0), ("c", 0.5), ("v", 0.5)),
        (("h", third), ("c", third), ("v", third)),
    ]
    assert power_set_weights(("h", "v"), ("h", "c", "v")) == [
        (("h", 1.0), ("c", 0.0), ("v", 0.0)),
        (("h", 0.0), ("c", 0.0), ("v", 1.0)),
        (("h", 0.5), ("c", 0.0), ("v", 0.5)),
    ]
    assert power_set_weights((), ("h", "c")) == []  # the empty set conditions on nothing
    assert len(power_set_weights(("h", "c", "v"), ("h", "c", "v"), max_subset_size=1)) == 3
    with pytest.raises(ValueError, match="not steering attributes"):
        power_set_weights(("x",), ("h",))
    assert preferred_on({"h": 5, "c": 3, "v": 2}, {"h": 3, "c": 3}, ("h", "c", "v")) == ("h",)
    assert preferred_on({"h": True}, {"h": 0}, ("h",)) == ()


def test_cmpo_pairs_from_likert_ratings(db: sqlite_utils.Database) -> None:
    gen(db, "x", "X", group="G", prompt="q")
    gen(db, "y", "Y", group="G", index=1, prompt="q")
    gen(db, "z", "Z", group="G", index=2, prompt="q")
    gen(db, "lonely", "L", group="H", prompt="q2")
    annotate(
        db,
        Annotation("x", "lik", "likert", {"h": 5, "c": 4, "v": 2}),
        Annotation("y", "lik", "likert", {"h": 3, "c": 3, "v": 4}),
        Annotation("z", "lik", "likert", {"h": 3, "c": 3, "v": 4}),  # ties y everywhere
        Annotation("lonely", "lik", "likert", {"h": 1, "c": 1, "v": 1}),
    )
    half, one, xy_ = 0.5, 1.0, ("x", "y")
    out = cmpo_pairs(db, "lik", ("h", "c", "v"))
    xy = [
        pp("q", "X", "Y", "cmpo:lik:x>y:h", 1.0, (("h", one), ("c", 0.0), ("v", 0.0)), ids=xy_),
        pp("q", "X", "Y", "cmpo:lik:x>y:c", 1.0, (("h", 0.0), ("c", one), ("v", 0.0)), ids=xy_),
        pp("q", "X", "Y", "cmpo:lik:x>y:h+c", 1.0, (("h", half), ("c", half), ("v", 0.0)),
           ids=xy_),
        pp("q", "Y", "X", "cmpo:lik:y>x:v", 1.0, (("h", 0.0), ("c", 0.0), ("v", one)),
           ids=("y", "x")),
    ]  # fmt: skip
    xz = [
        pp("q", "X", "Z", p.source.replace(">y", ">z"), 1.0, p.attribute_weights, ids=("x", "z"))
        for p in xy[:3]
    ] + [pp("q", "Z", "X", "cmpo:lik:z>x:v", 1.0, xy[3].attribute_weights, ids=("z", "x"))]
    assert out == xy + xz
    two = cmpo_pairs(db, "lik", ("h", "c"))
    assert [(p.source, p.attribute_weights) for p in two[:3]] == [
        ("cmpo:lik:x>y:h", (("h", 1.0), ("c", 0.0))),
        ("cmpo:lik:x>y:c", (("h", 0.0), ("c", 1.0))),
        ("cmpo:lik:x>y:h+c", (("h", 0.5), ("c", 0.5))),
    ]
    assert len(two) == 6  # y over x and z over x only on v, which is not steered here
    assert len(cmpo_pairs(db, "lik", ("h", "c", "v"), max_subset_size=1)) == 6
    with pytest.raises(ValueError, match="distinct"):
        cmpo_pairs(db, "lik", ("h", "h"))


# ------------------------------------------------------------------------------------ CDF


def test_terciles_are_even_symmetric_and_tie_safe() -> None:
    seven = {f"p{i}": float(i) for i in range(7)}
    assert Counter(terciles(seven).values()) == {"easy": 2, "medium": 3, "hard": 2}
    six = terciles({f"p{i}": float(i) for i in range(6)})
    assert [six[f"p{i}"] for i in range(6)] == ["easy"] * 2 + ["medium"] * 2 + ["hard"] * 2
    tied = terciles({"a": 1.0, "b": 1.0, "c": 1.0, "d": 9.0})
    assert tied["a"] == tied["b"] == tied["c"]
    with pytest.raises(ValueError, match="finite"):
        terciles({"a": math.nan})


def test_cdf_routes_each_prompt_to_one_kind_of_feedback(db: sqlite_utils.Database) -> None:
    for i in range(1, 7):
        gen(db, f"a{i}", f"A{i}", group=f"G{i}", prompt=f"p{i}")
        gen(db, f"b{i}", f"B{i}", group=f"G{i}", index=1, prompt=f"p{i}")
    ids = [f"a{i}" for i in range(1, 7)]
    annotate(db, *(Annotation(g, "crit", "critique", f"fix {g}") for g in ids))
    annotate(db, *(Annotation(g, "ref", "refinement", f"better {g}") for g in ids))
    annotate(
        db,
        *(
            Annotation(f"a{i}", "pj", "preference", {"winner": "b"}, generation_id_b=f"b{i}")
            for i in range(1, 7)
        ),
    )
    asked: list[str] = []
    ppl = {"p1": 1.0, "p2": 2.0, "p3": 3.0, "p4": 4.0, "p5": 5.0, "p6": 6.0}

    def perplexity(prompt: str) -> float:
        asked.append(prompt)
        return ppl[prompt]

    def rewrite(prompt: str, answer: str, critique: str) -> str:
        return f"{answer} after {critique} for {prompt}"

    cfg = CdfConfig(critique_provider="crit", refinement_provider="ref", preference_provider="pj")
    skipped: Counter[str] = Counter()
    out = cdf_pairs(db, cfg, perplexity=perplexity, rewrite=rewrite, skipped=skipped)
    assert out == [
        # a rewrite or refinement was never logged: only the rejected side has an id
        pp("p1", "A1 after fix a1 for p1", "A1", "cdf:easy:critique:a1", ids=("", "a1")),
        pp("p2", "A2 after fix a2 for p2", "A2", "cdf:easy:critique:a2", ids=("", "a2")),
        pp("p3", "better a3", "A3", "cdf:medium:refinement:a3", ids=("", "a3")),
        pp("p4", "better a4", "A4", "cdf:medium:refinement:a4", ids=("", "a4")),
        pp("p5", "B5", "A5", "cdf:hard:pj:b5>a5", ids=("b5", "a5")),
        pp("p6", "B6", "A6", "cdf:hard:pj:b6>a6", ids=("b6", "a6")),
    ]
    assert sorted(asked) == sorted(set(asked)) == [f"p{i}" for i in range(1, 7)]
    assert skipped == {}
    # A rewrite that changes nothing is no preference.
    out = cdf_pairs(db, cfg, perplexity=ppl.__getitem__, rewrite=lambda q, a, c: a)
    assert [p.source for p in out][:2] == ["cdf:medium:refinement:a3", "cdf:medium:refinement:a4"]


def test_greedy_perplexity_matches_a_hand_rolled_greedy_decode(tiny_model: Path) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["def parse(self, text):", "import json", "def parse(self, text):"]
    got = greedy_perplexity(tiny_model, prompts, max_new_tokens=6)
    assert list(got) == ["def parse(self, text):", "import json"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for prompt, value in got.items():
        ids = tok(prompt, return_tensors="pt").input_ids[0].tolist()
        logps = []
        with torch.no_grad():
            for _ in range(6):
                logits = model(torch.tensor([ids])).logits[0, -1].double()
                nxt = int(logits.argmax())
                logps.append(float(torch.log_softmax(logits, -1)[nxt]))
                ids.append(nxt)
                if nxt == tok.eos_token_id:
                    break
        assert value == pytest.approx(math.exp(-sum(logps) / len(logps)), rel=1e-4)
        assert 1.0 <= value <= len(tok)


# ------------------------------------------------------------------------------------ JSONL


def test_jsonl_round_trip(tmp_path: Path) -> None:
    examples = [sft("p", "c", "g1"), sft("q\n\u00e9", "d", "g2", weight=0.5)]
    pairs = [
        pp("p", "a", "b", "s1"),
        pp("p", "a", "b", "s2", 0.75, (("h", 0.5), ("c", 0.5))),
    ]
    assert save_sft(tmp_path / "sft.jsonl", examples) == 2
    assert save_pairs(tmp_path / "pairs.jsonl", pairs) == 2
    assert load_sft(tmp_path / "sft.jsonl") == examples
    assert load_pairs(tmp_path / "pairs.jsonl") == pairs
    line = json.loads((tmp_path / "pairs.jsonl").read_text().splitlines()[1])
    assert line["attribute_weights"] == [["h", 0.5], ["c", 0.5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "sft.jsonl"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"f\.jsonl:3: invalid JSON"),
        ("[1, 2]", r"f\.jsonl:3: expected a JSON object"),
        ('{"prompt": "p", "chosen": "a"}', r"f\.jsonl:3: missing field 'rejected'"),
        ('{"prompt": "p", "chosen": "a", "rejected": 1}', r"field 'rejected' must be a string"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "x": 1}', r"unknown field 'x'"),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "label_confidence": 0.2}',
            r"'label_confidence' must be in \[0.5, 1\]",
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "attribute_weights": {"h": 1}}',
            r"'attribute_weights' must be a list",
        ),
        (
            '{"prompt": "p", "chosen": "a", "rejected": "b", "label_confidence": NaN}',
            r"'label_confidence' must be a finite number",
        ),
    ],
)
def test_jsonl_errors_name_the_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "f.jsonl"
    good = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(JsonlError, match=message):
        load_pairs(path)


def test_jsonl_sft_weight_must_be_a_number(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "p", "completion": "c", "weight": true}\n')
    with pytest.raises(JsonlError, match=r"s\.jsonl:1: field 'weight' must be a finite number"):
        load_sft(path)


def test_unlabelled_counts_generations_without_the_providers_label(
    db: sqlite_utils.Database,
) -> None:
    from tiller.server.formats.logstore import count_unlabelled as unlabelled
    from tiller.server.formats.logstore import last_generation_seq

    assert last_generation_seq(db) == 0
    gen(db, "u0", "before")  # logged before the range: never counted
    lo = last_generation_seq(db)
    for i in range(1, 5):
        gen(db, f"u{i}", f"o{i}", group="U", index=i)
    hi = last_generation_seq(db)
    assert hi == lo + 4
    assert unlabelled(db, "rm", lo, hi) == 4
    annotate(db, tag("u1", "Good"), tag("u2", None, error="rm down"))  # an error is a label too
    assert unlabelled(db, "rm", lo, hi) == 2
    pref = Annotation("u3", "judge", "preference", {"winner": "a"}, generation_id_b="u4")
    annotate(db, pref)
    assert unlabelled(db, "judge", lo, hi) == 2  # u3 as side a, u4 as side b; u1, u2 not
    assert unlabelled(db, "rm", lo, hi) == 2  # another provider's label does not count
    annotate(db, tag("u3", "Bad"), tag("u4", "Good"))
    assert unlabelled(db, "rm", lo, hi) == 0
