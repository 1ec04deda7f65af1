"""Fuzz the gRPC surface of the real server: hypothesis over the proto request messages, and
raw bytes on every method. The server never crashes, every request gets a declared status, and
another client is served throughout.

Deterministic in CI (``derandomize``); ``TILLER_FUZZ_EXAMPLES=2000`` for a longer local run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TAGS, ServerProc
from tiller.client import Client
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

C = grpc.StatusCode
EXAMPLES = int(os.environ.get("TILLER_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# What a request may legitimately end with. Never UNKNOWN, INTERNAL, UNAVAILABLE, CANCELLED.
# FAILED_PRECONDITION: attribute weights sent to an adapter without steering heads.
GENERATE_OK = {C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
FEEDBACK_OK = {C.OK, C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.NOT_FOUND}
ADMIN_OK = {C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION, C.PERMISSION_DENIED}
READ_OK = {C.OK}

text = st.text(max_size=40)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
doubles = st.floats(allow_nan=True, allow_infinity=True)
tags = st.one_of(st.sampled_from(TAGS), text)


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    s = pb.SamplingParams()
    # Always bounded so that valid requests stay cheap; both signs and the int32 extremes.
    s.max_tokens = draw(st.one_of(st.integers(-3, 6), st.sampled_from([-(2**31), 2**31 - 1])))
    for name, strategy in (
        ("temperature", floats),
        ("top_p", floats),
        ("top_k", st.integers(-(2**31), 2**31 - 1)),
        ("seed", st.integers(0, 2**64 - 1)),
        ("n", st.one_of(st.integers(-2, 6), st.just(2**31 - 1))),
        ("repetition_penalty", floats),
    ):
        if draw(st.booleans()):
            setattr(s, name, draw(strategy))
    s.stop.extend(draw(st.lists(text, max_size=20)))
    return s


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    r = pb.GenerateRequest(sampling=draw(sampling()))
    kind = draw(st.sampled_from(["prompt", "chat", "none"]))
    if kind == "prompt":
        r.prompt = draw(st.text(max_size=300))
    elif kind == "chat":
        roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), text)
        for role, content in draw(st.lists(st.tuples(roles, st.text(max_size=80)), max_size=6)):
            r.chat.messages.add(role=role, content=content)
    r.feedback = draw(st.one_of(st.just(""), tags))
    for tag, w in draw(st.dictionaries(tags, doubles, max_size=10)).items():
        r.feedback_mix[tag] = w
    for name, w in draw(st.dictionaries(text, doubles, max_size=20)).items():
        r.attributes[name] = w
    if draw(st.booleans()):
        r.adapter.name = draw(st.one_of(st.sampled_from(["detox", "base", ""]), text))
        if draw(st.booleans()):
            r.adapter.version = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        r.log = draw(st.booleans())
    r.request_id = draw(text)
    return r


@st.composite
def feedback_requests(draw: st.DrawFn) -> pb.SubmitFeedbackRequest:
    r = pb.SubmitFeedbackRequest(
        generation_id=draw(st.one_of(st.just(""), st.just("gen-" + "0" * 32), text)),
        tag=draw(st.one_of(st.just(""), tags)),
        critique=draw(text),
        refinement=draw(text),
        idempotency_key=draw(text),
        source=draw(text),
    )
    if draw(st.booleans()):
        r.score = draw(doubles)
    if draw(st.booleans()):
        r.preference.chosen_generation_id = draw(text)
        r.preference.rejected_generation_id = draw(text)
    return r


# Names that cannot touch the session server's real adapter (a rollback would change its state).
admin_names = st.one_of(
    st.sampled_from(["", "../evil", "a/b", "x" * 65, ".hidden", "nope"]), text
).filter(lambda n: n != "detox")
admin_requests = st.one_of(
    st.builds(
        pb.LoadAdapterRequest,
        name=admin_names,
        path=st.one_of(st.sampled_from(["", "/", "/etc", "../..", "/proc/self"]), text),
    ),
    st.builds(pb.ActivateAdapterRequest, name=admin_names, version=st.integers(0, 2**32 - 1)),
    st.builds(pb.RollbackAdapterRequest, name=admin_names),
)

_TILLER = "/tiller.v1.Tiller/"
_ADMIN = "/tiller.v1.TillerAdmin/"
RAW_METHODS: dict[str, set[grpc.StatusCode]] = {
    _TILLER + "Generate": GENERATE_OK,
    _TILLER + "GenerateStream": GENERATE_OK,
    _TILLER + "SubmitFeedback": FEEDBACK_OK,
    _TILLER + "ListAdapters": READ_OK | {C.INVALID_ARGUMENT},
    _TILLER + "GetServerStatus": READ_OK | {C.INVALID_ARGUMENT},
    _ADMIN + "LoadAdapter": ADMIN_OK,
    _ADMIN + "ActivateAdapter": ADMIN_OK,
    _ADMIN + "RollbackAdapter": ADMIN_OK,
}


@pytest.fixture(scope="module")
def channel(target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target) as ch:
        yield ch


@pytest.fixture(scope="module", autouse=True)
def bystander(target: str, server: ServerProc) -> Iterator[None]:
    """Another client, served throughout the module; checked (and the process) at the end."""
    stop = threading.Event()
    served: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        with Client(target, timeout=120) as c:
            while not stop.is_set():
                try:
                    served.append(c.generate("bystander", max_tokens=2).completion_tokens)
                except BaseException as e:  # recorded and asserted below
                    errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield
    stop.set()
    t.join(timeout=120)
    assert not errors, errors[:3]
    assert served and all(n > 0 for n in served)
    assert server.proc.poll() is None, "the server died"
    with grpc.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def _status(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return C.OK


@FUZZ
@given(req=generate_requests())
def test_generate(channel: grpc.Channel, req: pb.GenerateRequest) -> None:
    stub = pb_grpc.TillerStub(channel)
    code = _status(lambda: stub.Generate(req, timeout=120))
    assert code in GENERATE_OK, (code, req)


@FUZZ
@given(req=generate_requests())
def test_generate_stream(channel: grpc.Channel, req: pb.GenerateRequest) -> None:
    stub = pb_grpc.TillerStub(channel)
    code = _status(lambda: list(stub.GenerateStream(req, timeout=120)))
    assert code in GENERATE_OK, (code, req)


@FUZZ
@given(req=feedback_requests())
def test_submit_feedback(channel: grpc.Channel, req: pb.SubmitFeedbackRequest) -> None:
    stub = pb_grpc.TillerStub(channel)
    code = _status(lambda: stub.SubmitFeedback(req, timeout=60))
    assert code in FEEDBACK_OK, (code, req)


@FUZZ
@given(req=admin_requests)
def test_admin(channel: grpc.Channel, req: object) -> None:
    admin = pb_grpc.TillerAdminStub(channel)
    call = getattr(admin, type(req).__name__.removesuffix("Request"))
    code = _status(lambda: call(req, timeout=60))
    assert code in ADMIN_OK, (code, req)


@FUZZ
@given(method=st.sampled_from(sorted(RAW_METHODS)), payload=st.binary(max_size=512))
def test_raw_bytes(channel: grpc.Channel, method: str, payload: bytes) -> None:
    # No serializers: the bytes go out as they are.
    if method.endswith("Stream"):
        stream = channel.unary_stream(method)
        code = _status(lambda: list(stream(payload, timeout=120)))
    else:
        unary = channel.unary_unary(method)
        code = _status(lambda: unary(payload, timeout=120))
    assert code in RAW_METHODS[method], (code, method, payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # truncated varint
        b"\x0a\x05\xff\xfe\xfd\xfc\xfb",  # prompt (field 1) that is not UTF-8
        b"\x0a\x7f",  # length past the end
        b"\x07",  # field 0 / bad wire type
    ],
)
def test_unparseable_requests_are_invalid_argument(channel: grpc.Channel, payload: bytes) -> None:
    call = channel.unary_unary(_TILLER + "Generate")
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=30)
    assert info.value.code() == C.INVALID_ARGUMENT
    assert "not a valid message for Generate" in info.value.details()
