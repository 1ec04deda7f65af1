"""A/B two Tiller variants under the same load, in one run, alternating (shared harness).

Used by ``log_overhead.py``, ``feedback_mix.py`` and ``cpu_lora.py``: each starts `tiller serve`
with some extra options (and environment), drives ``--requests`` streamed requests over
``--concurrency`` streams with request keyword arguments of its own, and reports tok/s per
variant and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from serve_throughput import (
    Settings,
    drive,
    process,
    resolve_model,
    run_async,
    tiller_serve_cmd,
    wait_ready,
)
from tqdm import tqdm


@dataclass(frozen=True)
class Variant:
    name: str
    serve_args: tuple[str, ...] = ()
    request_kw: dict[str, Any] = field(default_factory=dict)
    tiller_log: bool = True
    env: dict[str, str] = field(default_factory=dict)  # for the server process


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def settings(a: argparse.Namespace) -> Settings:
    model = resolve_model(a.model)
    return Settings(
        model=str(model),
        dtype=a.dtype,
        concurrency=a.concurrency,
        requests=a.requests,
        max_tokens=a.max_tokens,
        temperature=1.0,
        seed=0,
        max_model_len=1024,
        gpu_memory_utilization=0.1 if "tiny" in model.name else 0.3,
        max_num_seqs=64,
        tiller_log=True,
    )


async def _load(
    target: str, s: Settings, kw: dict[str, Any], tick: Callable[[], object]
) -> tuple[int, float, float]:
    from tiller.client import AsyncClient

    async with AsyncClient(target, timeout=600) as client:

        async def send(prompt: str, sampling: dict[str, Any]) -> int:
            sampling = {k: v for k, v in sampling.items() if k != "repetition_penalty"}
            n = 0
            async for chunk in client.stream(prompt, **sampling, **kw):
                n += len(chunk.token_ids)
            return n

        return await drive(send, s, tick, os.getpid())


def run_variant(v: Variant, s: Settings, rnd: int, work: Path) -> dict[str, Any]:
    port_file = work / f"{v.name}-r{rnd}.port"
    port_file.unlink(missing_ok=True)
    cmd = [
        *tiller_serve_cmd(
            replace(s, tiller_log=v.tiller_log), port_file, work / f"cache-{v.name}-r{rnd}"
        ),
        *v.serve_args,
    ]
    log = work / f"{v.name}-r{rnd}.log"
    with (
        tqdm(total=s.requests, desc=f"round {rnd} {v.name}", leave=False) as bar,
        process(cmd, log, v.env) as proc,
    ):
        wait_ready(port_file.exists, proc, log)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        tokens, wall, other = run_async(_load(target, s, v.request_kw, bar.update))
    return {
        "variant": v.name,
        "round": rnd,
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "other_cpu_pct": other,
    }


def ab(
    title: str, a: Variant, b: Variant, s: Settings, rounds: int, target: float, out: Path
) -> float:
    """Alternate a/b for ``rounds``; print ``title: ratio`` (b over a, medians) and save JSON."""
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    phases = []
    for rnd in range(rounds):
        order = (a, b) if rnd % 2 == 0 else (b, a)
        for v in order:
            phases.append(run_variant(v, s, rnd, work))
    med = {
        v.name: statistics.median(p["tok_s"] for p in phases if p["variant"] == v.name)
        for v in (a, b)
    }
    ratio = med[b.name] / med[a.name]
    noisy = max(p["other_cpu_pct"] for p in phases)
    verdict = "met" if ratio >= target else "NOT met"
    print(
        f"{title}: {ratio:.3f} ({b.name} {med[b.name]:.1f} tok/s, {a.name} "
        f"{med[a.name]:.1f} tok/s; target >= {target}: {verdict})"
    )
    if noisy > 10:
        print(f"warning: other processes took up to {noisy:.0f}% CPU during a phase")
    out.write_text(
        json.dumps(
            {
                "settings": asdict(s),
                "phases": phases,
                "median_tok_s": med,
                "ratio": ratio,
                "target": target,
            },
            indent=2,
        )
    )
    return ratio


if __name__ == "__main__":
    sys.exit("run log_overhead.py, feedback_mix.py or cpu_lora.py")
