"""``tiller log``: read the generation log — tail it, show one generation, export, snapshot,
plot labels.

Every command only reads: the log is opened read-only (``mode=ro``) while the server and the
annotator keep writing it (WAL). Exports read one snapshot (a single read transaction);
``snapshot`` copies the whole file (SQLite's online backup) for readers on other hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

if TYPE_CHECKING:
    import sqlite_utils

    from tiller.server.formats.logstore import GenerationView, LabelRow

_DB = click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The generation log (SQLite).",
)
# The reading commands take several logs too: one shard per server replica, as paths or globs.
_DBS = click.option(
    "--db",
    "db_paths",
    multiple=True,
    required=True,
    help="The generation log (SQLite); repeat it or give a glob for several shards.",
)
_CHUNK = 500


def _open(path: Path) -> sqlite_utils.Database:
    """A read-only connection to a Tiller log; ``ClickException`` if it is missing or foreign."""
    from tiller.server.formats.logstore import SCHEMA_VERSION, open_readonly, schema_version

    if not path.is_file():
        raise click.ClickException(f"no generation log at {path}")
    db = open_readonly(path)
    version = schema_version(db)
    if version == 0 or version > SCHEMA_VERSION:
        db.close()
        raise click.ClickException(
            f"{path} has log schema version {version}; this Tiller reads 1..{SCHEMA_VERSION}"
        )
    return db


def _logs(specs: Sequence[str]) -> list[Path]:
    """The log files ``specs`` (paths or globs) name; ``ClickException`` for two of one name."""
    from .shards import resolve

    try:
        return resolve(specs)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _open_all(specs: Sequence[str]) -> sqlite_utils.Database:
    """One read-only connection over every log ``specs`` names (paths or globs): the log itself
    for one, else the union of the shards' generations, annotations and feedback."""
    from .shards import union_of

    paths = _logs(specs)
    if len(paths) == 1:
        return _open(paths[0])
    for path in paths:
        _open(path).close()  # each one a Tiller log, or a clear error naming it
    if not paths:
        raise click.ClickException(f"no generation log matches {', '.join(specs)}")
    return union_of(paths)


def _adapter(adapter: str, version: int | None) -> str:
    return f"{adapter}@v{version}" if adapter else "base"


@click.group()
def log() -> None:
    """Inspect the generation log: recent generations, one generation's labels, exports, plots."""


# ---------------------------------------------------------------------------------------- tail


def _rated(db: sqlite_utils.Database, ids: Sequence[str]) -> dict[str, list[str]]:
    """App feedback per generation id, in short words: "Harmful", "0.9", "critique", "chosen"."""
    from tiller.server.formats.logstore import feedback_naming

    out: dict[str, list[str]] = {i: [] for i in ids}
    for f in feedback_naming(db, ids):
        if f.chosen_id:
            for gid, word in ((f.chosen_id, "chosen"), (f.rejected_id, "rejected")):
                if gid in out:
                    out[gid].append(word)
            continue
        words = [w for w in (f.tag, f.critique and "critique") if w]
        words += ["refinement"] if f.refinement else []
        words += [f"{f.score:g}"] if f.score is not None else []
        out[f.generation_id].append(" ".join(words))
    return out


def _tail_table(db: sqlite_utils.Database, rows: Sequence[GenerationView]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False)
    adapters = [_adapter(r.adapter or "", r.adapter_version) for r in rows]
    # Ids are what one copies into `tiller log show`: never truncated; the output gives way.
    table.add_column("id", no_wrap=True, min_width=max((len(r.id) for r in rows), default=2))
    table.add_column("time", no_wrap=True, min_width=19)
    table.add_column("adapter", no_wrap=True, min_width=max(map(len, adapters), default=7))
    table.add_column("feedback")
    table.add_column("rated")
    table.add_column("finish", no_wrap=True)
    table.add_column("output", no_wrap=True, overflow="ellipsis", ratio=1, min_width=20)
    rated = _rated(db, [r.id for r in rows])
    for r, adapter in zip(rows, adapters, strict=True):
        out = " ".join((r.output_text or "").split())
        table.add_row(
            Text(r.id),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
            Text(adapter),
            Text(r.feedback or ""),
            Text("; ".join(rated[r.id])),
            Text(r.finish_reason or ""),
            Text(out[:60] + ("…" if len(out) > 60 else "")),
        )
    return table


