"""Serving throughput: Tiller gRPC and Tiller's OpenAI HTTP API vs direct AsyncLLM (in-process)
vs `vllm serve` (OpenAI HTTP).

Same model, prompts, sampling (fixed seed per request) and engine settings, N concurrent streams.
Each system runs in its own subprocess, one at a time; rounds rotate the order; medians are
reported. tok/s = completion tokens reported by the system / wall time of the measured phase
(after a short warm-up, excluding start-up). Both baselines get the engine arguments that
`tiller serve` uses, but not Tiller's own logits processor: its cost is part of what is measured.

    python bench/serve_throughput.py                        # SmolLM2-135M, 128 requests, 32 streams
    python bench/serve_throughput.py --model tiny --requests 64 --rounds 3
    python bench/serve_throughput.py --unary    # whole results: no system streams tokens
    python bench/serve_throughput.py --systems tiller,asyncllm --rounds 6 --interleave
    python bench/serve_throughput.py --systems tiller,tiller-session,asyncllm --interleave
    python bench/serve_throughput.py --pool bench/out/run1.json bench/out/run2.json

``tiller-session`` is the same server with the client's streams multiplexed over one
GenerateSession RPC (``AsyncClient(multiplex=True)``); ``tiller`` opens a GenerateStream per
request. ``tiller-blocking`` and ``tiller-blocking-session`` are the same two with the blocking
``Client``, a thread per stream; they run only when named in ``--systems``.

``--pool`` runs nothing: it pools the per-round ratios of earlier runs' JSON outputs (same
settings but the number of requests) into one geometric mean and interval.

``--interleave`` starts every system once and alternates their phases (ABBA with two), so
that both sides of a ratio see the same minutes of a machine whose speed drifts; without it each
phase gets a freshly started system. Every engine is in memory at once: two SmolLM2 engines fit
a 2-core box, four do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from tiller.server.config import EngineConfig
from tiller.server.device import detect_dtype

SYSTEMS = ("tiller", "tiller-session", "asyncllm", "vllm-serve", "tiller-http")
BLOCKING = ("tiller-blocking", "tiller-blocking-session")  # the blocking Client; on request only
ALL = (*SYSTEMS, *BLOCKING)
# a GenerateStream RPC per request, or one GenerateSession: from AsyncClient, then from Client
GRPC = ("tiller", "tiller-session", *BLOCKING)
IN_PROCESS = ("asyncllm",)  # systems whose client runs inside the front end
TARGETS = {"asyncllm": 0.95, "vllm-serve": 1.0}  # Tiller gRPC over these
HTTP_TARGET = 1.0  # Tiller HTTP over vllm-serve: the same API, the same client
_TOPICS = (
    "sourdough bread",
    "the moon landing",
    "black holes",
    "a lighthouse keeper",
    "composting",
    "the French revolution",
    "honey bees",
    "learning to juggle",
)
_FORMS = (
    "Write a short story about {}.",
    "Explain {} to a ten-year-old.",
    "List three surprising facts about {}.",
    "Write a haiku about {}.",
    "Give a two-sentence summary of {}.",
    "What would a pirate say about {}?",
)
PROMPTS = [form.format(topic) for topic in _TOPICS for form in _FORMS]  # 48 prompts
Send = Callable[[str, dict[str, Any]], Awaitable[int]]  # (prompt, sampling) -> completion tokens
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    model: str
    dtype: str
    concurrency: int
    requests: int
    max_tokens: int
    temperature: float
    seed: int
    max_model_len: int
    gpu_memory_utilization: float
    max_num_seqs: int
    tiller_log: bool
    unary: bool = False  # whole results (no streaming) in every system
    stream_interval: int = 1  # vLLM's --stream-interval, given to every system alike

    def sampling(self, i: int, max_tokens: int | None = None) -> dict[str, Any]:
        """Identical keyword names in Tiller's client, the OpenAI body and ``SamplingParams``."""
        return {
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature,
            "top_p": 1.0,
            "top_k": 0,
            "repetition_penalty": 1.0,
            "seed": self.seed + i,
        }

    def warm_up(self, i: int) -> tuple[str, dict[str, Any]]:
        """Warm-up request ``i`` (not counted): a short one, seeded apart from the measured."""
        return f"Warm-up {i}: say hello.", self.sampling(10_000 + i, 8)

    def request(self, i: int) -> tuple[str, dict[str, Any]]:
        """Measured request ``i``: its prompt and sampling, the same in every system."""
        return PROMPTS[i % len(PROMPTS)], self.sampling(i)

    def engine_config(self) -> EngineConfig:
        """The engine configuration `tiller serve` is started with here."""
        return EngineConfig(
            model=Path(self.model),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
        )

    def engine_args(self) -> dict[str, Any]:
        """The vLLM engine arguments that `tiller serve` starts its engine with (its defaults
        included), for both baselines; Tiller's own logits processor is not among them."""
        from vllm.platforms import current_platform

        from tiller.server.engine import tiller_engine_kwargs

        extra = {"stream_interval": self.stream_interval} if self.stream_interval > 1 else {}
        return tiller_engine_kwargs(self.engine_config(), on_cpu=current_platform.is_cpu(), **extra)


