"""Score the hosted model on a raw table's test rows, the way the open model is scored.

Spark owns the data movement: the rows are read from the pinned Delta version and scored by
``mapInPandas`` tasks, each sending chat completions (temperature 0, the export's prompt) from a
small thread pool, so at most ``concurrency`` requests are in flight in total. The SDK retries
429 and 5xx answers with backoff, honouring Retry-After. Each answer is parsed to a label; one
that names no label (or a request that still failed) counts as wrong and is reported. The
predictions go to a Delta table; the metrics are aggregated in Spark by evaluate's own code
(``confusion_counts`` -> ``metrics_from_confusion``, unparsed answers counted wrong) and logged by
``log_evaluation``, so the hosted model's run has exactly the metric names ``sparktune evaluate``
gives the open model (``test/accuracy``, ``test/precision/negative``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.openai.export import PromptTemplate
from sparktune.results import StageResult

__all__ = ["PREDICTION_SCHEMA", "ScoreResult", "ScoreSpec", "comparison_table", "parse_answer", "run_row",
           "score_model"]

PREDICTION_SCHEMA = (
    "row_id string, label int, prediction int, answer string, parsed boolean, error string, retries int, model string"
)
_WORD = re.compile(r"[a-z0-9]+")


def parse_answer(answer: str | None, label_names) -> int:
    """The label id an answer names, or -1: the exact name, else the one label it mentions (two or none: -1)."""
    if not answer:
        return -1
    names = [str(n).strip().lower() for n in label_names]
    words = _WORD.findall(answer.lower())
    if not words:
        return -1
    text = " ".join(words)
    for i, name in enumerate(names):
        if text == " ".join(_WORD.findall(name)):
            return i
    mentioned = [
        i for i, name in enumerate(names) if re.search(rf"\b{re.escape(' '.join(_WORD.findall(name)))}\b", text)
    ]
    return mentioned[0] if len(mentioned) == 1 else -1


@dataclass(frozen=True)
class ScoreSpec:
    table: str
    model: str  # the Azure deployment name, or the fine-tuned model's name on OpenAI
    split: str = "test"
    limit: int = 0
    predictions: str | None = None
    concurrency: int = 8
    partitions: int = 2
    max_retries: int = 6
    max_tokens: int = 5
    request_timeout: float = 60.0
    template: PromptTemplate = field(default_factory=PromptTemplate)

    def check(self) -> None:
        self.template.check()
        if not self.model:
            raise SparktuneError("--deployment is empty: name the Azure deployment (or, on OpenAI, the fine-tuned "
                                 "model) to score")
        if self.concurrency < 1 or self.partitions < 1:
            raise SparktuneError(f"--concurrency and --partitions must be >= 1; found {self.concurrency} and "
                                 f"{self.partitions}")
        if self.limit < 0:
            raise SparktuneError(f"--limit must be 0 (all rows) or a positive row count; found {self.limit}")


@dataclass
class ScoreResult(StageResult):
    """The hosted model's evaluation (``evaluation``: the same type ``sparktune evaluate`` returns)
    plus what only a hosted model has: unparsed answers, failed requests, retries."""

    model: str
    evaluation: Any  # sparktune.evaluate.EvaluateResult
    unparsed: int
    errors: int
    retries: int
    run_id: str | None
    examples: list = field(default_factory=list)  # a few unparsed answers / errors, for the report
    comparison: list = field(default_factory=list)  # (label, {metric: value}) rows printed side by side

    def summary(self) -> str:
        lines = [self.evaluation.summary(),
                 f"\nunparsed answers {self.unparsed}  (counted wrong)   failed requests {self.errors}   retries "
                 f"{self.retries}"]
        for example in self.examples:
            lines.append(f"  row {example['row_id']}: answer {example['answer']!r}"
                         + (f", error {example['error']}" if example["error"] else ""))
        if self.comparison:
            lines += ["", comparison_table(self.comparison, self.evaluation.split or "all")]
        return "\n".join(lines)


def _partition_scorer(creds, spec: ScoreSpec, threads: int):
    """The function each Spark task runs: a client and a thread pool per task, results per row."""
    template, model, label_names = spec.template, spec.model, list(spec.template.label_names)
    max_retries, max_tokens, timeout = spec.max_retries, spec.max_tokens, spec.request_timeout

    def run(batches):
        from concurrent.futures import ThreadPoolExecutor

        import pandas as pd

        client = creds.client(max_retries=max_retries, timeout=timeout)

        def one(text: str):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=model, messages=template.messages(text), temperature=0, max_tokens=max_tokens
                )
                completion = raw.parse()
                answer = completion.choices[0].message.content if completion.choices else None
                return answer, None, int(getattr(raw, "retries_taken", 0) or 0)
            except Exception as exc:  # noqa: BLE001 - a row the service never answered: counted wrong, reported
                return None, creds.scrub(f"{type(exc).__name__}: {exc}")[:500], max_retries

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for batch in batches:
                results = list(pool.map(one, batch["text"].tolist()))
                answers = [r[0] for r in results]
                predictions = [parse_answer(a, label_names) for a in answers]
                # Plain arrays: every column lines up by position whatever the batch's index is.
                yield pd.DataFrame({
                    "row_id": batch["row_id"].astype(str).to_numpy(),
                    "label": batch["label"].astype("int32").to_numpy(),
                    "prediction": pd.array(predictions, dtype="int32"),
                    "answer": answers,
                    "parsed": [p >= 0 for p in predictions],
                    "error": [r[1] for r in results],
                    "retries": pd.array([r[2] for r in results], dtype="int32"),
                    "model": model,
                })

    return run


def _preflight(creds, spec: ScoreSpec) -> int:
    """One request from the driver, so a wrong deployment or key fails now, clearly, not per row."""
    import openai

    client = creds.client(max_retries=spec.max_retries, timeout=spec.request_timeout)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=spec.model,
            messages=spec.template.messages("A short test review."),
            temperature=0,
            max_tokens=spec.max_tokens,
        )
        raw.parse()
    except openai.NotFoundError as exc:
        raise SparktuneError(f"--deployment {spec.model!r} was not found by the service ({creds.scrub(exc)[:400]}); "
                             "deploy it first (`sparktune openai deploy`) or check the name") from exc
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise SparktuneError(f"the service refused the credentials ({creds.scrub(exc)[:400]}); check "
                             "AZURE_OPENAI_API_KEY / AZURE_OPENAI_AD_TOKEN and the endpoint") from exc
    except openai.APIError as exc:
        raise SparktuneError(f"a test request to {spec.model!r} failed: {creds.scrub(exc)[:400]}") from exc
    return int(getattr(raw, "retries_taken", 0) or 0)


def _spark_metrics(out, label_names: list) -> dict:
    """Evaluate's metrics of the predictions, aggregated in Spark: the confusion matrix of the parsed
    answers, and per true class the rows without one (wrong, never a hit)."""
    from pyspark.sql import functions as F

    from sparktune.evaluate import confusion_counts, metrics_from_confusion

    matrix = confusion_counts(out.where(F.col("prediction") >= 0), len(label_names))
    missed = [0] * len(matrix)
    for row in out.where(F.col("prediction") < 0).groupBy("label").count().collect():  # at most one row per class
        label = int(row["label"])
        if label >= len(missed):  # a label the template has no name for: grow the matrix to hold it
            for line in matrix:
                line.extend([0] * (label + 1 - len(missed)))
            matrix.extend([[0] * (label + 1) for _ in range(label + 1 - len(missed))])
            missed.extend([0] * (label + 1 - len(missed)))
        missed[label] = int(row["count"])
    return metrics_from_confusion(matrix, label_names, unanswered=missed)


def score_model(spark, creds, spec: ScoreSpec, tracker=None, run_id: str | None = None, job_id: str | None = None,
                say=print) -> ScoreResult:
    """Score ``spec.model`` on ``spec.table``'s ``spec.split`` rows; log to ``run_id`` (or the job's
    run, or a new one) through ``tracker`` (None: no MLflow)."""
    from sparktune.tables import check_writes, read_table, table_version

    spec.check()
    check_writes(spark, "openai-score", tables={"--predictions": spec.predictions}, inputs={"--table": spec.table})
    version = table_version(spark, spec.table)
    df = _rows_to_score(read_table(spark, spec.table, version=version, what="--table"), spec)
    retries = _preflight(creds, spec)

    partitions = min(spec.partitions, spec.concurrency)
    threads = max(1, spec.concurrency // partitions)
    say(f"scoring {spec.model} on {spec.table} (version {version}, split {spec.split or 'all'}): "
        f"{partitions} Spark task(s) x {threads} request(s) in flight")
    scored = df.repartition(partitions).mapInPandas(_partition_scorer(creds, spec, threads), PREDICTION_SCHEMA)
    out, predictions_version = _store_predictions(spark, scored, spec, version)
    try:
        counts, computed, examples = _summarise(out, spec)
    finally:
        if not spec.predictions:
            out.unpersist()

    evaluation = _evaluation(spec, version, computed, predictions_version)
    result = ScoreResult(spec.model, evaluation, int(counts["unparsed"] or 0), int(counts["errors"] or 0),
                         retries + int(counts["retries"] or 0), None, examples)
    if tracker is not None:
        result.run_id = _log_score(tracker, creds, spec, result, run_id, job_id)
    return result


def _rows_to_score(df, spec: ScoreSpec):
    """``df``'s labelled rows of ``spec.split`` (all splits when empty) as row_id, text, label; at most
    ``spec.limit`` of them, picked by a hash of row_id."""
    from pyspark.sql import functions as F

    missing = [c for c in ("row_id", "text", "label") + (("split",) if spec.split else ()) if c not in df.columns]
    if missing:
        raise SparktuneError(f"--table {spec.table}: missing column(s) {missing} (columns: {df.columns}); score a raw "
                             "table from `sparktune ingest`")
    if spec.split:
        df = df.where(F.col("split") == spec.split)
    df = df.where(F.col("label") >= 0).select("row_id", "text", "label")
    if spec.limit:
        df = df.orderBy(F.xxhash64(F.col("row_id"))).limit(spec.limit)
    return df


def _store_predictions(spark, scored, spec: ScoreSpec, version):
    """(the predictions to aggregate, the --predictions table's version or None). With --predictions
    they are written and read back; without, ``scored`` is cached so each request is sent once (the
    caller unpersists it)."""
    from sparktune.tables import read_table, write_table

    if not spec.predictions:
        return scored.persist(), None  # the requests are sent once; the aggregations read the cache
    predictions_version = write_table(
        scored,
        spec.predictions,
        properties={
            "sparktune.model": spec.model,
            "sparktune.source_table": spec.table,
            "sparktune.source_version": version,
            "sparktune.split": spec.split or "",
        },
        user_metadata={
            "stage": "openai-score",
            "model": spec.model,
            "source_table": spec.table,
            "source_version": version,
        },
    )
    return read_table(spark, spec.predictions, version=predictions_version), predictions_version


def _summarise(out, spec: ScoreSpec):
    """(row/unparsed/error/retry counts, evaluate's metrics, up to 5 unparsed examples) of the
    predictions ``out``; no rows, or every request failed, is an error."""
    from pyspark.sql import functions as F

    counts = out.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum((~F.col("parsed") & F.col("error").isNull()).cast("int")).alias("unparsed"),
        F.sum(F.col("error").isNotNull().cast("int")).alias("errors"),
        F.sum("retries").alias("retries"),
    ).collect()[0]
    if not counts["n"]:
        raise SparktuneError(f"no labelled rows in {spec.table} split {spec.split!r}; pick a split with labels "
                             "(e.g. test)")
    if counts["errors"] == counts["n"]:
        first = out.where(F.col("error").isNotNull()).select("error").first()["error"]
        raise SparktuneError(f"every request failed; the first error: {first}")
    computed = _spark_metrics(out, list(spec.template.label_names))
    examples = [r.asDict() for r in out.where(~F.col("parsed")).select("row_id", "answer", "error").limit(5)
                .collect()]
    return counts, computed, examples


def _evaluation(spec: ScoreSpec, version, computed: dict, predictions_version):
    """Evaluate's result record for the hosted model's ``computed`` metrics."""
    from sparktune.evaluate import EvaluateResult
    from sparktune.evaluate.metrics import class_names
    from sparktune.tasks import Task

    return EvaluateResult(
        model_uri=f"openai:{spec.model}", model_version="", task=Task.CLASSIFICATION, table=spec.table,
        table_version=version, split=spec.split or None, rows=computed["n"],
        metrics={k: computed[k] for k in ("accuracy", "precision", "recall", "f1")}, per_class=computed["per_class"],
        labels=class_names(len(computed["confusion_matrix"]), list(spec.template.label_names)),
        confusion_matrix=computed["confusion_matrix"], limit=spec.limit or None, predictions_table=spec.predictions,
        predictions_version=predictions_version,
    )


def _log_score(tracker, creds, spec: ScoreSpec, result: ScoreResult, run_id: str | None, job_id: str | None) -> str:
    """Log ``result`` to ``run_id``, else the fine-tuning job's run, else a new run (ended here); returns
    the run's id."""
    from sparktune.evaluate import log_evaluation
    from sparktune.openai.client import find_job_run

    if run_id is None and job_id:
        run_id = find_job_run(tracker, job_id)
    created = run_id is None
    if run_id is None:
        run_id = tracker.start_run(f"openai score {spec.model}", tags={"sparktune.stage": "openai-score",
                                                                       "sparktune.model_kind": "hosted"})
    evaluation = result.evaluation
    evaluation.run_id = run_id
    log_evaluation(tracker, run_id, evaluation)  # evaluate's metric names, tags and report
    prefix = spec.split or "eval"
    tracker.log_metrics(run_id, {f"{prefix}/unparsed": result.unparsed, f"{prefix}/errors": result.errors,
                                 f"{prefix}/retries": result.retries})
    tracker.set_tags(run_id, {"sparktune.openai.deployment": spec.model,
                              f"sparktune.{prefix}.predictions": spec.predictions or ""})
    tracker.log_dict(run_id, {"unparsed": result.unparsed, "errors": result.errors, "retries": result.retries,
                              "examples": [{k: creds.scrub(v) for k, v in e.items()} for e in result.examples]},
                     f"evaluation/{prefix}_hosted.json")
    if created:
        tracker.end_run(run_id)
    return run_id


_COMPARED = ("n", "accuracy", "precision", "recall", "f1")


def run_row(tracker, run_id: str, split: str, label: str | None = None) -> tuple[str, dict]:
    """A run's ``<split>/<metric>`` values (and its row count tag as ``n``) for ``comparison_table``."""
    run = tracker.get_run(run_id)
    values = {name: run.data.metrics.get(f"{split}/{name}") for name in _COMPARED[1:]}
    rows = run.data.tags.get(f"sparktune.{split}.rows")
    values["n"] = int(rows) if rows and rows.isdigit() else None
    return (label or run.info.run_name or run_id), values


def comparison_table(rows: list, split: str) -> str:
    """``rows``: ``(label, {metric: value})`` from ``run_row``, printed side by side."""
    width = max([len("model")] + [len(label) for label, _ in rows])
    lines = [f"{split} split", f"{'model':<{width}}  " + "  ".join(f"{m:>9}" for m in _COMPARED)]
    for label, metrics in rows:
        cells = []
        for name in _COMPARED:
            value = metrics.get(name)
            cells.append(f"{'-':>9}" if value is None else (f"{int(value):>9d}" if name == "n" else f"{value:>9.4f}"))
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
