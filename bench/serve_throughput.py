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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from tiller.server.device import detect_dtype

SYSTEMS = ("tiller", "asyncllm", "vllm-serve", "tiller-http")
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

    def engine_args(self) -> dict[str, Any]:
        """The vLLM engine arguments that `tiller serve` starts its engine with (its defaults
        included), for both baselines; Tiller's own logits processor is not among them."""
        from vllm.platforms import current_platform

        from tiller.server.config import EngineConfig
        from tiller.server.engine import tiller_engine_kwargs

        c = EngineConfig(
            model=Path(self.model),
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_num_seqs=self.max_num_seqs,
        )
        return tiller_engine_kwargs(c, on_cpu=current_platform.is_cpu())


@dataclass
class Phase:
    system: str
    round: int
    completion_tokens: int
    wall_s: float
    other_cpu_pct: float  # CPU that processes outside the benchmark took meanwhile
    tok_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.tok_s = self.completion_tokens / self.wall_s


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cpu_ticks(root: int) -> tuple[int, int]:
    """(busy clock ticks of the whole machine, ticks used by ``root`` and its descendants)."""
    total = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    parent: dict[int, int] = {}
    used: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):  # gone meanwhile
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            parent[int(pid)], used[int(pid)] = int(stat[1]), int(stat[11]) + int(stat[12])

    def ours(pid: int) -> bool:
        while pid > 1 and pid != root:
            pid = parent.get(pid, 0)
        return pid == root

    return sum(total) - total[3] - total[4], sum(t for p, t in used.items() if ours(p))


Result = tuple[int, float, float]  # completion tokens, wall seconds, other processes' CPU %


async def drive(send: Send, s: Settings, progress: Callable[[], object], root: int) -> Result:
    """Warm up (not counted), then ``s.requests`` requests over ``s.concurrency`` streams.

    Also measures the CPU that processes outside ``root``'s tree took meanwhile (% of a core).
    """
    warm = [
        send(f"Warm-up {i}: say hello.", s.sampling(10_000 + i, 8)) for i in range(s.concurrency)
    ]
    await asyncio.gather(*warm)
    todo = iter(range(s.requests))  # shared by the workers; next() never awaits
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for i in todo:
            n = await send(PROMPTS[i % len(PROMPTS)], s.sampling(i))
            tokens += n  # not `tokens += await ...`: that reads `tokens` before the await
            progress()

    busy, own, start = *cpu_ticks(root), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(s.concurrency)))
    wall = time.perf_counter() - start
    busy_end, own_end = cpu_ticks(root)
    other = (busy_end - busy - (own_end - own)) / os.sysconf("SC_CLK_TCK") / wall * 100
    return tokens, wall, max(other, 0.0)


async def tiller_load(target: str, s: Settings, progress: Callable[[], object]) -> Result:
    from tiller.client import AsyncClient

    async with AsyncClient(target, timeout=600) as client:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            if s.unary:
                return (await client.generate(prompt, **sampling)).completion_tokens
            counted = reported = 0
            async for chunk in client.stream(prompt, **sampling):
                counted += len(chunk.token_ids)
                reported += chunk.completion_tokens if chunk.final else 0
            return reported or counted

        return await drive(send, s, progress, os.getpid())


async def openai_load(
    base: str, s: Settings, progress: Callable[[], object], model: str = "bench"
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

        return await drive(send, s, progress, os.getpid())


async def asyncllm_load(s: Settings, progress: Callable[[], object]) -> Result:
    """Runs in the worker subprocess."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.utils.gc_utils import freeze_gc_heap
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**s.engine_args()))
    freeze_gc_heap()  # as `vllm serve` does once started: the in-process baseline at its best
    try:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            kind = RequestOutputKind.FINAL_ONLY if s.unary else RequestOutputKind.DELTA
            params = SamplingParams(**sampling, output_kind=kind)
            tokens = 0
            async for out in llm.generate(prompt, params, uuid.uuid4().hex):
                tokens += sum(len(c.token_ids) for c in out.outputs)
            return tokens

        return await drive(send, s, progress, os.getppid())  # the orchestrator's tree
    finally:
        llm.shutdown()


# ------------------------------------------------------------------ subprocesses


@contextmanager
def process(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own process group (output to ``log``); the whole group dies on exit."""
    # VLLM_ENABLE_V1_MULTIPROCESSING: what `tiller serve` sets.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
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
    ]


