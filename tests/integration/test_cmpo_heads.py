"""CMPO plural-head training: low-rank heads learned from λ-conditioned pairs move each
attribute's preference its own way, start as the base model, publish as a heads-only version,
and serve through the live server exactly as the torch reference computes them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import ServerProc
from tests.steering_reference import HeadsReference
from tiller.client import Client
from tiller.learner.data.examples import PreferencePair
from tiller.learner.heads_trainer import HeadsResult, HeadsTrainConfig, train_heads
from tiller.learner.objectives.cmpo import CMPOConfig
from tiller.server.formats.heads import read_heads
from tiller.server.formats.manifest import load_manifest
from tiller.server.formats.publish import Release, publish

FRUIT, ANIMAL = " apple pear plum", " zebra lion wolf"


def _pairs() -> list[PreferencePair]:
    out = []
    for i in range(12):
        prompt = f"Item {i}:"
        out.append(PreferencePair(prompt, FRUIT, ANIMAL, (("fruit", 1.0), ("animal", 0.0))))
        out.append(PreferencePair(prompt, ANIMAL, FRUIT, (("fruit", 0.0), ("animal", 1.0))))
    return out


@pytest.fixture(scope="module")
def trained(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> HeadsResult:
    cfg = HeadsTrainConfig(
        attributes=("fruit", "animal"),
        base_model="tiny-llama",
        rank=4,
        epochs=25,
        lr=2e-2,
        batch_size=8,
        objective=CMPOConfig(beta=0.5, label_smoothing=0.1),
        progress=False,
    )
    return train_heads(tiny_model, _pairs(), cfg, tmp_path_factory.mktemp("heads") / "out")


def _score(ref: HeadsReference, prompt: str, text: str, given: dict[str, float]) -> float:
    p = ref.tok(prompt).input_ids
    c = ref.tok(text, add_special_tokens=False).input_ids
    return sum(float(ref.logprobs([*p, *c[:k]], given)[c[k]]) for k in range(len(c)))


def test_heads_start_as_the_base_model_and_learn_per_attribute(
    tiny_model: Path, trained: HeadsResult
) -> None:
    assert trained.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: λ-mix = base
    assert trained.history[-1]["loss"] < 0.45
    ref = HeadsReference(tiny_model, trained.out_dir)
    base = {"fruit": 0.5, "animal": 0.5}  # Σλ = 1 with the learned parts averaged

    def margin(w: dict[str, float]) -> float:
        return _score(ref, "Item 3:", FRUIT, w) - _score(ref, "Item 3:", ANIMAL, w)

    fruit, animal, mixed = margin({"fruit": 1.0}), margin({"animal": 1.0}), margin(base)
    assert fruit > mixed + 1.0 and animal < mixed - 1.0, (fruit, mixed, animal)
    manifest = read_heads(trained.out_dir)
    assert manifest.names == ("fruit", "animal") and manifest.default_weights == (0.5, 0.5)


def test_heads_only_version_publishes_and_serves_like_the_reference(
    tiny_model: Path, trained: HeadsResult, server: ServerProc, tmp_path: Path
) -> None:
    import grpc

    from tiller.protos.tiller.v1 import tiller_pb2 as pb
    from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

    version = publish(
        tmp_path / "registry",
        "plural",
        trained.out_dir,
        Release(base_model="tiny-llama", attributes=("fruit", "animal"), objective="cmpo"),
    )
    m = load_manifest(version)
    assert not m.has_lora and m.attributes == ("fruit", "animal")
    with grpc.insecure_channel(server.target) as ch:
        pb_grpc.TillerAdminStub(ch).LoadAdapter(
            pb.LoadAdapterRequest(name="plural", path=str(version)), timeout=60
        )
    ref = HeadsReference(tiny_model, version)
    prompt_ids = ref.tok("Item 5:").input_ids
    with Client(server.target) as c:
        for w in ({"fruit": 1.0}, {"animal": 1.0}, {"fruit": 2.0, "animal": -1.0}):
            g = c.generate(
                "Item 5:", adapter="plural", adapter_version=m.version, attributes=w,
                max_tokens=8, temperature=0.0,
            )  # fmt: skip
            ref.check(prompt_ids, w, g.completions[0].token_ids)


def test_heads_cli_trains_from_jsonl(tiny_model: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tiller.learner.data.jsonl import save_pairs
    from tiller.learner.learn.cli import learn

    save_pairs(tmp_path / "pairs.jsonl", _pairs()[:4])
    args = ["heads", "--model", str(tiny_model), "--pairs", str(tmp_path / "pairs.jsonl"),
            "--attribute", "fruit", "--attribute", "animal", "--epochs", "1", "--rank", "2",
            "--out", str(tmp_path / "h")]  # fmt: skip
    result = CliRunner().invoke(learn, args)
    assert result.exit_code == 0, result.output
    assert read_heads(tmp_path / "h").names == ("fruit", "animal")
    bad = CliRunner().invoke(learn, [*args[:5], "--attribute", "fruit", *args[-4:]])
    assert bad.exit_code != 0 and "unknown attribute 'animal'" in bad.output
