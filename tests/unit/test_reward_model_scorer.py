"""The ``rm:<dir>`` scorer on a tiny random reward model built here (same tokenizer as the tiny
Llama): scores against a manual forward pass, batching, label choice, quantile tags, config
checks and errors that name the directory."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tiller.learner.align.config import SweepConfig
from tiller.learner.annotate.base import GenerationView
from tiller.learner.annotate.config import build_providers, parse_config
from tiller.learner.annotate.quantile import (
    QuantileConfig,
    QuantileTagProvider,
    ScoreConfig,
    ScoreProvider,
    score_all,
)
from tiller.learner.annotate.ratings import RatingConfig
from tiller.learner.annotate.reward_model import RewardModelScorer, parse_spec
from tiller.learner.annotate.scorers import check_scorer, make_scorer
from tiller.server.tools.tiny_model import build_tiny_reward_model

TEXTS = [
    "def f(x): return x",
    "hello world",
    "",
    "import asyncio\n" * 40,  # longer than max_length below: truncated
    "The event loop runs tasks.",
    "a",
    "raise ValueError('bad')",
]


@pytest.fixture(scope="module")
def rm_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "rm1")


@pytest.fixture(scope="module")
def rm3_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_reward_model(tiny_model, tmp_path_factory.mktemp("rm") / "rm3", num_labels=3)


def manual_logits(model_dir: Path, text: str) -> torch.Tensor:
    """The model's logits for ``text`` alone: no padding, no batching."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0]


def gen(i: int, group: str, text: str) -> GenerationView:
    return GenerationView(
        seq=i,
        id=f"g{i}",
        group_id=group,
        sample_index=0,
        prompt="p",
        chat_json="",
        rendered_prompt="p",
        feedback="",
        adapter="",
        adapter_version=0,
        output_text=text,
        finish_reason="stop",
        created_at=0.0,
    )


def test_scores_are_finite_deterministic_and_differ(rm_dir: Path) -> None:
    s = make_scorer(f"rm:{rm_dir}?device=cpu")
    first = [s.score(t) for t in TEXTS]
    assert all(math.isfinite(x) for x in first)
    assert [s.score(t) for t in TEXTS] == first
    assert len({round(x, 5) for x in first}) == len(TEXTS)


def test_score_is_the_models_logit(rm_dir: Path) -> None:
    s = make_scorer(f"rm:{rm_dir}?device=cpu")
    for text in ("def f(x): return x", "The event loop runs tasks."):
        assert s.score(text) == pytest.approx(float(manual_logits(rm_dir, text)[0]), abs=1e-5)


def test_batches_score_as_one_by_one(rm_dir: Path) -> None:
    # batch_size 3 over 7 texts of different lengths: padded rows, and a short last batch
    s = make_scorer(f"rm:{rm_dir}?device=cpu&batch_size=3&max_length=32")
    assert isinstance(s, RewardModelScorer)
    one = [s.score(t) for t in TEXTS]
    assert s.score_batch(TEXTS) == pytest.approx(one, abs=1e-4)
    assert score_all(s, TEXTS) == pytest.approx(one, abs=1e-4)
    long_text = TEXTS[3]
    assert s.score(long_text) == pytest.approx(s.score(long_text + "more text after the cut"))


def test_label_choice(rm3_dir: Path) -> None:
    text = "hello world"
    logits = manual_logits(rm3_dir, text)
    last = make_scorer(f"rm:{rm3_dir}?device=cpu")
    first = make_scorer(f"rm:{rm3_dir}?device=cpu&label=0")
    assert last.score(text) == pytest.approx(float(logits[2]), abs=1e-5)
    assert first.score(text) == pytest.approx(float(logits[0]), abs=1e-5)
    assert last.score(text) != pytest.approx(first.score(text))
    with pytest.raises(ValueError, match="label 3 out of range; the model has 3"):
        check_scorer(f"rm:{rm3_dir}?label=3")


def test_loaded_once_per_directory_and_settings(rm_dir: Path) -> None:
    a = make_scorer(f"rm:{rm_dir}?device=cpu")
    assert make_scorer(f"rm:{rm_dir}/?device=cpu") is a  # another spelling, same model
    assert make_scorer(f"rm:{rm_dir}?device=cpu&batch_size=2") is not a


