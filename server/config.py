"""Typed, frozen configuration: built once at the CLI edge, passed down; nothing else reads env.

These dataclasses hold the one copy of every default: the CLI's options read theirs from here
(``default``, ``choices``), so a server built from code runs as ``tiller serve`` does.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .formats.sections import type_hints

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def choices(cls: type[Any], name: str) -> list[str]:
    """The values of ``cls``'s ``Literal`` field ``name``: a CLI option's choices."""
    return [str(v) for v in typing.get_args(type_hints(cls)[name])]


@dataclass(frozen=True)
class EngineConfig:
    """What the vLLM engine is started with. ``None``: Tiller's default for the platform, else
    vLLM's (``engine.tiller_engine_kwargs``). ``vllm_args`` (``tiller serve -- ARGS``) win."""

    model: Path  # HF-format model directory (--model)
    dtype: Dtype = "auto"  # auto: float32 on CPUs without native bf16, vLLM's choice elsewhere
    max_model_len: int | None = None  # context length (prompt + completion); None: the model's
    gpu_memory_utilization: float | None = None  # None: 0.3 (of NUMA node 0) on CPU, 0.9 on GPU
    enforce_eager: bool | None = None  # None: eager on CPU (no compile time), CUDA graphs on GPU
    enable_lora: bool = True  # Tiller serves adapters: always on
    max_lora_rank: int | None = None  # the largest LoRA rank an adapter may have (vLLM: 16)
    # Adapters in one batch: a hot-swap runs the old and the new version side by side (vLLM: 1).
    max_loras: int = 4
    max_num_seqs: int | None = None  # sequences in one batch; None: 64 on CPU, vLLM's on GPU
    # Cap the KV cache at this many blocks (None: size it from memory). A testing and
    # capacity-planning knob: a tiny cache forces preemption.
    num_kv_blocks: int | None = None
    # Run the model worker inside the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
    # one spinning process fewer, which matters most on few-core CPUs. Set at the CLI edge.
    single_process_worker: bool = True
    vllm_args: Mapping[str, Any] = field(default_factory=dict)  # any AsyncEngineArgs field


@dataclass(frozen=True)
class AdapterSource:
    """An adapter version directory to load at start-up under ``name``."""

    name: str
    path: Path


@dataclass(frozen=True)
class Limits:
    """Request limits. Exceeding one is RESOURCE_EXHAUSTED; nonsense values are INVALID_ARGUMENT."""

    max_message_bytes: int = 4 * 1024 * 1024  # gRPC message size, both ways
    max_tokens_cap: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 128  # for requests that give none
    max_n: int = 16  # completions per request
    max_stop_strings: int = 16
    max_chat_messages: int = 256
    max_feedback_mix: int = 8  # tags in one feedback mixture
    max_attributes: int = 16  # attribute weights in one request
    max_attribute_weight: float = 10.0  # |weight| bound of each attribute
    max_logprobs: int = 20  # top alternatives per token a request may ask for
    max_prompt_tokens: int | None = None  # None: the model's context is the only bound
    # server-side cap on one RPC's duration (DEADLINE_EXCEEDED); None: the client's deadline only
    max_request_s: float | None = 900.0
    # Background requests (the learner's) in the engine at once, as a share of its sequence
    # seats (at least 1; 1.0: no cap): the rest stay free for interactive requests, which vLLM's
    # priority order alone cannot give them once background ones hold every seat.
    background_seat_share: float = 0.25
    # Background sequences in the engine while interactive requests are there too: on a CPU
    # every extra sequence in a step slows the users' tokens (-1: the share alone). Off by
    # default: measured on 2 cores it slowed the learner 2.5x without keeping users faster.
    background_seats_under_load: int = -1

    def __post_init__(self) -> None:
        if not 0 < self.background_seat_share <= 1:
            raise ValueError(
                f"background_seat_share must be in (0, 1], got {self.background_seat_share}"
            )
        if self.background_seats_under_load < -1:
            raise ValueError(
                f"background_seats_under_load must be >= -1, got {self.background_seats_under_load}"
            )
        if not 0 < self.default_max_tokens <= self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} must be in (0, max_tokens_cap "
                f"{self.max_tokens_cap}]"
            )


@dataclass(frozen=True)
class LogConfig:
    """The generation log. ``synchronous=FULL`` survives power loss, ``NORMAL`` only crashes."""

    path: Path  # the SQLite file (--log-db)
    max_queue: int = 10_000  # records waiting for the writer; more are dropped and counted
    max_batch: int = 512  # records per write transaction
    synchronous: Literal["NORMAL", "FULL"] = "FULL"


@dataclass(frozen=True)
class TokenGrant:
    """One bearer token, kept only as its sha256. ``max_concurrent`` RPCs at once (0: no cap)."""

    name: str  # shows up in logs and metrics instead of the token
    sha256: str  # sha256 hex of the token
    roles: frozenset[str]  # of: generate, feedback, admin
    max_concurrent: int = 0


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for the gRPC ports. With ``client_ca``, clients must present a cert it signed."""

    cert: Path  # PEM server certificate (--tls-cert)
    key: Path  # PEM private key (--tls-key)
    client_ca: Path | None = None  # PEM CA of the client certificates (--tls-client-ca)


@dataclass(frozen=True)
class SecurityConfig:
    """Who may call what. ``tokens=None``: no authentication (local development)."""

    tokens: tuple[TokenGrant, ...] | None = None  # from the --tokens file ([[tokens]] below)
    tls: TlsConfig | None = None
    admin_host: str = "127.0.0.1"  # where admin_port listens
    admin_port: int | None = None  # set: TillerAdmin is served only there, not on the main port
    adapter_roots: tuple[Path, ...] = ()  # LoadAdapter paths must lie inside one (empty: none may)


@dataclass(frozen=True)
class ObservabilityConfig:
    """Metrics and logs."""

    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # set: Prometheus text format on http://host:port/metrics
    log_format: Literal["text", "json"] = "text"  # json: one object a line
    log_level: LogLevel = "INFO"


@dataclass(frozen=True)
class HttpConfig:
    """The OpenAI-compatible HTTP API (beside gRPC; same tokens, TLS, limits and log)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    port_file: Path | None = None  # the bound port is written here once serving


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``tiller serve`` runs with."""

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    adapters: tuple[AdapterSource, ...] = ()  # loaded at start-up (--adapter NAME=DIR)
    default_adapter: str | None = None  # for requests that name none
    limits: Limits = field(default_factory=Limits)
    drain_grace_s: float = 30.0  # on SIGTERM: how long running requests may finish
    enable_admin: bool = False  # serve TillerAdmin (on the main port unless admin_port)
    log: LogConfig | None = None  # None: the server-wide switch is off
    registry: Path | None = None  # follow promoted versions here and hot-swap them
    registry_poll_s: float = 0.5  # how often the registry's state.json is read
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    http: HttpConfig | None = None  # None: gRPC only
