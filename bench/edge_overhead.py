"""RPC edge cost: tok/s with metrics, the request time cap and JSON logs on ÷ all off (the edge
then only parses requests), same load, one run (target >= 0.97).

python bench/edge_overhead.py [--model smollm2|tiny] [--requests 96] [--rounds 2]
"""

from __future__ import annotations

from pathlib import Path

from serve_throughput import free_port
from tiller_ab import Variant, ab, parse, settings

if __name__ == "__main__":
    args = parse(__doc__ or "")
    s = settings(args)
    out = args.out or Path("bench/out/edge_overhead.json")
    ab(
        "edge on/off tok/s ratio",
        Variant("edge-off", serve_args=("--max-request-seconds", "0")),
        Variant(
            "edge-on",
            serve_args=(
                "--max-request-seconds",
                "900",
                "--metrics-port",
                str(free_port()),
                "--log-format",
                "json",
            ),
        ),
        s,
        args.rounds,
        0.97,
        out,
    )
