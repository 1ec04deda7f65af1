"""Generation log cost: tok/s with logging on ÷ off, same load, one run (target >= 0.97).

python bench/log_overhead.py [--model smollm2|tiny] [--requests 96] [--rounds 2]
"""

from __future__ import annotations

from pathlib import Path

from tiller_ab import Variant, ab, parse, settings

if __name__ == "__main__":
    args = parse(__doc__ or "")
    s = settings(args)
    out = args.out or Path("bench/out/log_overhead.json")
    ab(
        "logging on/off tok/s ratio",
        Variant("log-off", tiller_log=False),
        Variant("log-on", tiller_log=True),
        s,
        args.rounds,
        0.97,
        out,
    )