@log.command()
@_DBS
@click.option("-n", "n", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--follow", is_flag=True, help="Keep printing new generations (Ctrl-C stops).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="With --follow.")
def tail(db_paths: tuple[str, ...], n: int, follow: bool, interval: float) -> None:
    """The last N generations. FEEDBACK is the tag the generation was conditioned on; RATED is
    the app feedback it received (tag and/or score)."""
    from rich.console import Console

    from tiller.server.formats.logstore import latest_generations

    console = Console()
    if follow and len(db_paths) > 1:
        raise click.UsageError("--follow follows one log; run one tail per shard")
    db = _open_all(db_paths)
    try:
        rows = latest_generations(db, 0, n)
        console.print(_tail_table(db, rows))
        last = rows[-1].seq if rows else 0
        while follow:
            time.sleep(interval)
            rows = latest_generations(db, last, 1000)
            if rows:
                console.print(_tail_table(db, rows))
                last = rows[-1].seq
    except KeyboardInterrupt:
        pass
    finally:
        db.close()


# ---------------------------------------------------------------------------------------- show


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its JSON text columns decoded: ``sampling_json`` -> ``sampling``, etc."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k.endswith("_json"):
            out[k.removesuffix("_json")] = json.loads(v) if v else None
        elif k == "output_token_ids":
            out[k] = json.loads(v) if v else []
        else:
            out[k] = v
    return out


@log.command()
@click.argument("generation_id")
@_DBS
def show(generation_id: str, db_paths: tuple[str, ...]) -> None:
    """One generation with every annotation (as either generation of a pair) and every piece
    of app feedback that names it, as JSON."""
    from tiller.server.formats import logstore

    db = _open_all(db_paths)
    try:
        row = logstore.generation_record(db, generation_id)
        if row is None:
            where = ", ".join(db_paths)
            raise click.ClickException(f"unknown generation id {generation_id!r} in {where}")
        notes = logstore.annotation_records_of(db, generation_id)
        feedback = logstore.feedback_records_of(db, generation_id)
    finally:
        db.close()
    doc = {
        "generation": _decoded(row),
        "annotations": [_decoded(a) for a in notes],
        "feedback": feedback,
    }
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


# -------------------------------------------------------------------------------------- export


def _arrow_schema(db: sqlite_utils.Database) -> Any:
    import pyarrow as pa

    from tiller.server.formats.logstore import table_columns

    types = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}

    def struct(table: Literal["generations", "annotations"]) -> list[Any]:
        cols = table_columns(db, table)
        return [pa.field(name, types.get(kind.upper(), pa.string())) for name, kind in cols]

    return pa.schema(
        [*struct("generations"), ("annotations", pa.list_(pa.struct(struct("annotations"))))]
    )


