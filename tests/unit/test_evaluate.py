"""The held-out evaluation's statistics: paired comparison of conditions sharing prompts/seeds."""

from __future__ import annotations

import math
import random

import pytest

from tiller.learner.align.config import EvalConfig
from tiller.learner.align.evaluate import Stats, compare, mean_ci


def stats(label: str, scores: list[float]) -> Stats:
    m, ci = mean_ci(scores)
    return Stats(label, len(scores), m, ci, 1.0, None, tuple(scores), ())


def test_mean_ci_is_the_student_t_interval() -> None:
    m, ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert ci == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-5)  # t(0.975, 3)
    assert mean_ci([1.0]) == (1.0, math.inf)


def test_compare_pairs_scores_by_prompt_and_seed() -> None:
    # Per-prompt variation dwarfs the effect (+0.1): unpaired it is invisible, paired it is clear.
    rng = random.Random(0)
    prompt_effect = [rng.gauss(0, 1) for _ in range(64)]
    a = stats("a", [x + 0.1 + rng.gauss(0, 0.05) for x in prompt_effect])
    b = stats("b", [x + rng.gauss(0, 0.05) for x in prompt_effect])
    c = compare(a, b)
    assert c["diff"] == pytest.approx(a.mean - b.mean)
    assert c["p"] < 1e-6 < 0.3 < c["p_welch"]
    assert abs(c["diff"] - 0.1) < c["ci95"] < 0.05
    flipped = compare(b, a)
    assert flipped["diff"] == pytest.approx(-c["diff"]) and flipped["p"] == pytest.approx(c["p"])


def test_compare_refuses_unpaired_conditions() -> None:
    with pytest.raises(ValueError, match="not paired"):
        compare(stats("a", [1.0, 2.0, 3.0]), stats("b", [1.0, 2.0]))


def test_spread_is_a_paired_condition_and_conditions_add_the_prompted_version() -> None:

    from tiller.learner.align.evaluate import conditions, spread

    s = spread(stats("hi", [3.0, 2.0, 5.0]), stats("lo", [1.0, 2.0, 1.0]), "tag spread")
    assert s.scores == (2.0, 0.0, 4.0) and s.mean == 2.0 and s.n == 3
    with pytest.raises(ValueError, match="not paired"):
        spread(stats("hi", [1.0]), stats("lo", [1.0, 2.0]), "x")

    from tiller.server.formats.manifest import Conditioning

    cfg = EvalConfig(prompts=("p",), scorer="length", tags=("Hi", "Lo"))
    cond = Conditioning(tags=("Hi", "Lo"), template="{feedback}: {prompt}", separator="")
    labels = [c.label for c in conditions(cfg, "steer", 3, prompted=(1, cond))]
    assert labels == [
        "base", "steer@v3 [Hi]", "steer@v3 [Lo]",
        "prompted steer@v1 [Hi]", "prompted steer@v1 [Lo]",
    ]  # fmt: skip
    # nothing trained was promoted
    assert len(conditions(cfg, "steer", 1, prompted=(1, cond))) == 3
    # The prompted conditions are the base model with the tag rendered into the prompt: no
    # version number the server may have unloaded.
    prompted = conditions(cfg, "steer", 3, (1, cond))[3:]
    assert [(c.label, c.adapter, c.version, c.feedback) for c in prompted] == [
        ("prompted steer@v1 [Hi]", "", None, "Hi"),
        ("prompted steer@v1 [Lo]", "", None, "Lo"),
    ]
    assert all(c.render == cond for c in prompted)
    assert [c.label for c in conditions(cfg, "steer", None)] == ["base"]


def test_guided_evaluation_asks_the_loaded_bootstrap_with_mixtures() -> None:
    from tiller.learner.align.evaluate import conditions
    from tiller.learner.heldout import HeldoutSampling
    from tiller.server.formats.manifest import Conditioning

    cfg = EvalConfig(prompts=("p",), scorer="length", tags=("Hi", "Lo"), guidance=0.5)
    cond = Conditioning(tags=("Hi", "Lo"), template="{feedback}: {prompt}", separator="")
    got = conditions(cfg, "steer", 3, prompted=(1, cond))
    assert [(c.label, c.adapter, c.version, c.mix) for c in got] == [
        ("base", "", None, ()),
        ("steer@v3 [Hi, guided w=0.5]", "steer", 3, (("Hi", 1.5), ("Lo", -0.5))),
        ("steer@v3 [Lo, guided w=0.5]", "steer", 3, (("Lo", 1.5), ("Hi", -0.5))),
        ("prompted steer@v1 [Hi, guided w=0.5]", "steer", 1,
         (("Hi", 1.5), ("Lo", -0.5))),
        ("prompted steer@v1 [Lo, guided w=0.5]", "steer", 1,
         (("Lo", 1.5), ("Hi", -0.5))),
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"eval\.guidance needs eval\.tags"):
        EvalConfig(prompts=("p",), scorer="length", guidance=0.5)
    with pytest.raises(ValueError, match=r"eval\.sampling\.repetition_penalty"):
        EvalConfig(
            prompts=("p",), scorer="length", tags=("Hi", "Lo"), guidance=0.5,
            sampling=HeldoutSampling(repetition_penalty=1.2),
        )  # fmt: skip


