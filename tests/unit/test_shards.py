"""The learner's view of several log shards: resolution, the union views, per-shard cursors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tiller.learner.annotate.config import parse_config as parse_annotator
from tiller.learner.learn.config import parse_config as parse_learner
from tiller.learner.learn.trigger import generation_seqs
from tiller.learner.shards import SINGLE, LogShards, cursor_of, resolve, total
from tiller.server.formats.logstore import connect, generations_by_id

SCHEMA_ONLY = "SELECT id FROM generations ORDER BY id"


def _shard(path: Path, ids: list[str]) -> Path:
    db = connect(path)
    # Every NOT NULL column without a default gets a value of its type.
    filler = {"TEXT": "x", "INTEGER": 0, "REAL": 0.0}
    required = [
        (r[1], filler.get(str(r[2]).upper(), "x"))
        for r in db.execute("PRAGMA table_info(generations)").fetchall()
        if r[3] and r[4] is None and not r[5]
    ]
    for gid in ids:
        db.table("generations").insert({**dict(required), "id": gid}, alter=False)
    db.conn.close()
    return path


def test_resolve_expands_globs_and_refuses_two_shards_with_one_name(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.sqlite").touch()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.sqlite").touch()
    got = resolve([str(tmp_path / "*.sqlite"), str(tmp_path / "b.sqlite")])
    assert [p.name for p in got] == ["a.sqlite", "b.sqlite"]
    with pytest.raises(ValueError, match="'a'"):
        resolve([str(tmp_path / "*.sqlite"), str(tmp_path / "other" / "a.sqlite")])


def test_union_spans_every_shard_and_cursors_are_per_shard(tmp_path: Path) -> None:
    _shard(tmp_path / "shards" / "r0.sqlite", ["gen-a", "gen-b"])
    _shard(tmp_path / "shards" / "r1.sqlite", ["gen-c"])
    log = LogShards(connect(tmp_path / "learner.sqlite"), [str(tmp_path / "shards" / "*.sqlite")])
    with log.union() as db:
        assert [r[0] for r in db.execute(SCHEMA_ONLY).fetchall()] == ["gen-a", "gen-b", "gen-c"]
        assert set(generations_by_id(db, ["gen-a", "gen-c"])) == {"gen-a", "gen-c"}
    seqs = generation_seqs(log.shards())
    assert seqs == {"r0": 2, "r1": 1} and total(seqs) == 3
    # A shard that appears later (a new replica) joins at the next look.
    _shard(tmp_path / "shards" / "r2.sqlite", ["gen-d"])
    assert set(log.shards()) == {"r0", "r1", "r2"}
    log.close()


def test_a_replaced_snapshot_is_read_again(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s" / "r0.sqlite", ["gen-a"])
    log = LogShards(connect(tmp_path / "learner.sqlite"), [str(shard)])
    assert generation_seqs(log.shards()) == {"r0": 1}
    newer = _shard(tmp_path / "new.sqlite", ["gen-a", "gen-b", "gen-c"])
    tmp = shard.with_suffix(".tmp")
    shutil.copy(newer, tmp)
    os.replace(tmp, shard)  # as `tiller log snapshot` replaces it
    assert generation_seqs(log.shards()) == {"r0": 3}
    log.close()


def test_one_file_is_the_old_layout(tmp_path: Path) -> None:
    db = connect(tmp_path / "log.sqlite")
    log = LogShards(db)
    assert log.single and log.shards() == {SINGLE: db}
    with log.union() as u:
        assert u is db
    assert cursor_of(7, {}) == {SINGLE: 7}
    assert cursor_of(9, {"shard_cursors": {"r0": 4, "r1": 5}}) == {"r0": 4, "r1": 5}


def test_no_shard_yet_reads_as_an_empty_log(tmp_path: Path) -> None:
    log = LogShards(connect(tmp_path / "learner.sqlite"), [str(tmp_path / "none" / "*.sqlite")])
    assert log.shards() == {}
    with log.union() as db:
        assert db.execute(SCHEMA_ONLY).fetchall() == []


def _learner(tmp_path: Path, **extra: object) -> dict[str, object]:
    return {
        "db": "learner.sqlite", "registry": "reg", "workdir": "work", "model": "m",
        "adapter": "a", "base_model": "b",
        "data": {"kind": "pairs", "source": "score", "provider": "len"}, **extra,
    }  # fmt: skip


def test_learner_config_resolves_shards_and_keeps_db_out_of_them(tmp_path: Path) -> None:
    cfg = parse_learner(_learner(tmp_path, shards=["shards/*.sqlite"]), tmp_path, {})
    assert cfg.shards == (str(tmp_path / "shards" / "*.sqlite"),)
    with pytest.raises(ValueError, match="db is the learner's own file"):
        parse_learner(_learner(tmp_path, shards=["*.sqlite"]), tmp_path, {})


def test_annotator_takes_db_or_shards(tmp_path: Path) -> None:
    providers = [{"name": "len", "type": "score", "scorer": "length"}]
    cfg = parse_annotator({"shards": ["/s/*.sqlite"], "providers": providers}, {})
    assert cfg.db is None and cfg.shards == ("/s/*.sqlite",)
    for bad in ({}, {"db": "x.sqlite", "shards": ["/s/*.sqlite"]}):
        with pytest.raises(ValueError, match=r"db .* or shards"):
            parse_annotator({**bad, "providers": providers}, {})


def test_tiller_log_reads_several_shards(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tiller.learner.logcli import log

    _shard(tmp_path / "r0.sqlite", ["gen-a", "gen-b"])
    _shard(tmp_path / "r1.sqlite", ["gen-c"])
    runner = CliRunner()
    shown = runner.invoke(log, ["show", "gen-c", "--db", str(tmp_path / "*.sqlite")])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["generation"]["id"] == "gen-c"
    tail = runner.invoke(
        log, ["tail", "--db", str(tmp_path / "r0.sqlite"), "--db", str(tmp_path / "r1.sqlite")]
    )
    assert tail.exit_code == 0, tail.output
    assert all(g in tail.output for g in ("gen-a", "gen-b", "gen-c"))
    missing = runner.invoke(log, ["show", "gen-z", "--db", str(tmp_path / "*.sqlite")])
    assert missing.exit_code != 0 and "gen-z" in missing.output


def test_tiller_log_exports_and_plots_several_shards(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from tiller.learner.logcli import log

    _shard(tmp_path / "r0.sqlite", ["gen-a", "gen-b"])
    _shard(tmp_path / "r1.sqlite", ["gen-c"])
    runner = CliRunner()
    out = tmp_path / "all.jsonl"
    done = runner.invoke(log, ["export", "--db", str(tmp_path / "r*.sqlite"), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert sorted(json.loads(x)["id"] for x in out.open()) == ["gen-a", "gen-b", "gen-c"]
    ranged = runner.invoke(
        log, ["export", "--db", str(tmp_path / "r*.sqlite"), "--out", str(out), "--since-seq", "1"]
    )
    assert ranged.exit_code != 0 and "per shard" in ranged.output
