"""Past one server, on one host: two replicas with a log shard each and one annotator per shard,
one learner reading both shards. The learner's data spans both shards, and both replicas
serve each promoted version (hot-swapped from the shared registry) with no failed request."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import Client, TillerClientError
from tiller.server.formats.logstore import connect, iterations, open_readonly

PROMPTS = [f"Tell me about item number {i}." for i in range(6)]
LEARNER = """\
db = "{root}/learner.sqlite"
shards = ["{root}/shards/*.sqlite"]
registry = "{root}/registry"
workdir = "{root}/work"
model = "{model}"
adapter = "critic"
base_model = "tiny-llama"
server = "{server}"
max_iterations = 2
[train]
objective = "dpo"
lora_r = 4
lora_alpha = 8
target_modules = ["q_proj", "v_proj"]
batch_size = 4
max_steps = 2
max_length = 64
[data]
kind = "pairs"
source = "score"
provider = "len"
on_policy = false
[trigger]
min_annotations = 8
min_examples = 2
poll_s = 0.2
"""
ANNOTATOR = """\
db = "{db}"
batch_size = 64
poll_interval_s = 0.2
[[providers]]
name = "len"
type = "score"
scorer = "length"
"""


def _tiller(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tiller.client.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="module")
def replicas(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, server: object
) -> Iterator[tuple[Path, list[ServerProc]]]:
    # `server` (the session one) first: engines never start concurrently on 2 cores.
    root = tmp_path_factory.mktemp("replicas")
    (root / "shards").mkdir()
    (root / "registry").mkdir()
    srvs: list[ServerProc] = []
    try:
        for name in ("replica-0", "replica-1"):
            srvs.append(
                start_server(
                    tiny_model,
                    root / name,
                    *("--log-db", str(root / "shards" / f"{name}.sqlite")),
                    *("--registry", str(root / "registry"), "--registry-poll", "0.2"),
                    http=False,
                )
            )
        yield root, srvs
    finally:
        for s in srvs:
            stop_server(s)


def _active(target: str) -> int:
    with Client(target, timeout=30) as c:
        return next((a.active_version for a in c.adapters() if a.name == "critic"), 0)


def _wait_served(srvs: list[ServerProc], version: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while any(_active(s.target) < version for s in srvs):
        assert time.monotonic() < deadline, f"v{version} not served by every replica"
        time.sleep(0.2)


class Load:
    """Closed-loop requests for ``critic`` on every replica; counts failures and versions."""

    def __init__(self, srvs: list[ServerProc]) -> None:
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.versions: dict[str, set[int]] = {s.target: set() for s in srvs}
        self.threads = [threading.Thread(target=self._run, args=(s.target,)) for s in srvs]

    def _run(self, target: str) -> None:
        with Client(target, timeout=60) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    g = c.generate(
                        PROMPTS[i % len(PROMPTS)],
                        adapter="critic",
                        n=2,
                        temperature=1.0,
                        max_tokens=6,
                    )
                    self.versions[target].add(g.adapter_version)
                except TillerClientError as e:
                    self.failures.append(f"{target}: {e.code.name} {e.message}")
                i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def test_one_learner_learns_from_every_shard_and_every_replica_serves_it(
    replicas: tuple[Path, list[ServerProc]], tiny_model: Path
) -> None:
    root, srvs = replicas
    shards = {s.target: root / "shards" / f"replica-{i}.sqlite" for i, s in enumerate(srvs)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, shard in enumerate(shards.values()):  # one annotator per shard, as a sidecar
            cfg = root / f"annotator-{i}.toml"
            cfg.write_text(ANNOTATOR.format(db=shard))
            procs.append(_tiller("annotate", "--config", str(cfg), log=root / f"ann-{i}.log"))
        for s in srvs:  # user traffic on both replicas: each shard gets generations
            with Client(s.target, timeout=60) as c:
                for p in PROMPTS:
                    c.generate(p, n=2, temperature=1.0, max_tokens=8)
        learn_cfg = root / "learn.toml"
        learn_cfg.write_text(LEARNER.format(root=root, model=tiny_model, server=srvs[0].target))
        learner = _tiller("learn", "--config", str(learn_cfg), "--no-progress",
                          log=root / "learner.log")  # fmt: skip
        procs.append(learner)
        _wait_served(srvs, 1)
        with Load(srvs) as load:  # v1 -> v2 swaps on both replicas under load
            assert learner.wait(timeout=600) == 0, (root / "learner.log").read_text()[-3000:]
            _wait_served(srvs, 2)
            time.sleep(1.0)  # both replicas answer on v2 for a while
        assert load.failures == [], load.failures[:5]
        for target, seen in load.versions.items():
            assert 2 in seen, f"{target} never served v2 ({seen})"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)

    # The first iteration's data holds generations from both shards.
    owner = {}
    for target, shard in shards.items():
        for (gid,) in open_readonly(shard).execute("SELECT id FROM generations").fetchall():
            owner[gid] = target
    pairs = [json.loads(x) for x in (root / "work" / "iter-0001" / "data.jsonl").open()]
    used = {owner[p[k]] for p in pairs for k in ("chosen_id", "rejected_id")}
    assert used == set(shards), f"iteration 1 trained on generations of {used} only"
    # The learner recorded per-shard cursors in its own file, never in a shard.
    recs = iterations(connect(root / "learner.sqlite"), "critic")
    assert [r["status"] for r in recs] == ["promoted", "promoted"]
    cursors = json.loads(recs[-1]["details_json"])["shard_cursors"]
    assert set(cursors) == {"replica-0", "replica-1"} and all(v > 0 for v in cursors.values())
    for shard in shards.values():
        assert iterations(open_readonly(shard)) == []
