"""Bounded load test on loopback: N concurrent GenerateStream clients for D seconds against a
real ``tiller serve`` (tokens on, one token capped below N so that RESOURCE_EXHAUSTED is
exercised, metrics on, log on). Samples the server's RSS (process tree) once a second.

Pass: no status other than OK and the declared RESOURCE_EXHAUSTED; RSS flat (the median of the
last quarter of the run within 10% of the second quarter's: the first quarter is warm-up).

    python bench/load_test.py [--model tiny|smollm2|DIR] [--concurrency 200] [--duration 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import free_port, process, resolve_model, run_async, wait_ready


@dataclass
class Tally:
    codes: Counter[str] = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0


def tree_rss_mib(pid: int) -> float:
    """RSS of ``pid`` and all its descendants, MiB (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total / 1024


def sample_rss(pid: int, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while not stop.wait(1.0):
        out.append((time.monotonic() - t0, tree_rss_mib(pid)))


async def drive(
    target: str, tokens: dict[str, str], n: int, capped: int, until: float, tally: Tally
) -> None:
    from tiller.client import AsyncClient, TillerClientError
    from tiller.client.client import RetryPolicy

    clients = {
        name: AsyncClient(target, token=tok, timeout=120, retry=RetryPolicy(attempts=0))
        for name, tok in tokens.items()
    }

    async def worker(i: int) -> None:
        # The first `capped` workers share the capped token; the rest use the uncapped one.
        c = clients["capped" if i < capped else "open"]
        k = 0
        while time.monotonic() < until:
            k += 1
            t = time.monotonic()
            first = None
            try:
                async for chunk in c.stream(
                    f"Load {i}.{k}: tell me a story about",
                    max_tokens=32,
                    temperature=1.0,
                    seed=i * 100_000 + k,
                ):
                    if first is None and chunk.token_ids:
                        first = time.monotonic() - t
                    tally.tokens += len(chunk.token_ids)
                tally.codes["OK"] += 1
                tally.latency.append(time.monotonic() - t)
                if first is not None:
                    tally.ttft.append(first)
            except TillerClientError as e:
                tally.codes[e.code.name] += 1
                tally.messages.setdefault(e.code.name, e.message)
                if e.code.name == "RESOURCE_EXHAUSTED":
                    await asyncio.sleep(0.05)  # a polite client backs off before retrying

    try:
        await asyncio.gather(*(worker(i) for i in range(n)))
    finally:
        for c in clients.values():
            await c.close()


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument(
        "--capped-clients", type=int, default=40, help="clients sharing the capped token"
    )
    ap.add_argument("--token-cap", type=int, default=24, help="max_concurrent of that token")
    ap.add_argument("--memory", type=float, default=0.1, help="--gpu-memory-utilization")
    ap.add_argument("--out", type=Path, default=Path("bench/out/load_test.json"))
    args = ap.parse_args()

    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="tiller-load-"))
    tokens = {"capped": secrets.token_urlsafe(24), "open": secrets.token_urlsafe(24)}
    (work / "tokens.json").write_text(
        json.dumps(
            {
                "tokens": [
                    {"name": "capped", "token": tokens["capped"], "roles": ["generate"],
                     "max_concurrent": args.token_cap},
                    {"name": "open", "token": tokens["open"], "roles": ["generate"]},
                ]
            }
        )
    )  # fmt: skip
    metrics_port = free_port()
    cmd = [
        sys.executable, "-m", "tiller.client.cli", "serve", "--model", str(model),
        "--port", "0", "--port-file", str(work / "port"), "--log-db", str(work / "log.sqlite"),
        "--tokens", str(work / "tokens.json"), "--metrics-port", str(metrics_port),
        "--max-num-seqs", "64", "--gpu-memory-utilization", str(args.memory),
    ]  # fmt: skip
    log = work / "server.log"
    with process(cmd, log) as proc:
        wait_ready(lambda: (work / "port").exists() and "serving" in log.read_text(), proc, log)
        target = f"127.0.0.1:{(work / 'port').read_text().strip()}"
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, stop, rss), daemon=True)
        rss_start = tree_rss_mib(proc.pid)
        sampler.start()
        tally = Tally()
        t0 = time.monotonic()
        run_async(
            drive(target, tokens, args.concurrency, args.capped_clients, t0 + args.duration, tally)
        )
        elapsed = time.monotonic() - t0
        stop.set()
        sampler.join()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            scraped = r.read().decode()
        alive = proc.poll() is None

    ok = tally.codes["OK"]
    bad = {k: v for k, v in tally.codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")}
    q = len(rss) // 4
    early = statistics.median(v for _, v in rss[q : 2 * q]) if q else float("nan")
    late = statistics.median(v for _, v in rss[-q:]) if q else float("nan")
    peak = max((v for _, v in rss), default=float("nan"))
    metric_ok = sum(
        float(line.rsplit(" ", 1)[1])
        for line in scraped.splitlines()
        if line.startswith('tiller_requests_total{code="OK",method="GenerateStream"}')
    )
    figures = {
        "concurrency": args.concurrency,
        "duration_s": round(elapsed, 1),
        "ok": ok,
        "resource_exhausted": tally.codes["RESOURCE_EXHAUSTED"],
        "other_errors": bad,
        "error_messages": tally.messages,
        "tokens": tally.tokens,
        "tok_per_s": round(tally.tokens / elapsed, 1),
        "streams_per_s": round(ok / elapsed, 2),
        "latency_p50_s": round(pct(tally.latency, 50), 3),
        "latency_p99_s": round(pct(tally.latency, 99), 3),
        "ttft_p50_s": round(pct(tally.ttft, 50), 3),
        "ttft_p99_s": round(pct(tally.ttft, 99), 3),
        "rss_start_mib": round(rss_start, 1),
        "rss_q2_median_mib": round(early, 1),
        "rss_q4_median_mib": round(late, 1),
        "rss_peak_mib": round(peak, 1),
        "metrics_ok_streams": metric_ok,
        "server_alive": alive,
        "rss_samples": rss,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    growth = late / early if early else float("nan")
    print(
        f"late/early RSS ratio: {growth:.3f} (q2 median {early:.0f} MiB, q4 median {late:.0f} MiB, "
        f"peak {peak:.0f} MiB, start {rss_start:.0f} MiB; target <= 1.10: "
        f"{'met' if growth <= 1.10 else 'NOT met'})"
    )
    print(
        f"undeclared errors: {sum(bad.values())} of {sum(tally.codes.values())} RPCs "
        f"(target 0) {bad or ''}"
    )
    print(
        f"RESOURCE_EXHAUSTED (declared, token cap {args.token_cap} for {args.capped_clients} "
        f"clients): {tally.codes['RESOURCE_EXHAUSTED']}"
    )
    print(
        f"completed streams: {ok} ({ok / elapsed:.1f}/s; /metrics counted {metric_ok:.0f}), "
        f"{tally.tokens / elapsed:.0f} tok/s, {args.concurrency} concurrent for {elapsed:.0f} s"
    )
    print(
        f"stream latency p50/p99: {figures['latency_p50_s']}/{figures['latency_p99_s']} s, "
        f"first token p50/p99: {figures['ttft_p50_s']}/{figures['ttft_p99_s']} s"
    )
    print(f"server alive after the run: {alive}")
    sys.exit(0 if not bad and alive and growth <= 1.10 else 1)


if __name__ == "__main__":
    main()
