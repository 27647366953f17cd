"""``sparktune openai ...``: export, validate, submit, follow, deploy and score a hosted fine-tune.

    sparktune openai export   --table ./data/imdb_raw --output ./data/openai --limit 1000 --validation-limit 200
    sparktune openai validate --data ./data/openai
    sparktune openai submit   --data ./data/openai --suffix imdb --epochs 2 --wait
    sparktune openai deploy   --data ./data/openai --name imdb-ft
    sparktune openai score    --table ./data/imdb_raw --deployment imdb-ft --data ./data/openai \\
                              --predictions ./data/openai_predictions --compare <open model's run id>

Credentials come from the environment only (AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY or
AZURE_OPENAI_AD_TOKEN, OPENAI_API_VERSION; or OPENAI_API_KEY), or a Databricks secret scope
(--secret-scope); see docs/azure_openai.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

from sparktune.errors import SparktuneError
from sparktune.openai.client import DEFAULT_BASE_MODEL
from sparktune.openai.export import DEFAULT_LABEL_NAMES, DEFAULT_SYSTEM_PROMPT, DEFAULT_USER_TEMPLATE, ExportRows
from sparktune.openai.validate import DEFAULT_PRICE_PER_MILLION
from sparktune.settings import Stage, add_stage, option

__all__ = [
    "DeploySettings",
    "ExportSettings",
    "FollowSettings",
    "ScoreSettings",
    "SubmitSettings",
    "ValidateSettings",
    "add_cli",
    "deploy_stage",
    "export_stage",
    "follow_stage",
    "score_stage",
    "submit_stage",
    "validate_stage",
]


# Settings shared by several steps -----------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TemplateSettings:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """The system message; empty: none."""
    user_template: str = DEFAULT_USER_TEMPLATE
    """The user message; {text} is replaced by the review, \\n is a new line."""
    label_names: list[str] = field(default_factory=lambda: list(DEFAULT_LABEL_NAMES))
    """The answers for labels 0, 1, ... (comma-separated)."""

    def template(self):
        from sparktune.openai.export import PromptTemplate

        return PromptTemplate(self.system_prompt, self.user_template.replace("\\n", "\n"), tuple(self.label_names))


@dataclass(frozen=True, kw_only=True)
class ValidationSettings:
    base_model: str = DEFAULT_BASE_MODEL
    """Base model to fine-tune."""
    epochs: int | None = None
    """Training epochs; empty: the service chooses from the example count."""
    price_per_million: float = DEFAULT_PRICE_PER_MILLION
    """USD per 1M training tokens for the cost estimate (check your price list)."""


@dataclass(frozen=True, kw_only=True)
class ServiceSettings:
    secret_scope: str = ""
    """On Databricks: read the AZURE_OPENAI_* values from this secret scope."""
    poll_interval: float = 10.0
    """Seconds between status checks."""
    timeout: float = 0.0
    """Stop waiting after this many seconds (0: no limit)."""


# The steps -------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ExportSettings(TemplateSettings, ValidationSettings, ExportRows):
    """``sparktune openai export``'s flags: the rows (``ExportRows``, declared with the export), the
    prompt template, the validation's settings, and these two."""

    force: bool = False
    """Rewrite even when the files are up to date."""
    validate: bool = True
    """Validate the files and print their summary: examples, tokens, cost."""


@dataclass(frozen=True, kw_only=True)
class ValidateSettings(ValidationSettings):
    """``sparktune openai validate``'s flags."""

    data: str = ""
    """An export folder (train.jsonl + validation.jsonl)."""
    train: str = ""
    """A training JSONL file (instead of data)."""
    validation: str = ""
    """A validation JSONL file (with train)."""


@dataclass(frozen=True, kw_only=True)
class SubmitSettings(ValidationSettings, ServiceSettings):
    """``sparktune openai submit``'s flags."""

    data: str
    """The export folder."""
    batch_size: int | None = None
    """Training batch size; empty: the service chooses."""
    learning_rate_multiplier: float | None = None
    """Learning rate multiplier; empty: the service chooses."""
    suffix: str = ""
    """Added to the fine-tuned model's name (at most 40 characters)."""
    seed: int | None = None
    """The job's seed, for reproducible runs."""
    wait: bool = False
    """Follow the job until it ends."""


@dataclass(frozen=True, kw_only=True)
class FollowSettings(ServiceSettings):
    """``sparktune openai follow``'s flags."""

    job: str = ""
    """Fine-tuning job id; empty: the one in data's job.json."""
    data: str = ""
    """The export folder `submit` wrote job.json into."""
    run_id: str = ""
    """MLflow run of the job; empty: found by the job id."""


