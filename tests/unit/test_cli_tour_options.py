"""The newcomer-facing CLI pieces that need no server: vLLM's log level under Tiller's, the
word lists of ``tiller heads lexical``, and ``tiller generate``'s option checks."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tiller.client.cli import main as tiller_cli
from tiller.server import logsetup
from tiller.server.config import ObservabilityConfig
from tiller.server.tools.heads_cli import heads


@pytest.mark.parametrize(
    ("tiller", "vllm"),
    [("DEBUG", "DEBUG"), ("INFO", "WARNING"), ("WARNING", "WARNING"), ("ERROR", "ERROR")],
)
def test_vllm_logs_from_warning_unless_debug(tiller: str, vllm: str) -> None:
    assert logsetup.vllm_level(tiller) == vllm


def test_a_level_the_user_set_for_vllm_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "info")
    assert logsetup.set_vllm_level("ERROR") == "INFO"
    monkeypatch.delenv("VLLM_LOGGING_LEVEL")
    assert logsetup.set_vllm_level("INFO") == "WARNING"
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"


def test_configure_sets_the_vllm_logger_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("vllm").level)
    try:
        logsetup.configure(ObservabilityConfig(log_format="json", log_level="INFO"))
        assert logging.getLogger("vllm").getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("tiller.server.app").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:], _, _ = saved
        root.setLevel(saved[1])
        logging.getLogger("vllm").setLevel(saved[2])
        monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ("ocean", "expected NAME=WORD"),
        ("ocean=", "expected NAME=WORD"),
        ("=sea,ship", "expected NAME=WORD"),
        ("base=sea", "'base' is taken"),
    ],
)
def test_lexical_word_lists_are_checked(words: str, message: str, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    r = CliRunner().invoke(
        heads, ["lexical", "--model", str(model), str(tmp_path / "out"), "--words", words]
    )
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_generate_rejects_system_with_raw() -> None:
    r = CliRunner().invoke(tiller_cli, ["generate", "--raw", "--system", "Be brief.", "hi"])
    assert r.exit_code == 2 and "--system" in r.output and "--raw" in r.output


def test_the_tour_script_reads_every_tour_command_from_the_readme(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("tour", root / "docs" / "tour.py")
    assert spec is not None and spec.loader is not None
    tour = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tour", tour)  # dataclasses look their module up
    spec.loader.exec_module(tour)
    steps = tour.tour_steps((root / "README.md").read_text())
    assert steps[0].command == "tiller up"
    assert all(s.command.startswith("tiller ") for s in steps)
    lexical = [s.command for s in steps if s.command.startswith("tiller heads lexical")]
    assert len(lexical) == 1 and " --words ocean=" in lexical[0]  # continuation joined
    assert any(s.command.endswith('--attr ocean=1 "Explain rainbows"') for s in steps)
    # every command the CLI would run is one it has
    names = {s.command.split()[1] for s in steps}
    assert names <= set(tiller_cli.list_commands(None)), names  # type: ignore[arg-type]