@dataclass
class Phase:
    system: str
    round: int
    completion_tokens: int
    wall_s: float
    other_cpu_pct: float  # CPU that processes outside the benchmark took meanwhile
    front_cpu_s: float  # CPU outside vLLM's engine cores: the serving front end and the client
    client_cpu_s: float  # the client's part of it; 0 where the client runs in the front end
    tok_s: float = field(init=False)
    front_us_per_token: float = field(init=False)
    client_us_per_token: float = field(init=False)

    def __post_init__(self) -> None:
        self.tok_s = self.completion_tokens / self.wall_s
        self.front_us_per_token = self.front_cpu_s / self.completion_tokens * 1e6
        self.client_us_per_token = self.client_cpu_s / self.completion_tokens * 1e6


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cpu_ticks(root: int) -> tuple[int, int, int, int]:
    """(busy clock ticks of the whole machine, ticks used by the measured system (``root`` and
    its descendants) and by this process (its client), the part of those outside vLLM's
    engine-core processes: the serving front end and the client, and the client's part: 0
    when the client runs inside the front end (``root`` is this process))."""
    total = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    engine: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):  # gone meanwhile
            comm, stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
            fields = stat.split()
            parent[int(pid)], used[int(pid)] = int(fields[1]), int(fields[11]) + int(fields[12])
            if comm.split("(", 1)[1].startswith("VLLM::"):
                engine.add(int(pid))

    def ours(pid: int) -> bool:
        while pid > 1 and pid != root:
            pid = parent.get(pid, 0)
        return pid == root

    me = os.getpid()
    mine = {p: t for p, t in used.items() if p == me or ours(p)}
    front = sum(t for p, t in mine.items() if p not in engine)
    client = mine.get(me, 0) if me != root else 0
    return sum(total) - total[3] - total[4], sum(mine.values()), front, client


# completion tokens, wall seconds, other processes' CPU %, CPU seconds outside the engine, the
# client's part of them
Result = tuple[int, float, float, float, float]


async def drive(send: Send, s: Settings, progress: Callable[[], object], root: int) -> Result:
    """Warm up (not counted), then ``s.requests`` requests over ``s.concurrency`` streams.

    Also measures the CPU that processes outside ``root``'s tree (the system measured) and
    this one took meanwhile (% of a core), and the CPU of those outside vLLM's engine cores
    (seconds). Idle systems started beside it (``--interleave``) count as outside.
    """
    await asyncio.gather(*(send(*s.warm_up(i)) for i in range(s.concurrency)))
    todo = iter(range(s.requests))  # shared by the workers; next() never awaits
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in todo:
            n = await send(*s.request(i))
            tokens += n  # not `tokens += await ...`: that reads `tokens` before the await
            progress()

    meter = CpuMeter(root)
    await asyncio.gather(*(worker() for _ in range(s.concurrency)))
    return meter.result(tokens)