def run_phase(system: str, rnd: int, s: Settings, work: Path) -> Phase:
    log = work / f"{system}-r{rnd}.log"
    fmt = "{desc}: {n_fmt}/{total_fmt} requests [{elapsed} since start-up]"
    with tqdm(total=s.requests, desc=f"round {rnd} {system}", bar_format=fmt, leave=False) as bar:
        if system == "tiller":
            port_file = work / f"tiller-r{rnd}.port"
            cmd = tiller_serve_cmd(s, port_file, work / f"cache-r{rnd}")
            with process(cmd, log) as proc:
                wait_ready(port_file.exists, proc, log)
                target = f"127.0.0.1:{port_file.read_text().strip()}"
                tokens, wall, other = run_async(tiller_load(target, s, bar.update))
        elif system == "tiller-http":
            port_file, http_file = work / f"http-r{rnd}.port", work / f"http-r{rnd}.http"
            cmd = tiller_serve_cmd(s, port_file, work / f"cache-http-r{rnd}", http_file)
            with process(cmd, log) as proc:
                wait_ready(port_file.exists, proc, log)  # written after the HTTP port
                base = f"http://127.0.0.1:{http_file.read_text().strip()}"
                load = openai_load(base, s, bar.update, model=Path(s.model).name)
                tokens, wall, other = run_async(load)
        elif system == "vllm-serve":
            port = free_port()
            with process(vllm_serve_cmd(s, port), log) as proc:
                base = f"http://127.0.0.1:{port}"
                wait_ready(lambda: http_ok(f"{base}/health"), proc, log)
                tokens, wall, other = run_async(openai_load(base, s, bar.update))
        else:  # asyncllm: this script again, as a worker subprocess
            result, ticks = work / f"asyncllm-r{rnd}.json", work / f"asyncllm-r{rnd}.progress"
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                json.dumps(asdict(s)),
                str(result),
                str(ticks),
            ]
            with process(cmd, log) as proc:
                while proc.poll() is None:
                    bar.update((ticks.stat().st_size if ticks.exists() else 0) - bar.n)
                    time.sleep(0.5)
            if proc.returncode != 0 or not result.exists():
                raise RuntimeError(f"asyncllm worker failed (rc={proc.returncode}), see {log}")
            tokens, wall, other = json.loads(result.read_text())
    return Phase(system, rnd, tokens, wall, other)


def worker_main(settings_json: str, out: str, ticks: str) -> None:
    s = Settings(**json.loads(settings_json))
    with open(ticks, "ab", buffering=0) as f:
        result = run_async(asyncllm_load(s, lambda: f.write(b".")))
    Path(out).write_text(json.dumps(result))


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


def report(phases: list[Phase], s: Settings, out: Path) -> None:
    median = {k: statistics.median(p.tok_s for p in phases if p.system == k) for k in SYSTEMS}
    tokens = {k: [p.completion_tokens for p in phases if p.system == k] for k in SYSTEMS}
    ratios = {k: median["tiller"] / median[k] for k in TARGETS}
    names = {"asyncllm": "AsyncLLM", "vllm-serve": "vllm-serve"}
    for k, target in TARGETS.items():
        verdict = "met" if ratios[k] >= target else "NOT met"
        print(
            f"Tiller/{names[k]} tok/s ratio: {ratios[k]:.2f} (tiller {median['tiller']:.1f} "
            f"tok/s, {k} {median[k]:.1f} tok/s; target >= {target:.2f}: {verdict})"
        )
    http = median["tiller-http"] / median["vllm-serve"]
    ratios["tiller-http/vllm-serve"] = http
    print(
        f"Tiller-HTTP/vllm-serve tok/s ratio: {http:.2f} (tiller-http "
        f"{median['tiller-http']:.1f} tok/s, vllm-serve {median['vllm-serve']:.1f} tok/s; "
        f"target >= {HTTP_TARGET:.2f}: {'met' if http >= HTTP_TARGET else 'NOT met'})"
    )
    print("completion tokens per round: " + ", ".join(f"{k} {v}" for k, v in tokens.items()))
    if len({t for v in tokens.values() for t in v}) > 1:
        print("note: systems produced different token counts (EOS); tok/s still comparable")
    if busy := [f"{p.system} r{p.round}" for p in phases if p.other_cpu_pct > 10]:
        print(f"warning: other processes took CPU during {', '.join(busy)}: figures unreliable")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = dict(settings=asdict(s), phases=[asdict(p) for p in phases], median_tok_s=median)
    out.write_text(json.dumps(dict(summary, tiller_ratio=ratios, targets=TARGETS), indent=2))
    print(f"wrote {out}")


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
    ap.add_argument("--out", type=Path, default=Path("bench/out/serve_throughput.json"))
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # SETTINGS_JSON OUT PROGRESS
    a = ap.parse_args()
    if a.worker:
        return worker_main(*a.worker)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` blocks run
    a.gpu_memory_utilization = a.gpu_memory_utilization or (0.1 if a.model == "tiny" else 0.3)
    a.model = str(resolve_model(a.model))
    a.dtype = detect_dtype(a.dtype)  # Tiller's choice for this machine, given to all three
    s = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)})
    print(
        f"{Path(a.model).name}, dtype {a.dtype}, {a.concurrency} streams, {a.requests} requests "
        f"of <= {a.max_tokens} tokens, temperature {a.temperature}, {a.rounds} round(s)"
    )
    work = a.out.parent / f"{a.out.stem}-work"  # server logs stay here for a look afterwards
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    phases: list[Phase] = []
    for rnd in range(a.rounds):
        k = rnd % len(SYSTEMS)
        for system in SYSTEMS[k:] + SYSTEMS[:k]:
            phase = run_phase(system, rnd, s, work)
            tqdm.write(
                f"round {rnd} {system}: {phase.completion_tokens} tokens in {phase.wall_s:.2f} s"
                f" = {phase.tok_s:.1f} tok/s (other processes: {phase.other_cpu_pct:.0f}% CPU)"
            )
            phases.append(phase)
    report(phases, s, a.out)


if __name__ == "__main__":
    main()
