"""The pieces of a multi-process run that need no second process: the spec a launch writes, the
command it runs, the config checks, and the sharded reference pass (two shards sum to one)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tiller.learner import distributed
from tiller.learner.batch_loss import peft_model, reference_logps
from tiller.learner.batches import tokenize
from tiller.learner.data.examples import PreferencePair, SFTExample
from tiller.learner.data.jsonl import load_pairs
from tiller.learner.objectives.dpo import DPOConfig
from tiller.learner.trainer import TrainConfig, TrainResult

PAIRS = [
    PreferencePair(prompt="def add(a, b):", chosen=" return a + b", rejected=" import os"),
    PreferencePair(prompt="class Foo:", chosen=" pass", rejected=" return None"),
    PreferencePair(
        prompt="try:",
        chosen=" yield",
        rejected=" except",
        label_confidence=0.75,
        attribute_weights=(("a", 0.5),),
    ),
]


def test_spec_round_trips_config_and_examples(tmp_path: Path) -> None:
    cfg = TrainConfig(
        objective="dpo",
        objective_config=DPOConfig(beta=0.3),
        target_modules=("q_proj", "v_proj"),
        layers_to_transform=(0, 1),
        lr=3e-4,
        grad_accum=4,
        processes=2,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_every=3,
        accelerate_config=tmp_path / "fsdp.yaml",
    )
    out = tmp_path / "adapter"
    spec = distributed.write_spec(tmp_path / "model", PAIRS, cfg, out, tmp_path / "init")
    assert spec.parent == distributed.launch_dir(out) == tmp_path / "adapter.launch"
    raw = json.loads(spec.read_text())
    assert distributed.config_from_json(raw["config"]) == cfg
    assert raw["init_adapter"] == str(tmp_path / "init") and raw["resume"] is False
    assert load_pairs(spec.parent / "examples.jsonl") == PAIRS


def test_spec_refuses_examples_of_the_wrong_kind(tmp_path: Path) -> None:
    cfg = TrainConfig(objective="dpo", grad_accum=2, processes=2)
    sft = [SFTExample(prompt="p", completion="c")]
    with pytest.raises(TypeError, match="trains on PreferencePair"):
        distributed.write_spec(tmp_path, sft, cfg, tmp_path / "out")


def test_result_round_trips() -> None:
    r = TrainResult(Path("/x/adapter"), 4, 0.5, 12.0, ({"step": 1.0, "loss": 0.7},), 2)
    assert distributed.result_from_json(json.loads(json.dumps(distributed.result_to_json(r)))) == r


def test_launch_command_cpu_uses_torchrun_with_gloo(tmp_path: Path) -> None:
    cfg = TrainConfig(device="cpu", grad_accum=2, processes=2)
    cmd, env = distributed.launch_command(tmp_path / "spec.json", cfg)
    assert cmd[1:5] == ["-m", distributed.MODULE, "launcher", str(os.getpid())]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" in cmd and "--config_file" not in cmd
    assert cmd[-4:] == ["--module", distributed.MODULE, "run", str(tmp_path / "spec.json")]
    assert env["ACCELERATE_USE_CPU"] == "true"


def test_launch_command_with_a_config_file_lets_it_choose(tmp_path: Path) -> None:
    yaml = tmp_path / "fsdp.yaml"
    cfg = TrainConfig(device="cuda", grad_accum=4, processes=4, accelerate_config=yaml)
    cmd, env = distributed.launch_command(tmp_path / "spec.json", cfg, script=("w.py",))
    assert cmd[cmd.index("--config_file") + 1] == str(yaml)
    assert "--multi_gpu" not in cmd and cmd[-2:] == ["w.py", str(tmp_path / "spec.json")]
    assert env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")  # not set


def test_config_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"grad_accum \(3\) must be a multiple of processes \(2\)"):
        TrainConfig(grad_accum=3, processes=2)
    with pytest.raises(ValueError, match="processes must be >= 1"):
        TrainConfig(processes=0)
    with pytest.raises(ValueError, match="accelerate_config needs processes > 1"):
        TrainConfig(accelerate_config=Path("x.yaml"))


def test_launched_reads_the_launchers_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched()


def test_main_without_a_mode_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert distributed.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_reference_shards_sum_to_the_whole(tiny_model: Path) -> None:
    """Five pairs in batches of two: three batches over two shards, the second shard repeating
    one to keep the forward counts equal; the shards' sum is the one-process tensor exactly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = TrainConfig(objective="dpo", batch_size=2)
    pairs = [*PAIRS, PAIRS[0], PAIRS[1]]
    items = tokenize(pairs, tok, cfg, pairs=True)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    cpu = torch.device("cpu")
    whole = reference_logps(model, items, cfg, cpu, tok.eos_token_id)
    shards = [reference_logps(model, items, cfg, cpu, tok.eos_token_id, (r, 2)) for r in (0, 1)]
    assert whole.shape == (5, 2) and bool((whole < 0).all())
    assert torch.equal(shards[0] + shards[1], whole)
    assert bool((shards[0][2:4] == 0).all()) and bool((shards[1][:2] == 0).all())

    class Wrapper(torch.nn.Module):  # the shape of DDP/FSDP: the model under ``.module``
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    assert peft_model(Wrapper(Wrapper(model))) is model and peft_model(model) is model
