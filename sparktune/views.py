"""SQL views for analysts: tokenized rows with their text and the model's predictions, in one place.

``create_review_view`` makes a view that joins the tokenized table to the raw table (for the
text) and, when given, to a predictions table written by ``sparktune evaluate --predictions``,
so a question such as "which long reviews does the model get wrong" is one ``SELECT``:

    SELECT split, text, n_tokens, label, prediction FROM imdb_reviews
    WHERE truncated AND NOT correct

The view is SQL over the tables, not a copy: it always shows their current versions. Tables
are paths (``delta.`...```) or catalog names (Unity Catalog ``catalog.schema.table`` on
Databricks), as everywhere in sparktune.
"""

from __future__ import annotations

import re

from sparktune.errors import SparktuneError
from sparktune.tables import parse_table_ref, read_table

__all__ = ["VIEW_COLUMNS", "create_review_view", "review_view_sql"]

VIEW_COLUMNS = ("row_id", "split", "label", "text", "n_tokens", "truncated",
                "prediction", "probabilities", "correct", "model_uri", "model_version")
"""The view's columns; prediction columns are null for rows the predictions table does not cover."""

_VIEW_NAME = re.compile(r"^`?[A-Za-z_]\w*`?(\.`?[A-Za-z_]\w*`?){0,2}$")


def review_view_sql(view: str, tokenized: str, raw: str, predictions: str | None = None,
                    temporary: bool = False) -> str:
    """The ``CREATE OR REPLACE VIEW`` statement for ``create_review_view``."""
    if not _VIEW_NAME.match(view or ""):
        raise SparktuneError(f"view name: expected name, schema.name or catalog.schema.name, found {view!r}")
    tok, src = parse_table_ref(tokenized).sql, parse_table_ref(raw).sql
    if predictions:
        pred = parse_table_ref(predictions).sql
        # One row per tokenized row even if the predictions table holds several rows per id.
        pred_cols = ("p.prediction, p.probabilities, p.prediction = t.label AS correct, "
                     "p.model_uri, p.model_version")
        pred_join = (f"LEFT JOIN (SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY row_id "
                     f"ORDER BY model_version DESC) AS _n FROM {pred}) WHERE _n = 1) p ON p.row_id = t.row_id")
    else:
        pred_cols = ("CAST(NULL AS INT) AS prediction, CAST(NULL AS ARRAY<DOUBLE>) AS probabilities, "
                     "CAST(NULL AS BOOLEAN) AS correct, CAST(NULL AS STRING) AS model_uri, "
                     "CAST(NULL AS STRING) AS model_version")
        pred_join = ""
    kind = "TEMPORARY VIEW" if temporary else "VIEW"
    return (
        f"CREATE OR REPLACE {kind} {view} AS "
        f"SELECT t.row_id, t.split, t.label, r.text, t.n_tokens, t.truncated, {pred_cols} "
        f"FROM {tok} t JOIN {src} r ON r.row_id = t.row_id {pred_join}"
    ).strip()


def create_review_view(spark, view: str, tokenized: str, raw: str, predictions: str | None = None,
                       temporary: bool = False) -> str:
    """Create (or replace) ``view`` joining ``tokenized`` rows to their ``raw`` text and ``predictions``.

    For classification tables (one tokenized row per review); packed causal-LM blocks have no
    single source row. ``temporary``: a session-scoped view (no catalog write). Returns the name.
    """
    tok_cols = set(read_table(spark, tokenized, what="tokenized table").columns)
    missing = {"row_id", "split", "label", "n_tokens", "truncated"} - tok_cols
    if missing:
        raise SparktuneError(f"{tokenized}: not a tokenized table written by `sparktune tokenize` "
                             f"(missing columns {sorted(missing)}); pass the tokenized table")
    spark.sql(review_view_sql(view, tokenized, raw, predictions, temporary=temporary))
    return view
