"""``tiller log``: read the generation log — tail it, show one generation, export, plot labels.

Every command only reads: the log is opened read-only (``mode=ro``) while the server and the
annotator keep writing it (WAL). Exports read one snapshot (a single read transaction).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click

_DB = click.option(
    "--db",
    "db_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The generation log (SQLite).",
)
_CHUNK = 500


def _open(path: Path) -> sqlite3.Connection:
    """A read-only connection to a Tiller log; ``ClickException`` if it is missing or foreign."""
    from tiller.server.formats.logstore import SCHEMA_VERSION

    if not path.is_file():
        raise click.ClickException(f"no generation log at {path}")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=5000")
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version == 0 or version > SCHEMA_VERSION:
        conn.close()
        raise click.ClickException(
            f"{path} has log schema version {version}; this Tiller reads 1..{SCHEMA_VERSION}"
        )
    return conn


def _adapter(adapter: str, version: int | None) -> str:
    return f"{adapter}@v{version}" if adapter else "base"


@click.group()
def log() -> None:
    """Inspect the generation log: recent generations, one generation's labels, exports, plots."""


# ---------------------------------------------------------------------------------------- tail


def _tail_rows(conn: sqlite3.Connection, after: int, n: int) -> list[sqlite3.Row]:
    rows = conn.execute(
        """SELECT seq, id, created_at, adapter, adapter_version, feedback, finish_reason,
                  output_text
           FROM generations WHERE seq > ? ORDER BY seq DESC LIMIT ?""",
        [after, n],
    ).fetchall()
    return rows[::-1]


def _rated(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, list[str]]:
    """App feedback per generation id, in short words: "Harmful", "0.9", "critique", "chosen"."""
    out: dict[str, list[str]] = {i: [] for i in ids}
    marks = ",".join("?" * len(ids))
    for f in conn.execute(
        f"""SELECT * FROM feedback WHERE generation_id IN ({marks}) OR chosen_id IN ({marks})
            OR rejected_id IN ({marks}) ORDER BY seq""",
        [*ids, *ids, *ids],
    ):
        if f["chosen_id"]:
            for gid, word in ((f["chosen_id"], "chosen"), (f["rejected_id"], "rejected")):
                if gid in out:
                    out[gid].append(word)
            continue
        words = [w for w in (f["tag"], f["critique"] and "critique") if w]
        words += ["refinement"] if f["refinement"] else []
        words += [f"{f['score']:g}"] if f["score"] is not None else []
        out[f["generation_id"]].append(" ".join(words))
    return out


