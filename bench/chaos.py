"""Randomized kill -9 of the annotator and the learner while the server serves (#9 reliability).

    python bench/chaos.py [--rounds 12] [--seed 0] [--max-wait 30]

The documented long form of the fixed-point kill tests in CI (the annotator's exactly-once
test, the learner's resume tests, the publisher's kill tests): a real ``tiller serve`` on the
tiny random Llama with a generation log and a registry, two closed-loop clients generating
(logged) throughout, ``tiller annotate`` (a length score and quantile tags) and ``tiller learn``
(active sampling, DPO, a gate, checkpoints every few steps) as processes of their own. Each
round picks the annotator or the learner at random, lets it run for a random time (up to
``--max-wait`` s) and kills its process group with SIGKILL, then starts it again. At the end
the learner is stopped with SIGTERM, the annotator drains the backlog with ``--once``, and the
script checks:

- annotations: every logged generation has exactly one annotation per provider (none lost,
  none duplicated);
- registry: every version directory verifies (manifest + sha256 of every file), the active
  version is one of them, no two versions come from the same learner iteration;
- learner: iteration numbers are unique; every promoted/rejected/published row names a version
  that exists;
- serving: no client request failed; the server serves the registry's active version;
- the log passes SQLite's integrity check.

Prints a table and writes ``bench/out/chaos.json``; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import sqlite_utils
from closed_loop import ClosedLoop

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PROMPTS = [f"tell me about item {i} and" for i in range(40)]


def tiller(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiller.client.cli", *args]


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start_server(model: Path, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = work / "server.port"
    port_file.unlink(missing_ok=True)
    cmd = tiller(
        "serve", "--model", str(model), "--port", "0", "--port-file", str(port_file),
        "--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.1",
        "--log-db", str(work / "log.sqlite"), "--registry", str(work / "registry"),
        "--registry-poll", "0.2", "--enable-admin",
    )  # fmt: skip
    proc = spawn(cmd, work / "server.log")
    deadline = time.monotonic() + 300
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((work / "server.log").read_text()[-3000:])
        time.sleep(0.2)
    target = f"127.0.0.1:{port_file.read_text().strip()}"
    from tiller.client.health import check

    while check(target, timeout=10) != 1:  # grpc.health.v1 SERVING
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((work / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    return proc, target


def write_configs(work: Path, model: Path, target: str) -> tuple[Path, Path]:
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    annotate = work / "annotate.toml"
    annotate.write_text(
        f'db = "{work / "log.sqlite"}"\nbatch_size = 8\n'
        '[[providers]]\nname = "len"\ntype = "score"\nscorer = "length"\n'
        '[[providers]]\nname = "len-tags"\ntype = "quantile"\nscorer = "length"\n'
        'mode = "global"\ntags = ["Short", "Long"]\n'
    )
    learn = work / "learn.json"
    learn.write_text(
        json.dumps(
            {
                "db": str(work / "log.sqlite"),
                "registry": str(work / "registry"),
                "workdir": str(work / "learner"),
                "model": str(model),
                "adapter": "chaos",
                "base_model": "tiny-llama",
                "server": target,
                "trigger": {"min_annotations": 8, "min_examples": 2, "poll_s": 0.2},
                "sample": {
                    "prompts_file": "prompts.txt",
                    "per_iteration": 6,
                    "n": 2,
                    "max_tokens": 8,
                },
                "data": {"kind": "pairs", "source": "score", "provider": "len"},
                "train": {
                    "objective": "dpo",
                    "lora_r": 4,
                    "lora_alpha": 8,
                    "target_modules": ["q_proj", "v_proj"],
                    "batch_size": 2,
                    "max_steps": 24,
                    "max_length": 64,
                },
                "gate": {
                    "prompts": PROMPTS[:4],
                    "scorer": "length",
                    "margin": 1000.0,
                    "sampling": {"samples": 1, "max_tokens": 8},
                },
            }
        )
    )
    return annotate, learn


def iteration_rows(db: sqlite_utils.Database) -> list[tuple[int, str, int | None]]:
    """``(iteration, status, version)`` of the chaos adapter's recorded iterations, in order."""
    from tiller.server.formats.logstore import iterations

    return [(r["iteration"], r["status"], r["version"]) for r in iterations(db, "chaos")]


