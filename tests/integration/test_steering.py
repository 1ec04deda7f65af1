"""Attribute steering over gRPC: a real ``tiller serve`` with heads-carrying adapter versions,
checked against the pure-torch reference (CMPO Eq 3.1), in mixed batches, with LoRA, and for
validation, defaults and the generation log."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from tests.conftest import ServerProc, start_server, stop_server
from tests.steering_reference import HeadsReference
from tiller.client import AsyncClient, Client, TillerClientError
from tiller.client.cli import main as tiller_cli
from tiller.server.formats.heads import HEADS_MANIFEST
from tiller.server.formats.manifest import Manifest, write_manifest
from tiller.server.tools.heads_build import init_heads, write_version

PROMPT = "The movie was"
GREEDY: dict[str, Any] = dict(max_tokens=12, temperature=0.0)
LOWRANK = [
    {"helpfulness": 1.0},
    {"base": 0.5, "helpfulness": 0.5},
    {"base": 1.5, "verbosity": -0.5},
    {"helpfulness": 0.8, "verbosity": 0.7},
    {"helpfulness": 0.0, "base": 1.0, "verbosity": 0.0},
    {"helpfulness": 0.0},
]
FULL = [{"tone": 1.0}, {"base": 0.5, "tone": 0.5}, {"tone": 2.0, "base": -1.0}]


@pytest.fixture(scope="module")
def versions(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiller.server.tools.tiny_model import build_random_lora

    root = tmp_path_factory.mktemp("steer-registry")
    steer = root / "steer" / "v0001"
    result = CliRunner().invoke(
        tiller_cli,
        [
            *("heads", "init", "--model", str(tiny_model), str(steer)),
            *("--attribute", "helpfulness", "--attribute", "verbosity"),
            *("--rank", "8", "--scale", "0.5", "--seed", "3"),
        ],
    )
    assert result.exit_code == 0, result.output
    # Full heads whose defaults are not the base model: requests without weights get them.
    full = root / "steerfull" / "v0001"
    init_heads(tiny_model, full, ["tone"], kind="full", scale=3.0, seed=4)
    data = json.loads((full / HEADS_MANIFEST).read_text())
    data["attributes"][0]["default_weight"] = 0.5
    data["attributes"][1]["default_weight"] = 0.5
    (full / HEADS_MANIFEST).write_text(json.dumps(data))
    write_version(full, "steerfull", 1, tiny_model.name)
    # A LoRA and heads in one version: the heads read the LoRA-adapted trunk.
    both = root / "detoxsteer" / "v0001"
    build_random_lora(tiny_model, both, seed=5)
    init_heads(tiny_model, both, ["helpfulness"], rank=4, scale=0.5, seed=6)
    write_version(both, "detoxsteer", 1, tiny_model.name)
    # A manifest naming attributes without shipping heads.
    bare = root / "bare" / "v0001"
    bare.mkdir(parents=True)
    write_manifest(bare, Manifest(name="bare", version=1, base_model="m", attributes=("humor",)))
    return {"steer": steer, "steerfull": full, "detoxsteer": both, "bare": bare}


@pytest.fixture(scope="module")
def steer_server(
    tiny_model: Path,
    versions: dict[str, Path],
    lora_versions: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProc]:
    work = tmp_path_factory.mktemp("steer-server")
    adapters = [f"{n}={p}" for n, p in versions.items()] + [f"detox={lora_versions[1]}"]
    srv = start_server(
        tiny_model,
        work,
        "--log-db",
        str(work / "log.sqlite"),
        *[a for pair in (("--adapter", x) for x in adapters) for a in pair],
    )
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.logs()[-4000:]


@pytest.fixture(scope="module")
def client(steer_server: ServerProc) -> Iterator[Client]:
    with Client(steer_server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def refs(tiny_model: Path, versions: dict[str, Path]) -> dict[str, HeadsReference]:
    return {
        "steer": HeadsReference(tiny_model, versions["steer"]),
        "steerfull": HeadsReference(tiny_model, versions["steerfull"]),
        "detoxsteer": HeadsReference(tiny_model, versions["detoxsteer"], versions["detoxsteer"]),
    }


def _ids(ref: HeadsReference) -> list[int]:
    return list(ref.tok.encode(PROMPT))


CASES = (
    [("steer", w) for w in LOWRANK]
    + [("steerfull", w) for w in FULL]
    + [("detoxsteer", {"helpfulness": 1.0}), ("detoxsteer", {"base": 2.0, "helpfulness": -1.0})]
)


@pytest.mark.parametrize(("adapter", "weights"), CASES, ids=[f"{a}-{w}" for a, w in CASES])
def test_greedy_steering_matches_the_reference(
    client: Client, refs: dict[str, HeadsReference], adapter: str, weights: dict[str, float]
) -> None:
    g = client.generate(PROMPT, adapter=adapter, attributes=weights, **GREEDY)
    got = g.completions[0].token_ids
    # All-zero weights give all-zero logits: a uniform distribution whose greedy pick is id 0
    # (end of text for the tiny model), so that request stops at once.
    assert len(got) == (1 if not any(weights.values()) else 12)
    refs[adapter].check(_ids(refs[adapter]), weights, got)


@pytest.mark.parametrize(("adapter", "weights"), [("steer", LOWRANK[2]), ("steerfull", FULL[2])])
def test_logprobs_are_the_steered_distribution(
    client: Client, refs: dict[str, HeadsReference], adapter: str, weights: dict[str, float]
) -> None:
    """Served logprobs are those of Σ_j λ_j·h·W_j (what was sampled from), not the base's."""
    g = client.generate(PROMPT, adapter=adapter, attributes=weights, logprobs=2, **GREEDY)
    c = g.completions[0]
    assert [t.token_id for t in c.logprobs] == list(c.token_ids)
    assert all(len(t.top) == 2 for t in c.logprobs)
    refs[adapter].check(_ids(refs[adapter]), weights, c.token_ids, [t.logprob for t in c.logprobs])


