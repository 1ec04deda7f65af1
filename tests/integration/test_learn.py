"""``tiller learn`` on a live server: sample → annotate → train → gate → publish → promote → the
server serves the new version; a failing gate publishes but never promotes.

Everything is real: a ``tiller serve`` process following a registry, the annotator's score and
quantile providers over the SQLite log, the trainer on the tiny model, admin ``LoadAdapter``
for the gate's candidate.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import ServerProc, stop_server
from tests.learning import run_learner, start_learn_server
from tiller.client import AsyncClient, Client, TillerClientError
from tiller.learner.annotate.quantile import (
    QuantileConfig,
    QuantileTagProvider,
    ScoreConfig,
    ScoreProvider,
)
from tiller.learner.annotate.ratings import RatedAttribute, RatingConfig, RatingProvider
from tiller.learner.fluency import Scorer, load_scoring_model
from tiller.learner.heads_trainer import HeadsTrainConfig
from tiller.learner.heldout import HeldoutSampling
from tiller.learner.learn.config import (
    DataConfig,
    LearnConfig,
    SampleConfig,
    TriggerConfig,
    parse_config,
)
from tiller.learner.learn.gate import GateConfig, Side
from tiller.learner.learn.gate_runs import run_gate, run_side, run_sides
from tiller.learner.learn.loop import Learner
from tiller.learner.trainer import TrainConfig
from tiller.server.formats import logstore as runs
from tiller.server.formats.logstore import connect
from tiller.server.formats.manifest import load_manifest
from tiller.server.formats.registry import list_versions, read_state, version_path

PROMPTS = tuple(f"Tell me about item number {i}." for i in range(8))
# A LoRA run small enough for the tiny model in a test (two optimizer steps).
TINY_LORA: dict[str, Any] = dict(
    lora_r=4,
    lora_alpha=8,
    target_modules=("q_proj", "v_proj"),
    batch_size=4,
    max_steps=2,
    max_length=64,
    progress=False,
)
HELD_OUT = ("Describe the sea.", "Describe a forest.", "Describe a city.")


@pytest.fixture(scope="module")
def learn_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProc, Path, Path]]:
    srv, db, registry = start_learn_server(
        tiny_model, tmp_path_factory.mktemp("learn"), tmp_path_factory.getbasetemp()
    )
    yield srv, db, registry
    stop_server(srv)


def _config(
    tiny_model: Path, srv: ServerProc, db: Path, registry: Path, work: Path, **kw: object
) -> LearnConfig:
    base = LearnConfig(
        db=db,
        registry=registry,
        workdir=work,
        adapter="critic",
        model=tiny_model,
        base_model="tiny-llama",
        server=srv.target,
        train=TrainConfig(objective="dpo", lr=1e-3, **TINY_LORA),
        data=DataConfig(kind="pairs", source="score", provider="len", higher_is_better=True),
        trigger=TriggerConfig(min_annotations=4, min_examples=2, poll_s=0.1),
        sample=SampleConfig(prompts=PROMPTS, per_iteration=8, n=2, max_tokens=8),
        gate=GateConfig(
            prompts=HELD_OUT,
            scorer="length",
            margin=1e6,
            max_perplexity_ratio=1e6,  # measured (the path runs), never binding
            max_base_perplexity_ratio=1e6,
            sampling=HeldoutSampling(samples=1, max_tokens=8),
        ),
        max_iterations=2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


async def _run(cfg: LearnConfig, providers: list[object]) -> list[str]:
    return await run_learner(cfg, providers, 300)


async def test_learn_loop_promotes_and_server_swaps(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    srv, db, registry = learn_server
    cfg = _config(tiny_model, srv, db, registry, tmp_path / "work")
    lines = await _run(cfg, [ScoreProvider(ScoreConfig(scorer="length", provider_name="len"))])

    rows = runs.iterations(connect(db), "critic")
    assert [(r["iteration"], r["status"], r["version"]) for r in rows] == [
        (1, "promoted", 1),
        (2, "promoted", 2),
    ], lines
    assert read_state(registry, "critic").active == 2
    with Client(srv.target) as c:
        served = {a.name: a.active_version for a in c.adapters()}
    assert served["critic"] == 2

    extra = load_manifest(version_path(registry, "critic", 2)).extra
    assert extra["objective"] == "dpo" and extra["hyperparameters"]["lora_r"] == 4
    assert extra["metrics"]["gate"]["passed"] is True
    assert extra["metrics"]["gate"]["candidate"]["side"] == "critic-candidate@v2"
    assert extra["metrics"]["gate"]["incumbent"]["side"] == "critic@v1"
    assert all(
        extra["metrics"]["gate"][side]["perplexity"] > 1.0 for side in ("candidate", "incumbent")
    )
    assert extra["data_window"]["served_version"] == 1
    assert extra["data_window"]["examples"] >= 2
    # Iteration 1's incumbent (the base) generated beside its sampling; iteration 2's (critic@v1)
    # is iteration 1's promoted candidate: its gate run was reused, not generated again.
    first = load_manifest(version_path(registry, "critic", 1)).extra["metrics"]["gate"]
    second = extra["metrics"]["gate"]
    assert first["incumbent_reused"] is True and first["incumbent_source"] == "sampling"
    assert second["incumbent_reused"] is True and second["incumbent_source"] == "promoted"
    assert first["incumbent"]["side"] == "base" and first["incumbent"]["perplexity"] > 1.0
    # The base model's run (iteration 1's incumbent) stays the anchor of the base bound.
    assert first["base_perplexity"] == second["base_perplexity"] == first["incumbent"]["perplexity"]
    for key in ("value", "distinct2", "perplexity", "scores"):
        assert second["incumbent"][key] == first["candidate"][key], key

    # Sampling is logged (iteration 1 from the base, 2 from critic@v1); gate traffic is not.
    gens = (
        connect(db)
        .execute("SELECT adapter, adapter_version, count(*) FROM generations GROUP BY 1, 2")
        .fetchall()
    )
    assert sorted(gens) == [("", 0, 16), ("critic", 1, 16)]


async def test_gate_uses_a_known_incumbent_run_instead_of_generating(
    learn_server: tuple[ServerProc, Path, Path],
) -> None:
    srv = learn_server[0]
    cfg = GateConfig(
        prompts=HELD_OUT, scorer="length", sampling=HeldoutSampling(samples=1, max_tokens=8)
    )
    base, ghost = Side("", 0), Side("no-such-adapter", 7)
    async with AsyncClient(srv.target) as client:
        known = await run_side(client, base, cfg)
        verdict, cand, _ = await run_gate(client, base, ghost, cfg, incumbent_run=known)
        # Without the known run the incumbent is generated, and the server knows no such adapter.
        with pytest.raises(TillerClientError) as info:
            await run_gate(client, base, ghost, cfg)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown adapter 'no-such-adapter'" in info.value.message
    assert verdict.incumbent_reused and verdict.incumbent["side"] == "no-such-adapter@v7"
    # Same side, prompts and seeds: the base generates the same texts again, which score alike.
    assert cand.texts == known.texts and verdict.passed
    assert verdict.incumbent["value"] == verdict.candidate["value"]


@pytest.mark.parametrize("bound", [0.0, 2.0])
async def test_learner_loads_the_gates_scoring_model_before_any_iteration_thread(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path, bound: float
) -> None:
    # Its gate runs load the model in worker threads beside the trainer's thread; transformers'
    # lazy imports are not thread-safe, so the first load happens before any iteration.
    srv = learn_server[0]
    db, registry = tmp_path / "log.sqlite", tmp_path / "registry"
    registry.mkdir()
    cfg = _config(tiny_model, srv, db, registry, tmp_path / "work")
    assert cfg.gate is not None
    cfg = replace(cfg, gate=replace(cfg.gate, max_perplexity_ratio=bound,
                                    max_base_perplexity_ratio=0.0))  # fmt: skip
    learner = Learner(cfg, connect(db), report=lambda _: None, progress=False)
    stop = asyncio.Event()
    stop.set()  # no iteration runs
    assert await learner.run(stop) == 0
    assert (learner._fluency is not None) == (bound > 0)


async def test_gate_sides_generate_together_and_each_gets_its_perplexity(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path]
) -> None:
    srv = learn_server[0]
    cfg = GateConfig(
        prompts=HELD_OUT,
        scorer="length",
        sampling=HeldoutSampling(samples=2, max_tokens=8),
        max_perplexity_ratio=1e6,
    )
    base = Side("", 0)
    calls: list[int] = []

    def fluency() -> Scorer:
        calls.append(1)
        return load_scoring_model(tiny_model)

    async with AsyncClient(srv.target) as client:
        alone = await run_side(client, base, cfg, fluency)
        both = await run_sides(client, (base, base), cfg, fluency)
        with pytest.raises(ValueError, match="max_perplexity_ratio needs the base model"):
            await run_sides(client, (base,), cfg)
    assert len(both) == 2 and len(calls) == 2  # one base-model load per call, not per side
    # Same side, prompts and seeds, asked at once: the same texts in the gate's order.
    assert both[0].texts == both[1].texts == alone.texts
    assert [p for _, p, _ in alone.texts] == [p for p in HELD_OUT for _ in range(2)]
    assert all(r.perplexity is not None and math.isfinite(r.perplexity) for r in both)
    assert both[0].perplexity == pytest.approx(alone.perplexity, rel=1e-5)


async def test_failing_gate_publishes_but_does_not_promote(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    srv, db, registry = learn_server
    gate = GateConfig(
        prompts=HELD_OUT,
        scorer="length",
        min_distinct2_ratio=100.0,
        sampling=HeldoutSampling(max_tokens=8),
    )
    cfg = _config(
        tiny_model,
        srv,
        db,
        registry,
        tmp_path / "work",
        adapter="strict",
        gate=gate,
        max_iterations=1,
    )
    await _run(cfg, [ScoreProvider(ScoreConfig(scorer="length", provider_name="len"))])
    (row,) = runs.iterations(connect(db), "strict")
    assert row["status"] == "rejected" and row["gate_passed"] == 0
    assert "fluency" in row["reason"]
    assert read_state(registry, "strict").active is None
    verdict = load_manifest(version_path(registry, "strict", row["version"])).extra["metrics"][
        "gate"
    ]
    assert verdict["passed"] is False and verdict["reasons"]
    with Client(srv.target) as c:
        assert "strict" not in {a.name for a in c.adapters()}


async def test_a_crash_between_publish_and_record_publishes_once(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    srv, db, registry = learn_server
    cfg = _config(
        tiny_model, srv, db, registry, tmp_path / "work", adapter="once", max_iterations=1
    )
    providers = [ScoreProvider(ScoreConfig(scorer="length", provider_name="len"))]
    await _run(cfg, providers)
    (row,) = runs.iterations(connect(db), "once")
    assert row["status"] == "promoted" and row["version"] == 1
    # The learner dies after publishing v1 and before recording iteration 1: the row is gone,
    # the frozen data and the checkpoints are on disk. The restart redoes iteration 1 ...
    connect(db).execute("DELETE FROM learner_iterations WHERE adapter = 'once'")
    lines = await _run(cfg, providers)
    assert any("already published as v0001" in line for line in lines), lines
    # ... and records it against the version it had published, without publishing another.
    (row,) = runs.iterations(connect(db), "once")
    assert (row["iteration"], row["status"], row["version"]) == (1, "promoted", 1)
    assert list_versions(registry, "once") == [1]
    extra = load_manifest(version_path(registry, "once", 1)).extra
    assert extra["data_window"]["iteration"] == 1


async def test_alt_loop_conditions_on_tags(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    srv, db, registry = learn_server
    tags = ("Short", "Long")
    cfg = _config(
        tiny_model,
        srv,
        db,
        registry,
        tmp_path / "work",
        adapter="alt",
        train=TrainConfig(objective="alt", **TINY_LORA),
        data=DataConfig(
            kind="alt",
            provider="len-tags",
            tags=tags,
            balance="none",
            template="Length: {feedback}\nText: {prompt}",
            separator="",
        ),
        sample=SampleConfig(prompts=PROMPTS, per_iteration=8, n=2, max_tokens=8, feedback="Long"),
        gate=GateConfig(
            prompts=HELD_OUT,
            scorer="length",
            metric="spread",
            high_tag="Long",
            low_tag="Short",
            margin=1e6,
            sampling=HeldoutSampling(max_tokens=8),
        ),
        max_iterations=2,
    )
    tagger = QuantileTagProvider(
        QuantileConfig(scorer="length", tags=tags, mode="global", provider_name="len-tags")
    )
    lines = await _run(cfg, [tagger])
    assert any(line.startswith("bootstrap: alt@v1") for line in lines), lines
    # v1 is the conditioning-only bootstrap (base weights + tag template); iterations make v2, v3.
    boot = load_manifest(version_path(registry, "alt", 1))
    assert not boot.has_lora and boot.conditioning is not None and boot.conditioning.tags == tags
    assert boot.conditioning.template == "Length: {feedback}\nText: {prompt}"
    assert boot.conditioning.separator == ""
    rows = runs.iterations(connect(db), "alt")
    assert [(r["status"], r["version"]) for r in rows] == [("promoted", 2), ("promoted", 3)]
    manifest = load_manifest(version_path(registry, "alt", 2))
    assert manifest.conditioning is not None and manifest.conditioning.tags == tags
    assert manifest.has_lora
    # Iteration 1 sampled the bootstrap alt@v1 with exemplar feedback (server-rendered), and
    # its gate compared the candidate with that prompted base.
    assert manifest.extra["metrics"]["gate"]["incumbent"]["side"] == "alt@v1"
    rendered = (
        connect(db)
        .execute(
            "SELECT DISTINCT feedback, prompt, rendered_prompt FROM generations "
            "WHERE adapter = 'alt' AND adapter_version = 1"
        )
        .fetchall()
    )
    assert {r[0] for r in rendered} == {"Long"}
    assert all(r[2] == f"Length: Long\nText: {r[1]}" for r in rendered), rendered[:2]
    gate = manifest.extra["metrics"]["gate"]
    assert set(gate["candidate"]["scores"]) == {"Long", "Short"}


async def test_cmpo_loop_trains_heads_serves_them_and_samples_with_weights(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    srv, db, registry = learn_server
    attrs = ("long", "plain")
    ratings = RatingProvider(
        RatingConfig(
            provider_name="ratings",
            attributes=(
                RatedAttribute(name="long", scorer="length", cuts=(2.0, 4.0, 6.0)),
                RatedAttribute(name="plain", scorer="readability", cuts=(0.0, 50.0)),
            ),
        )
    )
    weights = ({"long": 1.0, "plain": 0.0}, {"long": 0.0, "plain": 1.0})
    cfg = _config(
        tiny_model,
        srv,
        db,
        registry,
        tmp_path / "work",
        adapter="plural",
        data=DataConfig(kind="cmpo", provider="ratings", attributes=attrs),
        heads=HeadsTrainConfig(attributes=attrs, base_model="tiny-llama", rank=2, epochs=1,
                               batch_size=16, max_length=64, lr=5e-2, progress=False),
        sample=SampleConfig(prompts=PROMPTS, per_iteration=8, n=3, max_tokens=8,
                            attributes=weights),
        gate=GateConfig(prompts=HELD_OUT, scorer="length", attributes=weights[0], margin=1e6,
                        max_perplexity_ratio=1e6,
                        sampling=HeldoutSampling(samples=1, max_tokens=8)),
    )  # fmt: skip
    lines = await _run(cfg, [ratings])
    rows = runs.iterations(connect(db), "plural")
    assert [(r["iteration"], r["status"], r["version"]) for r in rows] == [
        (1, "promoted", 1),
        (2, "promoted", 2),
    ], lines
    assert any("training cmpo heads" in line for line in lines), lines
    v1, v2 = (load_manifest(version_path(registry, "plural", v)) for v in (1, 2))
    for m in (v1, v2):  # heads-only versions, published with their attributes
        assert not m.has_lora and m.attributes == attrs and m.extra["objective"] == "cmpo"
        assert m.extra["hyperparameters"]["rank"] == 2
    # v1's heads start as the base (B = 0: loss log 2); v2 continues from v1's heads.
    first = [m.extra["metrics"]["first_step"]["loss"] for m in (v1, v2)]
    assert first[0] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first[1] - math.log(2)) > 1e-4, first
    # The gate generated with the weights on the side with heads: base first, then plural@v1.
    gates = [m.extra["metrics"]["gate"] for m in (v1, v2)]
    assert [g["incumbent"]["side"] for g in gates] == ["base", "plural@v1"]
    assert gates[1]["candidate"]["side"] == "plural-candidate@v2"
    # Iteration 2 sampled plural@v1 with the configured weight vectors in turn.
    sampled = (
        connect(db)
        .execute(
            "SELECT DISTINCT attributes_json FROM generations "
            "WHERE adapter = 'plural' AND adapter_version = 1"
        )
        .fetchall()
    )
    got = sorted((json.loads(r[0]) for r in sampled), key=json.dumps)
    assert got == sorted(weights, key=json.dumps)
    with Client(srv.target) as c:
        mix = {"long": 0.7, "plain": 0.3}
        g = c.generate("Describe the sea.", adapter="plural", attributes=mix, max_tokens=4)
        assert g.adapter_version == 2
        with pytest.raises(TillerClientError) as info:
            c.generate("x", adapter="plural", attributes={"loud": 1.0}, max_tokens=2)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown attribute 'loud'" in info.value.message


def test_config_file_round_trip(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("a\n\nb\n")
    data = {
        "db": "log.sqlite",
        "registry": "reg",
        "workdir": "work",
        "model": "m",
        "adapter": "critic",
        "base_model": "tiny",
        "server": "127.0.0.1:1",
        "admin_server": "127.0.0.1:2",
        "sample": {"prompts_file": "prompts.txt", "n": 3},
        "data": {"kind": "pairs", "source": "judge", "provider": "j"},
        "train": {"objective": "dpo", "objective_config": {"beta": 0.2}, "lora_r": 8},
        "gate": {
            "prompts": ["x"],
            "judge": {"base_url": "http://h/v1", "model": "m", "api_key_env": "K"},
        },
    }
    cfg = parse_config(data, tmp_path, {"K": "secret"})
    assert cfg.sample is not None and cfg.sample.prompts == ("a", "b") and cfg.sample.n == 3
    assert cfg.db == tmp_path / "log.sqlite" and cfg.admin_server == "127.0.0.1:2"
    assert cfg.train.loss_config.beta == 0.2  # type: ignore[union-attr]
    assert (
        cfg.gate is not None and cfg.gate.judge is not None and cfg.gate.judge.api_key == "secret"
    )
    for bad, needle in (
        ({**data, "bogus": 1}, "bogus"),
        ({**data, "data": {"kind": "alt", "provider": "p"}}, "data.tags"),
        ({**data, "train": {"objective": "nope"}}, "nope"),
        ({**data, "train": {"checkpoint_dir": "x"}}, "managed by the learner"),
        ({**data, "gate": {"prompts": ["x"], "metric": "spread", "scorer": "length"}}, "high_tag"),
        ({**data, "server": ""}, "server"),
    ):
        with pytest.raises(ValueError, match=needle):
            parse_config(bad, tmp_path, {})
    assert cfg.registry == tmp_path / "reg" and cfg.workdir == tmp_path / "work"


def test_log_plot_shows_the_learner_table(
    learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from tiller.learner.learn.cli import learn
    from tiller.learner.logcli import log

    _, db, _ = learn_server
    assert runs.iterations(connect(db))  # written by the tests above
    out = tmp_path / "plot.png"
    result = CliRunner().invoke(log, ["plot", "--db", str(db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"
    history = CliRunner().invoke(learn, ["history", "--db", str(db), "--adapter", "critic"])
    assert history.exit_code == 0 and "promoted" in history.output and "v2" in history.output


@pytest.mark.timeout(1200)
def test_learner_killed_mid_training_resumes_the_same_run(
    tiny_model: Path, learn_server: tuple[ServerProc, Path, Path], tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys
    import time

    srv, db, registry = learn_server
    work = tmp_path / "work"
    config = {
        "db": str(db),
        "registry": str(registry),
        "workdir": str(work),
        "model": str(tiny_model),
        "adapter": "resume",
        "base_model": "tiny-llama",
        "server": srv.target,
        "max_iterations": 1,
        "trigger": {"min_annotations": 1, "min_examples": 2, "poll_s": 0.1},
        "data": {"kind": "pairs", "source": "score", "provider": "len"},
        "train": {
            "objective": "dpo", "lora_r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "batch_size": 2, "max_steps": 200,
            "max_length": 64,
        },
    }  # fmt: skip
    path = tmp_path / "learn.json"
    path.write_text(json.dumps(config))
    # The 'len' annotations of the earlier tests' base-model samples are the data.
    argv = [
        sys.executable,
        "-m",
        "tiller.client.cli",
        "learn",
        "--config",
        str(path),
        "--no-progress",
    ]
    log = (tmp_path / "learn.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    ckpt = work / "iter-0001" / "ckpt"
    while not any(ckpt.glob("step-*")):
        assert proc.poll() is None, (tmp_path / "learn.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert runs.iterations(connect(db), "resume") == []  # nothing recorded, nothing published
    assert not (registry / "resume").exists() or read_state(registry, "resume").active is None

    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with its" in done.stderr
    (row,) = runs.iterations(connect(db), "resume")
    assert row["status"] == "promoted" and row["version"] == 1 and row["steps"] == 200
    assert json.loads(row["details_json"])["resumed_from_step"] >= 50
    assert read_state(registry, "resume").active == 1