@log.command()
@_DBS
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--since-seq", type=int, default=0, show_default=True, help="Export seq > N.")
@click.option("--until-seq", type=int, default=None, help="Export seq <= M.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "parquet"]),
    default=None,
    help="Default: parquet if OUT ends in .parquet, else jsonl.",
)
def export(
    db_paths: tuple[str, ...], out: Path, since_seq: int, until_seq: int | None, fmt: str | None
) -> None:
    """Generations joined with their annotations, one record per generation: the log's
    columns as stored (JSON columns stay JSON text) plus ``annotations``, a list of annotation
    rows. Several shards export together (seqs are per shard: no seq range then). Written to
    a temporary file and renamed, so OUT is never half-written."""
    fmt = fmt or ("parquet" if out.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise click.ClickException(
                "--format parquet needs pyarrow: pip install pyarrow (or 'tiller[learner]')"
            ) from None
    from tiller.server.formats.logstore import generation_records, read_snapshot

    if (since_seq or until_seq is not None) and len(_logs(db_paths)) > 1:
        raise click.UsageError("--since-seq/--until-seq take one log: seqs are per shard")
    db = _open_all(db_paths)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n = notes = 0
    try:
        with read_snapshot(db):  # one snapshot for the whole export
            if fmt == "parquet":
                schema = _arrow_schema(db)
                with pq.ParquetWriter(tmp, schema) as writer:
                    for chunk in generation_records(db, since_seq, until_seq, _CHUNK):
                        writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                        n, notes = n + len(chunk), notes + sum(len(r["annotations"]) for r in chunk)
                    if n == 0:
                        writer.write_table(schema.empty_table())
            else:
                with tmp.open("w", encoding="utf-8") as f:
                    for chunk in generation_records(db, since_seq, until_seq, _CHUNK):
                        for rec in chunk:
                            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        n, notes = n + len(chunk), notes + sum(len(r["annotations"]) for r in chunk)
        tmp.replace(out)
    finally:
        db.close()
        tmp.unlink(missing_ok=True)
    click.echo(f"exported {n} generations ({notes} annotations) to {out}", err=True)


# ------------------------------------------------------------------------------------ snapshot


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def take_snapshot(db_path: Path, out: Path) -> int:
    """Copy the live log at ``db_path`` to ``out`` as one consistent state; the page count.

    SQLite's online backup in one step is one read transaction on the source, so writers (WAL)
    carry on and the copy is a single point in time. The copy is switched to rollback-journal
    mode (a WAL file cannot be opened on a read-only mount), fsynced as ``.OUT.tmp`` beside OUT,
    then renamed over OUT: readers see the old file or the new one, never a half-written one,
    and a reader that has the old file open keeps reading it. The previous snapshot stays
    hard-linked as ``.OUT.prev`` until the next one, so its data outlives the rename on network
    file systems, where another client's open file is otherwise gone (ESTALE)."""
    tmp = out.with_name(f".{out.name}.tmp")
    prev = out.with_name(f".{out.name}.prev")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in (tmp, tmp.with_name(tmp.name + "-journal")):
        stale.unlink(missing_ok=True)  # a crashed run's leftovers; one writer per OUT
    src = _open(db_path)
    try:
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.conn.backup(dst, pages=-1)  # -1: every page in one step, one read transaction
            dst.execute("PRAGMA journal_mode=DELETE")
            pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
        finally:
            dst.close()
    finally:
        src.close()
    _fsync(tmp)
    if out.exists():
        prev.unlink(missing_ok=True)
        # Without hard links (some SMB shares) readers there may see the old one vanish.
        with contextlib.suppress(OSError):
            os.link(out, prev)
    os.replace(tmp, out)
    _fsync(out.parent, directory=True)
    return pages


@log.command()
@_DB
@click.option(
    "--out",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The snapshot file; replaced atomically.",
)
@click.option(
    "--every",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Take a snapshot every SECONDS until SIGTERM or SIGINT (the current one finishes).",
)
def snapshot(db_path: Path, out: Path, every: float | None) -> None:
    """A consistent copy of a live log, for readers on other hosts: the learner reads every
    server replica's shard through these copies on a shared volume (SQLite's WAL must not be
    shared over a network file system). OUT is written beside itself as .OUT.tmp and renamed
    over OUT, so readers never see a half-written file. With --every, a shard that is missing
    or unreadable is reported and tried again at the next tick."""
    if every is None:
        pages = take_snapshot(db_path, out)
        click.echo(f"snapshot of {db_path} ({pages} pages) to {out}", err=True)
        return
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    while not stop.is_set():
        started = time.monotonic()
        try:
            pages = take_snapshot(db_path, out)
            click.echo(f"snapshot of {db_path} ({pages} pages) to {out}", err=True)
        except (click.ClickException, sqlite3.Error, OSError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else repr(e)
            click.echo(f"no snapshot of {db_path} this time: {msg}", err=True)
        stop.wait(max(0.0, every - (time.monotonic() - started)))


# ---------------------------------------------------------------------------------------- plot


def _tag_order(rows: Sequence[LabelRow]) -> list[str]:
    """Quantile providers keep the score in ``raw``: order their tags by mean score (lowest
    band first). Other tags have no known order: alphabetical."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        try:
            scores.setdefault(json.loads(r.value_json), []).append(float(r.raw))
        except (TypeError, ValueError):
            return sorted({json.loads(r.value_json) for r in rows})
    return sorted(scores, key=lambda t: sum(scores[t]) / len(scores[t]))


@log.command()
@_DBS
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--provider", default=None, help="Only this annotation provider.")
def plot(db_paths: tuple[str, ...], out: Path, provider: str | None) -> None:
    """How labels shift across adapter versions: one panel per provider — the share of each
    tag per adapter version (bars) for tag annotations, score histograms per adapter version
    for score annotations. Written as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("plot needs matplotlib: pip install matplotlib") from None
    from tiller.server.formats.logstore import iterations, tag_and_score_labels

    db = _open_all(db_paths)
    try:
        rows = tag_and_score_labels(db, provider)
        learned = iterations(db)
    finally:
        db.close()
    if not rows and not learned:
        which = f" from provider {provider!r}" if provider else ""
        raise click.ClickException(f"no tag or score annotations{which} in {', '.join(db_paths)}")
    panels: dict[tuple[str, str], list[LabelRow]] = {}
    for r in rows:
        panels.setdefault((r.provider, r.kind), []).append(r)

    n = len(panels) + (1 if learned else 0)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.8 * n), squeeze=False)
    if learned:
        _learner_panel(axes[-1, 0], learned)
    for ax, ((name, kind), prows) in zip(axes[:, 0], panels.items(), strict=False):
        by_version: dict[str, list[LabelRow]] = {}
        for r in prows:
            by_version.setdefault(_adapter(r.adapter, r.adapter_version), []).append(r)
        if kind == "tag":
            tags = _tag_order(prows)
            width = 0.8 / len(by_version)
            for i, (version, vrows) in enumerate(by_version.items()):
                values = [json.loads(r.value_json) for r in vrows]
                shares = [values.count(t) / len(values) for t in tags]
                xs = [x + (i - (len(by_version) - 1) / 2) * width for x in range(len(tags))]
                ax.bar(xs, shares, width, label=f"{version} (n={len(values)})")
            ax.set_xticks(range(len(tags)), tags, rotation=15, ha="right")
            ax.set_ylabel("share of generations")
        else:
            data = [[float(json.loads(r.value_json)) for r in v] for v in by_version.values()]
            lo, hi = min(map(min, data)), max(map(max, data))
            bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
            for version, values in zip(by_version, data, strict=True):
                ax.hist(
                    values,
                    bins=bins,
                    histtype="step",
                    linewidth=1.6,
                    density=True,
                    label=f"{version} (n={len(values)})",
                )
            ax.set_xlabel("score")
            ax.set_ylabel("density")
        ax.set_title(f"{name} ({kind})")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    click.echo(f"wrote {out}", err=True)