def _tail_table(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False)
    adapters = [_adapter(r["adapter"] or "", r["adapter_version"]) for r in rows]
    # Ids are what one copies into `tiller log show`: never truncated; the output gives way.
    table.add_column("id", no_wrap=True, min_width=max((len(r["id"]) for r in rows), default=2))
    table.add_column("time", no_wrap=True, min_width=19)
    table.add_column("adapter", no_wrap=True, min_width=max(map(len, adapters), default=7))
    table.add_column("feedback")
    table.add_column("rated")
    table.add_column("finish", no_wrap=True)
    table.add_column("output", no_wrap=True, overflow="ellipsis", ratio=1, min_width=20)
    rated = _rated(conn, [r["id"] for r in rows])
    for r, adapter in zip(rows, adapters, strict=True):
        out = " ".join((r["output_text"] or "").split())
        table.add_row(
            Text(r["id"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"])),
            Text(adapter),
            Text(r["feedback"] or ""),
            Text("; ".join(rated[r["id"]])),
            Text(r["finish_reason"] or ""),
            Text(out[:60] + ("…" if len(out) > 60 else "")),
        )
    return table


@log.command()
@_DB
@click.option("-n", "n", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--follow", is_flag=True, help="Keep printing new generations (Ctrl-C stops).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="With --follow.")
def tail(db_path: Path, n: int, follow: bool, interval: float) -> None:
    """The last N generations. FEEDBACK is the tag the generation was conditioned on; RATED is
    the app feedback it received (tag and/or score)."""
    from rich.console import Console

    console = Console()
    conn = _open(db_path)
    try:
        rows = _tail_rows(conn, 0, n)
        console.print(_tail_table(conn, rows))
        last = rows[-1]["seq"] if rows else 0
        while follow:
            time.sleep(interval)
            rows = _tail_rows(conn, last, 1000)
            if rows:
                console.print(_tail_table(conn, rows))
                last = rows[-1]["seq"]
    except KeyboardInterrupt:
        pass
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------- show


def _decoded(row: sqlite3.Row) -> dict[str, Any]:
    """A row with its JSON text columns decoded: ``sampling_json`` -> ``sampling``, etc."""
    out: dict[str, Any] = {}
    for k in row.keys():  # noqa: SIM118 (sqlite3.Row iterates values)
        v = row[k]
        if k.endswith("_json"):
            out[k.removesuffix("_json")] = json.loads(v) if v else None
        elif k == "output_token_ids":
            out[k] = json.loads(v) if v else []
        else:
            out[k] = v
    return out


@log.command()
@click.argument("generation_id")
@_DB
def show(generation_id: str, db_path: Path) -> None:
    """One generation with every annotation (as either generation of a pair) and every piece
    of app feedback that names it, as JSON."""
    conn = _open(db_path)
    try:
        row = conn.execute("SELECT * FROM generations WHERE id = ?", [generation_id]).fetchone()
        if row is None:
            raise click.ClickException(f"unknown generation id {generation_id!r} in {db_path}")
        notes = conn.execute(
            "SELECT * FROM annotations WHERE generation_id = ? OR generation_id_b = ? ORDER BY seq",
            [generation_id, generation_id],
        ).fetchall()
        feedback = conn.execute(
            "SELECT * FROM feedback WHERE ? IN (generation_id, chosen_id, rejected_id) "
            "ORDER BY seq",
            [generation_id],
        ).fetchall()
    finally:
        conn.close()
    doc = {
        "generation": _decoded(row),
        "annotations": [_decoded(a) for a in notes],
        "feedback": [dict(f) for f in feedback],
    }
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


# -------------------------------------------------------------------------------------- export


def _records(
    conn: sqlite3.Connection, since: int, until: int | None
) -> Iterator[list[dict[str, Any]]]:
    """Generations with ``since < seq <= until`` in chunks, each with its ``annotations`` list
    (the rows whose first generation it is, so a pairwise label appears once)."""
    last = since
    while True:
        rows = conn.execute(
            "SELECT * FROM generations WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
            [last, until if until is not None else 2**63 - 1, _CHUNK],
        ).fetchall()
        if not rows:
            return
        ids = [r["id"] for r in rows]
        notes: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        marks = ",".join("?" * len(ids))
        for a in conn.execute(
            f"SELECT * FROM annotations WHERE generation_id IN ({marks}) ORDER BY seq", ids
        ):
            notes[a["generation_id"]].append(dict(a))
        yield [{**dict(r), "annotations": notes[r["id"]]} for r in rows]
        last = rows[-1]["seq"]


def _arrow_schema(conn: sqlite3.Connection) -> Any:
    import pyarrow as pa

    types = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}

    def struct(table: str) -> list[Any]:
        cols = conn.execute(f"PRAGMA table_info({table})").fetchall()
        return [pa.field(c["name"], types.get(c["type"].upper(), pa.string())) for c in cols]

    return pa.schema(
        [*struct("generations"), ("annotations", pa.list_(pa.struct(struct("annotations"))))]
    )


@log.command()
@_DB
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
    db_path: Path, out: Path, since_seq: int, until_seq: int | None, fmt: str | None
) -> None:
    """Generations joined with their annotations, one record per generation: the log's
    columns as stored (JSON columns stay JSON text) plus ``annotations``, a list of annotation
    rows. Written to a temporary file and renamed, so OUT is never half-written."""
    fmt = fmt or ("parquet" if out.suffix == ".parquet" else "jsonl")
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise click.ClickException(
                "--format parquet needs pyarrow: pip install pyarrow (or 'tiller[learner]')"
            ) from None
    conn = _open(db_path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n = notes = 0
    try:
        conn.execute("BEGIN")  # one snapshot for the whole export
        if fmt == "parquet":
            schema = _arrow_schema(conn)
            with pq.ParquetWriter(tmp, schema) as writer:
                for chunk in _records(conn, since_seq, until_seq):
                    writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                    n, notes = n + len(chunk), notes + sum(len(r["annotations"]) for r in chunk)
                if n == 0:
                    writer.write_table(schema.empty_table())
        else:
            with tmp.open("w", encoding="utf-8") as f:
                for chunk in _records(conn, since_seq, until_seq):
                    for rec in chunk:
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n, notes = n + len(chunk), notes + sum(len(r["annotations"]) for r in chunk)
        tmp.replace(out)
    finally:
        conn.close()
        tmp.unlink(missing_ok=True)
    click.echo(f"exported {n} generations ({notes} annotations) to {out}", err=True)


# ---------------------------------------------------------------------------------------- plot


def _tag_order(rows: Sequence[sqlite3.Row]) -> list[str]:
    """Quantile providers keep the score in ``raw``: order their tags by mean score (lowest
    band first). Other tags have no known order: alphabetical."""
    scores: dict[str, list[float]] = {}
    for r in rows:
        try:
            scores.setdefault(json.loads(r["value_json"]), []).append(float(r["raw"]))
        except (TypeError, ValueError):
            return sorted({json.loads(r["value_json"]) for r in rows})
    return sorted(scores, key=lambda t: sum(scores[t]) / len(scores[t]))


@log.command()
@_DB
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--provider", default=None, help="Only this annotation provider.")
def plot(db_path: Path, out: Path, provider: str | None) -> None:
    """How labels shift across adapter versions: one panel per provider — the share of each
    tag per adapter version (bars) for tag annotations, score histograms per adapter version
    for score annotations. Written as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("plot needs matplotlib: pip install matplotlib") from None
    conn = _open(db_path)
    try:
        rows = conn.execute(
            """SELECT a.provider, a.kind, a.value_json, a.raw, g.adapter, g.adapter_version
               FROM annotations a JOIN generations g ON g.id = a.generation_id
               WHERE a.kind IN ('tag', 'score') AND a.error = '' AND a.value_json != 'null'
                 AND (? IS NULL OR a.provider = ?)
               ORDER BY a.provider, a.kind, g.adapter, g.adapter_version""",
            [provider, provider],
        ).fetchall()
    finally:
        conn.close()
    import sqlite_utils

    from tiller.server.formats.logstore import iterations

    learned = iterations(sqlite_utils.Database(db_path))
    if not rows and not learned:
        which = f" from provider {provider!r}" if provider else ""
        raise click.ClickException(f"no tag or score annotations{which} in {db_path}")
    panels: dict[tuple[str, str], list[sqlite3.Row]] = {}
    for r in rows:
        panels.setdefault((r["provider"], r["kind"]), []).append(r)

    n = len(panels) + (1 if learned else 0)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.8 * n), squeeze=False)
    if learned:
        _learner_panel(axes[-1, 0], learned)
    for ax, ((name, kind), prows) in zip(axes[:, 0], panels.items(), strict=False):
        by_version: dict[str, list[sqlite3.Row]] = {}
        for r in prows:
            by_version.setdefault(_adapter(r["adapter"], r["adapter_version"]), []).append(r)
        if kind == "tag":
            tags = _tag_order(prows)
            width = 0.8 / len(by_version)
            for i, (version, vrows) in enumerate(by_version.items()):
                values = [json.loads(r["value_json"]) for r in vrows]
                shares = [values.count(t) / len(values) for t in tags]
                xs = [x + (i - (len(by_version) - 1) / 2) * width for x in range(len(tags))]
                ax.bar(xs, shares, width, label=f"{version} (n={len(values)})")
            ax.set_xticks(range(len(tags)), tags, rotation=15, ha="right")
            ax.set_ylabel("share of generations")
        else:
            data = [[float(json.loads(r["value_json"])) for r in v] for v in by_version.values()]
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
