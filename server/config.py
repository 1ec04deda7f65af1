"""Typed, frozen configuration: built once at the CLI edge, passed down; nothing else reads env."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class EngineConfig:
    """What the vLLM engine is started with. ``dtype='auto'`` means: the fastest for this device."""

    model: Path
    dtype: Dtype = "auto"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.3
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    enable_lora: bool = True
    max_lora_rank: int = 16
    max_loras: int = 4
    max_num_seqs: int = 64
    seed: int = 0
    # Cap the KV cache at this many blocks (None: size it from memory). A testing and
    # capacity-planning knob: a tiny cache forces preemption.
    num_kv_blocks: int | None = None
    # Run the model worker inside the engine-core process (VLLM_ENABLE_V1_MULTIPROCESSING=0):
    # one spinning process fewer, 1.75x faster on 2-core CPUs (PLATFORM.md). Set at the CLI edge.
    single_process_worker: bool = True


@dataclass(frozen=True)
class AdapterSource:
    """An adapter version directory to load at start-up under ``name``."""

    name: str
    path: Path


@dataclass(frozen=True)
class Limits:
    """Request limits. Exceeding one is RESOURCE_EXHAUSTED; nonsense values are INVALID_ARGUMENT."""

    max_message_bytes: int = 4 * 1024 * 1024
    max_tokens_cap: int = 4096
    default_max_tokens: int = 128
    max_n: int = 16
    max_stop_strings: int = 16
    max_chat_messages: int = 256
    max_feedback_mix: int = 8
    max_attributes: int = 16
    max_attribute_weight: float = 10.0
    max_prompt_tokens: int | None = None  # None: the model's context is the only bound
    max_request_s: float | None = None  # server-side cap on one RPC's duration (DEADLINE_EXCEEDED)

    def __post_init__(self) -> None:
        if not 0 < self.default_max_tokens <= self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens {self.default_max_tokens} must be in (0, max_tokens_cap "
                f"{self.max_tokens_cap}]"
            )


@dataclass(frozen=True)
class LogConfig:
    """The generation log. ``synchronous=FULL`` survives power loss, ``NORMAL`` only crashes."""

    path: Path
    max_queue: int = 10_000
    max_batch: int = 512
    synchronous: Literal["NORMAL", "FULL"] = "FULL"


@dataclass(frozen=True)
class TokenGrant:
    """One bearer token, kept only as its sha256. ``max_concurrent`` RPCs at once (0: no cap)."""

    name: str
    sha256: str
    roles: frozenset[str]
    max_concurrent: int = 0


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for the gRPC ports. With ``client_ca``, clients must present a cert it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class SecurityConfig:
    """Who may call what. ``tokens=None``: no authentication (local development)."""

    tokens: tuple[TokenGrant, ...] | None = None
    tls: TlsConfig | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None  # set: TillerAdmin is served only there, not on the main port
    adapter_roots: tuple[Path, ...] = ()  # LoadAdapter paths must lie inside one (empty: any)


@dataclass(frozen=True)
class ObservabilityConfig:
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # set: Prometheus text format on http://host:port/metrics
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``tiller serve`` runs with."""

    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 50051
    adapters: tuple[AdapterSource, ...] = ()
    default_adapter: str | None = None
    limits: Limits = field(default_factory=Limits)
    drain_grace_s: float = 30.0
    enable_admin: bool = False
    log: LogConfig | None = None  # None: the server-wide switch is off
    registry: Path | None = None  # follow promoted versions here and hot-swap them
    registry_poll_s: float = 0.5
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
