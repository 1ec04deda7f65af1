"""Bad input gets the right status with a message naming the field; the server keeps serving."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from tiller.client import Client, TillerClientError
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

CASES = [
    ("empty prompt", dict(prompt=""), INVALID, "prompt"),
    ("blank prompt", dict(prompt="   \n"), INVALID, "prompt"),
    ("no user turn", dict(prompt=[{"role": "system", "content": "x"}]), INVALID, "chat"),
    ("bad role", dict(prompt=[{"role": "robot", "content": "x"}]), INVALID, "role"),
    ("prompt longer than context", dict(prompt="alpha beta gamma " * 2000), INVALID, "prompt"),
    ("max_tokens zero", dict(max_tokens=0), INVALID, "max_tokens"),
    ("max_tokens negative", dict(max_tokens=-5), INVALID, "max_tokens"),
    ("max_tokens over cap", dict(max_tokens=100000), EXHAUSTED, "max_tokens"),
    ("max_tokens past context", dict(prompt="word " * 300, max_tokens=1990), INVALID, "max_tokens"),
    ("temperature negative", dict(temperature=-1.0), INVALID, "temperature"),
    ("temperature nan", dict(temperature=math.nan), INVALID, "temperature"),
    ("top_p zero", dict(top_p=0.0), INVALID, "top_p"),
    ("top_p above one", dict(top_p=1.01), INVALID, "top_p"),
    ("top_k", dict(top_k=-7), INVALID, "top_k"),
    ("n too large", dict(n=5, temperature=1.0), EXHAUSTED, "n"),
    ("greedy n", dict(n=2, temperature=0.0), INVALID, "n"),
    ("repetition penalty", dict(repetition_penalty=0.0), INVALID, "repetition_penalty"),
    ("unknown adapter", dict(adapter="nope"), INVALID, "adapter 'nope'"),
    ("unloaded version", dict(adapter="detox", adapter_version=9), INVALID, "version 9"),
    ("tag on base model", dict(feedback="Lowest Toxicity"), INVALID, "feedback tag"),
    (
        "misspelt tag",
        dict(adapter="detox", feedback="Lowest Toxcity"),
        INVALID,
        "'Lowest Toxicity'",
    ),
    ("unknown mix tag", dict(adapter="detox", feedback_mix={"Nice": 1.0}), INVALID, "feedback_mix"),
    (
        "inf mix weight",
        dict(adapter="detox", feedback_mix={"Lowest Toxicity": math.inf}),
        INVALID,
        "finite",
    ),
    ("unknown attribute", dict(attributes={"humor": 0.5}), INVALID, "attribute 'humor'"),
    ("nan attribute", dict(adapter="detox", attributes={"x": math.nan}), INVALID, "attribute"),
]


@pytest.fixture(scope="module")
def client(target: str) -> Client:
    with Client(target, timeout=60) as c:
        yield c


@pytest.mark.parametrize(("name", "kwargs", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    client: Client, name: str, kwargs: dict, code: grpc.StatusCode, needle: str
) -> None:
    kw = {"prompt": "hello", "max_tokens": 4, **kwargs}
    prompt = kw.pop("prompt")
    with pytest.raises(TillerClientError) as info:
        client.generate(prompt, **kw)
    assert info.value.code == code, info.value
    assert needle in info.value.message
    # The same failure on the streaming RPC.
    with pytest.raises(TillerClientError) as info:
        list(client.stream(prompt, **kw))
    assert info.value.code == code


def test_oversized_message_is_resource_exhausted(client: Client) -> None:
    with pytest.raises(TillerClientError) as info:
        client.generate("x" * (5 * 1024 * 1024), max_tokens=1)
    assert info.value.code == EXHAUSTED


def test_request_with_no_input_at_all(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.TillerStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(), timeout=30)
    assert info.value.code() == INVALID
    assert "prompt" in info.value.details()


def test_admin_rpcs_validate(target: str, tmp_path: Path) -> None:
    with grpc.insecure_channel(target) as ch:
        admin = pb_grpc.TillerAdminStub(ch)
        cases = [
            (
                admin.LoadAdapter,
                pb.LoadAdapterRequest(name="x", path=str(tmp_path)),
                INVALID,
                "tiller-manifest.json",
            ),
            (
                admin.LoadAdapter,
                pb.LoadAdapterRequest(name="../evil", path=str(tmp_path)),
                INVALID,
                "adapter name",
            ),
            (
                admin.ActivateAdapter,
                pb.ActivateAdapterRequest(name="detox", version=9),
                INVALID,
                "version 9",
            ),
            (
                admin.RollbackAdapter,
                pb.RollbackAdapterRequest(name="nope"),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no earlier version",
            ),
        ]
        for call, req, code, needle in cases:
            with pytest.raises(grpc.RpcError) as info:
                call(req, timeout=10)
            assert info.value.code() == code and needle in info.value.details()


def test_server_still_serves_after_all_of_that(client: Client) -> None:
    g = client.generate("still alive?", max_tokens=3, temperature=0.0)
    assert g.completion_tokens > 0
