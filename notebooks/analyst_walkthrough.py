# Databricks notebook source
# MAGIC %md
# MAGIC # sparktune for analysts: what is in the tokenized table, and how the model did
# MAGIC
# MAGIC This notebook walks through the tables the sparktune pipeline leaves behind:
# MAGIC
# MAGIC 1. label balance per split,
# MAGIC 2. the token-length histogram,
# MAGIC 3. how much truncation costs, per split,
# MAGIC 4. why rows were quarantined at ingest,
# MAGIC 5. the predictions joined to the review text (through the `imdb_reviews` SQL view),
# MAGIC 6. the MLflow run that trained the model.
# MAGIC
# MAGIC On Databricks, set the widgets at the top (Unity Catalog names such as `main.sparktune.imdb_tokenized`).
# MAGIC Locally it runs as a plain script, `python notebooks/analyst_walkthrough.py`, with the same
# MAGIC parameters from `SPARKTUNE_NB_<NAME>` environment variables (defaults: the tables `sparktune pipeline`
# MAGIC writes under `./data`).

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters

# COMMAND ----------

from sparktune.databricks import notebook_param, on_databricks
from sparktune.spark import get_spark
from sparktune.tables import parse_table_ref, table_exists

ON_DATABRICKS = on_databricks()
_PREFIX = "main.sparktune." if ON_DATABRICKS else "./data/"

RAW = notebook_param("raw_table", _PREFIX + "imdb_raw")
TOKENIZED = notebook_param("tokenized_table", _PREFIX + "imdb_tokenized")
QUARANTINE = notebook_param("quarantine_table", _PREFIX + "imdb_raw_quarantine")
PREDICTIONS = notebook_param("predictions_table", _PREFIX + "imdb_predictions")
VIEW = notebook_param("view", ("main.sparktune." if ON_DATABRICKS else "") + "imdb_reviews")
RUN_ID = notebook_param("mlflow_run_id", "")
TRACKING_URI = notebook_param("tracking_uri", "")
PLOT = notebook_param("plot_path", "")

spark = get_spark()
TOK = parse_table_ref(TOKENIZED).sql


def show(df, n=20):
    """Databricks' display() in a notebook (tables and charts), the first rows as text elsewhere."""
    if "display" in globals():
        globals()["display"](df)  # Databricks notebooks define display()
    else:
        print(df.limit(n).toPandas().to_string(index=False), end="\n\n")


print(f"tokenized table: {TOKENIZED}\nraw table: {RAW}\npredictions: {PREDICTIONS}\n")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 1. Label balance per split
# MAGIC `label` is the class id (`-1`: unlabelled, e.g. IMDB's `unsupervised` split).

# COMMAND ----------

print("== label balance")
show(spark.sql(f"""
    SELECT split, label, count(*) AS rows,
           round(count(*) / sum(count(*)) OVER (PARTITION BY split), 4) AS share
    FROM {TOK} GROUP BY split, label ORDER BY split, label
"""))

# COMMAND ----------

# MAGIC %md
# MAGIC ## 2. Token lengths
# MAGIC Rows per 32-token bucket and split; on Databricks pick the bar chart in the result's visualisation menu.

# COMMAND ----------

print("== token-length histogram (32-token buckets)")
show(spark.sql(f"""
    SELECT split, CAST(floor(n_tokens / 32) * 32 AS INT) AS tokens_from, count(*) AS rows
    FROM {TOK} GROUP BY split, tokens_from ORDER BY split, tokens_from
"""), n=200)
if PLOT:
    from sparktune.stats import plot_token_lengths

    plot_token_lengths(spark, TOKENIZED, PLOT)
    print(f"histogram written to {PLOT}\n")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 3. Truncation by split
# MAGIC A review longer than the tokenizer's `max_length` was cut (`truncated`): the model never saw its end.

# COMMAND ----------

