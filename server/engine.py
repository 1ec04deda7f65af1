"""The engine boundary: a small Protocol the service talks to, and its vLLM implementation.

The service never imports vLLM; it sees ``EngineRequest`` in and ``Delta`` values out.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import EngineConfig
from .device import detect_dtype
from .formats.errors import EngineFailure, InvalidArgument, TillerError, Unavailable
from .values import Delta, EngineRequest, Finish, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

_FINISH = {None: Finish.NONE, "stop": Finish.STOP, "length": Finish.LENGTH, "abort": Finish.ABORT}


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


class Engine(Protocol):
    """What the generation service needs from an inference engine."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[Sequence[Delta]]:
        """Yield the deltas produced per engine step; aborts the request if the caller stops."""
        ...

    async def generate_group(
        self, requests: Sequence[EngineRequest]
    ) -> list[AsyncIterator[Sequence[Delta]]]:
        """Admit ``requests`` so that the scheduler sees them in the same step; return one
        delta stream per request (as ``generate``)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def num_unfinished(self) -> int: ...

    async def add_lora(self, name: str, lora_id: int, path: str) -> None: ...

    async def remove_lora(self, lora_id: int) -> None: ...

    async def check_health(self) -> None: ...

    def shutdown(self) -> None: ...

    @property
    def steering_dims(self) -> tuple[int, int] | None:
        """(hidden_size, vocab_size) when attribute heads can be served; None otherwise."""
        ...

    @property
    def max_num_seqs(self) -> int:
        """Sequences the scheduler runs in one step (its seats)."""
        ...

    @property
    def sampling_defaults(self) -> Mapping[str, Any]:
        """Sampling defaults of the model (its generation_config.json) for requests that give
        none: temperature, top_p, top_k, repetition_penalty."""
        ...


def steering_architecture(model: Path) -> str | None:
    """The Tiller steering architecture that extends ``model``'s, or None if unsupported."""
    from .steering.plugin import STEER_ARCHITECTURES

    try:
        archs = json.loads((model / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return None
    return STEER_ARCHITECTURES.get(archs[0]) if archs else None


# What the CPU path needs, where vLLM's defaults are made for a GPU: no graph compilation (start-up
# time), a KV-cache share of NUMA node 0 that leaves room for a second engine (a judge), and
# batches that fit it. Nothing is set on a GPU: vLLM's own defaults (CUDA graphs, 0.9) apply.
# No chunked prefill: when a seeded request's prefill is split, vLLM rewinds its torch generator,
# which a CPU generator refuses ("CPU Generator does not use offset"), and the engine dies. A
# --max-num-batched-tokens given by the user turns chunking back on (a budget below the context
# needs it); seeded requests then risk that crash (docs/results/cpu-notes.md).
CPU_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "gpu_memory_utilization": 0.3,
    "max_num_seqs": 64,
    "enable_chunked_prefill": False,
}
# What Tiller sets on every platform: logprobs are those of the distribution actually sampled
# from (after steering, feedback mixing, penalties, temperature, top-k/top-p), not the raw model's.
# Priority scheduling: waiting interactive requests go before waiting background ones (the
# learner's), and KV-cache preemption takes background requests first.
TILLER_DEFAULTS: dict[str, Any] = {
    "logprobs_mode": "processed_logprobs",
    "scheduling_policy": "priority",
}
_OPTIONAL = (
    "max_model_len",
    "gpu_memory_utilization",
    "enforce_eager",
    "max_lora_rank",
    "max_num_seqs",
)


def tiller_engine_kwargs(config: EngineConfig, *, on_cpu: bool, **overrides: Any) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` keywords Tiller starts vLLM with, without its logits processors
    and model plugin: the platform's defaults, then ``config``'s set fields, then its
    ``vllm_args``, then ``overrides`` (the caller's engine arguments win). Raises ``ValueError``
    if they switch LoRA off (Tiller serves adapters)."""
    kw: dict[str, Any] = dict(TILLER_DEFAULTS)
    if on_cpu:
        kw.update(CPU_DEFAULTS)
    kw.update(
        model=str(config.model),
        dtype=detect_dtype(config.dtype),
        enable_lora=config.enable_lora,
        max_loras=config.max_loras,
    )
    kw.update({k: v for k in _OPTIONAL if (v := getattr(config, k)) is not None})
    if config.num_kv_blocks is not None:
        kw["num_gpu_blocks_override"] = config.num_kv_blocks
    chosen = {**config.vllm_args, **overrides}
    kw.update(chosen)
    if on_cpu and "max_num_batched_tokens" in chosen:
        # a token budget the user chose may be below the context: vLLM must chunk to serve it
        kw["enable_chunked_prefill"] = chosen.get("enable_chunked_prefill", True)
    if not kw["enable_lora"]:
        raise ValueError("Tiller serves adapters: the engine needs enable_lora")
    return kw


def parallel_sizes(kw: Mapping[str, Any]) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes of engine keywords ``kw``."""
    return int(kw.get("tensor_parallel_size") or 1), int(kw.get("pipeline_parallel_size") or 1)


def engine_args(config: EngineConfig, **overrides: Any) -> Any:
    """vLLM ``AsyncEngineArgs`` for ``config`` (``tiller_engine_kwargs``, then ``overrides``).
    Supported architectures (Llama, Qwen2, Qwen3) are served through their steering subclass,
    with the steering processor ahead of mixing, unless the model is sharded (tensor or pipeline
    parallel): the attribute heads are not sharded, so steering is then off and an adapter that
    ships heads is refused at load."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    from .mixing import FeedbackMixProcessor
    from .steering.plugin import register
    from .steering.processor import SteerProcessor

    register()  # the entry point does this in vLLM's processes; here for the front end too
    kw = tiller_engine_kwargs(config, on_cpu=current_platform.is_cpu(), **overrides)
    hf = kw.get("hf_overrides")
    user_arch = isinstance(hf, Mapping) and "architectures" in hf  # wins, served unsteered
    steer_arch = None
    if not user_arch and steering_allowed(kw):
        steer_arch = steering_architecture(config.model)
    ours: list[Any] = [SteerProcessor] if steer_arch else []
    ours.append(FeedbackMixProcessor)
    kw["logits_processors"] = [*ours, *(kw.get("logits_processors") or [])]
    if steer_arch:
        kw["hf_overrides"] = {"architectures": [steer_arch], **(kw.get("hf_overrides") or {})}
    return AsyncEngineArgs(**kw)


def steering_allowed(kw: Mapping[str, Any]) -> bool:
    """Whether attribute heads can be served with engine keywords ``kw`` (not sharded)."""
    tp, pp = parallel_sizes(kw)
    if tp * pp > 1:
        log.warning(
            "attribute steering is off: tensor_parallel_size=%d, pipeline_parallel_size=%d "
            "(the heads are not sharded); adapters with heads will be refused",
            tp,
            pp,
        )
        return False
    return True


def parse_vllm_args(argv: Sequence[str]) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` fields that ``argv`` (vLLM's own CLI flags, as ``vllm serve``
    takes them) sets: parsed by vLLM's parser, and only the flags given, so that an explicit
    flag wins even where it equals vLLM's default. An unknown or invalid flag: vLLM's parser
    prints its message and raises ``SystemExit(2)``."""
    import argparse

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="tiller serve [...] --"))
    for action in parser._actions:  # unset flags stay out of the namespace
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return dict(vars(parser.parse_args(list(argv))))


def engine_error(e: Exception) -> Exception:
    """The Tiller error for an exception out of vLLM, on every request path: a dead engine is
    UNAVAILABLE, vLLM's own input validation INVALID_ARGUMENT, anything else INTERNAL."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(e, TillerError):
        return e
    if isinstance(e, EngineDeadError):
        return Unavailable("the inference engine is not running")
    if isinstance(e, ValueError | VLLMClientError):
        return InvalidArgument(f"rejected by the engine: {e}")
    return EngineFailure(f"engine failed: {type(e).__name__}: {e}")


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, Any]], k: int
) -> tuple[TokenLogprob, ...]:
    """vLLM's per-position ``{token id: Logprob}`` maps as ``TokenLogprob``s: the sampled token,
    and the alternatives of rank 1..``k`` (vLLM adds the sampled token when it ranks below k)."""
    out = []
    for token_id, position in zip(token_ids, positions, strict=True):
        sampled = position[token_id]
        ranked = sorted(
            (lp.rank, tid, lp)
            for tid, lp in position.items()
            if lp.rank is not None and lp.rank <= k
        )
        top = tuple(
            TopLogprob(tid, lp.decoded_token or "", float(lp.logprob)) for _, tid, lp in ranked
        )
        out.append(TokenLogprob(token_id, sampled.decoded_token or "", float(sampled.logprob), top))
    return tuple(out)