def test_steering_changes_the_output(client: Client) -> None:
    outs = {
        client.generate(PROMPT, adapter="steer", attributes=w, **GREEDY).completions[0].token_ids
        for w in LOWRANK[:4]
    }
    assert len(outs) >= 3


def test_base_one_hot_is_byte_identical_to_the_base_model(client: Client) -> None:
    for kw in (dict(temperature=0.0), dict(temperature=1.0, seed=11)):
        plain = client.generate(PROMPT, max_tokens=20, **kw)
        steered = client.generate(
            PROMPT, adapter="steer", attributes={"base": 1.0}, max_tokens=20, **kw
        )
        assert steered.completions[0].token_ids == plain.completions[0].token_ids
        assert steered.text.encode() == plain.text.encode()


def test_manifest_defaults_apply_when_a_request_gives_none(
    client: Client, refs: dict[str, HeadsReference]
) -> None:
    default = client.generate(PROMPT, adapter="steerfull", **GREEDY)
    explicit = client.generate(
        PROMPT, adapter="steerfull", attributes={"base": 0.5, "tone": 0.5}, **GREEDY
    )
    plain = client.generate(PROMPT, **GREEDY)
    assert default.completions[0].token_ids == explicit.completions[0].token_ids
    assert default.completions[0].token_ids != plain.completions[0].token_ids
    refs["steerfull"].check(_ids(refs["steerfull"]), {}, default.completions[0].token_ids)


def test_stream_equals_unary(client: Client) -> None:
    w = {"base": 1.5, "verbosity": -0.5}
    unary = client.generate(PROMPT, adapter="steer", attributes=w, **GREEDY)
    chunks = list(client.stream(PROMPT, adapter="steer", attributes=w, **GREEDY))
    assert tuple(t for c in chunks for t in c.token_ids) == unary.completions[0].token_ids


