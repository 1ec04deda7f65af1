"""The learner's view of the generation log: one file, or N shards (one per server replica).

``db`` in the learner's config names one SQLite file (as before), a glob
(``/shards/*.sqlite``) or a list of files. With one file the learner reads and records in it,
exactly as before. With several, the learner

- records its own iterations in ``state_db`` (a file of its own, never a shard),
- reads each shard read-only (shards may be the live files on one host, or snapshots copied from
  each replica, see ``tiller log snapshot``),
- builds datasets over the union of all shards: one in-memory connection ATTACHes every shard
  and defines TEMP views ``generations``, ``annotations`` and ``feedback`` over them, so the
  dataset builders run unchanged (generation ids are unique across shards),
- keeps a cursor per shard (shard name -> seq): sequence numbers are per shard, so exactly-once
  stays exactly-once per shard.

A glob is resolved again at every use, so replicas that appear later are picked up. A shard's
name is its file name without the suffix; two shards with one name are an error.
"""

from __future__ import annotations

import glob
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from tiller.server.formats.logstore import connect, open_readonly

# The tables a dataset reads; each becomes a view over every shard.
_UNION_TABLES = ("generations", "annotations", "feedback")
SINGLE = ""  # the one shard's name when the log is one file: cursors keep their old meaning

Cursor = dict[str, int]  # shard name -> the seq consumed up to


def resolve(spec: Sequence[str]) -> list[Path]:
    """The shard files ``spec`` names now (globs expanded), sorted; ``ValueError`` for two shards
    with one name."""
    out: dict[Path, None] = {}
    for item in spec:
        expanded = str(Path(item).expanduser())
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        out.update((Path(m).resolve(), None) for m in matches)
    paths = sorted(out)
    names = [p.stem for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two log shards are named {dup[0]!r}: shard file names must differ")
    return paths


class LogShards:
    """The learner's connections: ``state`` (its own file: ``db``) and the shards it reads
    (``shards``; none: it reads ``state``, the one-file layout). Use from one thread."""

    def __init__(self, state: sqlite_utils.Database, shards: Sequence[str] = ()) -> None:
        self.state = state
        self.spec = tuple(shards)
        self.single = not self.spec
        self._open: dict[Path, tuple[int, sqlite_utils.Database]] = {}

    def shards(self) -> dict[str, sqlite_utils.Database]:
        """Each shard's connection by name (the one file: ``SINGLE``, the state connection).
        A shard file replaced since it was opened (a new snapshot) is opened again."""
        if self.single:
            return {SINGLE: self.state}
        out = {}
        for path in resolve(self.spec):
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                continue  # a replica whose first snapshot has not landed yet
            known = self._open.get(path)
            if known is None or known[0] != inode:
                if known is not None:
                    known[1].close()
                known = (inode, open_readonly(path))
                self._open[path] = known
            out[path.stem] = known[1]
        return out

    def close(self) -> None:
        for _, db in self._open.values():
            db.close()
        self._open.clear()

    @contextmanager
    def union(self) -> Iterator[sqlite_utils.Database]:
        """One connection whose ``generations``, ``annotations`` and ``feedback`` span every
        shard (the state connection itself for one file)."""
        if self.single:
            yield self.state
            return
        db = union_of([p for p in resolve(self.spec) if p.exists()])
        try:
            yield db
        finally:
            db.conn.close()


def union_of(paths: Sequence[Path]) -> sqlite_utils.Database:
    """A connection whose ``generations``, ``annotations`` and ``feedback`` are the union of the
    shards at ``paths``, read-only (ATTACH + TEMP views); the caller closes it. No paths: an
    empty log."""
    if not paths:
        return empty_log()
    conn = sqlite3.connect(":memory:", uri=True, check_same_thread=False)
    try:
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_ATTACHED)
        if len(paths) > limit:
            raise ValueError(
                f"{len(paths)} log shards, but this SQLite attaches at most {limit}: "
                "merge shards or raise SQLITE_MAX_ATTACHED"
            )
        for i, path in enumerate(paths):
            conn.execute(f"ATTACH DATABASE ? AS s{i}", (f"file:{path}?mode=ro",))
        for table in _UNION_TABLES:
            body = " UNION ALL ".join(f"SELECT * FROM s{i}.{table}" for i in range(len(paths)))
            conn.execute(f"CREATE TEMP VIEW {table} AS {body}")
    except BaseException:
        conn.close()
        raise
    return sqlite_utils.Database(conn)


def empty_log() -> sqlite_utils.Database:
    """An in-memory log with the schema and no rows (no shard exists yet)."""
    return connect(Path(":memory:"))


def total(cursor: Mapping[str, int]) -> int:
    """One number for a cursor (the labels consumed, summed over shards): the manifests' and
    ``learner_iterations``' ``annotation_seq``; the one file's seq itself."""
    return sum(cursor.values())


def cursor_of(annotation_seq: int, details: Mapping[str, object] | None) -> Cursor:
    """The cursor a recorded iteration consumed up to (per-shard ones live in its details)."""
    shards = (details or {}).get("shard_cursors")
    if isinstance(shards, Mapping):
        return {str(k): int(str(v)) for k, v in shards.items()}
    return {SINGLE: annotation_seq}
