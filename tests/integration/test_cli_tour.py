"""The command line a newcomer meets, on real servers (tiny model, real vLLM, real gRPC):
``tiller generate`` sends chat turns (plain text for a model without a chat template),
``tiller chat`` keeps a conversation from piped stdin, ``tiller heads lexical`` steers toward
its words, and ``tiller serve`` / ``tiller up`` print no vLLM INFO lines by default."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import AsyncClient, Client
from tiller.client.cli import main as tiller_cli

GREEDY = ("--temperature", "0", "--max-tokens", "6")
# vLLM's text log lines: "(EngineCore pid=1) INFO 12-05 02:20:41 [file.py:1] ..."
VLLM_LINE = r"^(\(\S+ pid=\d+\) )?{} \d\d-\d\d "
VLLM_INFO = re.compile(VLLM_LINE.format("INFO"), re.MULTILINE)
WORDS = ("self", "return", "None", "import", "value", "name", "def", "True")


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiller.client.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _chat(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return _cli("chat", *args, stdin=stdin)


def _json(*args: str) -> dict:  # type: ignore[type-arg]
    r = CliRunner().invoke(tiller_cli, ["generate", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)  # type: ignore[no-any-return]


def _chat_text(model: Path, messages: list[dict[str, str]]) -> str:
    tok = AutoTokenizer.from_pretrained(model)
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_generate_sends_the_prompt_as_a_chat_turn(target: str, tiny_model: Path) -> None:
    out = _json("--target", target, *GREEDY, "How do I store basil?")
    user = {"role": "user", "content": "How do I store basil?"}
    assert out["rendered_prompt"] == _chat_text(tiny_model, [user])
    out = _json("--target", target, *GREEDY, "--system", "Be brief.", "How do I store basil?")
    system = {"role": "system", "content": "Be brief."}
    assert out["rendered_prompt"] == _chat_text(tiny_model, [system, user])
    out = _json("--target", target, *GREEDY, "--raw", "How do I store basil?")
    assert out["rendered_prompt"] == "How do I store basil?"


def test_generate_renders_a_feedback_tag_into_the_chat_turn(target: str, tiny_model: Path) -> None:
    out = _json(
        *("--target", target, *GREEDY, "--adapter", "detox", "--feedback", "Lowest Toxicity"),
        "The plot",
    )
    turn = {"role": "user", "content": "Lowest Toxicity input: The plot<|separator|>"}
    assert out["rendered_prompt"] == _chat_text(tiny_model, [turn])


def test_chat_keeps_the_conversation_and_stops_at_exit(target: str) -> None:
    r = _chat("--target", target, *GREEDY, stdin="first\n\nsecond\n/exit\nthird\n")
    assert r.returncode == 0, r.stderr[-2000:]
    opts = {"temperature": 0.0, "max_tokens": 6}
    with Client(target, timeout=120) as c:
        one = c.generate([{"role": "user", "content": "first"}], **opts).text
        turns = [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": one},
            {"role": "user", "content": "second"},
        ]
        two = c.generate(turns, **opts).text
        alone = c.generate([{"role": "user", "content": "second"}], **opts).text
    assert two != alone  # the second answer depends on the first turn: the check can fail
    assert r.stdout == f"> first\n{one}\n> second\n{two}\n"  # nothing after /exit


@pytest.fixture(scope="module")
def no_template_server(
    tiny_model: Path, server: ServerProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    """The tiny model without its chat template, served with the default log level."""
    model = tmp_path_factory.mktemp("models") / "tiny-plain"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    srv = start_server(model, tmp_path_factory.mktemp("plain"), "--no-log")
    yield srv
    stop_server(srv)


def test_a_model_without_a_chat_template_gets_plain_text(no_template_server: ServerProc) -> None:
    target = no_template_server.target
    r = _cli("generate", "--target", target, "--json", *GREEDY, "How do I store basil?")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["rendered_prompt"] == "How do I store basil?"
    assert "no chat template" in r.stderr
    r = _cli("generate", "--target", target, "--system", "Be brief.", "hi")
    assert r.returncode == 1 and "no chat template" in r.stderr
    r = _chat("--target", target, stdin="hello\n")
    assert r.returncode == 1 and "tiller generate --raw" in r.stderr


def test_serve_prints_no_vllm_info_lines_by_default(no_template_server: ServerProc) -> None:
    logs = no_template_server.logs()
    assert "tiller: serving tiny-plain on 127.0.0.1:" in logs  # Tiller's own lines stay
    assert re.search(VLLM_LINE.format("WARNING"), logs, re.MULTILINE)  # vLLM's warnings too
    assert not VLLM_INFO.search(logs), VLLM_INFO.findall(logs)[:3]


def test_up_prints_no_vllm_info_lines_by_default(
    tiny_model: Path, server: ServerProc, tmp_path: Path
) -> None:
    r = _cli(
        *("up", "--once", "--port", "0", "--model", str(tiny_model)),
        *("--gpu-memory-utilization", "0.1", "--dtype", "float32"),
        *("--max-model-len", "2048", "--cache-dir", str(tmp_path)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tiller: serving tiny-llama" in r.stdout
    assert "[feedback: 'Harmless and very helpful' · adapter feedback@v1]" in r.stdout
    both = r.stdout + r.stderr
    assert not VLLM_INFO.search(both), VLLM_INFO.findall(both)[:3]


async def test_lexical_heads_raise_their_words_with_the_weight(
    target: str, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lexical" / "v0001"
    r = CliRunner().invoke(
        tiller_cli,
        [
            *("heads", "lexical", "--model", str(tiny_model), str(out)),
            *("--words", f"code={','.join(WORDS)}", "--name", "lexical"),
            # The random tiny model's hidden states share little of a direction (h·a is about
            # 0.2 ± 0.4 where SmolLM2's is 0.8 ± 0.2): a larger boost shows the same effect.
            *("--strength", "20"),
        ],
    )
    assert r.exit_code == 0, r.output
    from tiller.server.tools.heads_build import word_token_ids

    boosted, missing = word_token_ids(AutoTokenizer.from_pretrained(tiny_model), WORDS)
    assert not missing and len(boosted) >= len(WORDS)
    async with AsyncClient(target, timeout=120) as admin:
        await admin.load_adapter("lexical", str(out))
        await admin.activate_adapter("lexical", 1)
        share = {}
        for lam in (0.0, 0.5, 1.0):
            g = await admin.generate(
                "def parse(value):",
                adapter="lexical",
                attributes={"base": 1 - lam, "code": lam},
                **{"max_tokens": 48, "temperature": 1.0, "seed": 3, "n": 4},
            )
            ids = [t for c in g.completions for t in c.token_ids]
            share[lam] = sum(t in boosted for t in ids) / len(ids)
    assert share[0.0] < share[0.5] < share[1.0], share
    assert share[1.0] > 3 * share[0.0] + 0.05, share