class CpuMeter:
    """The CPU figures of one measured phase, from its start (construction) to ``result``."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.busy, self.own, self.front, self.client = cpu_ticks(root)
        self.start = time.perf_counter()

    def result(self, tokens: int) -> Result:
        wall = time.perf_counter() - self.start
        busy, own, front, client = cpu_ticks(self.root)
        tick = os.sysconf("SC_CLK_TCK")
        other = (busy - self.busy - (own - self.own)) / tick / wall * 100
        return (
            tokens,
            wall,
            max(other, 0.0),
            (front - self.front) / tick,
            (client - self.client) / tick,
        )


def drive_threads(
    send: Callable[[str, dict[str, Any]], int],
    s: Settings,
    progress: Callable[[], object],
    root: int,
) -> Result:
    """``drive`` for a blocking client: ``s.concurrency`` threads instead of tasks."""
    with ThreadPoolExecutor(s.concurrency) as pool:
        warm = [pool.submit(send, *s.warm_up(i)) for i in range(s.concurrency)]
        for f in warm:
            f.result()
        todo = iter(range(s.requests))
        lock = threading.Lock()  # over ``todo`` and ``tokens``

        def worker() -> int:
            tokens = 0
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return tokens
                tokens += send(*s.request(i))
                progress()

        meter = CpuMeter(root)
        workers = [pool.submit(worker) for _ in range(s.concurrency)]
        return meter.result(sum(f.result() for f in workers))


async def tiller_load(
    target: str, s: Settings, progress: Callable[[], object], root: int, multiplex: bool = False
) -> Result:
    from tiller.client import AsyncClient

    async with AsyncClient(target, timeout=600, multiplex=multiplex) as client:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            if s.unary:
                return (await client.generate(prompt, **sampling)).completion_tokens
            counted = reported = 0
            async for chunk in client.stream(prompt, **sampling):
                counted += len(chunk.token_ids)
                reported += chunk.completion_tokens if chunk.final else 0
            return reported or counted

        return await drive(send, s, progress, root)


def blocking_load(
    target: str, s: Settings, progress: Callable[[], object], root: int, multiplex: bool
) -> Result:
    from tiller.client import Client

    with Client(target, timeout=600, multiplex=multiplex) as client:

        def send(prompt: str, sampling: dict[str, Any]) -> int:
            counted = reported = 0
            for chunk in client.stream(prompt, **sampling):
                counted += len(chunk.token_ids)
                reported += chunk.completion_tokens if chunk.final else 0
            return reported or counted

        return drive_threads(send, s, progress, root)


async def openai_load(
    base: str, s: Settings, progress: Callable[[], object], root: int, model: str = "bench"
) -> Result:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as http:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            stream = {"stream": True, "stream_options": {"include_usage": True}}
            body = {"model": model, "prompt": prompt, **({} if s.unary else stream), **sampling}
            reported = chunks = 0
            async with http.post(f"{base}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{base}: HTTP {resp.status}: {await resp.text()}")
                if s.unary:
                    return int((await resp.json())["usage"]["completion_tokens"])
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue  # blank separators and "data: [DONE]"
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        reported = event["usage"]["completion_tokens"]
                    elif event.get("choices"):
                        chunks += 1
            return reported or chunks

        return await drive(send, s, progress, root)


async def asyncllm_worker(s: Settings, ready: Path, commands: Iterator[str]) -> None:
    """Runs in the worker subprocess: one engine (``ready`` is written once it is up), one
    measured phase per command (a result path; progress goes to ``<path>.progress``), until the
    commands end."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.utils.gc_utils import freeze_gc_heap
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**s.engine_args()))
    freeze_gc_heap()  # as `vllm serve` does once started: the in-process baseline at its best
    ready.write_text("up")
    try:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            kind = RequestOutputKind.FINAL_ONLY if s.unary else RequestOutputKind.DELTA
            params = SamplingParams(**sampling, output_kind=kind)
            tokens = 0
            async for out in llm.generate(prompt, params, uuid.uuid4().hex):
                tokens += sum(len(c.token_ids) for c in out.outputs)
            return tokens

        for command in commands:
            out = Path(command.strip())
            with open(f"{out}.progress", "ab", buffering=0) as f:
                result = await drive(send, s, lambda: f.write(b"."), os.getpid())
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.rename(out)  # whole, or not there
    finally:
        llm.shutdown()


