"""``tiller learn`` in CMPO mode: the config (data.kind 'cmpo' + [heads]) and heads training
continuing from served heads. (CMPO pairs carry their generation ids as fields: test_datasets.)"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tiller.learner.data.examples import PreferencePair
from tiller.learner.heads_trainer import HeadsTrainConfig, train_heads
from tiller.learner.learn.config import parse_config
from tiller.learner.objectives.cmpo import CMPOConfig
from tiller.server.formats.heads import load_tensors

CMPO: dict[str, Any] = {
    "db": "log.sqlite",
    "registry": "reg",
    "workdir": "work",
    "model": "m",
    "adapter": "plural",
    "base_model": "tiny",
    "server": "127.0.0.1:1",
    "sample": {"prompts": ["a"], "attributes": [{"x": 1.0}, {"y": 1.0}]},
    "data": {"kind": "cmpo", "provider": "ratings", "attributes": ["x", "y"]},
    "heads": {"rank": 4, "epochs": 3, "objective": {"beta": 0.3}},
    "gate": {"prompts": ["p"], "scorer": "length", "attributes": {"x": 1.0}},
}


def test_cmpo_config_builds_heads_from_the_data_attributes(tmp_path: Path) -> None:
    cfg = parse_config(CMPO, tmp_path, {})
    assert cfg.heads is not None and cfg.heads.attributes == ("x", "y")
    assert cfg.heads.base_model == "tiny" and cfg.heads.rank == 4 and cfg.heads.epochs == 3
    assert cfg.heads.objective == CMPOConfig(beta=0.3)
    assert cfg.sample is not None and cfg.sample.attributes == ({"x": 1.0}, {"y": 1.0})
    assert cfg.gate is not None and dict(cfg.gate.attributes) == {"x": 1.0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"kind": "cmpo", "provider": "r"}}, "needs data.attributes"),
        ({"train": {"objective": "dpo"}}, r"use \[heads\], not \[train\]"),
        ({"heads": {"attributes": ["x"]}}, r"\[heads\]: attributes is set by the learner"),
        ({"heads": {"bogus": 1}}, r"\[heads\]: unknown keys \['bogus'\]"),
        ({"heads": {"objective": {"gamma": 1}}}, r"\[heads.objective\]: unknown keys"),
        ({"heads": {"objective": {"sft_weight": -1.0}}}, "sft_weight must be a finite number"),
        ({"sample": {"prompts": ["a"], "attributes": [{}]}}, r"sample.attributes\[0\]"),
        (
            {"data": {"kind": "pairs", "provider": "r", "attributes": ["x"]}},
            "data.attributes applies to data.kind 'cmpo' only",
        ),
        (
            {"data": {"kind": "pairs", "provider": "r"}, "heads": None},
            r"gate.attributes needs data.kind 'cmpo'",
        ),
    ],
)
def test_cmpo_config_errors_name_the_field(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    bad = {k: v for k, v in (CMPO | change).items() if v is not None}
    with pytest.raises(ValueError, match=message):
        parse_config(bad, tmp_path, {})


def _pairs() -> list[PreferencePair]:
    out = []
    for i in range(4):
        out.append(
            PreferencePair(f"Item {i}:", " apple pear", " zebra lion", (("x", 1.0), ("y", 0.0)))
        )
        out.append(
            PreferencePair(f"Item {i}:", " zebra lion", " apple pear", (("x", 0.0), ("y", 1.0)))
        )
    return out  # fmt: skip


def test_heads_training_continues_from_given_heads(tiny_model: Path, tmp_path: Path) -> None:
    cfg = HeadsTrainConfig(attributes=("x", "y"), base_model="t", rank=2, epochs=2, lr=2e-2,
                           batch_size=4, progress=False)  # fmt: skip
    first = train_heads(tiny_model, _pairs(), cfg, tmp_path / "v1")
    assert first.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: the base
    more = train_heads(tiny_model, _pairs(), cfg, tmp_path / "v2", init_heads=tmp_path / "v1")
    # It starts where the first run ended: already below log 2 at its first step.
    assert more.history[0]["loss"] < math.log(2) - 0.05, (first.history, more.history)
    a, b = load_tensors(tmp_path / "v1"), load_tensors(tmp_path / "v2")
    assert not all(bool((a[k] == b[k]).all()) for k in a)
    other = HeadsTrainConfig(attributes=("x", "y"), base_model="t", rank=3, progress=False)
    with pytest.raises(ValueError, match=r"heads in .* are \[\('x', 'lowrank', 2\)"):
        train_heads(tiny_model, _pairs(), other, tmp_path / "v3", init_heads=tmp_path / "v1")


def test_kept_base_logits_train_the_same_heads_as_recomputing_them(
    tiny_model: Path, tmp_path: Path
) -> None:
    cfg = HeadsTrainConfig(attributes=("x", "y"), base_model="t", rank=2, epochs=2, lr=2e-2,
                           batch_size=4, progress=False)  # fmt: skip
    kept = train_heads(tiny_model, _pairs(), cfg, tmp_path / "kept")
    again = train_heads(
        tiny_model, _pairs(), replace(cfg, logits_cache_gib=0.0), tmp_path / "again"
    )
    assert [h["loss"] for h in kept.history] == pytest.approx(
        [h["loss"] for h in again.history], rel=1e-4
    )
    a, b = load_tensors(tmp_path / "kept"), load_tensors(tmp_path / "again")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