def test_pad_token_from_eos_when_missing(rm_dir: Path, tmp_path: Path) -> None:
    bare = shutil.copytree(rm_dir, tmp_path / "no-pad")
    tok_cfg = json.loads((bare / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = json.loads((bare / "config.json").read_text())
    cfg["pad_token_id"] = None
    (bare / "config.json").write_text(json.dumps(cfg))
    assert AutoTokenizer.from_pretrained(bare).pad_token is None

    s = RewardModelScorer(parse_spec(f"rm:{bare}?device=cpu"))
    ref = make_scorer(f"rm:{rm_dir}?device=cpu")
    assert s.score_batch(TEXTS) == pytest.approx([ref.score(t) for t in TEXTS], abs=1e-4)


async def test_quantile_tags_and_scores_from_the_reward_model(rm_dir: Path) -> None:
    name = f"rm:{rm_dir}?device=cpu&batch_size=4"
    texts = ["hello world", "def f(x): return x", "a", "The event loop runs tasks."]
    batch = [gen(i, "p1", t) for i, t in enumerate(texts)]
    ref = [float(manual_logits(rm_dir, t)[0]) for t in texts]
    tags = ("t0", "t1", "t2", "t3")
    q = QuantileTagProvider(
        QuantileConfig(scorer=name, tags=tags, mode="per_prompt", provider_name="rm-tags")
    )
    notes = await q.annotate(batch)
    # four distinct scores in one group, four tags: the k-th lowest score gets tag k
    rank = sorted(range(len(texts)), key=lambda i: ref[i])
    assert [n.value for n in notes] == [tags[rank.index(i)] for i in range(len(texts))]
    assert [float(n.raw) for n in notes] == pytest.approx(ref, abs=1e-4)

    scores = await ScoreProvider(ScoreConfig(scorer=name, provider_name="rm")).annotate(batch)
    assert [n.kind for n in scores] == ["score"] * 4
    assert [n.value for n in scores] == pytest.approx(ref, abs=1e-4)


class _FailsInBatch:
    """A scorer whose batch call fails: ``score_all`` must fall back to one text at a time."""

    name = "fails-in-batch"

    def score(self, text: str) -> float:
        if text == "bad":
            raise ValueError("bad text")
        return math.inf if text == "inf" else float(len(text))

    def score_batch(self, texts: Sequence[str]) -> list[float]:
        raise RuntimeError("whole batch failed")


def test_score_all_keeps_per_text_errors() -> None:
    assert score_all(_FailsInBatch(), ["ab", "bad", "inf"]) == [
        2.0,
        "ValueError: bad text",
        "scorer returned inf",
    ]


def test_non_finite_batch_scores_become_errors(rm_dir: Path) -> None:
    s = RewardModelScorer(parse_spec(f"rm:{rm_dir}?device=cpu"))
    with torch.no_grad():
        s._model.score.weight.fill_(float("nan"))
    assert score_all(s, ["a", "b"]) == ["scorer returned nan", "scorer returned nan"]


def test_configs_accept_rm_and_refuse_unknown(rm_dir: Path) -> None:
    name = f"rm:{rm_dir}"
    providers = [
        {
            "name": "rm-tags",
            "type": "quantile",
            "scorer": name,
            "mode": "global",
            "tags": ["a", "b"],
        },
        {"name": "rm-score", "type": "score", "scorer": name},
        {
            "name": "rm-rate",
            "type": "rating",
            "attributes": [{"name": "x", "scorer": name, "cuts": [0.0]}],
        },
    ]
    cfg = parse_config({"db": "log.sqlite", "providers": providers}, {})
    assert [p.scorer for p in cfg.providers[:2]] == [name, name]
    assert isinstance(cfg.providers[2], RatingConfig)
    assert SweepConfig(attributes=("a", "b"), scorers=(name, "length")).scorers[0] == name

    bad = {"name": "q", "type": "score", "scorer": "toxicity"}
    with pytest.raises(ValueError, match=r"unknown scorer 'toxicity'; valid: .*rm:<model dir>"):
        parse_config({"db": "log.sqlite", "providers": [bad]}, {})


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("?batch_size=0", "batch_size must be >= 1"),
        ("?label=x", "label must be an integer, got 'x'"),
        ("?device=tpu", "device must be one of auto, cpu, cuda"),
        ("?temperature=1", "unknown setting 'temperature'; valid: batch_size"),
    ],
)
def test_bad_settings_name_the_key(rm_dir: Path, suffix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_scorer(f"rm:{rm_dir}{suffix}")


def test_bad_directories_name_the_path(tiny_model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"{re.escape(str(missing))} does not exist"):
        ScoreConfig(scorer=f"rm:{missing}", provider_name="rm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match=f"provider 'q': .*{re.escape(str(tmp_path / 'empty'))} has no config.json"
    ):
        QuantileConfig(
            scorer=f"rm:{tmp_path / 'empty'}", tags=("a", "b"), mode="global", provider_name="q"
        )
    # a causal LM would load with a fresh random head: refused at config time
    with pytest.raises(
        ValueError, match=f"{re.escape(str(tiny_model))} holds LlamaForCausalLM, not a"
    ):
        check_scorer(f"rm:{tiny_model}")
    with pytest.raises(ValueError, match="no model directory"):
        check_scorer("rm:")


def test_providers_build_from_an_rm_config(rm_dir: Path) -> None:
    cfg = parse_config(
        {
            "db": "log.sqlite",
            "providers": [{"name": "s", "type": "score", "scorer": f"rm:{rm_dir}"}],
        },
        {},
    )
    (provider,) = build_providers(cfg)
    assert isinstance(provider, ScoreProvider)
