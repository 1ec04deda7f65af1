"""Hot-swap under load: 32 concurrent clients while 5 versions are published and promoted and
one is rolled back. Reports failed requests (target 0), promote -> first response served by
the new version (target < 1 s on the tiny model), and tok/s while swapping ÷ steady tok/s.

    python bench/hotswap.py [--model tiny|smollm2] [--duration 120] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from serve_throughput import process, resolve_model, run_async, wait_ready
from tqdm import tqdm

from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.publish import Release, publish
from tiller.server.formats.registry import promote, rollback
from tiller.server.tools.tiny_model import build_random_lora

TAGS = ("good", "bad")


@dataclass
class Log:
    done: list[tuple[float, float, int, int]] = field(default_factory=list)  # start,end,ver,tok
    failed: list[str] = field(default_factory=list)


async def clients(target: str, n: int, until: float, log: Log, bar: tqdm) -> None:
    from tiller.client import AsyncClient, TillerClientError

    async with AsyncClient(target, timeout=120) as c:

        async def worker(i: int) -> None:
            k = 0
            while time.monotonic() < until:
                t = time.monotonic()
                try:
                    g = await c.generate(
                        f"Request {i}.{k}: tell me",
                        adapter="detox",
                        max_tokens=32,
                        temperature=1.0,
                        seed=i * 1000 + k,
                    )
                    log.done.append((t, time.monotonic(), g.adapter_version, g.completion_tokens))
                except TillerClientError as e:
                    log.failed.append(f"{e.code.name}: {e.message}")
                k += 1
                bar.update()

        await asyncio.gather(*(worker(i) for i in range(n)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--duration", type=float, default=120.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("bench/out/hotswap.json"))
    a = p.parse_args()
    model = resolve_model(a.model)
    work = Path(tempfile.mkdtemp(prefix="tiller-hotswap-"))
    registry = work / "registry"
    release = Release(base_model=model.name, conditioning=Conditioning(tags=TAGS))
    loras = [build_random_lora(model, work / f"lora{i}", seed=i) for i in range(6)]
    publish(registry, "detox", loras[0], release)
    promote(registry, "detox", 1)
    mem = "0.1" if "tiny" in model.name else "0.3"
    cmd = [
        "python",
        "-m",
        "tiller.client.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--port-file",
        str(work / "port"),
        "--registry",
        str(registry),
        "--registry-poll",
        "0.1",
        "--no-log",
        "--gpu-memory-utilization",
        mem,
        "--max-model-len",
        "1024",
    ]
    log, swaps = Log(), []
    try:
        with process(cmd, work / "server.log") as proc:
            wait_ready((work / "port").exists, proc, work / "server.log")
            target = f"127.0.0.1:{(work / 'port').read_text().strip()}"
            start = time.monotonic()
            steady_end = start + a.duration / 3
            until = start + a.duration

            async def drive() -> None:
                with tqdm(desc="requests", unit="req") as bar:
                    load = asyncio.create_task(clients(target, a.concurrency, until, log, bar))
                    await asyncio.sleep(steady_end - time.monotonic())
                    step = (until - time.monotonic()) / 7
                    for i in range(1, 6):  # publish + promote v2..v6
                        path = await asyncio.to_thread(
                            publish, registry, "detox", loras[i], release
                        )
                        v = int(path.name[1:])
                        await asyncio.to_thread(promote, registry, "detox", v)
                        swaps.append((v, time.monotonic()))
                        await asyncio.sleep(step)
                    state = await asyncio.to_thread(rollback, registry, "detox")
                    swaps.append((int(state.active or 0), time.monotonic()))
                    await load

            run_async(drive())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = [d for d in log.done if d[1] <= steady_end]
    swapping = [d for d in log.done if d[0] >= steady_end]
    steady_tps = sum(d[3] for d in steady) / (steady_end - start)
    swap_tps = sum(d[3] for d in swapping) / (max(d[1] for d in swapping) - steady_end)
    latency, routed = [], []
    for v, t in swaps:
        served = [(end, st) for st, end, ver, _ in log.done if ver == v and end >= t]
        latency.append(min(served)[0] - t if served else float("inf"))
        # When did requests start going to the new version (the swap itself, without the
        # time a request then takes to finish)?
        starts = [st for st, _end, ver, _ in log.done if ver == v and st >= t]
        routed.append(min(starts) - t if starts else float("inf"))
    total = len(log.done) + len(log.failed)
    print(f"failed requests: {len(log.failed)} of {total} (target 0)")
    print(
        f"promote -> first response on the new version: median {statistics.median(latency):.3f}"
        f" s, max {max(latency):.3f} s over {len(latency)} swaps (target < 1 s on tiny)"
    )
    print(
        f"swapping/steady tok/s ratio: {swap_tps / steady_tps:.3f} "
        f"({swap_tps:.1f} vs {steady_tps:.1f} tok/s)"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": str(model),
                "failed": log.failed[:20],
                "requests": total,
                "swap_latency_s": latency,
                "routed_s": routed,
                "steady_tok_s": steady_tps,
                "swap_tok_s": swap_tps,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
