"""The images' entrypoint scripts, run outside docker exactly as the Dockerfile and compose.yaml
name them (paths under /opt/tiller mapped to this checkout), on the tiny model with temp dirs:
the server becomes healthy by the image's HEALTHCHECK command, logs to its shard and serves
/metrics; a second replica writes its own shard, and one publish into the registry is served
by both; the judge answers; the annotator labels the shard
with the shipped providers through that judge; the learner starts on the shipped config and
stops cleanly; the server drains and exits 0 on SIGTERM. The server runs with a tokens file
(TILLER_TOKENS_FILE): health stays open, admin loads only from the registry and the learner's
work directory.

The server and the judge load at the same time; the second replica starts once the judge is
stopped (never three engines at once on 2 cores).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.ports import PORT_ATTEMPTS, free_port, lost_port_race, wait_announced
from tiller.client import Client

from .files import DEPLOY, DOCKERFILES, entrypoint_command, healthcheck_command, in_repo

pytestmark = pytest.mark.integration

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
SHARD = COMPOSE["server"]["environment"]["TILLER_LOG_SHARD"]
START_TIMEOUT_S = 300.0
APP_TOKEN = "app-token-for-tests"
LEARNER_TOKEN = "learner-token-for-tests"
TOKENS = f"""
[[tokens]]
name = "app"
token = "{APP_TOKEN}"
roles = ["generate", "feedback"]

[[tokens]]
name = "learner"
token = "{LEARNER_TOKEN}"
roles = ["generate", "admin"]
"""


def image_command(dockerfile: Path = DOCKERFILES[0]) -> list[str]:
    """What the CPU image runs: its ENTRYPOINT, as files of this checkout."""
    return [
        str(in_repo(a)) if a.startswith("/") else a
        for a in entrypoint_command(dockerfile.read_text())
    ]


def image_healthcheck(dockerfile: Path = DOCKERFILES[0]) -> list[str]:
    return [str(in_repo(a)) for a in healthcheck_command(dockerfile.read_text())]


def service_command(name: str) -> list[str]:
    """What compose runs for a service: its entrypoint plus its command."""
    s = COMPOSE[name]
    return [str(in_repo(s["entrypoint"][0])), *s["entrypoint"][1:], *s.get("command", [])]


def service_healthcheck(name: str) -> list[str]:
    test = COMPOSE[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return [str(in_repo(test[1])), *test[2:]]


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)  # per process
    argvs: dict[str, list[str]] = field(default_factory=dict)
    port_races: int = 0  # judge restarts after another process took its port

    @property
    def data(self) -> Path:
        return Path(self.env["TILLER_DATA"])

    @property
    def target(self) -> str:
        return self.target_of("server")

    def target_of(self, name: str) -> str:
        return f"127.0.0.1:{self.env_of(name)['TILLER_PORT']}"

    def env_of(self, name: str) -> dict[str, str]:
        return {**self.env, **self.overrides.get(name, {})}

    @property
    def shard(self) -> Path:
        return self.data / "logs" / f"{SHARD}.sqlite"

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def start(self, name: str, argv: list[str], **env: str) -> subprocess.Popen[bytes]:
        self.overrides[name] = env
        self.argvs[name] = argv
        with (self.root / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                argv,
                env=self.env_of(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def run(self, argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, env={**self.env, **env}, capture_output=True, text=True, timeout=timeout
        )

    def wait_healthy(self, name: str, check: list[str]) -> None:
        """Wait until ``name`` answers its probe, then run ``check`` (the image's or compose's
        healthcheck command), which must exit 0. Polling happens in this process: a Python
        start-up per second would slow the engines' loading on a 2-core machine. A server
        started on port 0 is probed on the ports it announces; a judge that lost its port to
        another process is started again on a fresh one."""
        t0 = time.monotonic()
        if name.startswith("server"):
            self._resolve_ports(name)
        while not self._answers(name):
            proc = self.procs[name]
            if name == "judge" and lost_port_race(proc, self.log(name)):
                self._restart_judge()
                continue
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name)}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                raise AssertionError(f"{name} not up after {START_TIMEOUT_S} s:\n{self.log(name)}")
            time.sleep(0.5)
        r = self.run(check, timeout=30, **self.overrides.get(name, {}))
        assert r.returncode == 0, f"{check} exited {r.returncode}: {r.stdout}{r.stderr}"

    def _resolve_ports(self, name: str) -> None:
        """Record the gRPC and metrics ports a server started with port 0 has bound."""
        env = self.overrides[name]
        if self.env_of(name)["TILLER_PORT"] != "0":
            return

        def log() -> str:
            return (self.root / f"{name}.log").read_text(errors="replace")

        proc = self.procs[name]
        port = wait_announced(proc, log, "serving", START_TIMEOUT_S)
        env["TILLER_PORT"] = str(port)
        if self.env_of(name).get("TILLER_METRICS_PORT") == "0":
            env["TILLER_METRICS_PORT"] = str(wait_announced(proc, log, "metrics", 30))

    def _restart_judge(self) -> None:
        self.port_races += 1
        assert self.port_races < PORT_ATTEMPTS, self.log("judge")
        self.env["JUDGE_PORT"] = str(free_port())
        self.env["TILLER_JUDGE_URL"] = f"http://127.0.0.1:{self.env['JUDGE_PORT']}/v1"
        self.start("judge", self.argvs["judge"], **self.overrides["judge"])

    def _answers(self, name: str) -> bool:
        import grpc

        from tiller.client.health import SERVING, check

        if self.procs[name].poll() is not None:
            return False  # whatever answers on its port now is not this process
        try:
            if name.startswith("server"):
                return check(self.target_of(name), timeout=2) == SERVING
            url = f"http://127.0.0.1:{self.env['JUDGE_PORT']}/health"
            with urllib.request.urlopen(url, timeout=2):
                return True
        except (grpc.RpcError, OSError):
            return False

    def second_replica(self) -> str:
        """Start ``server-1`` (same volume and registry, its own port and log shard) once,
        after stopping the judge: on 2 cores three engines at once slow everything down."""
        if "server-1" not in self.procs:
            self.stop("judge")
            self.start(
                "server-1",
                image_command(),
                TILLER_PORT="0",
                TILLER_METRICS_PORT="0",
                TILLER_LOG_SHARD="server-1",
            )
        self.wait_healthy("server-1", image_healthcheck())
        return "server-1"

    def stop(self, name: str, timeout: float = 60.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


def base_env(root: Path, model: Path, outer: Mapping[str, str]) -> dict[str, str]:
    """The container's environment, outside docker: nothing TILLER_/JUDGE_ leaks in from the
    caller; this interpreter's `tiller` and `python` come first on PATH."""
    env = {k: v for k, v in outer.items() if not k.startswith(("TILLER_", "JUDGE_"))}
    bindir = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        PYTHON=sys.executable,
        HOME=str(root / "home"),
        TILLER_DATA=str(root / "data"),
        TILLER_CACHE_DIR=str(root / "cache"),
        TILLER_MODEL=str(model),
        TILLER_PORT="0",  # servers bind a free port and announce it (Stack._resolve_ports)
        TILLER_LOG_SHARD=SHARD,
        TILLER_METRICS_PORT="0",
        JUDGE_PORT=str(free_port()),  # vLLM needs it up front (Stack._restart_judge)
        JUDGE_DTYPE="float32",
        JUDGE_MAX_MODEL_LEN="1024",
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    env["TILLER_JUDGE_URL"] = f"http://127.0.0.1:{env['JUDGE_PORT']}/v1"
    (root / "home").mkdir(parents=True, exist_ok=True)
    return env


