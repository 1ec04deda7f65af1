"""Hot-swap under load: concurrent clients while versions are published and promoted, and one
is rolled back. Each swap goes as in ``tiller learn``: the gate has already loaded the
candidate (admin ``LoadAdapter`` as ``detox-candidate``), then the same weights are published
and promoted, so the server reuses the candidate's LoRA and the promote only switches the route.
Every third swap is "cold" (no candidate loaded first: the server loads the weights into the
engine after the promote), the same run's baseline.

"Routed" is when the server starts routing requests to the new version: its ``hot-swapped``
log line (JSON logs, millisecond timestamps) after the promote's wall-clock time. Probe
clients sending 1-token requests back to back check it from outside: the first probe request
sent after the promote that the new version served.

Prints, for the warm swaps (targets on SmolLM2: median < 0.5 s, p99 < 1 s, 0 failed):

    promote -> first request routed to the new version: median X s, p99 Y s
    failed requests: N of M

and the cold swaps' median, promote -> first *response* on the new version, and tok/s while
swapping ÷ steady tok/s.

    python bench/hotswap.py [--model tiny|smollm2] [--swaps 20] [--duration 240]
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
from datetime import datetime
from pathlib import Path

from serve_throughput import process, resolve_model, run_async, wait_ready
from tqdm import tqdm

from tiller.server.formats.manifest import Conditioning, Manifest, write_manifest
from tiller.server.formats.publish import Release, publish
from tiller.server.formats.registry import promote, rollback
from tiller.server.tools.tiny_model import build_random_lora

TAGS = ("good", "bad")


@dataclass
class Log:
    done: list[tuple[float, float, int, int]] = field(default_factory=list)  # start,end,ver,tok
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Swap:
    version: int
    at: float  # monotonic time of the promote (or rollback)
    wall: float  # the same instant, wall clock (to match the server's log timestamps)
    warm: bool  # the candidate was loaded before the promote


async def clients(
    target: str, n: int, probes: int, until: float, log: Log, probe_log: Log, bar: tqdm
) -> None:
    from tiller.client import AsyncClient, TillerClientError

    async with AsyncClient(target, timeout=120) as c:

        async def worker(i: int, max_tokens: int, into: Log) -> None:
            k = 0
            while time.monotonic() < until:
                t = time.monotonic()
                try:
                    g = await c.generate(
                        f"Request {i}.{k}: tell me",
                        adapter="detox",
                        max_tokens=max_tokens,
                        temperature=1.0,
                        seed=i * 1000 + k,
                    )
                    into.done.append((t, time.monotonic(), g.adapter_version, g.completion_tokens))
                except TillerClientError as e:
                    into.failed.append(f"{e.code.name}: {e.message}")
                k += 1
                bar.update()

        await asyncio.gather(
            *(worker(i, 32, log) for i in range(n)),
            *(worker(n + i, 1, probe_log) for i in range(probes)),
        )


def swapped_at(server_log: str) -> list[tuple[int, float]]:
    """(version, wall time) of every ``hot-swapped`` line in the server's JSON log."""
    out = []
    for line in server_log.splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("msg", "").startswith("hot-swapped"):
            out.append((int(rec["version"]), datetime.fromisoformat(rec["ts"]).timestamp()))
    return out