def _learner_panel(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """The learner's iterations: each candidate's gate value (o promoted, x rejected, the
    served version's value dashed) and the final training loss on a second axis."""
    for adapter in sorted({r["adapter"] for r in rows}):
        mine = [r for r in rows if r["adapter"] == adapter]
        gated = [r for r in mine if r["candidate_value"] is not None]
        ax.plot(
            [r["iteration"] for r in gated],
            [r["incumbent_value"] for r in gated],
            "--",
            color="gray",
            label=f"{adapter}: served",
        )
        for status, marker in (("promoted", "o"), ("rejected", "x"), ("published", "s")):
            pts = [(r["iteration"], r["candidate_value"]) for r in gated if r["status"] == status]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, marker=marker, s=50, label=f"{adapter}: candidate {status}")
        losses = [(r["iteration"], r["final_loss"]) for r in mine if r["final_loss"] is not None]
        if losses:
            twin = ax.twinx()
            xs, ys = zip(*losses, strict=True)
            twin.plot(xs, ys, ":", color="tab:purple", label=f"{adapter}: loss")
            twin.set_ylabel("final loss")
    ax.set_xlabel("learner iteration")
    ax.set_ylabel("gate value (higher is better)")
    ax.set_title("learner iterations")
    ax.legend(fontsize="small")
