"""An iteration's training data: built from the log (``DataConfig``), then frozen in its work
directory so that a restarted iteration trains on the same examples from the same served
version (and resumes from its checkpoint)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from tiller.server.formats.logstore import generations_by_id
from tiller.server.formats.manifest import load_manifest

from ..data.alt import AltConfig, ReplayWindow, build_alt
from ..data.cmpo import cmpo_pairs
from ..data.examples import PreferencePair, SFTExample
from ..data.jsonl import load_pairs, load_sft, save_pairs, save_sft
from ..data.pairs import feedback_pairs, judge_pairs, score_pairs
from ..shards import SINGLE, Cursor, total
from .config import LearnConfig
from .served import Served, conditioning

Examples = Sequence[SFTExample] | Sequence[PreferencePair]


@dataclass(frozen=True)
class IterationData:
    """What an iteration trains on: its examples, the label seq they were built up to, the
    reasons rows were skipped (counts), and the version served when they were built."""

    examples: Examples
    cursor: Cursor  # per shard, the label seq the data was built up to
    skipped: Mapping[str, int]
    served: Served

    @property
    def annotation_seq(self) -> int:
        return total(self.cursor)


def on_policy(
    db: sqlite_utils.Database, pairs: Sequence[PreferencePair], adapter: str, version: int
) -> list[PreferencePair]:
    """The pairs whose two generations were both sampled from ``adapter@v{version}``."""
    gens = generations_by_id(db, (i for p in pairs for i in (p.chosen_id, p.rejected_id) if i))

    def fresh(i: str) -> bool:
        g = gens.get(i)
        return g is not None and g.adapter == adapter and g.adapter_version == version

    return [p for p in pairs if fresh(p.chosen_id) and fresh(p.rejected_id)]


def build(
    db: sqlite_utils.Database, cfg: LearnConfig, now: Served, skipped: Counter[str]
) -> Examples:
    """The dataset ``cfg.data`` describes, newest ``max_examples`` last; reasons rows were left
    out are counted into ``skipped``."""
    d = cfg.data
    if d.kind == "alt":
        cond = conditioning(cfg)
        assert cond is not None
        alt = AltConfig(
            conditioning=cond,
            provider=d.provider,
            window=ReplayWindow(last_versions=d.replay_versions),
            allow_truncated=d.allow_truncated,
            unknown_tags="skip",
            balance=d.balance,
            seed=cfg.train.seed,
        )
        examples = build_alt(db, alt, skipped=skipped)
        return examples[-d.max_examples :] if d.max_examples else examples
    if d.kind == "cmpo":
        pairs = cmpo_pairs(
            db,
            d.provider,
            d.attributes,
            max_subset_size=d.max_subset_size,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
        )
    elif d.source == "judge":
        pairs = judge_pairs(
            db,
            d.provider,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
            tie_margin=d.judge_tie_margin,
        )
    elif d.source == "score":
        pairs = score_pairs(
            db,
            d.provider,
            higher_is_better=d.higher_is_better,
            min_margin=d.min_margin,
            pairing=d.pairing,
            allow_truncated=d.allow_truncated,
            skipped=skipped,
        )
    else:
        pairs = feedback_pairs(db, allow_truncated=d.allow_truncated, skipped=skipped)
    if d.on_policy and (d.kind == "cmpo" or d.source != "feedback"):
        name = cfg.adapter if now.version is not None else ""
        kept = on_policy(db, pairs, name, now.version or 0)
        skipped["off_policy"] += len(pairs) - len(kept)
        pairs = kept
    return pairs[-d.max_examples :] if d.max_examples else pairs


def freeze(work: Path, data: IterationData) -> None:
    """Write ``data`` under ``work``; ``frozen.json`` appears last (the completeness marker)."""
    work.mkdir(parents=True, exist_ok=True)
    pairs = bool(data.examples) and isinstance(data.examples[0], PreferencePair)
    if pairs:
        save_pairs(work / "data.jsonl", data.examples)  # type: ignore[arg-type]
    else:
        save_sft(work / "data.jsonl", data.examples)  # type: ignore[arg-type]
    now = data.served
    meta = {
        "kind": "pairs" if pairs else "sft",
        "annotation_seq": data.annotation_seq,
        "shard_cursors": data.cursor,
        "skipped": dict(data.skipped),
        "served_version": now.version,
        "served_path": str(now.path) if now.path else None,
    }
    tmp = work / "frozen.json.tmp"
    tmp.write_text(json.dumps(meta))
    tmp.replace(work / "frozen.json")  # the marker: data.jsonl is complete once this exists


def load_frozen(work: Path) -> IterationData | None:
    """The data ``freeze`` wrote under ``work``, or None when it did not finish."""
    marker = work / "frozen.json"
    if not marker.exists():
        return None
    meta = json.loads(marker.read_text())
    examples: Examples = (
        load_pairs(work / "data.jsonl")
        if meta["kind"] == "pairs"
        else load_sft(work / "data.jsonl")
    )
    path = Path(meta["served_path"]) if meta["served_path"] else None
    now = Served(meta["served_version"], path, load_manifest(path) if path else None)
    cursor = meta.get("shard_cursors") or {SINGLE: int(meta["annotation_seq"])}
    return IterationData(examples, cursor, dict(meta["skipped"]), now)
