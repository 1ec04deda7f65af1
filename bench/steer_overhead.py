"""Attribute-steering cost: tok/s of steered requests ÷ unsteered requests under the same load
(32 concurrent streams), all variants on one server in one run, rounds alternating the order.

    python bench/steer_overhead.py [--model smollm2|tiny|PATH] [--requests 96] [--rounds 2]

Figures (one line each, ratio first): k=4 low-rank heads (r=16; target >= 0.90), k=4 full
heads, k=8 low-rank heads, and 10% of the requests steered (k=4 low-rank). The unsteered
baseline runs on the same server (the steering model class is always in place; an unsteered
row costs nothing in the processor). Each line also gives the ratio of tokens per CPU-second of
this process tree (server + client), which other load on a shared machine does not skew.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from serve_throughput import cpu_ticks, drive, process, run_async, tiller_serve_cmd, wait_ready
from tiller_ab import parse, settings
from tqdm import tqdm

from tiller.server.tools.heads_build import init_heads, write_version

TARGET = 0.90


def _heads(model: Path, out: Path, k: int, kind: str) -> Path:
    if not (out / "tiller-manifest.json").exists():
        names = [f"a{i}" for i in range(k)]
        init_heads(model, out, names, kind=kind, rank=16, scale=0.05, seed=k)
        write_version(out, out.name, 1, model.name)
    return out


def _even(k: int) -> dict[str, float]:
    """Every head weighted (no zero shortcut anywhere): base 0.2, the rest share 0.8."""
    return {"base": 0.2, **{f"a{i}": 0.8 / k for i in range(k)}}


async def _load(
    target: str, s: Any, kw_for: Callable[[int], dict[str, Any]], tick: Callable[[], object]
) -> tuple[int, float, float]:
    from tiller.client import AsyncClient

    count = iter(range(10**9))
    async with AsyncClient(target, timeout=600) as client:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            sampling = {k: v for k, v in sampling.items() if k != "repetition_penalty"}
            n = 0
            async for chunk in client.stream(prompt, **sampling, **kw_for(next(count))):
                n += len(chunk.token_ids)
            return n

        return await drive(send, s, tick, os.getpid())


if __name__ == "__main__":
    args = parse(__doc__ or "")
    # A small KV cache is plenty for 32 streams of short requests; leaves memory to neighbours.
    s = replace(settings(args), gpu_memory_utilization=0.1 if "tiny" in args.model else 0.15)
    out = args.out or Path("bench/out/steer_overhead.json")
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    model = Path(s.model)
    lr4 = _heads(model, work / f"{model.name}-lr4", 4, "lowrank")
    full4 = _heads(model, work / f"{model.name}-full4", 4, "full")
    lr8 = _heads(model, work / f"{model.name}-lr8", 8, "lowrank")
    variants: dict[str, Callable[[int], dict[str, Any]]] = {
        "unsteered": lambda i: {},
        "k=4 low-rank": lambda i: {"adapter": lr4.name, "attributes": _even(4)},
        "k=4 full": lambda i: {"adapter": full4.name, "attributes": _even(4)},
        "k=8 low-rank": lambda i: {"adapter": lr8.name, "attributes": _even(8)},
        "10% steered (k=4 low-rank)": lambda i: (
            {"adapter": lr4.name, "attributes": _even(4)} if i % 10 == 0 else {}
        ),
    }
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    cmd = [
        *tiller_serve_cmd(s, port_file, work / "cache"),
        "--no-log",
        *[a for d in (lr4, full4, lr8) for a in ("--adapter", f"{d.name}={d}")],
    ]
    phases: list[dict[str, Any]] = []
    with process(cmd, work / "server.log") as proc:
        wait_ready(port_file.exists, proc, work / "server.log")
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        for rnd in range(args.rounds):
            names = list(variants) if rnd % 2 == 0 else list(reversed(variants))
            for name in names:
                own = cpu_ticks(os.getpid())[1]
                with tqdm(total=s.requests, desc=f"round {rnd} {name}", leave=False) as bar:
                    tokens, wall, other = run_async(_load(target, s, variants[name], bar.update))
                cpu_s = (cpu_ticks(os.getpid())[1] - own) / os.sysconf("SC_CLK_TCK")
                phases.append(
                    {"variant": name, "round": rnd, "tokens": tokens, "wall_s": wall}
                    | {"tok_s": tokens / wall, "other_cpu_pct": other}
                    | {"cpu_s": cpu_s, "tok_per_cpu_s": tokens / cpu_s}
                )
    med = {v: statistics.median(p["tok_s"] for p in phases if p["variant"] == v) for v in variants}
    per_cpu = {
        v: statistics.median(p["tok_per_cpu_s"] for p in phases if p["variant"] == v)
        for v in variants
    }
    base = med["unsteered"]
    ratios = {}
    for v in list(variants)[1:]:
        ratios[v] = med[v] / base
        goal = f"; target >= {TARGET}: {'met' if ratios[v] >= TARGET else 'NOT met'}"
        print(
            f"steered/unsteered tok/s ratio ({v}, r=16 where low-rank, {s.concurrency} streams, "
            f"{model.name}): {ratios[v]:.3f} ({med[v]:.1f} vs {base:.1f} tok/s; per CPU-second "
            f"of server+client: {per_cpu[v] / per_cpu['unsteered']:.3f}"
            f"{goal if v == 'k=4 low-rank' else ''})"
        )
    noisy = max(p["other_cpu_pct"] for p in phases)
    if noisy > 10:
        print(f"warning: other processes took up to {noisy:.0f}% CPU during a phase")
    out.write_text(
        json.dumps(
            {"model": str(model), "phases": phases, "median_tok_s": med, "ratios": ratios},
            indent=2,
        )
    )
