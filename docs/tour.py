"""Run the README's five-minute tour as written and record what each command prints.

    python docs/tour.py            # writes docs/tour.md

Needs the CPU install (SmolLM2 prepared under ~/.cache/tiller) and ports 50051 and 50052 free.
Every line of the tour's code block runs in bash, in order, except where a terminal would
wait: ``tiller up`` and ``... &`` run in the background until the end (``tiller up`` until its
demo answer is printed); ``tiller chat`` reads ``CHAT_INPUT``; ``--follow`` runs for
``FOLLOW_S`` seconds; ``GENERATION_ID`` is the newest id in the log; ``tiller align`` (18
minutes) and what reads its run directory are listed, not run.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT_INPUT = "How do I store basil?\nAnd how long will it keep?\n/exit\n"
FOLLOW_S = 5.0
NOT_RUN = ("tiller align", "tiller learn history")
START_S = 900.0  # a server's start on SmolLM2 with 2 busy cores
# A vLLM log line and its call site: "(EngineCore pid=1) WARNING 12-05 02:29:23 [utils.py:333] "
VLLM_SITE = re.compile(r"^(?:\(\S+ pid=\d+\) )?[A-Z]+ \d\d-\d\d [\d:]+ (\[\S+:\d+\])")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


@dataclass
class Step:
    command: str
    comment: str
    output: str = ""
    seconds: float = 0.0
    note: str = ""


def tour_steps(readme: str) -> list[Step]:
    """The tour block's commands, continuation lines joined, with their trailing comments."""
    block = readme.split("## A five-minute tour", 1)[1].split("```bash\n", 1)[1]
    steps: list[Step] = []
    pending = ""
    for line in block.split("```", 1)[0].splitlines():
        code, _, comment = line.partition("  #") if not line.startswith("#") else ("", "", line)
        code = code.strip()
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        if code or pending:
            steps.append(Step(re.sub(r"\s+", " ", pending + code), comment.strip(" #")))
        pending = ""
    return steps


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_S
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"waiting for {text!r}:\n{path.read_text(errors='replace')}")
        time.sleep(0.5)


def _run(step: Step, background: list[tuple[subprocess.Popen[bytes], Path]], tmp: Path) -> None:
    cmd = step.command
    if cmd.startswith(NOT_RUN):
        step.note = "not run here (18 minutes): see docs/results/learning.md"
        return
    if "GENERATION_ID" in cmd:
        tail = _shell("tiller log tail --db ~/.cache/tiller/log/generations.sqlite -n 1")
        cmd = cmd.replace("GENERATION_ID", re.findall(r"gen-[0-9a-f]{32}", tail)[-1])
    t0 = time.monotonic()
    if cmd == "tiller up" or cmd.endswith("&"):
        log = tmp / f"bg{len(background)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", cmd.rstrip("& ")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=ENV,
                start_new_session=True,
            )
        background.append((proc, log))
        _wait_for(log, "still serving" if cmd == "tiller up" else "tiller: serving", proc)
        step.output = log.read_text(errors="replace")
        step.note = "left running in the background"
    elif "--follow" in cmd:
        proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
        time.sleep(FOLLOW_S)
        proc.send_signal(signal.SIGINT)
        step.output = proc.communicate(timeout=60)[0].decode(errors="replace")
        step.note = f"stopped after {FOLLOW_S:.0f} s"
    else:
        stdin = CHAT_INPUT if cmd.startswith("tiller chat") else None
        step.output = _shell(cmd, stdin)
        if stdin:
            step.note = "stdin: " + " | ".join(CHAT_INPUT.splitlines())
    step.seconds = time.monotonic() - t0
    if cmd != step.command:
        step.note = f"ran as `{cmd}`"


def _shell(cmd: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        ["bash", "-c", cmd],
        input=stdin,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=START_S,
    )
    out = r.stdout + r.stderr
    return out if r.returncode == 0 else f"{out}[exit status {r.returncode}]\n"


def _stop(background: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, _ in reversed(background):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def compact(output: str, keep: int = 2) -> str:
    """Runs of more than ``keep`` vLLM log lines from one call site ("[utils.py:333]") cut to
    ``keep`` and a count, so that a per-weight warning does not fill the page."""
    out: list[str] = []
    run: list[str] = []
    site = None
    for line in [*output.splitlines(), ""]:
        m = VLLM_SITE.match(line)
        this = m.group(1) if m else None
        if this is None or this != site:
            out += run[:keep]
            if len(run) > keep:
                out.append(f"[... {len(run) - keep} more lines from {site}, cut by docs/tour.py]")
            run = []
        site = this
        if this is None:
            out.append(line)
        else:
            run.append(line)
    return "\n".join(out).rstrip("\n")


def render(steps: list[Step]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "# The five-minute tour, as run",
        "",
        f"`python docs/tour.py` ran the README's tour on {datetime.now(UTC):%Y-%m-%d} "
        f"({cpu}, {os.cpu_count()} cores, no GPU); below is what each command printed, "
        "stdout and stderr as a terminal shows them.",
        "",
    ]
    for s in steps:
        lines += ["```console", f"$ {s.command}", compact(s.output), "```"]
        facts = [f"{s.seconds:.1f} s"] if s.seconds else []
        facts += [s.note] if s.note else []
        lines += [f"*{'; '.join(facts)}*", ""] if facts else [""]
    return "\n".join(lines)


def main() -> None:
    steps = tour_steps((ROOT / "README.md").read_text())
    background: list[tuple[subprocess.Popen[bytes], Path]] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for step in steps:
                print(f"$ {step.command}", file=sys.stderr, flush=True)
                _run(step, background, Path(tmp))
        finally:
            _stop(background)
    out = ROOT / "docs" / "tour.md"
    out.write_text(render(steps))
    print(out)


if __name__ == "__main__":
    main()
