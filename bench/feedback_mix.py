"""Feedback mixing cost: tok/s of 2-tag mixed requests ÷ single-tag requests under the same
concurrent load, one run (target >= 0.45: two conditions cost about twice the compute).

    python bench/feedback_mix.py [--model smollm2|tiny] [--requests 96] [--rounds 2]
"""

from __future__ import annotations

from pathlib import Path

from tiller_ab import Variant, ab, parse, settings

from tiller.server.formats.manifest import Conditioning, Manifest, write_manifest
from tiller.server.tools.models import DEFAULT_TAGS

if __name__ == "__main__":
    args = parse(__doc__ or "")
    s = settings(args)
    out = args.out or Path("bench/out/feedback_mix.json")
    profile = out.with_suffix("") / "profile"
    if not (profile / "tiller-manifest.json").exists():
        profile.mkdir(parents=True, exist_ok=True)
        write_manifest(
            profile,
            Manifest(
                name="fb",
                version=1,
                base_model=Path(s.model).name,
                conditioning=Conditioning(tags=DEFAULT_TAGS),
            ),
        )
    serve = ("--adapter", f"fb={profile}", "--no-log")
    single = Variant(
        "single-tag", serve, {"adapter": "fb", "feedback": DEFAULT_TAGS[0]}, tiller_log=False
    )
    mixed = Variant(
        "mixed-2-tag",
        serve,
        {"adapter": "fb", "feedback_mix": {DEFAULT_TAGS[0]: 1.5, DEFAULT_TAGS[3]: -0.5}},
        tiller_log=False,
    )
    ab("2-tag mixed/single-tag tok/s ratio", single, mixed, s, args.rounds, 0.45, out)
