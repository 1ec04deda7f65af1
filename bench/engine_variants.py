"""One engine setting, on and off: two in-process AsyncLLM engines, alternating measured phases.

Both engines start from the arguments `tiller serve` uses (as in ``serve_throughput.py``) and
are driven by the same closed-loop consumer in this process, so that the ratio isolates the
setting. Variants:

- ``tiller-engine``: Tiller's whole engine configuration (the steering model class and the
  steering and feedback-mixing logits processors) against none of it;
- ``omp1``: one OpenMP thread in the engine core (``OMP_NUM_THREADS=1``) against the default,
  which leaves the other core to the front end.

    python bench/engine_variants.py --variant tiller-engine --rounds 12 --requests 192
    python bench/engine_variants.py --variant omp1 --rounds 6 --requests 192

Prints ``VARIANT/plain tok/s ratio: X`` (ratio of medians) and the per-round ratios with their
geometric mean and 95% interval.
"""

from __future__ import annotations

import argparse
import os
import statistics
import uuid
from typing import Any

import serve_throughput as st
from tiller_ab import settings

VARIANTS = ("tiller-engine", "omp1")


def start_engine(s: st.Settings, variant: str | None) -> Any:
    """An ``AsyncLLM`` with ``s``'s engine arguments, changed as ``variant`` says."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from tiller.server.engine import engine_args

    if variant == "tiller-engine":
        return AsyncLLM.from_engine_args(engine_args(s.engine_config()))
    saved = os.environ.get("OMP_NUM_THREADS")
    if variant == "omp1":
        os.environ["OMP_NUM_THREADS"] = "1"  # read by the engine core as it is spawned
    try:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**s.engine_args()))
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


async def run(s: st.Settings, variant: str, rounds: int) -> dict[str, list[float]]:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.utils.gc_utils import freeze_gc_heap

    engines = {"plain": start_engine(s, None), variant: start_engine(s, variant)}
    freeze_gc_heap()
    tok_s: dict[str, list[float]] = {name: [] for name in engines}
    try:
        for r in range(rounds):
            order = list(engines.items())
            if r % 2:
                order.reverse()  # ABBA: both sides see the same minutes of the machine
            for name, llm in order:

                async def send(prompt: str, sampling: dict[str, Any], llm: Any = llm) -> int:
                    params = SamplingParams(**sampling, output_kind=RequestOutputKind.DELTA)
                    n = 0
                    async for out in llm.generate(prompt, params, uuid.uuid4().hex):
                        n += sum(len(c.token_ids) for c in out.outputs)
                    return n

                tokens, wall, other, _, _ = await st.drive(send, s, lambda: None, os.getpid())
                tok_s[name].append(tokens / wall)
                print(
                    f"round {r} {name}: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} "
                    f"tok/s (other processes: {other:.0f}% CPU)",
                    flush=True,
                )
    finally:
        for llm in engines.values():
            llm.shutdown()
        engines.clear()  # finalized now, not during interpreter teardown
    return tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--model", default="smollm2", help="tiny | smollm2 | PATH")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    # What `tiller serve` sets on the CPU: the model worker inside the engine-core process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    s = settings(a)
    tok_s = st.run_async(run(s, a.variant, a.rounds))
    ratios = [v / p for v, p in zip(tok_s[a.variant], tok_s["plain"], strict=True)]
    med_v, med_p = statistics.median(tok_s[a.variant]), statistics.median(tok_s["plain"])
    print(
        f"{a.variant}/plain tok/s ratio: {med_v / med_p:.2f} "
        f"({a.variant} {med_v:.1f} tok/s, plain {med_p:.1f} tok/s)"
    )
    print(f"{a.variant}/plain per round: {st.per_round(ratios)}")


if __name__ == "__main__":
    main()
