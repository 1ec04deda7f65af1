"""Steerability demonstration: a low-rank head trained to prefer tokens that contain a digit,
served by `tiller serve`, and a sweep of its weight λ (weights {base: 1-λ, digits: λ}) against
the share of generated tokens that contain a digit. Saves the curve as a PNG.

    python bench/steer_sweep.py [--model smollm2|tiny|PATH] [--lambdas -1,-0.5,0,0.5,1,2]

Monotonicity is reported for λ >= 0; negative λ flips the head's change, which is linear in h,
so off the training distribution it need not push away from the class.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from dataclasses import replace
from pathlib import Path

from serve_throughput import PROMPTS, process, resolve_model, tiller_serve_cmd, wait_ready
from tiller_ab import settings

from tiller.server.tools.heads_build import train_class_head, write_version


def digit_tokens(model: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [i for i in range(len(tok)) if any(c.isdigit() for c in tok.decode([i]))]


async def sweep(
    target: str, lambdas: list[float], cls: set[int], n: int, tokens: int
) -> list[float]:
    from tiller.client import AsyncClient

    shares = []
    async with AsyncClient(target, timeout=600) as client:
        for lam in lambdas:
            outs = await asyncio.gather(
                *[
                    client.generate(
                        p,
                        adapter="digits",
                        attributes={"base": 1.0 - lam, "digits": lam},
                        max_tokens=tokens,
                        temperature=0.0,
                    )
                    for p in PROMPTS[:n]
                ]
            )
            ids = [t for g in outs for t in g.completions[0].token_ids]
            shares.append(sum(t in cls for t in ids) / max(1, len(ids)))
            print(f"digit-token share at λ={lam:+.2f}: {shares[-1]:.3f} ({len(ids)} tokens)")
    return shares


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lambdas", default="-1,-0.5,0,0.1,0.25,0.5,1,1.5,2")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("bench/out/steer_sweep"))
    a = p.parse_args()
    model = resolve_model(a.model)
    s = settings(
        argparse.Namespace(model=str(model), dtype="auto", concurrency=1, requests=1, max_tokens=1)
    )
    s = replace(s, gpu_memory_utilization=0.1 if "tiny" in model.name else 0.15)
    a.out.mkdir(parents=True, exist_ok=True)
    version = a.out / f"{model.name}-digits"
    cls = digit_tokens(model)
    if not (version / "tiller-manifest.json").exists():
        train_class_head(model, version, "digits", cls, PROMPTS, rank=4, steps=200)
        write_version(version, "digits", 1, model.name)
    lambdas = [float(x) for x in a.lambdas.split(",")]
    port_file = a.out / "port"
    port_file.unlink(missing_ok=True)
    cmd = [
        *tiller_serve_cmd(s, port_file, a.out / "cache"),
        "--no-log",
        "--adapter",
        f"digits={version}",
    ]
    with process(cmd, a.out / "server.log") as proc:
        wait_ready(port_file.exists, proc, a.out / "server.log")
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        shares = asyncio.run(sweep(target, lambdas, set(cls), a.prompts, a.max_tokens))
    nonneg = [x for lam, x in zip(lambdas, shares, strict=True) if lam >= 0]
    monotone = all(x <= y for x, y in itertools.pairwise(nonneg))
    print(
        f"digit-share(λ={lambdas[-1]})/digit-share(λ=0) ratio: "
        f"{shares[-1] / max(shares[lambdas.index(0.0)], 1e-9):.2f} "
        f"(monotone for λ >= 0: {monotone}; {model.name})"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(lambdas, shares, marker="o")
    ax.set_xlabel("λ (weights: base 1-λ, digits λ)")
    ax.set_ylabel("share of generated tokens with a digit")
    ax.set_title(f"Attribute steering sweep ({model.name})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out / "steer_sweep.png", dpi=120)
    (a.out / "steer_sweep.json").write_text(json.dumps({"lambdas": lambdas, "shares": shares}))
    print(f"saved {a.out / 'steer_sweep.png'}")