# ------------------------------------------------------------------ subprocesses


@contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, stdin: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group (output to ``log``); the whole group dies on exit."""
    # VLLM_ENABLE_V1_MULTIPROCESSING: what `tiller serve` sets.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.stdin is not None:
            with suppress(OSError):
                proc.stdin.close()  # a worker whose commands end shuts its engine down
            with suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        proc.terminate()  # the leader shuts down its own children gracefully ...
        with suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        with suppress(ProcessLookupError):  # ... and whatever is left of its group is killed
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 600
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{proc.args!r} did not become ready (rc={proc.poll()}):\n{tail}")
        time.sleep(0.5)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _opts(**options: object) -> list[str]:
    """``--name value`` pairs; True is ``--name``, False ``--no-name``."""
    out: list[str] = []
    for key, value in options.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        else:
            out += [f"--{name}", str(value)]
    return out


def vllm_serve_cmd(s: Settings, port: int) -> list[str]:
    server = {"served_model_name": "bench", "host": "127.0.0.1", "port": port}
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *_opts(**s.engine_args(), **server),
    ]


def tiller_serve_cmd(
    s: Settings, port_file: Path, cache_dir: Path, http_port_file: Path | None = None
) -> list[str]:
    log = {} if s.tiller_log else {"no_log": True}
    http = {} if http_port_file is None else {"http_port": 0, "http_port_file": http_port_file}
    return [
        sys.executable,
        "-m",
        "tiller.client.cli",
        "serve",
        *_opts(
            model=s.model,
            dtype=s.dtype,
            port=0,
            port_file=port_file,
            max_model_len=s.max_model_len,
            gpu_memory_utilization=s.gpu_memory_utilization,
            max_num_seqs=s.max_num_seqs,
            cache_dir=cache_dir,
            **log,
            **http,
        ),
        *(["--", f"--stream-interval={s.stream_interval}"] if s.stream_interval > 1 else []),
    ]


Progress = Callable[[int], object]  # tqdm's update: requests done since the last call
Runner = Callable[[Path, Progress], Result]  # one measured phase (its files under the path)


@contextmanager
def start(system: str, s: Settings, work: Path) -> Iterator[Runner]:
    """``system`` started and ready; yields a function that runs one measured phase."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{system}.log"
    if system in (*GRPC, "tiller-http"):
        port_file, http_file = work / f"{system}.port", work / f"{system}.http"
        http = http_file if system == "tiller-http" else None
        with process(tiller_serve_cmd(s, port_file, work / f"cache-{system}", http), log) as p:
            wait_ready(port_file.exists, p, log)  # written after the HTTP port
            if http is None:
                target = f"127.0.0.1:{port_file.read_text().strip()}"
                mux = system.endswith("-session")
                if system in BLOCKING:
                    yield lambda _, bar: blocking_load(target, s, lambda: bar(1), p.pid, mux)
                else:
                    yield lambda _, bar: run_async(
                        tiller_load(target, s, lambda: bar(1), p.pid, multiplex=mux)
                    )
            else:
                base = f"http://127.0.0.1:{http.read_text().strip()}"
                name = Path(s.model).name
                yield lambda _, bar: run_async(
                    openai_load(base, s, lambda: bar(1), p.pid, model=name)
                )
    elif system == "vllm-serve":
        port = free_port()
        with process(vllm_serve_cmd(s, port), log) as p:
            base = f"http://127.0.0.1:{port}"
            wait_ready(lambda: http_ok(f"{base}/health"), p, log)
            yield lambda _, bar: run_async(openai_load(base, s, lambda: bar(1), p.pid))
    else:  # asyncllm: this script again, as a worker subprocess taking phases on stdin
        ready = work / "asyncllm.ready"
        ready.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(s)), str(ready)]
        with process(cmd, log, stdin=subprocess.PIPE) as p:
            wait_ready(ready.exists, p, log)
            assert p.stdin is not None
            pipe = p.stdin

            def phase(out: Path, bar: Progress) -> Result:
                ticks = Path(f"{out}.progress")
                died = f"asyncllm worker died (rc={{}}), see {log}"
                if p.poll() is not None:
                    raise RuntimeError(died.format(p.returncode))
                pipe.write(f"{out}\n".encode())
                pipe.flush()
                done, deadline = 0, time.monotonic() + 1800
                while not out.exists():
                    if p.poll() is not None:
                        raise RuntimeError(died.format(p.returncode))
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"asyncllm worker: no result in 30 min, see {log}")
                    now = ticks.stat().st_size if ticks.exists() else 0
                    bar(now - done)
                    done = now
                    time.sleep(0.5)
                tokens, wall, other, front, client = json.loads(out.read_text())
                return int(tokens), float(wall), float(other), float(front), float(client)

            yield phase