@dataclass(frozen=True, kw_only=True)
class DeploySettings(ServiceSettings):
    """``sparktune openai deploy``'s flags."""

    name: str
    """Deployment name (what score's --deployment takes)."""
    model: str = ""
    """Fine-tuned model name; empty: from data's job.json."""
    data: str = ""
    """The export folder `follow` recorded the model in."""
    sku: str = "standard"
    """Deployment SKU: standard, globalstandard, developer ..."""
    capacity: int = 1
    """Capacity units (thousands of tokens per minute)."""


@dataclass(frozen=True, kw_only=True)
class ScoreSettings(TemplateSettings):
    """``sparktune openai score``'s flags."""

    table: str
    """Raw TABLE with row_id, split, text, label."""
    deployment: str
    """Azure deployment name (on OpenAI: the fine-tuned model name)."""
    data: str = ""
    """The export folder: score with its prompt template, log into its job's MLflow run."""
    split: str = "test"
    """Split to score; empty: all rows."""
    limit: int = 0
    """Score at most this many rows (0: all)."""
    predictions: str = option("", metavar="TABLE")
    """Write the predictions Delta table here; empty: none."""
    concurrency: int = 8
    """Requests in flight at most, in total."""
    partitions: int = 2
    """Spark tasks sharing them."""
    max_retries: int = 6
    """Retries per request on 429/5xx, with backoff."""
    max_tokens: int = 5
    """Longest answer, in tokens."""
    run_id: str = ""
    """MLflow run to log to; empty: the job's run from data, else a new run."""
    compare: list[str] = option(default_factory=list, metavar="RUN_ID")
    """Print these runs' metrics beside (repeatable)."""
    mlflow: bool = True
    """Log the metrics and the predictions table's version to MLflow."""
    secret_scope: str = ""
    """On Databricks: read missing AZURE_OPENAI_* values from this secret scope."""


def _files(s) -> tuple[str, str | None]:
    from sparktune.openai.export import TRAIN_FILE, VALIDATION_FILE

    if getattr(s, "train", ""):
        return s.train, s.validation or None
    if not s.data:
        raise SparktuneError("give --data DIR (an export folder) or --train FILE [--validation FILE]")
    return os.path.join(s.data, TRAIN_FILE), os.path.join(s.data, VALIDATION_FILE)


def _validate(s: ValidationSettings, train: str, validation: str | None):
    from sparktune.openai.validate import validate_files

    return validate_files(train, validation, base_model=s.base_model, epochs=s.epochs,
                          price_per_million=s.price_per_million)


def export_stage(spark, settings: ExportSettings, tracker=None):
    """``sparktune openai export``: a raw table -> chat JSONL (train + validation), then validated."""
    from sparktune.openai.export import ExportSpec, export_chat_jsonl

    s = settings
    spec = ExportSpec(**s.rows(), template=s.template())
    spec.check()
    result = export_chat_jsonl(spark, spec, force=s.force)
    if s.validate:
        result.validation = _validate(s, result.train_path, result.validation_path)
    return result


def validate_stage(spark, settings: ValidateSettings, tracker=None):
    """``sparktune openai validate`` (offline: no Spark, no service)."""
    train, validation = _files(settings)
    return _validate(settings, train, validation)


def _credentials(secret_scope: str):
    from sparktune.openai.client import credentials_from_env

    return credentials_from_env(secret_scope or None)


def submit_stage(spark, settings: SubmitSettings, tracker=None):
    """``sparktune openai submit``: validate, upload, create the job (and follow it with ``wait``)."""
    from sparktune.openai.client import JobSpec, follow_job, submit_job

    s = settings
    creds = _credentials(s.secret_scope)  # before any work: a missing key fails here
    spec = JobSpec(s.base_model, s.epochs, s.batch_size, s.learning_rate_multiplier, s.suffix, s.seed)
    spec.check()
    train, validation = _files(s)
    report = _validate(s, train, validation)
    result = submit_job(creds, s.data, spec, tracker, report, poll_interval=min(s.poll_interval, 5.0))
    print(f"job_id: {result.job_id}")
    print(f"run_id: {result.run_id}")
    sys.stdout.flush()
    if s.wait:
        result.followed = follow_job(creds, result.job_id, tracker, result.run_id, s.poll_interval, s.timeout,
                                     data_dir=s.data)
        result.status = result.followed.status
    return result