async def test_mixed_batch_gives_each_request_its_solo_output(steer_server: ServerProc) -> None:
    """Different λ per request, heads with and without LoRA, unsteered requests (base, LoRA),
    sampled ones: all in flight together, each equals its solo run."""
    jobs: list[dict[str, Any]] = [
        dict(adapter="steer", attributes=LOWRANK[0], **GREEDY),
        dict(adapter="steer", attributes=LOWRANK[2], **GREEDY),
        dict(adapter="steer", attributes=LOWRANK[3], max_tokens=12, temperature=1.0, seed=9),
        dict(adapter="steerfull", attributes=FULL[1], **GREEDY),
        dict(adapter="steerfull", **GREEDY),
        dict(adapter="detoxsteer", attributes={"helpfulness": 1.0}, **GREEDY),
        dict(adapter="detox", feedback="Lowest Toxicity", **GREEDY),
        dict(**GREEDY),
        dict(max_tokens=12, temperature=1.0, seed=9),
    ]
    async with AsyncClient(steer_server.target, timeout=120) as ac:
        solo = [(await ac.generate(PROMPT, **j)).completions[0].token_ids for j in jobs]
        for _ in range(2):
            together = await asyncio.gather(*[ac.generate(PROMPT, **j) for j in jobs * 2])
            assert [g.completions[0].token_ids for g in together] == solo * 2


@pytest.mark.parametrize(
    ("kwargs", "code", "needle"),
    [
        (
            dict(adapter="steer", attributes={"humor": 0.5}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown attribute 'humor'; adapter 'steer@v1' accepts: 'base', 'helpfulness', "
            "'verbosity'",
        ),
        (
            dict(adapter="steer", attributes={"helpfulness": math.nan}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "attributes['helpfulness'] must be a finite number",
        ),
        (
            dict(adapter="steer", attributes={"helpfulness": math.inf}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
        (
            dict(adapter="steer", attributes={"verbosity": -10.5}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside [-10.0, 10.0]",
        ),
        (
            dict(attributes={"helpfulness": 1.0}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "it has no steering heads",
        ),
        (
            dict(adapter="bare", attributes={"humor": 1.0}),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ships no steering heads",
        ),
    ],
    ids=["unknown", "nan", "inf", "bound", "no-heads", "manifest-without-heads"],
)
def test_bad_attributes(
    client: Client, kwargs: dict[str, Any], code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(TillerClientError) as info:
        client.generate(PROMPT, max_tokens=4, **kwargs)
    assert info.value.code == code, info.value.message
    assert needle in info.value.message


def test_the_log_records_the_weights_applied(client: Client, steer_server: ServerProc) -> None:
    given = client.generate(
        PROMPT, adapter="steer", attributes={"helpfulness": 0.8, "verbosity": -0.3}, max_tokens=4
    )
    default = client.generate(PROMPT, adapter="steerfull", max_tokens=4)
    db = steer_server.log.parent / "log.sqlite"
    with sqlite3.connect(db) as conn:
        rows = dict(
            conn.execute(
                "SELECT id, attributes_json FROM generations WHERE id IN (?, ?)",
                (given.completions[0].generation_id, default.completions[0].generation_id),
            ).fetchall()
        )
    assert json.loads(rows[given.completions[0].generation_id]) == {
        "base": 0.0,
        "helpfulness": 0.8,
        "verbosity": -0.3,
    }
    assert json.loads(rows[default.completions[0].generation_id]) == {"base": 0.5, "tone": 0.5}


def test_cli_attr(client: Client, steer_server: ServerProc) -> None:
    want = client.generate(
        PROMPT, adapter="steer", attributes={"base": 1.5, "verbosity": -0.5}, **GREEDY
    )
    result = CliRunner().invoke(
        tiller_cli,
        [
            *("generate", "--raw", PROMPT, "--target", steer_server.target, "--adapter", "steer"),
            *("--attr", "base=1.5", "--attr", "verbosity=-0.5", "--max-tokens", "12"),
            *("--temperature", "0", "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["completions"][0]["text"] == want.text