# ------------------------------------------------------------------ held-out generation


class _FakeClient:
    """Records each request; answers ``n`` texts that name the prompt, seed and sample."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, dict[str, object]]] = []

    async def generate(self, prompt: str, **kw: object) -> object:
        from types import SimpleNamespace

        self.asked.append((prompt, kw))
        n = int(kw["n"])  # type: ignore[call-overload]
        texts = [f"{prompt}|{kw['seed']}|{k}" for k in range(n)]
        return SimpleNamespace(completions=[SimpleNamespace(text=t) for t in texts])


def test_heldout_jobs_are_a_function_of_the_spec() -> None:
    from tiller.learner.heldout import Condition, HeldoutSampling, jobs
    from tiller.server.formats.manifest import Conditioning

    spec = HeldoutSampling(samples=3, max_tokens=8, seed=100)
    steer = Condition("steer", "steer", 2, "Hi", attributes=(("x", 1.0),))
    prompts = ("p", "q", "r")
    assert jobs(steer, prompts, spec) == jobs(steer, prompts, spec)  # same seeds, same jobs
    assert [i for i, _ in jobs(steer, prompts, spec)] == [0, 1, 2]
    got = [j for _, j in jobs(steer, prompts, spec)]
    assert [j.seed for j in got] == [100, 101, 102]  # prompt i: seed + i, for every condition
    assert all(j.log is False and j.n == 3 and j.max_tokens == 8 for j in got)
    assert (got[0].adapter, got[0].adapter_version, got[0].feedback) == ("steer", 2, "Hi")
    assert got[0].request_kwargs()["attributes"] == {"x": 1.0}
    # the base model: the tag is rendered into the prompt, not sent
    cond = Conditioning(tags=("Hi", "Lo"), template="{feedback}: {prompt}", separator="")
    base = [j for _, j in jobs(Condition("base", feedback="Hi", render=cond), prompts, spec)]
    first = base[0]
    assert (first.prompt, first.feedback, first.adapter, first.adapter_version) == (
        "Hi: p", "", "", None,
    )  # fmt: skip
    assert [j.seed for j in base] == [100, 101, 102]
    assert [j.seed for _, j in jobs(steer, prompts, HeldoutSampling(seed=7))] == [7, 8, 9]


def test_guided_pair_guides_each_extreme_away_from_the_other() -> None:
    from tiller.learner.heldout import guided_pair

    assert guided_pair("Hi", "Lo", 1.0) == {
        "Hi": (("Hi", 2.0), ("Lo", -1.0)),
        "Lo": (("Lo", 2.0), ("Hi", -1.0)),
    }
    assert guided_pair("Hi", "Lo", 0.0) == {}  # unguided: the tag itself is sent


def test_a_guided_condition_sends_one_mixed_request_per_sample() -> None:
    from tiller.learner.heldout import Condition, HeldoutSampling, guided, jobs

    mix = guided("Hi", "Lo", 0.5)
    assert mix == (("Hi", 1.5), ("Lo", -0.5))
    assert guided("Hi", "Lo", 0) == (("Hi", 1.0),)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance weight"):
            guided("Hi", "Lo", bad)
    spec = HeldoutSampling(samples=2, seed=10)
    got = jobs(Condition("g", "steer", 3, "Hi", mix=mix), ("p", "q", "r"), spec)
    assert [i for i, _ in got] == [0, 0, 1, 1, 2, 2]  # prompt-major, one request per sample
    assert [j.seed for _, j in got] == [10, 13, 11, 14, 12, 15]  # seed + i + j·len(prompts)
    first = got[0][1]
    assert (first.n, first.feedback, first.feedback_mix) == (1, "", mix)
    assert first.request_kwargs()["feedback_mix"] == {"Hi": 1.5, "Lo": -0.5}
    with pytest.raises(ValueError, match="served version"):
        Condition("base", feedback="Hi", mix=mix)


async def test_heldout_generate_asks_the_same_requests_and_scores_in_order() -> None:
    from tiller.learner.heldout import Condition, HeldoutSampling, generate

    spec = HeldoutSampling(samples=2, seed=5)
    conds = [Condition("base"), Condition("v3", "steer", 3)]
    first, again = _FakeClient(), _FakeClient()
    runs = await generate(first, conds, ("ab", "c"), spec, ("length",))  # type: ignore[arg-type]
    await generate(again, conds, ("ab", "c"), spec, ("length",))  # type: ignore[arg-type]
    assert first.asked == again.asked and len(first.asked) == 4
    assert [r.condition.label for r in runs] == ["base", "v3"]
    assert [(s.prompt, s.text) for s in runs[0].samples] == [
        ("ab", "ab|5|0"), ("ab", "ab|5|1"), ("c", "c|6|0"), ("c", "c|6|1"),
    ]  # fmt: skip
    assert runs[0].scores["length"] == (1.0, 1.0, 1.0, 1.0)  # one word each
    assert first.asked[2][1]["adapter"] == "steer" and first.asked[2][1]["log"] is False


def test_heldout_sampling_is_one_typed_toml_table() -> None:
    from tiller.learner.heldout import HeldoutSampling
    from tiller.server.formats.sections import ConfigError, build_section

    cfg = EvalConfig(prompts=("p",), scorer="length")
    assert cfg.sampling == HeldoutSampling()
    built = build_section(
        EvalConfig, {"prompts": ["p"], "scorer": "length", "sampling": {"samples": 4}}, "[eval]"
    )
    assert built.sampling == HeldoutSampling(samples=4)
    with pytest.raises(ConfigError, match=r"\[eval\.sampling\]: unknown keys \['bogus'\]"):
        build_section(
            EvalConfig, {"prompts": ["p"], "scorer": "length", "sampling": {"bogus": 1}}, "[eval]"
        )
    with pytest.raises(ConfigError, match=r"\[eval\]: unknown keys \['samples'\]"):  # flat
        build_section(EvalConfig, {"prompts": ["p"], "scorer": "length", "samples": 4}, "[eval]")
    with pytest.raises(ValueError, match=r"sampling\.samples must be >= 1"):
        HeldoutSampling(samples=0)


def test_compare_treats_each_prompt_as_one_block() -> None:
    # 4 prompts x 8 samples: a prompt's samples move together, so 32 per-sample pairs would
    # overstate the evidence; the test has 4 blocks.
    from scipy import stats as st

    rng = random.Random(1)
    prompts = tuple(f"p{i}" for i in range(4) for _ in range(8))
    shift = {p: rng.gauss(0.1, 0.2) for p in set(prompts)}  # the effect differs by prompt
    b_scores = [rng.gauss(0, 1) for _ in prompts]
    a_scores = [x + shift[p] + rng.gauss(0, 0.01) for x, p in zip(b_scores, prompts, strict=True)]

    def blocked(label: str, scores: list[float]) -> Stats:
        return Stats(label, len(scores), 0.0, 0.0, 1.0, None, tuple(scores), (), prompts)

    a, b = blocked("a", a_scores), blocked("b", b_scores)
    c = compare(a, b)
    diffs = [sum(a_scores[i : i + 8]) / 8 - sum(b_scores[i : i + 8]) / 8 for i in (0, 8, 16, 24)]
    assert c["blocks"] == 4
    assert c["p"] == pytest.approx(st.ttest_1samp(diffs, 0.0).pvalue)
    assert c["diff"] == pytest.approx(sum(diffs) / 4)
    per_sample = st.ttest_rel(a_scores, b_scores).pvalue
    assert per_sample < c["p"]  # pseudo-replication is what the blocks remove
    assert a.to_json()["blocks"] == 4 and "prompts" not in a.to_json()
    assert a.to_json()["block_means"] == pytest.approx(a.blocks)
    with pytest.raises(ValueError, match="different prompts"):
        compare(a, Stats("c", 32, 0.0, 0.0, 1.0, None, tuple(b_scores), (), prompts[::-1]))


def test_the_summary_line_says_how_many_prompts_were_paired() -> None:
    from tiller.learner.align.report import summary_lines

    v = {"diff": 0.1, "gain": 0.1, "ci95": 0.05, "t": 3.0, "p": 0.01, "p_welch": 0.2}
    line = next(
        x for x in summary_lines({"eval": {"x vs base": v | {"blocks": 64}}}) if "x vs" in x
    )
    assert "paired over 64 prompts: p=0.01, Welch p=0.2" in line
    old = next(x for x in summary_lines({"eval": {"x vs base": v}}) if "x vs" in x)
    assert "paired: p=0.01" in old  # a report from before blocks: per sample


def test_one_prompt_gives_no_test() -> None:
    prompts = ("p",) * 4
    a = Stats("a", 4, 0.0, 0.0, 1.0, None, (1.0, 2.0, 3.0, 4.0), (), prompts)
    b = Stats("b", 4, 0.0, 0.0, 1.0, None, (0.0, 1.0, 1.0, 1.0), (), prompts)
    c = compare(a, b)
    assert c["blocks"] == 1 and c["diff"] == pytest.approx(1.75) and math.isnan(c["p"])