def _client_part(system: str, us: float) -> str:
    """The client's share of a CPU figure, where the client is a process of its own."""
    return " (client in process)" if system in IN_PROCESS else f" (client {us:.0f})"


def measure(system: str, rnd: int, s: Settings, run: Runner, work: Path) -> Phase:
    fmt = "{desc}: {n_fmt}/{total_fmt} requests [{elapsed}]"
    with tqdm(total=s.requests, desc=f"round {rnd} {system}", bar_format=fmt, leave=False) as bar:
        phase = Phase(system, rnd, *run(work / f"{system}-r{rnd}.json", bar.update))
    tqdm.write(
        f"round {rnd} {system}: {phase.completion_tokens} tokens in {phase.wall_s:.2f} s"
        f" = {phase.tok_s:.1f} tok/s, front end + client {phase.front_us_per_token:.0f} us/token"
        + _client_part(system, phase.client_us_per_token)
        + f" (other processes: {phase.other_cpu_pct:.0f}% CPU)"
    )
    return phase


def worker_main(settings_json: str, ready: str) -> None:
    s = Settings(**json.loads(settings_json))
    run_async(asyncllm_worker(s, Path(ready), iter(sys.stdin.readline, "")))


# ------------------------------------------------------------------ orchestration


def resolve_model(name: str) -> Path:
    cache = Path(os.environ.get("TILLER_CACHE_DIR", Path.home() / ".cache" / "tiller"))
    if name == "smollm2":
        from tiller.server.tools.models import prepare_smollm2

        return prepare_smollm2(cache)
    if name == "tiny":
        from tiller.server.tools.tiny_model import build_tiny_llama

        return build_tiny_llama(cache / "models" / "tiny-llama")
    return Path(name).resolve()


def paired_band(ratios: list[float]) -> dict[str, float]:
    """Geometric mean of per-round ratios and its 95% t-interval (on the log ratios): the
    rounds' spread says how far the figure can be trusted on a machine whose speed drifts."""
    from tiller.learner.stats import mean_halfwidth

    m, h = mean_halfwidth([math.log(r) for r in ratios], 0.975)
    return {"mean": math.exp(m), "low": math.exp(m - h), "high": math.exp(m + h)}


def per_round(ratios: list[float]) -> str:
    """Per-round ratios, their median and geometric mean, and its 95% interval where there are
    two rounds or more."""
    band = paired_band(ratios)
    spread = f"95% CI {band['low']:.2f}-{band['high']:.2f}" if len(ratios) > 1 else "1 round"
    return (
        ", ".join(f"{r:.2f}" for r in ratios)
        + f" (median {statistics.median(ratios):.2f}; geometric mean {band['mean']:.2f}, {spread})"
    )


