"""Score the hosted model on a raw table's test rows, the way the open model is scored.

Spark owns the data movement: the rows are read from the pinned Delta version and scored by
``mapInPandas`` tasks, each sending chat completions (temperature 0, the export's prompt) from a
small thread pool, so at most ``concurrency`` requests are in flight in total. The SDK retries
429 and 5xx answers with backoff, honouring Retry-After. Each answer is parsed to a label; one
that names no label (or a request that still failed) counts as wrong and is reported. The
predictions go to a Delta table; metrics come from ``sparktune.evaluate.compute_metrics`` on
that table and are logged as ``<split>/<metric>`` beside the open model's runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sparktune.errors import SparktuneError
from sparktune.openai.export import PromptTemplate

__all__ = ["PREDICTION_SCHEMA", "ScoreResult", "ScoreSpec", "comparison_table", "parse_answer", "score_model"]

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
class ScoreResult:
    model: str
    table: str
    table_version: int
    split: str
    metrics: dict
    unparsed: int
    errors: int
    retries: int
    predictions_table: str | None
    predictions_version: int | None
    run_id: str | None
    examples: list  # a few unparsed answers / errors, for the report


def _partition_scorer(creds, spec: ScoreSpec, threads: int):
    """The function each Spark task runs: a client and a thread pool per task, results per row."""
    template, model, label_names = spec.template, spec.model, list(spec.template.label_names)
    max_retries, max_tokens, timeout = spec.max_retries, spec.max_tokens, spec.request_timeout
    secrets = creds.secrets()

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

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
                return None, scrub(f"{type(exc).__name__}: {exc}")[:500], max_retries

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
        raise SparktuneError(f"--deployment {spec.model!r} was not found by the service ({_scrub(exc, creds)}); "
                             "deploy it first (`sparktune openai deploy`) or check the name") from exc
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        raise SparktuneError(f"the service refused the credentials ({_scrub(exc, creds)}); check AZURE_OPENAI_API_KEY "
                             "/ "
                             "AZURE_OPENAI_AD_TOKEN and the endpoint") from exc
    except openai.APIError as exc:
        raise SparktuneError(f"a test request to {spec.model!r} failed: {_scrub(exc, creds)}") from exc
    return int(getattr(raw, "retries_taken", 0) or 0)


def _scrub(exc, creds) -> str:
    text = str(exc)
    for secret in creds.secrets():
        text = text.replace(secret, "***")
    return text[:400]


def score_model(spark, creds, spec: ScoreSpec, log=None, run_id: str | None = None, job_id: str | None = None,
                say=print) -> ScoreResult:
    """Score ``spec.model`` on ``spec.table``'s ``spec.split`` rows; log to ``run_id``

    (or the job's run, or a new one).
    """
    from pyspark.sql import functions as F

    from sparktune.evaluate import compute_metrics
    from sparktune.openai.tracking import JOB_ID_TAG
    from sparktune.tables import check_writes, read_table, table_version, write_table

    spec.check()
    check_writes(spark, "openai-score", tables={"--predictions": spec.predictions}, inputs={"--table": spec.table})
    version = table_version(spark, spec.table)
    df = read_table(spark, spec.table, version=version, what="--table")
    missing = [c for c in ("row_id", "text", "label") + (("split",) if spec.split else ()) if c not in df.columns]
    if missing:
        raise SparktuneError(f"--table {spec.table}: missing column(s) {missing} (columns: {df.columns}); score a raw "
                             "table from `sparktune ingest`")
    if spec.split:
        df = df.where(F.col("split") == spec.split)
    df = df.where(F.col("label") >= 0).select("row_id", "text", "label")
    if spec.limit:
        df = df.orderBy(F.xxhash64(F.col("row_id"))).limit(spec.limit)
    retries = _preflight(creds, spec)

    partitions = min(spec.partitions, spec.concurrency)
    threads = max(1, spec.concurrency // partitions)
    say(f"scoring {spec.model} on {spec.table} (version {version}, split {spec.split or 'all'}): "
        f"{partitions} Spark task(s) x {threads} request(s) in flight")
    scored = df.repartition(partitions).mapInPandas(_partition_scorer(creds, spec, threads), PREDICTION_SCHEMA)
    predictions_version = None
    if spec.predictions:
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
        out = read_table(spark, spec.predictions, version=predictions_version)
    else:
        out = scored.cache()
    counts = out.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum((~F.col("parsed") & F.col("error").isNull()).cast("int")).alias("unparsed"),
        F.sum(F.col("error").isNotNull().cast("int")).alias("errors"),
        F.sum("retries").alias("retries"),
    ).collect()[0]
    if not counts["n"]:
        raise SparktuneError(f"no labelled rows in {spec.table} split {spec.split!r}; pick a split with labels (e.g. "
                             "test)")
    if counts["errors"] == counts["n"]:
        first = out.where(F.col("error").isNotNull()).select("error").first()["error"]
        raise SparktuneError(f"every request failed; the first error: {first}")
    rows = out.select("label", "prediction").toPandas()
    label_names = list(spec.template.label_names)
    metrics = compute_metrics(rows["label"], rows["prediction"], label_names=label_names)
    examples = [r.asDict() for r in out.where(~F.col("parsed")).select("row_id", "answer", "error").limit(5).collect()]
    if not spec.predictions:
        out.unpersist()

    split = spec.split or "all"
    if log is not None:
        if run_id is None and job_id:
            run_id = log.find_run(JOB_ID_TAG, job_id)
        if run_id is None:
            run_id = log.start_run(f"openai score {spec.model}", tags={"sparktune.stage": "openai-score",
                                                                        "sparktune.model_kind": "hosted"})
        flat = {f"{split}/{k}": metrics[k] for k in ("n", "accuracy", "precision", "recall", "f1")}
        for name, row in metrics["per_class"].items():
            for key in ("precision", "recall", "f1"):
                flat[f"{split}/{key}_{name}"] = row[key]
        flat.update({f"{split}/unparsed": counts["unparsed"], f"{split}/errors": counts["errors"],
                     f"{split}/retries": retries + (counts["retries"] or 0)})
        log.log_metrics(run_id, flat)
        log.set_tags(run_id, {
            "sparktune.openai.deployment": spec.model,
            f"sparktune.{split}.table": spec.table,
            f"sparktune.{split}.table_version": version,
            f"sparktune.{split}.predictions": spec.predictions,
        })
        log.log_json(run_id, dict(metrics, unparsed=counts["unparsed"], errors=counts["errors"], examples=examples),
                     f"{split}_metrics.json", folder="evaluation")
    return ScoreResult(
        spec.model,
        spec.table,
        version,
        split,
        metrics,
        int(counts["unparsed"] or 0),
        int(counts["errors"] or 0),
        retries + int(counts["retries"] or 0),
        spec.predictions,
        predictions_version,
        run_id,
        examples,
    )


_COMPARED = ("n", "accuracy", "precision", "recall", "f1")


def _find_metric(metrics: dict, split: str, name: str):
    for key in (f"{split}/{name}", f"{split}_{name}"):  # `sparktune evaluate` logs <split>_<metric> today
        if key in metrics:
            return metrics[key]
    return None


def comparison_table(rows: list, split: str) -> str:
    """``rows``: ``(label, metrics dict keyed by MLflow metric names)``, printed side by side."""
    width = max([len("model")] + [len(label) for label, _ in rows])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{m:>9}" for m in _COMPARED)]
    for label, metrics in rows:
        cells = []
        for name in _COMPARED:
            value = _find_metric(metrics, split, name)
            cells.append(f"{'-':>9}" if value is None else (f"{int(value):>9d}" if name == "n" else f"{value:>9.4f}"))
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
