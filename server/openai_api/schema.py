"""Request bodies of the OpenAI-compatible API, validated by pydantic, and their translation
into the request service's ``GenerateRequest`` / ``FeedbackInput``.

Unknown fields are refused (400 naming the field), so a client never believes a parameter took
effect when Tiller ignored it. Tiller's steering travels in the SDK's ``extra_body`` under the
gRPC names: ``feedback``, ``feedback_mix``, ``attributes``, ``adapter_version``, ``log``,
``request_id``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..formats.errors import InvalidArgument
from ..formats.prompt import ChatTurn
from ..logrecords import FeedbackInput
from ..values import AdapterPick, GenerateRequest, Sampling

Number = StrictFloat | StrictInt


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class StructuredBody(_Body):
    """vLLM's ``structured_outputs``: the output must match one of these."""

    choice: list[StrictStr] | None = None
    regex: StrictStr | None = None
    json_: dict[str, Any] | StrictStr | None = Field(default=None, alias="json")
    grammar: StrictStr | None = None

    def params(self) -> dict[str, Any]:
        given = {
            k: v
            for k, v in (
                ("choice", self.choice),
                ("regex", self.regex),
                ("json", self.json_),
                ("grammar", self.grammar),
            )
            if v is not None
        }
        if len(given) != 1:
            raise InvalidArgument(
                "structured_outputs takes exactly one of: choice, regex, json, grammar",
                field="structured_outputs",
            )
        if given.get("choice") == []:
            raise InvalidArgument(
                "structured_outputs.choice is empty", field="structured_outputs.choice"
            )
        return given


class _Common(_Body):
    """What both generation endpoints take: OpenAI's sampling, vLLM's extras, Tiller's steering."""

    model: StrictStr = ""
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None
    user: StrictStr | None = None  # accepted and ignored, as OpenAI's abuse-monitoring id
    # vLLM's sampling extras
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    structured_outputs: StructuredBody | None = None
    # Tiller's steering, as in gRPC
    feedback: StrictStr = ""
    feedback_mix: dict[str, Number] = Field(default_factory=dict)
    attributes: dict[str, Number] = Field(default_factory=dict)
    adapter_version: Annotated[StrictInt, Field(ge=0)] | None = None
    log: StrictBool | None = None
    request_id: StrictStr = ""
    priority: Literal["interactive", "background"] = "interactive"  # background: admin role

    def _unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise InvalidArgument(
                    f"{name} is not supported (use repetition_penalty)", field=name
                )
        if self.logit_bias:
            raise InvalidArgument("logit_bias is not supported", field="logit_bias")

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_tokens=max_tokens,
            temperature=_float(self.temperature),
            top_p=_float(self.top_p),
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            n=self.n,
            repetition_penalty=_float(self.repetition_penalty),
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            structured=self.structured_outputs.params() if self.structured_outputs else None,
        )

    def _request(self, adapter: AdapterPick, sampling: Sampling, **input_: Any) -> GenerateRequest:
        self._unsupported()
        return GenerateRequest(
            sampling=sampling,
            feedback=self.feedback,
            feedback_mix=tuple(sorted((k, float(v)) for k, v in self.feedback_mix.items())),
            attributes=tuple(sorted((k, float(v)) for k, v in self.attributes.items())),
            adapter=adapter,
            log=self.log,
            request_id=self.request_id,
            background=self.priority == "background",
            **input_,
        )


def _float(x: float | int | None) -> float | None:
    return None if x is None else float(x)


class CompletionBody(_Common):
    prompt: StrictStr | list[StrictStr]
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise InvalidArgument("prompt is an empty list", field="prompt")
        return prompts

    def requests(self, adapter: AdapterPick) -> list[GenerateRequest]:
        """One service request per prompt (a list of prompts is a batch)."""
        if self.echo:
            raise InvalidArgument("echo is not supported", field="echo")
        if self.suffix:
            raise InvalidArgument("suffix is not supported", field="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise InvalidArgument("best_of other than n is not supported", field="best_of")
        sampling = self._sampling(self.max_tokens, self.logprobs)
        return [self._request(adapter, sampling, prompt=p) for p in self.prompts()]


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatBody(_Common):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    response_format: ResponseFormat | None = None

    def request(self, adapter: AdapterPick) -> GenerateRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidArgument(
                "give max_tokens or max_completion_tokens, not both", field="max_tokens"
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs=true", field="top_logprobs")
        k = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_tokens is None else self.max_tokens
        chat = tuple(ChatTurn(m.role, m.text()) for m in self.messages)
        return self._request(adapter, self._sampling(max_tokens, k), chat=chat)


class PreferenceBody(_Body):
    chosen_generation_id: StrictStr
    rejected_generation_id: StrictStr


class FeedbackBody(_Body):
    """``POST /v1/feedback``: the fields and semantics of ``SubmitFeedback``."""

    generation_id: StrictStr = ""
    score: Number | None = None
    tag: StrictStr = ""
    critique: StrictStr = ""
    refinement: StrictStr = ""
    preference: PreferenceBody | None = None
    idempotency_key: StrictStr = ""
    source: StrictStr = ""

    def feedback(self) -> FeedbackInput:
        pref = self.preference
        return FeedbackInput(
            generation_id=self.generation_id,
            score=_float(self.score),
            tag=self.tag,
            critique=self.critique,
            refinement=self.refinement,
            chosen_id=pref.chosen_generation_id if pref else "",
            rejected_id=pref.rejected_generation_id if pref else "",
            idempotency_key=self.idempotency_key,
            source=self.source,
        )