def round_ratios(tok_s: Iterable[tuple[int, str, float]]) -> dict[tuple[str, str], list[float]]:
    """Each round's ratio of a Tiller gRPC side to another system in the same round (the
    spread), and of each multiplexed side to its RPC-per-stream twin; from (round, system,
    tok/s) triples."""
    rounds: dict[int, dict[str, float]] = {}
    for rnd, system, value in tok_s:
        rounds.setdefault(rnd, {})[system] = value
    out: dict[tuple[str, str], list[float]] = {}
    for ran in rounds.values():
        pairs = [(a, b) for a in GRPC for b in ran if a in ran and b not in GRPC]
        pairs += [(a, a.removesuffix("-session")) for a in GRPC if a.endswith("-session")]
        for a, b in pairs:
            if a in ran and b in ran:
                out.setdefault((a, b), []).append(ran[a] / ran[b])
    return out


def report(phases: list[Phase], s: Settings, out: Path) -> None:
    by = {k: [p for p in phases if p.system == k] for k in ALL}
    ran = [k for k in ALL if by[k]]
    median = {k: statistics.median(p.tok_s for p in by[k]) for k in ran}
    tokens = {k: [p.completion_tokens for p in by[k]] for k in ran}
    names = {"asyncllm": "AsyncLLM", "vllm-serve": "vllm-serve"}
    ratios: dict[str, float] = {}
    for side in (x for x in GRPC if x in ran):
        for k, target in ((k, t) for k, t in TARGETS.items() if k in ran):
            ratio = median[side] / median[k]
            ratios[k if side == "tiller" else f"{side}/{k}"] = ratio
            verdict = "met" if ratio >= target else "NOT met"
            print(
                f"{side.capitalize()}/{names[k]} tok/s ratio: {ratio:.2f} ({side} "
                f"{median[side]:.1f} tok/s, {k} {median[k]:.1f} tok/s; target >= {target:.2f}: "
                f"{verdict})"
            )
    if "tiller-http" in ran and "vllm-serve" in ran:
        http = median["tiller-http"] / median["vllm-serve"]
        ratios["tiller-http/vllm-serve"] = http
        print(
            f"Tiller-HTTP/vllm-serve tok/s ratio: {http:.2f} (tiller-http "
            f"{median['tiller-http']:.1f} tok/s, vllm-serve {median['vllm-serve']:.1f} tok/s; "
            f"target >= {HTTP_TARGET:.2f}: {'met' if http >= HTTP_TARGET else 'NOT met'})"
        )
    paired: dict[str, dict[str, float]] = {}
    for (a, b), per in round_ratios((p.round, p.system, p.tok_s) for p in phases).items():
        paired[f"{a}/{b}"] = paired_band(per)
        print(f"{a.capitalize()}/{b} per round: {per_round(per)}")
    front = {k: statistics.median(p.front_us_per_token for p in by[k]) for k in ran}
    client = {k: statistics.median(p.client_us_per_token for p in by[k]) for k in ran}
    print(
        "CPU outside the engine per token (front end + client, median): "
        + ", ".join(f"{k} {front[k]:.0f} us{_client_part(k, client[k])}" for k in ran)
    )
    print("completion tokens per round: " + ", ".join(f"{k} {v}" for k, v in tokens.items()))
    if len({t for v in tokens.values() for t in v}) > 1:
        print("note: systems produced different token counts (EOS); tok/s still comparable")
    if busy := [f"{p.system} r{p.round}" for p in phases if p.other_cpu_pct > 10]:
        print(f"warning: other processes took CPU during {', '.join(busy)}: figures unreliable")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(
        settings=asdict(s),
        phases=[asdict(p) for p in phases],
        median_tok_s=median,
        median_front_us_per_token=front,
        median_client_us_per_token=client,
    )
    summary.update(tiller_ratio=ratios, paired=paired, targets=TARGETS)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


# Settings that must match for rounds of different runs to be pooled (the request count may not).
_POOLED_ALIKE = ("model", "dtype", "concurrency", "max_tokens", "temperature", "tiller_log",
                 "unary", "stream_interval")  # fmt: skip