def checks(work: Path, target: str, load: ClosedLoop) -> dict[str, Any]:
    from tiller.client import Client
    from tiller.server.formats import logstore
    from tiller.server.formats.manifest import load_manifest
    from tiller.server.formats.registry import list_versions, read_state, version_path

    db = sqlite_utils.Database(work / "log.sqlite")
    gens = logstore.count_generations(db)
    per_provider: dict[str, Any] = {}
    for provider in ("len", "len-tags"):
        counts = logstore.annotations_per_generation(db, provider)
        per_provider[provider] = {"exactly_once": counts.get(1, 0), "by_count": dict(counts)}
    integrity = logstore.integrity_check(db)
    rows = iteration_rows(db)
    db.close()

    registry = work / "registry"
    versions = list_versions(registry, "chaos")
    bad_versions: list[str] = []
    iterations_of: Counter[Any] = Counter()
    for v in versions:
        try:
            m = load_manifest(version_path(registry, "chaos", v))  # verifies every sha256
            iterations_of[m.extra.get("data_window", {}).get("iteration")] += 1
        except Exception as e:
            bad_versions.append(f"v{v}: {e}")
    active = read_state(registry, "chaos").active
    with Client(target) as c:
        served = {a.name: a.active_version for a in c.adapters()}.get("chaos")
    numbers = [r[0] for r in rows]
    with_version = [r for r in rows if r[1] in ("promoted", "rejected", "published")]
    result = {
        "generations": gens,
        "annotations": per_provider,
        "integrity_check": integrity,
        "versions": versions,
        "active": active,
        "served": served,
        "iterations": [{"iteration": i, "status": s, "version": v} for i, s, v in rows],
        "client_ok": len(load.done),
        "client_failed": len(load.failures),
        "client_failures": load.failures[:20],
        "checks": {
            "no annotation lost or duplicated": all(
                p["exactly_once"] == gens for p in per_provider.values()
            ),
            "log integrity_check ok": integrity == "ok",
            "every version verifies": not bad_versions,
            "one version per iteration": all(n == 1 for n in iterations_of.values()),
            "iteration numbers unique": len(numbers) == len(set(numbers)),
            "recorded versions exist": all(r[2] in versions for r in with_version),
            "server serves the active version": served == active,
            "no client request failed": not load.failures,
            "the learner made progress": bool(with_version),
        },
        "bad_versions": bad_versions,
    }
    return result


def run_rounds(
    a: argparse.Namespace, rng: random.Random, work: Path, model: Path, target: str, console: Any
) -> dict[str, Any]:
    """Load, annotator and learner; ``a.rounds`` random kills; the final drain and checks."""
    from rich.progress import track

    load = ClosedLoop(target, PROMPTS, 2, max_tokens=8, n=2).start()
    annotate_cfg, learn_cfg = write_configs(work, model, target)
    commands = {
        "annotator": tiller("annotate", "--config", str(annotate_cfg)),
        "learner": tiller("learn", "--config", str(learn_cfg), "--no-progress"),
    }
    procs = {k: spawn(cmd, work / f"{k}.log") for k, cmd in commands.items()}
    kills: list[dict[str, Any]] = []
    try:
        for r in track(range(a.rounds), description="kill -9 rounds", console=console):
            victim = rng.choice(sorted(procs))
            wait = rng.uniform(0.5, a.max_wait)
            time.sleep(wait)
            alive = procs[victim].poll() is None
            kill9(procs[victim])
            kills.append({"round": r + 1, "victim": victim, "after_s": round(wait, 2),
                          "was_running": alive})  # fmt: skip
            procs[victim] = spawn(commands[victim], work / f"{victim}.log")
        # A last stretch unharmed: until the learner recorded two more iterations (or 5 min).
        db = sqlite_utils.Database(work / "log.sqlite")
        goal, deadline = len(iteration_rows(db)) + 2, time.monotonic() + 300
        while len(iteration_rows(db)) < goal and time.monotonic() < deadline:
            time.sleep(1.0)
        db.close()
    finally:
        learner = procs["learner"]
        if learner.poll() is None:
            learner.send_signal(signal.SIGINT)
            try:
                learner.wait(timeout=120)
            except subprocess.TimeoutExpired:
                kill9(learner)
        kill9(procs["annotator"])
        load.stop()
    drain = subprocess.run(
        [*commands["annotator"], "--once", "--timeout", "300"], capture_output=True, text=True
    )
    result = checks(work, target, load) | {"kills": kills, "drain_rc": drain.returncode}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-wait", type=float, default=30.0, help="longest run before a kill (s)")
    ap.add_argument("--out", type=Path, default=OUT / "chaos.json")
    a = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from tiller.server.tools.tiny_model import build_tiny_llama

    console = Console()
    rng = random.Random(a.seed)
    work = OUT / "chaos"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    model = build_tiny_llama(Path.home() / ".cache" / "tiller" / "models" / "tiny-llama")
    server, target = start_server(model, work)
    try:
        result = run_rounds(a, rng, work, model, target, console)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            kill9(server)

    table = Table(title=f"chaos: {a.rounds} random kill -9 rounds (seed {a.seed})")
    table.add_column("check")
    table.add_column("result")
    for name, ok in result["checks"].items():
        table.add_row(name, "[green]ok[/]" if ok else "[red]FAILED[/]")
    console.print(table)
    victims = Counter(k["victim"] for k in result["kills"])
    console.print(
        f"kills: {dict(victims)}; generations {result['generations']}; client requests ok "
        f"{result['client_ok']}, failed {result['client_failed']}; "
        f"versions {result['versions']}, active {result['active']}; iterations "
        f"{[(i['iteration'], i['status']) for i in result['iterations']]}"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {a.out}")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
