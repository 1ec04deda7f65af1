"""``tiller log snapshot``: a consistent copy of a live WAL log, replaced atomically, on a real
SQLite log with the server's schema; ``--every`` runs as a real process and stops on SIGTERM."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import sqlite_utils
from click.testing import CliRunner

from tiller.learner.logcli import log, take_snapshot
from tiller.server.formats.logstore import (
    AnnotationRow,
    GenerationRow,
    connect,
    insert_generations,
    integrity_check,
    open_readonly,
    transaction,
)

BATCH = 50  # generations (and one annotation each) per write transaction
DEADLINE_S = 120.0  # a bound on waiting for a subprocess, not a speed requirement


def _write_batch(db: sqlite_utils.Database, start: int) -> None:
    """``BATCH`` generations and one annotation each, in one transaction."""
    gens = [
        GenerationRow(
            id=f"gen-{i}",
            created_at=1_700_000_000.0 + i,
            request_id=f"req-{i}",
            group_id=f"grp-{i}",
            sample_index=0,
            prompt="prompt " * 20,
            chat_json="",
            rendered_prompt="prompt " * 20,
            feedback="",
            feedback_mix_json="",
            attributes_json="",
            adapter="",
            adapter_version=0,
            base_model="tiny",
            sampling_json="{}",
            seed=i,
            output_text="output " * 40,
            output_token_ids="[1, 2, 3]",
            finish_reason="length",
            prompt_tokens=3,
            completion_tokens=3,
            latency_s=0.1,
            ttft_s=0.01,
        )
        for i in range(start, start + BATCH)
    ]
    notes = [
        asdict(AnnotationRow(1.0, g.id, "", "p", "score", "0.5", "", "", 0.0, "")) for g in gens
    ]
    with transaction(db):
        insert_generations(db, gens)
        db.table("annotations").insert_all(notes)


def _counts(path: Path) -> tuple[int, int, int]:
    """(generations, annotations, max generation seq) of the file at ``path``."""
    db = open_readonly(path)
    try:
        assert integrity_check(db) == "ok"
        gens, seq = db.execute("SELECT count(*), coalesce(max(seq), 0) FROM generations").fetchone()
        notes = db.execute("SELECT count(*) FROM annotations").fetchone()[0]
        return int(gens), int(notes), int(seq)
    finally:
        db.close()


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "server-0.sqlite"
    db = connect(path)
    _write_batch(db, 0)
    db.close()
    return path


def test_snapshot_while_another_connection_writes_is_one_point_in_time(
    shard: Path, tmp_path: Path
) -> None:
    """A writer commits batches the whole time; every snapshot holds whole batches only, with
    each batch's annotations (a torn copy would show a partial batch or missing rows)."""
    stop = threading.Event()
    commits = [1]
    errors: list[BaseException] = []

    def writer() -> None:
        db = connect(shard)
        try:
            while not stop.is_set():
                _write_batch(db, commits[0] * BATCH)
                commits[0] += 1
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)
        finally:
            db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    try:
        for k in range(6):
            while commits[0] < 2 * (k + 1) and not errors:  # writes land between snapshots
                time.sleep(0.01)
            out = tmp_path / "shards" / f"s{k}.sqlite"
            take_snapshot(shard, out)
            seen.append(_counts(out))
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    final = _counts(shard)
    for gens, notes, seq in seen:
        assert gens % BATCH == 0 and gens > 0, seen
        assert notes == gens and seq == gens, seen  # seq is 1..n: no gaps, nothing half-copied
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert seen[-1][0] <= final[0]
    assert len({s[0] for s in seen}) > 1, seen  # the snapshots did follow the writer


def test_snapshot_is_read_only_ready_rollback_journal(shard: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards" / "server-0.sqlite"
    r = CliRunner().invoke(log, ["snapshot", "--db", str(shard), "--out", str(out)])
    assert r.exit_code == 0, r.output
    db = open_readonly(out)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        db.close()
    assert _counts(out) == (BATCH, BATCH, BATCH)
    # Nothing but the snapshot matches a glob over the directory (no WAL, no temp file).
    assert sorted(p.name for p in out.parent.iterdir()) == ["server-0.sqlite"]


def test_replace_is_atomic_old_readers_keep_their_copy(shard: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards" / "server-0.sqlite"
    take_snapshot(shard, out)
    old = open_readonly(out)
    try:
        assert old.execute("SELECT count(*) FROM generations").fetchone()[0] == BATCH
        db = connect(shard)
        _write_batch(db, BATCH)
        db.close()
        take_snapshot(shard, out)
        # The reader that had the old file open still reads that file, whole.
        assert old.execute("SELECT count(*) FROM generations").fetchone()[0] == BATCH
        assert integrity_check(old) == "ok"
    finally:
        old.close()
    assert _counts(out) == (2 * BATCH, 2 * BATCH, 2 * BATCH)  # a new open sees the new one
    prev = out.with_name(f".{out.name}.prev")
    assert _counts(prev)[0] == BATCH  # the previous snapshot kept until the next one
    assert not out.with_name(f".{out.name}.tmp").exists()


def test_a_stale_temp_file_does_not_leak_into_the_snapshot(shard: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards" / "server-0.sqlite"
    out.parent.mkdir()
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(b"half-written by a run that was killed" * 100)
    take_snapshot(shard, out)
    assert _counts(out) == (BATCH, BATCH, BATCH)
    assert not tmp.exists()


def test_refuses_a_missing_or_foreign_file(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE t (x)")
    out = tmp_path / "out.sqlite"
    for source in (tmp_path / "missing.sqlite", foreign):
        r = CliRunner().invoke(log, ["snapshot", "--db", str(source), "--out", str(out)])
        assert r.exit_code == 1 and str(source) in r.output, r.output
        assert not out.exists()


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert proc.poll() is None, f"exited {proc.returncode}"
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_every_repeats_retries_a_missing_shard_and_stops_on_sigterm(tmp_path: Path) -> None:
    shard = tmp_path / "data" / "server-0.sqlite"  # not there yet: the server starts later
    out = tmp_path / "shards" / "server-0.sqlite"
    argv = [sys.executable, "-m", "tiller.client.cli", "log", "snapshot"]
    errlog = tmp_path / "stderr.txt"
    with errlog.open("w") as err:
        proc = subprocess.Popen(
            [*argv, "--db", str(shard), "--out", str(out), "--every", "0.1"],
            stderr=err,
            text=True,
        )
    try:
        _wait(lambda: "no generation log at" in errlog.read_text(), proc, "a missing shard")
        db = connect(shard)
        _write_batch(db, 0)
        _wait(out.exists, proc, "a first snapshot once the shard exists")
        first = out.stat().st_ino
        _write_batch(db, BATCH)
        db.close()
        # A later snapshot replaces the file (a new inode) with the new rows.
        _wait(
            lambda: out.stat().st_ino != first and _counts(out)[0] == 2 * BATCH,
            proc,
            "a later snapshot",
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, errlog.read_text()
    assert _counts(out) == (2 * BATCH, 2 * BATCH, 2 * BATCH)
    assert not out.with_name(f".{out.name}.tmp").exists()