def _job_record(data: str) -> dict:
    from sparktune.openai.client import read_job_file

    return read_job_file(data) if data else {}


def follow_stage(spark, settings: FollowSettings, tracker=None):
    """``sparktune openai follow``: a job's status and events until it ends; its metrics to MLflow."""
    from sparktune.openai.client import follow_job

    s = settings
    creds = _credentials(s.secret_scope)
    record = _job_record(s.data)
    job_id = s.job or record.get("job_id")
    if not job_id:
        raise SparktuneError("give --job JOB_ID or --data DIR (an export folder that `submit` wrote job.json into)")
    return follow_job(creds, job_id, tracker, s.run_id or record.get("run_id"), s.poll_interval, s.timeout,
                      data_dir=s.data or None)


def deploy_stage(spark, settings: DeploySettings, tracker=None):
    """``sparktune openai deploy``: an Azure OpenAI deployment of the fine-tuned model."""
    from sparktune.openai.client import Provider
    from sparktune.openai.deploy import DeploymentSpec, DeployResult, deploy_model, management_from_env

    s = settings
    creds = _credentials(s.secret_scope)
    model = s.model or _job_record(s.data).get("fine_tuned_model")
    if not model:
        raise SparktuneError("give --model (the fine-tuned model name) or --data DIR after `sparktune openai follow` "
                             "recorded it")
    if creds.provider == Provider.OPENAI:
        return DeployResult(model, model, creds.provider.value, "served by name")
    spec = DeploymentSpec(s.name, model, s.sku, s.capacity)
    return deploy_model(management_from_env(), spec, poll_interval=s.poll_interval, timeout=s.timeout or 3600.0)


def score_stage(spark, settings: ScoreSettings, tracker=None):
    """``sparktune openai score``: the deployment on a table's rows, scored like ``sparktune evaluate``."""
    from sparktune.openai.export import PromptTemplate, read_manifest
    from sparktune.openai.score import ScoreSpec, run_row, score_model

    s = settings
    creds = _credentials(s.secret_scope)
    template = s.template()
    record = {}
    if s.data:
        manifest = read_manifest(s.data)
        if manifest is None:
            raise SparktuneError(f"--data {s.data}: no manifest.json there; give the folder `sparktune openai "
                                 "export` wrote")
        t = manifest["settings"]["template"]
        template = PromptTemplate(t["system"], t["user"], tuple(t["label_names"]))  # score with the prompt it learnt
        record = _job_record(s.data) if os.path.isfile(os.path.join(s.data, "job.json")) else {}
    spec = ScoreSpec(
        table=s.table,
        model=s.deployment,
        split=s.split,
        limit=s.limit,
        predictions=s.predictions or None,
        concurrency=s.concurrency,
        partitions=s.partitions,
        max_retries=s.max_retries,
        max_tokens=s.max_tokens,
        template=template,
    )
    spec.check()
    tracker = tracker if s.mlflow else None
    result = score_model(spark, creds, spec, tracker, run_id=s.run_id or record.get("run_id"),
                         job_id=record.get("job_id"))
    if tracker is not None and result.run_id:
        split = spec.split or "eval"
        result.comparison = [run_row(tracker, result.run_id, split, f"{result.model} (hosted)")]
        result.comparison += [run_row(tracker, run_id, split) for run_id in s.compare]
    return result


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "openai", help="fine-tune a hosted model (Azure OpenAI / OpenAI) from the same tables and score it",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="openai_command", metavar="STEP")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    for stage in (
        Stage("export", ExportSettings, export_stage,
              help="raw Delta table -> chat JSONL (train + validation), then validate"),
        Stage("validate", ValidateSettings, validate_stage, spark=False,
              help="check chat JSONL and count tokens offline: examples, tokens, cost"),
        Stage("submit", SubmitSettings, submit_stage, spark=False, tracker=True,
              help="validate, upload the files and create the fine-tuning job (--wait: follow it)"),
        Stage("follow", FollowSettings, follow_stage, spark=False, tracker=True,
              help="print a job's status and events until it ends; log its metrics to MLflow"),
        Stage("deploy", DeploySettings, deploy_stage, spark=False,
              help="create an Azure OpenAI deployment of the fine-tuned model and wait for it"),
        Stage("score", ScoreSettings, score_stage, tracker=True, check=lambda s: _credentials(s.secret_scope),
              help="score the deployment on a table's test rows: metrics, predictions table, MLflow"),
    ):
        add_stage(sub, stage)