def candidate(lora: Path, iteration: int, base_model: str) -> Path:
    """What the learner's gate loads: a copy of the trained adapter with a candidate manifest."""
    out = lora.parent / f"candidate{iteration}"
    shutil.copytree(lora, out)
    write_manifest(out, Manifest(name="detox-candidate", version=iteration,
                                 base_model=base_model, has_lora=True))  # fmt: skip
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--swaps", type=int, default=20, help="warm swaps (cold ones are added)")
    p.add_argument("--duration", type=float, default=240.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--probes", type=int, default=4, help="1-token probe clients")
    p.add_argument("--out", type=Path, default=Path("bench/out/hotswap.json"))
    a = p.parse_args()
    model = resolve_model(a.model)
    work = Path(tempfile.mkdtemp(prefix="tiller-hotswap-"))
    registry = work / "registry"
    release = Release(base_model=model.name, conditioning=Conditioning(tags=TAGS))
    plan = [i % 3 != 2 for i in range(a.swaps + a.swaps // 2)]  # True = warm; every third cold
    while sum(plan) < a.swaps:
        plan.append(True)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # as deploy/align/oaif-critic.toml
    loras = [
        build_random_lora(
            model, work / "trained" / f"lora{i}", seed=i, rank=16, std=0.05, targets=targets
        )
        for i in tqdm(range(len(plan) + 1), desc="adapters")
    ]
    publish(registry, "detox", loras[0], release)
    promote(registry, "detox", 1)
    mem = "0.1" if "tiny" in model.name else "0.3"
    cmd = ["python", "-m", "tiller.client.cli", "serve", "--model", str(model), "--port", "0",
           "--port-file", str(work / "port"), "--registry", str(registry), "--registry-poll",
           "0.05", "--enable-admin", "--adapter-root", str(work / "trained"), "--no-log",
           "--log-format", "json", "--gpu-memory-utilization", mem,
           "--max-model-len", "1024"]  # fmt: skip
    log, probe_log, swaps = Log(), Log(), []
    try:
        with process(cmd, work / "server.log") as proc:
            wait_ready((work / "port").exists, proc, work / "server.log")
            target = f"127.0.0.1:{(work / 'port').read_text().strip()}"
            start = time.monotonic()
            steady_end = start + a.duration / 4
            until = start + a.duration

            async def drive() -> None:
                from tiller.client import AsyncClient

                with tqdm(desc="requests", unit="req") as bar:
                    load = asyncio.create_task(
                        clients(target, a.concurrency, a.probes, until, log, probe_log, bar)
                    )
                    await asyncio.sleep(steady_end - time.monotonic())
                    step = (until - time.monotonic() - 10) / (len(plan) + 1)
                    async with AsyncClient(target, timeout=300) as admin:
                        for i, warm in enumerate(plan, start=1):
                            t0 = time.monotonic()
                            if warm:  # the gate's load, then its evaluation time passes
                                await admin.load_adapter(
                                    "detox-candidate", str(candidate(loras[i], i, model.name))
                                )
                                await admin.activate_adapter("detox-candidate", i)
                            path = await asyncio.to_thread(
                                publish, registry, "detox", loras[i], release
                            )
                            v = int(path.name[1:])
                            await asyncio.to_thread(promote, registry, "detox", v)
                            swaps.append(Swap(v, time.monotonic(), time.time(), warm))
                            await asyncio.sleep(max(0.0, step - (time.monotonic() - t0)))
                    state = await asyncio.to_thread(rollback, registry, "detox")
                    swaps.append(Swap(int(state.active or 0), time.monotonic(), time.time(), True))
                    await load

            run_async(drive())
        server_log = (work / "server.log").read_text(errors="replace")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    steady = [d for d in log.done if d[1] <= steady_end]
    swapping = [d for d in log.done if d[0] >= steady_end]
    steady_tps = sum(d[3] for d in steady) / (steady_end - start)
    swap_tps = sum(d[3] for d in swapping) / (max(d[1] for d in swapping) - steady_end)
    swapped = swapped_at(server_log)
    rows = []
    for s in swaps:
        # Routed: the server's hot-swap line for this version after the promote. Probe: the
        # first 1-token request sent after the promote that the new version served. First
        # response: the first load request served by the new version to finish.
        routed = min((w - s.wall for v, w in swapped if v == s.version and w >= s.wall - 0.01),
                     default=float("inf"))  # fmt: skip
        starts = [st for st, _e, ver, _ in probe_log.done if ver == s.version and st >= s.at]
        ends = [e for _st, e, ver, _ in log.done if ver == s.version and e >= s.at]
        rows.append({"version": s.version, "warm": s.warm, "routed_s": max(0.0, routed),
                     "probe_routed_s": min(starts) - s.at if starts else float("inf"),
                     "first_response_s": min(ends) - s.at if ends else float("inf")})  # fmt: skip
    warm = [r["routed_s"] for r in rows if r["warm"]]
    cold = [r["routed_s"] for r in rows if not r["warm"]]
    total = len(log.done) + len(log.failed) + len(probe_log.done) + len(probe_log.failed)
    failed = log.failed + probe_log.failed
    print(
        "promote -> first request routed to the new version: "
        f"median {statistics.median(warm):.3f} s, p99 {percentile(warm, 0.99):.3f} s "
        f"over {len(warm)} swaps"
    )
    print(f"failed requests: {len(failed)} of {total}")
    probe = [r["probe_routed_s"] for r in rows if r["warm"]]
    print(
        "probe: first 1-token request sent after the promote and served by the new version: "
        f"median {statistics.median(probe):.3f} s, p99 {percentile(probe, 0.99):.3f} s"
    )
    if cold:
        print(
            f"cold swaps (weights loaded after the promote): median {statistics.median(cold):.3f}"
            f" s over {len(cold)}; warm/cold median ratio "
            f"{statistics.median(warm) / statistics.median(cold):.3f}"
        )
    resp = [r["first_response_s"] for r in rows if r["warm"]]
    print(f"promote -> first response on the new version (warm): median "
          f"{statistics.median(resp):.3f} s, max {max(resp):.3f} s")  # fmt: skip
    print(
        f"swapping/steady tok/s ratio: {swap_tps / steady_tps:.3f} "
        f"({swap_tps:.1f} vs {steady_tps:.1f} tok/s)"
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": str(model),
                "failed": failed[:20],
                "requests": total,
                "swaps": rows,
                "steady_tok_s": steady_tps,
                "swap_tok_s": swap_tps,
                "server_load_lines": [ln for ln in server_log.splitlines() if "loaded " in ln],
                "swapped_at": swapped,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