@pytest.fixture(scope="module")
def stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("deploy-stack")
    st = Stack(root, base_env(root, tiny_model, os.environ))
    (root / "tokens.toml").write_text(TOKENS)
    st.env.update(TILLER_TOKENS_FILE=str(root / "tokens.toml"), TILLER_LEARNER_TOKEN=LEARNER_TOKEN)
    st.start("server", image_command())
    st.start("judge", service_command("judge"))
    yield st
    for name in list(st.procs):
        st.stop(name)


def test_healthcheck_fails_without_a_server(tmp_path: Path, tiny_model: Path) -> None:
    env = {**base_env(tmp_path, tiny_model, os.environ), "TILLER_PORT": str(free_port())}
    r = subprocess.run(image_healthcheck(), env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr


def test_server_becomes_healthy(stack: Stack) -> None:
    stack.wait_healthy("server", image_healthcheck())
    r = stack.run(["tiller", "health", "--target", stack.target], timeout=30)
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stdout + r.stderr


def test_server_logs_to_its_shard_and_serves_metrics(stack: Stack) -> None:
    stack.wait_healthy("server", image_healthcheck())
    with Client(stack.target, timeout=120, token=APP_TOKEN) as c:
        for prompt in ("The movie was", "I think the food", "Service today"):
            g = c.generate(prompt, max_tokens=8, n=2, seed=1)
            assert g.logged
    with sqlite3.connect(stack.shard) as db:
        assert db.execute("select count(*) from generations").fetchone()[0] >= 6
    url = f"http://127.0.0.1:{stack.env_of('server')['TILLER_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert b"tiller_" in r.read()


async def test_tokens_and_adapter_roots_are_enforced(stack: Stack, tmp_path: Path) -> None:
    import grpc

    from tiller.client import AsyncClient, TillerClientError
    from tiller.server.formats.manifest import Manifest, write_manifest
    from tiller.server.tools.tiny_model import build_random_lora

    stack.wait_healthy("server", image_healthcheck())
    model = Path(stack.env["TILLER_MODEL"])

    def candidate(where: Path) -> Path:
        build_random_lora(model, where, seed=5)
        manifest = Manifest(name="cand", version=7, base_model=model.name, has_lora=True)
        write_manifest(where, manifest)
        return where

    inside = candidate(stack.data / "learner" / "gate" / "v0007")  # the default workdir
    outside = candidate(tmp_path / "v0007")
    async with AsyncClient(stack.target, timeout=60) as anonymous:
        with pytest.raises(TillerClientError) as e:
            await anonymous.generate("Hello", max_tokens=2)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(stack.target, timeout=60, token=APP_TOKEN) as app:
        with pytest.raises(TillerClientError) as e:
            await app.load_adapter("cand", str(inside))
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED  # no admin role
    async with AsyncClient(stack.target, timeout=60, token=LEARNER_TOKEN) as learner:
        with pytest.raises(TillerClientError) as e:
            await learner.load_adapter("cand", str(outside))
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED  # outside the adapter roots
        listing = await learner.load_adapter("cand", str(inside))
        assert "cand" in [a.name for a in listing]


def test_judge_becomes_healthy(stack: Stack) -> None:
    stack.wait_healthy("judge", service_healthcheck("judge"))
    url = f"http://127.0.0.1:{stack.env['JUDGE_PORT']}/v1/models"
    with urllib.request.urlopen(url, timeout=10) as r:
        assert b'"judge"' in r.read()


def test_annotator_labels_the_shard_with_the_shipped_providers(stack: Stack) -> None:
    stack.wait_healthy("server", image_healthcheck())
    stack.wait_healthy("judge", service_healthcheck("judge"))
    with Client(stack.target, timeout=120, token=APP_TOKEN) as c:
        assert c.generate("The soup was", max_tokens=8, n=2, seed=4).logged
    r = stack.run([*service_command("annotator"), "--once", "--timeout", "120"], timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    with sqlite3.connect(stack.shard) as db:
        n = db.execute("select count(*) from generations").fetchone()[0]
        counts = dict(db.execute("select provider, count(*) from annotations group by provider"))
    assert n >= 2
    assert counts == {"sentiment": n, "sentiment-tags": n, "judge-tags": n}


def test_a_missing_template_variable_stops_the_entrypoint(stack: Stack, tmp_path: Path) -> None:
    template = tmp_path / "annotate.toml"
    template.write_text('db = "${TILLER_NO_SUCH_SETTING}"\n')
    r = stack.run(service_command("annotator"), timeout=60, TILLER_ANNOTATE_CONFIG=str(template))
    assert r.returncode != 0
    assert "TILLER_NO_SUCH_SETTING" in r.stderr


def test_replicas_write_their_own_shards(stack: Stack) -> None:
    stack.second_replica()
    with Client(stack.target_of("server-1"), timeout=120, token=APP_TOKEN) as c:
        g = c.generate("Replica one says", max_tokens=4, seed=2)
    assert g.logged
    own = stack.data / "logs" / "server-1.sqlite"
    with sqlite3.connect(own) as one, sqlite3.connect(stack.shard) as zero:
        q = "select count(*) from generations where id = ?"
        assert one.execute(q, (g.generation_id,)).fetchone()[0] == 1
        assert zero.execute(q, (g.generation_id,)).fetchone()[0] == 0


def test_one_publish_every_replica_swaps(stack: Stack, tmp_path: Path) -> None:
    from tiller.server.formats.manifest import Conditioning
    from tiller.server.formats.publish import Release, publish
    from tiller.server.formats.registry import promote
    from tiller.server.tools.tiny_model import build_random_lora

    replicas = ("server", stack.second_replica())
    stack.wait_healthy("server", image_healthcheck())
    model = Path(stack.env["TILLER_MODEL"])
    lora = build_random_lora(model, tmp_path / "trained", seed=3)
    release = Release(
        base_model=model.name, conditioning=Conditioning(tags=("Good", "Bad")), objective="test"
    )
    registry = stack.data / "registry"  # the default the learner entrypoint publishes into
    publish(registry, "steer", lora, release)
    promote(registry, "steer", 1)
    for name in replicas:
        deadline = time.monotonic() + 60
        with Client(stack.target_of(name), timeout=60, token=APP_TOKEN) as c:
            while "steer" not in [a.name for a in c.adapters()]:
                assert time.monotonic() < deadline, stack.log(name)
                time.sleep(0.2)
            g = c.generate("Hello", adapter="steer", feedback="Good", max_tokens=4, log=False)
        assert g.adapter == "steer" and g.adapter_version == 1, name


def test_learner_starts_on_the_shipped_config_and_stops_cleanly(stack: Stack) -> None:
    stack.wait_healthy("server", image_healthcheck())
    proc = stack.start("learner", service_command("learner"), TILLER_TARGET=stack.target)
    deadline = time.monotonic() + 120
    while "learning steer" not in stack.log("learner"):
        assert proc.poll() is None, stack.log("learner")
        assert time.monotonic() < deadline, stack.log("learner")
        time.sleep(0.5)
    assert stack.stop("learner", timeout=60) == 0, stack.log("learner")
    assert (stack.data / "learner").is_dir()


def test_servers_drain_and_exit_0_on_sigterm(stack: Stack) -> None:
    for name in ("server", stack.second_replica()):
        stack.wait_healthy(name, image_healthcheck())
        assert stack.stop(name) == 0, stack.log(name)