def pool(paths: list[Path]) -> None:
    """Per-round ratios of every Tiller gRPC side to every other system, pooled over runs."""
    runs = [json.loads(p.read_text()) for p in paths]
    for key in _POOLED_ALIKE:
        if len({json.dumps(r["settings"][key]) for r in runs}) > 1:
            sys.exit(f"--pool: the runs differ in {key}; only the request count may differ")
    ratios: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        triples = ((p["round"], p["system"], p["tok_s"]) for p in run["phases"])
        for pair, per in round_ratios(triples).items():
            ratios.setdefault(pair, []).extend(per)
    print(f"pooled {len(runs)} runs: {', '.join(str(p) for p in paths)}")
    for (a, b), per in ratios.items():
        band = paired_band(per)
        target = TARGETS.get(b)
        met = (
            f"; {sum(r >= target for r in per)} of {len(per)} rounds >= {target}" if target else ""
        )
        print(
            f"{a}/{b} pooled per round: {len(per)} rounds, median {statistics.median(per):.3f}; "
            f"geometric mean {band['mean']:.3f}, 95% CI {band['low']:.3f}-{band['high']:.3f}{met}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    dtypes = ["auto", "float32", "bfloat16", "float16"]
    ap.add_argument("--dtype", default="auto", choices=dtypes, help="auto: Tiller's choice")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="request i samples with seed SEED+i")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, help="default: 0.1 tiny, 0.3 others")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument(
        "--tiller-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Tiller's generation log (its default: on)",
    )
    ap.add_argument("--unary", action="store_true", help="whole results, no streaming")
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"which to run (default: {','.join(SYSTEMS)}; also {','.join(BLOCKING)})",
    )
    ap.add_argument(
        "--stream-interval", type=int, default=1, help="tokens per streamed output, every system"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve_throughput.json"))
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="start every system once, then alternate their measured phases (every engine "
        "in memory at once)",
    )
    ap.add_argument(
        "--pool",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="pool earlier runs' rounds; run nothing",
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # SETTINGS_JSON READY; stdin
    a = ap.parse_args()
    if a.worker:
        return worker_main(*a.worker)
    if a.pool:
        return pool(a.pool)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` blocks run
    a.gpu_memory_utilization = a.gpu_memory_utilization or (0.1 if a.model == "tiny" else 0.3)
    a.model = str(resolve_model(a.model))
    a.dtype = detect_dtype(a.dtype)  # Tiller's choice for this machine, given to all three
    s = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)})
    print(
        f"{Path(a.model).name}, dtype {a.dtype}, {a.concurrency} streams, {a.requests} requests "
        f"of <= {a.max_tokens} tokens, temperature {a.temperature}, {a.rounds} round(s), "
        f"stream interval {a.stream_interval}"
    )
    work = a.out.parent / f"{a.out.stem}-work"  # server logs stay here for a look afterwards
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    systems = tuple(x for x in ALL if x in a.systems.split(","))
    if a.interleave and a.gpu_memory_utilization * len(systems) > 0.95:
        ap.error(
            f"--interleave keeps {len(systems)} engines in memory at once: "
            f"{len(systems)} x --gpu-memory-utilization {a.gpu_memory_utilization} > 0.95"
        )
    if not systems or len(systems) != len(a.systems.split(",")):
        ap.error(f"--systems: a comma-separated subset of {','.join(ALL)}, got {a.systems!r}")
    order = [
        (rnd, system)
        for rnd in range(a.rounds)
        for system in systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
    ]  # rounds rotate the order: with two systems, ABBA...
    with ExitStack() as stack:
        if a.interleave:  # every system warm; phases alternate in the same minutes
            runners = {x: stack.enter_context(start(x, s, work)) for x in systems}
            phases = [measure(x, rnd, s, runners[x], work) for rnd, x in order]
        else:  # each phase in a freshly started system
            phases = []
            for rnd, x in order:
                with start(x, s, work / f"r{rnd}") as run:
                    phases.append(measure(x, rnd, s, run, work))
    report(phases, s, a.out)


if __name__ == "__main__":
    main()