@dataclass
class VllmEngine:
    """``Engine`` over vLLM's ``AsyncLLM`` running in this process."""

    llm: AsyncLLM
    config: EngineConfig
    steering: bool  # served through the steering model class (attribute heads)
    _admit: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def start(cls, config: EngineConfig) -> VllmEngine:
        """Start the engine (tens of seconds). Call from inside the running event loop."""
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from .steering.processor import SteerProcessor

        args = engine_args(config)
        steering = SteerProcessor in args.logits_processors
        # A server's batch defaults (token budget, sequences), as `vllm serve` has them.
        llm = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
        return cls(llm=llm, config=config, steering=steering)

    @property
    def max_model_len(self) -> int:
        return int(self.llm.model_config.max_model_len)

    @property
    def model_id(self) -> str:
        """vLLM's served model name (the model path unless ``--served-model-name`` is given): the
        ``model_name`` label its metrics and Tiller's share."""
        return str(self.llm.model_config.served_model_name)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.get_tokenizer()

    @functools.cached_property
    def sampling_defaults(self) -> Mapping[str, Any]:
        return dict(self.llm.model_config.get_diff_sampling_param())

    @property
    def max_num_seqs(self) -> int:
        return int(self.llm.vllm_config.scheduler_config.max_num_seqs)

    @property
    def steering_dims(self) -> tuple[int, int] | None:
        if not self.steering:
            return None
        hf = self.llm.model_config.hf_text_config
        return int(hf.hidden_size), int(self.llm.model_config.get_vocab_size())

    def _sampling_params(self, request: EngineRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        s = request.sampling
        return SamplingParams(
            n=s.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
            stop=list(s.stop) or None,
            repetition_penalty=s.repetition_penalty,
            logprobs=s.logprobs,
            ignore_eos=s.ignore_eos,
            structured_outputs=StructuredOutputsParams(**s.structured) if s.structured else None,
            output_kind=RequestOutputKind.DELTA,
            stream_interval=request.stream_interval,
            extra_args=self._extra_args(request),
        )

    @staticmethod
    def _extra_args(request: EngineRequest) -> dict[str, Any] | None:
        extra: dict[str, Any] = {}
        if request.mix:
            extra["tiller_mix"] = asdict(request.mix)
        if request.steer:
            extra["tiller_steer"] = {
                "heads": request.steer.heads,
                "weights": list(request.steer.weights),
            }
        return extra or None

    async def generate(self, request: EngineRequest) -> AsyncIterator[Sequence[Delta]]:
        from vllm.inputs import TokensPrompt

        lora = self._lora(request)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        try:
            stream = self.llm.generate(
                prompt,
                self._sampling_params(request),
                request.request_id,
                lora_request=lora,
                priority=request.priority,
            )
            k = request.sampling.logprobs
            async for out in stream:
                yield [self._delta(c, k) for c in out.outputs]
        except asyncio.CancelledError:
            await self.abort(request.request_id)
            raise
        except Exception as e:
            raise engine_error(e) from e

    async def generate_group(
        self, requests: Sequence[EngineRequest]
    ) -> list[AsyncIterator[Sequence[Delta]]]:
        """Siblings are added while the scheduler is paused ("keep": running requests are
        frozen for the length of the admission, about a millisecond), so that they start in
        the same step. Separate adds would race the engine core's input loop."""
        from vllm.inputs import TokensPrompt

        async with self._admit:
            try:
                await self.llm.pause_generation(mode="keep", clear_cache=False)
                try:
                    queues = [
                        await self.llm.add_request(
                            r.request_id,
                            TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)),
                            self._sampling_params(r),
                            lora_request=self._lora(r),
                            priority=r.priority,
                        )
                        for r in requests
                    ]
                finally:
                    await self.llm.resume_generation()
            except Exception as e:
                raise engine_error(e) from e
        return [
            self._drain(q, r.request_id, r.sampling.logprobs)
            for q, r in zip(queues, requests, strict=True)
        ]

    async def _drain(
        self, q: Any, request_id: str, k: int | None
    ) -> AsyncIterator[Sequence[Delta]]:
        try:
            finished = False
            while not finished:
                out = q.get_nowait() or await q.get()
                finished = bool(out.finished)
                yield [self._delta(c, k) for c in out.outputs]
        except asyncio.CancelledError:
            await self.abort(request_id)
            raise
        except Exception as e:  # the output handler puts the engine's error into the queue
            raise engine_error(e) from e
        finally:
            q.close()

    @staticmethod
    def _delta(c: Any, k: int | None) -> Delta:
        return Delta(
            index=c.index,
            text=c.text,
            token_ids=tuple(c.token_ids),
            finish=_FINISH.get(c.finish_reason, Finish.STOP),
            logprobs=token_logprobs(c.token_ids, c.logprobs, k) if k is not None else (),
        )

    def _lora(self, request: EngineRequest) -> Any:
        from vllm.lora.request import LoRARequest

        if request.lora_id is None:
            return None
        return LoRARequest(request.lora_name or "", request.lora_id, request.lora_path or "")

    async def abort(self, request_id: str) -> None:
        await self.llm.abort(request_id)

    def num_unfinished(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        from vllm.lora.request import LoRARequest

        await self.llm.add_lora(LoRARequest(name, lora_id, path))

    async def remove_lora(self, lora_id: int) -> None:
        await self.llm.remove_lora(lora_id)

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