print("== truncation by split")
show(spark.sql(f"""
    SELECT split, count(*) AS rows, sum(CAST(truncated AS INT)) AS truncated_rows,
           round(avg(CAST(truncated AS DOUBLE)), 4) AS truncated_share,
           round(avg(n_tokens), 1) AS mean_tokens, percentile_approx(n_tokens, 0.95) AS p95_tokens
    FROM {TOK} GROUP BY split ORDER BY split
"""))

# COMMAND ----------

# MAGIC %md
# MAGIC ## 4. Quarantine: why rows were rejected at ingest
# MAGIC Every input record is either in the raw table or here, with its `reason` and the original `record`.

# COMMAND ----------

print("== quarantine reasons")
if table_exists(spark, parse_table_ref(QUARANTINE)):
    show(spark.sql(f"""
        SELECT split, reason, count(*) AS rows FROM {parse_table_ref(QUARANTINE).sql}
        GROUP BY split, reason ORDER BY rows DESC, split, reason
    """))
else:
    print(f"no quarantine table at {QUARANTINE}\n")

# COMMAND ----------

# MAGIC %md
# MAGIC ## 5. Predictions next to the text
# MAGIC `sparktune.views.create_review_view` makes one SQL view joining tokenized rows to their text and to the
# MAGIC predictions table (`sparktune evaluate --predictions`); query it like a table, e.g.
# MAGIC `SELECT text, label, prediction FROM imdb_reviews WHERE truncated AND NOT correct`.

# COMMAND ----------

from sparktune.views import create_review_view  # noqa: E402 -- notebook cells import what they use

HAS_PREDICTIONS = table_exists(spark, parse_table_ref(PREDICTIONS))
create_review_view(spark, VIEW, TOKENIZED, RAW, PREDICTIONS if HAS_PREDICTIONS else None,
                   temporary=not ON_DATABRICKS)
print(f"== view {VIEW}: accuracy by split and truncation")
show(spark.sql(f"""
    SELECT split, truncated, count(prediction) AS scored, round(avg(CAST(correct AS DOUBLE)), 4) AS accuracy
    FROM {VIEW} WHERE prediction IS NOT NULL GROUP BY split, truncated ORDER BY split, truncated
"""))
print("== wrong predictions, longest reviews first")
show(spark.sql(f"""
    SELECT split, label, prediction, n_tokens, truncated, substr(text, 1, 100) AS text_start
    FROM {VIEW} WHERE NOT correct ORDER BY n_tokens DESC, row_id
"""), n=10)

# COMMAND ----------

# MAGIC %md
# MAGIC ## 6. The MLflow run
# MAGIC The run that trained the model: from the `mlflow_run_id` widget, else from the predictions' `model_uri`.

# COMMAND ----------

import mlflow  # noqa: E402 -- notebook cells import what they use

from sparktune.train.tracking import resolve_tracking_uri  # noqa: E402 -- notebook cells import what they use

client = mlflow.MlflowClient(resolve_tracking_uri(TRACKING_URI))
run_id = RUN_ID
if not run_id and HAS_PREDICTIONS:
    first = spark.sql(f"SELECT model_uri FROM {parse_table_ref(PREDICTIONS).sql} LIMIT 1").collect()
    model_uri = first[0]["model_uri"] if first else ""
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/"):].split("/")[0]
    elif model_uri.startswith("models:/m-"):
        run_id = client.get_logged_model(model_uri[len("models:/"):].split("/")[0]).source_run_id
print("== MLflow run")
if run_id:
    run = client.get_run(run_id)
    print(f"run {run.info.run_id} ({run.info.run_name}), status {run.info.status}, "
          f"experiment {run.info.experiment_id}")
    for key, value in sorted(run.data.metrics.items()):
        print(f"  metric {key}: {value:.4g}")
    for key, value in sorted(run.data.params.items())[:40]:
        print(f"  param  {key}: {value}")
else:
    print("no run id given and none found in the predictions table")
print("\nwalkthrough done")
