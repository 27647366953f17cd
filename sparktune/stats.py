"""For analysts: ``sparktune stats`` summarises a tokenized table; ``sparktune sql`` runs a query.

Everything is computed in Spark (aggregates and a binned histogram); only the small results
come back to the driver, so the corpus is never collected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.results import StageResult
from sparktune.settings import Stage, add_stage, option
from sparktune.tables import read_table

__all__ = ["table_stats", "format_stats", "plot_token_lengths", "run_sql", "StatsResult", "SqlResult", "StatsSettings",
           "SqlSettings", "stats_stage", "sql_stage"]

HISTOGRAM_BINS = 40


def table_stats(spark, ref) -> dict:
    """Rows per split and label; token length mean/median/p95/max and truncation rate per split."""
    from pyspark.sql import functions as F

    df = read_table(spark, ref, what="--table")
    missing = {"split", "label", "n_tokens", "truncated"} - set(df.columns)
    if missing:
        raise SparktuneError(
            f"--table {ref}: expected a tokenized table (from `sparktune tokenize`) with split, label, n_tokens, "
            "truncated; "
            f"missing {', '.join(sorted(missing))}"
        )
    per_split = (
        df.groupBy("split")
        .agg(
            F.count("*").alias("rows"),
            F.avg("n_tokens").alias("mean_tokens"),
            F.percentile_approx("n_tokens", 0.5, 10000).alias("median_tokens"),
            F.percentile_approx("n_tokens", 0.95, 10000).alias("p95_tokens"),
            F.max("n_tokens").alias("max_tokens"),
            F.avg(F.col("truncated").cast("double")).alias("truncation_rate"),
            F.sum("n_tokens").alias("total_tokens"),
        )
        .orderBy("split")
        .collect()
    )
    labels = df.groupBy("split", "label").count().orderBy("split", "label").collect()
    stats: dict[str, Any] = {"table": str(ref), "rows": 0, "splits": {}}
    for row in per_split:
        stats["splits"][_split_name(row["split"])] = {
            "rows": row["rows"],
            "labels": {},
            "mean_tokens": round(float(row["mean_tokens"] or 0), 2),
            "median_tokens": int(row["median_tokens"] or 0),
            "p95_tokens": int(row["p95_tokens"] or 0),
            "max_tokens": int(row["max_tokens"] or 0),
            "truncation_rate": round(float(row["truncation_rate"] or 0), 4),
            "total_tokens": int(row["total_tokens"] or 0),
        }
        stats["rows"] += row["rows"]
    for row in labels:
        stats["splits"][_split_name(row["split"])]["labels"][str(row["label"])] = row["count"]
    return stats


def _split_name(split) -> str:
    # A table not written by sparktune may hold null splits: shown, not a crash.
    return "<null>" if split is None else str(split)


def format_stats(stats: dict) -> str:
    header = f"{'split':<14}{'rows':>9}  {'labels':<26}{'mean':>8}{'median':>8}{'p95':>7}{'max':>7}{'truncated':>11}"
    lines = [f"table: {stats['table']}   rows: {stats['rows']:,}", header, "-" * len(header)]
    for split, s in stats["splits"].items():
        labels = " ".join(f"{k}:{v}" for k, v in s["labels"].items())
        lines.append(
            f"{split:<14}{s['rows']:>9,}  {labels:<26}{s['mean_tokens']:>8.1f}{s['median_tokens']:>8}"
            f"{s['p95_tokens']:>7}{s['max_tokens']:>7}{s['truncation_rate']:>10.1%}"
        )
    return "\n".join(lines)


def plot_token_lengths(spark, ref, path: str, bins: int = HISTOGRAM_BINS) -> dict:
    """Write a PNG histogram of token lengths per split; returns the bin counts it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pyspark.sql import functions as F

    df = read_table(spark, ref, what="--table")
    top = df.agg(F.max("n_tokens")).collect()[0][0] or 1
    width = max(1, -(-int(top) // bins))
    counts = (
        df.where(F.col("n_tokens").isNotNull())
        .groupBy("split", F.floor(F.col("n_tokens") / width).alias("bin")).count().orderBy("split", "bin").collect()
    )
    series: dict = {}
    for row in counts:
        series.setdefault(_split_name(row["split"]), {})[int(row["bin"])] = row["count"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for split, by_bin in series.items():
        n_bins = max(by_bin) + 1
        ax.stairs([by_bin.get(b, 0) for b in range(n_bins)], [b * width for b in range(n_bins + 1)], label=split)
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title(f"Token lengths: {ref}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"bin_width": width, "series": series}


# Statements that only read: the first keyword of a read-only query. Anything else (DELETE,
# INSERT, MERGE, UPDATE, CREATE, DROP, ALTER, TRUNCATE, OPTIMIZE, VACUUM, RESTORE, SET, CACHE, ...)
# may change a table or the session and needs --allow-writes.
_READ_KEYWORDS = frozenset({"SELECT", "WITH", "VALUES", "TABLE", "FROM", "SHOW", "DESCRIBE", "DESC", "EXPLAIN"})
# Inside a WITH/FROM query these words start a write (Hive's FROM t INSERT ..., WITH x AS (...) INSERT ...).
_WRITE_WORDS = frozenset({"INSERT", "MERGE", "UPDATE", "DELETE", "OVERWRITE", "TRUNCATE", "DROP", "CREATE", "ALTER"})
# Words that start a Spark/Delta statement that is not a read (refused as a write, not as a typo).
_STATEMENTS = _WRITE_WORDS | frozenset({
    "OPTIMIZE", "VACUUM", "RESTORE", "REPLACE", "SET", "RESET", "CACHE", "UNCACHE", "REFRESH", "MSCK", "LOAD", "ADD",
    "REPAIR", "CLONE", "COPY", "USE", "GRANT", "REVOKE", "ANALYZE", "CONVERT", "REORG", "FSCK", "CALL", "EXECUTE",
    "DECLARE", "BEGIN", "COMMENT", "LIST", "SHOW"})
# Comments, string literals and `quoted identifiers` are not keywords.
_NOT_CODE = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"|`(?:``|[^`])*`", re.S)


def is_read_only(query: str) -> bool:
    """True when ``query`` only reads (SELECT, WITH ... SELECT, SHOW, DESCRIBE, EXPLAIN, ...).

    Decided before Spark sees the query: ``spark.sql`` runs a DELETE at once, so checking the
    plan afterwards would be too late. Conservative: a word that may write anywhere in a
    WITH/FROM query refuses it.
    """
    words = re.findall(r"[A-Za-z_]+", _NOT_CODE.sub(" ", query))
    if not words:
        return False
    first = words[0].upper()
    if first not in _READ_KEYWORDS:
        return False
    return first in ("SHOW", "DESCRIBE", "DESC") or not any(w.upper() in _WRITE_WORDS for w in words)


def run_sql(spark, query: str, limit: int = 100, allow_writes: bool = False):
    """Run a Spark SQL query; returns a pandas DataFrame of at most ``limit`` rows.

    Read-only unless ``allow_writes``: a query that may change a table is refused before it runs.
    """
    from pyspark.errors import AnalysisException, ParseException

    from sparktune.errors import user_error
    from sparktune.redact import redact

    first = (re.findall(r"[A-Za-z_]+", _NOT_CODE.sub(" ", query)) or [""])[0].upper()
    if not allow_writes and first not in _READ_KEYWORDS and first not in _STATEMENTS:
        raise SparktuneError(f"the query failed: {redact(first)[:40]!r} does not start a SQL statement (a typo?); "
                             "expected SELECT, WITH, SHOW, DESCRIBE or EXPLAIN. Nothing was run")
    if not allow_writes and not is_read_only(query):
        raise SparktuneError(
            "sparktune sql is read-only: expected a query that only reads (SELECT, WITH ... SELECT, SHOW, DESCRIBE, "
            f"EXPLAIN), found one that may change tables or the session ({redact(query.strip()[:120])!r}). "
            "Nothing was run. Pass --allow-writes to run it anyway (Delta keeps the previous version: "
            "RESTORE TABLE ... TO VERSION AS OF n undoes it)")
    try:
        df = spark.sql(query)
        return df.limit(limit).toPandas()
    except (AnalysisException, ParseException) as exc:
        first = str(exc).strip().splitlines()[0]
        raise SparktuneError(
            f"the query failed: {redact(first)[:500]}. Name tables as `name`, `schema.name` or delta.`/path/to/table`"
        ) from None
    except Exception as exc:  # runtime errors on the data (divide by zero, a bad cast, ...)
        known = user_error(exc)
        if known is None:
            raise
        raise known from None


@dataclass
class StatsResult(StageResult):
    """``sparktune stats``: the numbers of ``table_stats`` and the histogram file, if drawn."""

    stats: dict
    plot: str | None = None

    def summary(self) -> str:
        text = format_stats(self.stats)
        return f"{text}\nhistogram: {self.plot}" if self.plot else text

    def to_dict(self) -> dict:
        return {**self.stats, **({"plot": self.plot} if self.plot else {})}


@dataclass
class SqlResult(StageResult):
    """``sparktune sql``: the query's first rows."""

    rows: Any  # a pandas DataFrame

    def summary(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_columns", None, "display.width", 200, "display.max_colwidth", 80):
            return self.rows.to_string(index=False) if len(self.rows) else "(no rows)"

    def to_dict(self) -> dict:
        return {"rows": json.loads(self.rows.to_json(orient="records", default_handler=str))}


@dataclass(frozen=True, kw_only=True)
class StatsSettings:
    """``sparktune stats``'s flags."""

    table: str
    """Tokenized TABLE (a path or a catalog name)."""
    plot: str = option("", metavar="FILE.png")
    """Also write a histogram of token lengths per split to this PNG file; empty: none."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        require(problems, not self.plot or self.plot.lower().endswith(".png"), "plot",
                f"expected a file name ending in .png, found {self.plot!r}")
        raise_if(problems)


def stats_stage(spark, settings: StatsSettings, tracker=None) -> StatsResult:
    """``sparktune stats``: rows, label balance, token lengths and truncation of a tokenized table."""
    stats = table_stats(spark, settings.table)
    if settings.plot:
        plot_token_lengths(spark, settings.table, settings.plot)
    return StatsResult(stats, settings.plot or None)


@dataclass(frozen=True, kw_only=True)
class SqlSettings:
    """``sparktune sql``'s arguments."""

    query: str = option(positional=True)
    """The SQL query."""
    limit: int = 100
    """Print at most this many rows."""
    allow_writes: bool = False
    """Also run statements that change tables (INSERT, DELETE, MERGE, DROP, ...); without it the command is
    read-only."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        require(problems, self.limit >= 1, "limit", f"must be at least 1, found {self.limit}")
        raise_if(problems)


def sql_stage(spark, settings: SqlSettings, tracker=None) -> SqlResult:
    """``sparktune sql``: a Spark SQL query's first rows."""
    return SqlResult(run_sql(spark, settings.query, settings.limit, allow_writes=settings.allow_writes))


def add_cli(subparsers) -> None:
    add_stage(subparsers, Stage("stats", StatsSettings, stats_stage,
                                help="rows, label balance, token lengths and truncation of a tokenized table",
                                description=table_stats.__doc__))
    add_stage(subparsers, Stage("sql", SqlSettings, sql_stage,
                                help="run a Spark SQL query over the tables and print the result",
                                description="Tables by name or as delta.`/path`, e.g. "
                                            "SELECT split, count(*) FROM delta.`./data/tokens` GROUP BY split"))
