"""The engine boundary: a small Protocol the service talks to, and its vLLM implementation.

The service never imports vLLM; it sees ``EngineRequest`` in and ``Delta`` values out.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .config import EngineConfig
from .device import detect_dtype
from .formats.errors import EngineFailure, InvalidArgument, Unavailable
from .values import Delta, EngineRequest, Finish

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


def steering_architecture(model: Path) -> str | None:
    """The Tiller steering architecture that extends ``model``'s, or None if unsupported."""
    from .steering.plugin import STEER_ARCHITECTURES

    try:
        archs = json.loads((model / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return None
    return STEER_ARCHITECTURES.get(archs[0]) if archs else None


def engine_args(config: EngineConfig, **overrides: Any) -> Any:
    """vLLM ``AsyncEngineArgs`` for ``config``. Supported architectures (Llama, Qwen2, Qwen3) are
    served through their steering subclass, with the steering processor ahead of mixing."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from .mixing import FeedbackMixProcessor
    from .steering.plugin import register
    from .steering.processor import SteerProcessor

    register()  # the entry point does this in vLLM's processes; here for the front end too
    steer_arch = steering_architecture(config.model)
    kw: dict[str, Any] = dict(
        model=str(config.model),
        dtype=detect_dtype(config.dtype),
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=config.enable_prefix_caching,
        enable_lora=config.enable_lora,
        max_lora_rank=config.max_lora_rank,
        max_loras=config.max_loras,
        max_num_seqs=config.max_num_seqs,
        seed=config.seed,
        num_gpu_blocks_override=config.num_kv_blocks,
        logits_processors=[SteerProcessor, FeedbackMixProcessor]
        if steer_arch
        else [FeedbackMixProcessor],
    )
    if steer_arch:
        kw["hf_overrides"] = {"architectures": [steer_arch]}
    kw.update(overrides)
    return AsyncEngineArgs(**kw)


@dataclass
class VllmEngine:
    """``Engine`` over vLLM's ``AsyncLLM`` running in this process."""

    llm: AsyncLLM
    config: EngineConfig
    _admit: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def start(cls, config: EngineConfig) -> VllmEngine:
        """Start the engine (tens of seconds). Call from inside the running event loop."""
        from vllm.v1.engine.async_llm import AsyncLLM

        return cls(llm=AsyncLLM.from_engine_args(engine_args(config)), config=config)

    @property
    def max_model_len(self) -> int:
        return int(self.llm.model_config.max_model_len)

    @property
    def model_id(self) -> str:
        return str(self.config.model)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.get_tokenizer()

    @property
    def steering_dims(self) -> tuple[int, int] | None:
        if steering_architecture(self.config.model) is None:
            return None
        hf = self.llm.model_config.hf_text_config
        return int(hf.hidden_size), int(self.llm.model_config.get_vocab_size())

    def _sampling_params(self, request: EngineRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

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
            output_kind=RequestOutputKind.DELTA,
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
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        lora = self._lora(request)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        try:
            stream = self.llm.generate(
                prompt, self._sampling_params(request), request.request_id, lora_request=lora
            )
            async for out in stream:
                yield [self._delta(c) for c in out.outputs]
        except EngineDeadError as e:
            raise Unavailable("the inference engine is not running") from e
        except (ValueError, VLLMClientError) as e:  # vLLM's own input validation
            raise InvalidArgument(f"rejected by the engine: {e}") from e
        except asyncio.CancelledError:
            await self.abort(request.request_id)
            raise
        except (InvalidArgument, Unavailable):
            raise
        except Exception as e:
            raise EngineFailure(f"engine failed: {type(e).__name__}: {e}") from e

    async def generate_group(
        self, requests: Sequence[EngineRequest]
    ) -> list[AsyncIterator[Sequence[Delta]]]:
        """Siblings are added while the scheduler is paused ("keep": running requests are
        frozen for the length of the admission, about a millisecond), so that they start in
        the same step. Separate adds would race the engine core's input loop."""
        from vllm.inputs import TokensPrompt

        async with self._admit:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
            try:
                queues = [
                    await self.llm.add_request(
                        r.request_id,
                        TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)),
                        self._sampling_params(r),
                        lora_request=self._lora(r),
                    )
                    for r in requests
                ]
            finally:
                await self.llm.resume_generation()
        return [self._drain(q, r.request_id) for q, r in zip(queues, requests, strict=True)]

    async def _drain(self, q: Any, request_id: str) -> AsyncIterator[Sequence[Delta]]:
        try:
            finished = False
            while not finished:
                out = q.get_nowait() or await q.get()
                finished = bool(out.finished)
                yield [self._delta(c) for c in out.outputs]
        except asyncio.CancelledError:
            await self.abort(request_id)
            raise
        finally:
            q.close()

    @staticmethod
    def _delta(c: Any) -> Delta:
        return Delta(
            index=c.index,
            text=c.text,
            token_ids=tuple(c.token_ids),
            finish=_FINISH.get(c.finish_reason, Finish.STOP),
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
