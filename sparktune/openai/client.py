"""Credentials, the SDK client, and the fine-tuning job: upload, create, follow.

Credentials come only from the environment (or, on Databricks, a secret scope), never from
flags or config files, and are checked before any work starts:

- Azure OpenAI: ``AZURE_OPENAI_ENDPOINT`` plus ``AZURE_OPENAI_API_KEY`` or an Entra ID token in
  ``AZURE_OPENAI_AD_TOKEN``; ``OPENAI_API_VERSION`` (default ``DEFAULT_API_VERSION``).
- OpenAI (no Azure endpoint set): ``OPENAI_API_KEY`` and optionally ``OPENAI_BASE_URL``.

With ``--secret-scope SCOPE`` on Databricks, a variable that is not set is read from the scope
under the same name in lower case with dashes (``azure-openai-api-key``, ...).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sparktune.errors import SparktuneError

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_BASE_MODEL",
    "JOB_FILE",
    "Credentials",
    "FollowResult",
    "JobSpec",
    "JobStatus",
    "Provider",
    "SubmitResult",
    "credentials_from_env",
    "follow_job",
    "parse_result_file",
    "submit_job",
    "upload_file",
]

DEFAULT_API_VERSION = "2024-10-21"  # Azure OpenAI's GA data-plane version with fine-tuning
DEFAULT_BASE_MODEL = "gpt-4o-mini-2024-07-18"
JOB_FILE = "job.json"  # beside the exported files: what `follow`, `deploy` and `score` pick up

ENV_NAMES = ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "OPENAI_API_VERSION",
             "OPENAI_API_KEY", "OPENAI_BASE_URL")


class Provider(str, Enum):
    AZURE = "azure"
    OPENAI = "openai"


class JobStatus(str, Enum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def terminal(cls) -> set:
        return {cls.SUCCEEDED.value, cls.FAILED.value, cls.CANCELLED.value}


@dataclass(frozen=True)
class Credentials:
    """Where and how to call the API. Secrets are kept out of ``repr`` (and so out of logs)."""

    provider: Provider
    endpoint: str = ""
    api_version: str = ""
    api_key: str = field(default="", repr=False)
    ad_token: str = field(default="", repr=False)

    def secrets(self) -> list:
        return [s for s in (self.api_key, self.ad_token) if s]

    def describe(self) -> str:
        if self.provider == Provider.AZURE:
            auth = "API key" if self.api_key else "Entra ID token"
            return f"Azure OpenAI at {self.endpoint} (api-version {self.api_version}, {auth})"
        return "OpenAI" + (f" at {self.endpoint}" if self.endpoint else "")

    def client(self, max_retries: int = 5, timeout: float = 120.0):
        """An SDK client; it retries 429 and 5xx answers itself, honouring Retry-After."""
        if self.provider == Provider.AZURE:
            from openai import AzureOpenAI

            return AzureOpenAI(
                azure_endpoint=self.endpoint,
                api_version=self.api_version,
                api_key=self.api_key or None,
                azure_ad_token=None if self.api_key else self.ad_token,
                max_retries=max_retries,
                timeout=timeout,
            )
        from openai import OpenAI

        return OpenAI(api_key=self.api_key, base_url=self.endpoint or None, max_retries=max_retries, timeout=timeout)


def _secret_scope_reader(scope: str) -> Callable[[str], str]:
    try:
        from databricks.sdk.runtime import dbutils
    except Exception as exc:
        raise SparktuneError(
            f"--secret-scope {scope}: Databricks secrets are only readable on a Databricks cluster or with "
            f"databricks-sdk configured ({exc}); set the AZURE_OPENAI_* environment variables instead"
        ) from exc

    def read(name: str) -> str:
        try:
            return dbutils.secrets.get(scope=scope, key=name.lower().replace("_", "-"))
        except Exception:  # noqa: BLE001 - dbutils raises its own types for a missing key: treat as unset
            return ""

    return read


def credentials_from_env(secret_scope: str | None = None, environ=None) -> Credentials:
    """Read and check the credentials; raise ``SparktuneError`` saying which variable is missing."""
    env = os.environ if environ is None else environ
    reader = _secret_scope_reader(secret_scope) if secret_scope else None

    def get(name: str) -> str:
        value = (env.get(name) or "").strip()
        if not value and reader is not None:
            value = (reader(name) or "").strip()
        return value

    endpoint = get("AZURE_OPENAI_ENDPOINT")
    where = f" (environment or secret scope {secret_scope!r})" if secret_scope else " (environment)"
    if endpoint:
        if not endpoint.startswith(("https://", "http://")):
            raise SparktuneError("AZURE_OPENAI_ENDPOINT must be a URL like https://NAME.openai.azure.com; found "
                                 f"{endpoint!r}")
        key, token = get("AZURE_OPENAI_API_KEY"), get("AZURE_OPENAI_AD_TOKEN")
        if not key and not token:
            raise SparktuneError(
                f"AZURE_OPENAI_ENDPOINT is set but neither AZURE_OPENAI_API_KEY nor AZURE_OPENAI_AD_TOKEN is{where}: "
                "set the resource's key (Azure portal: Keys and Endpoint) or an Entra ID token "
                "(az account get-access-token --resource https://cognitiveservices.azure.com)"
            )
        return Credentials(
            Provider.AZURE, endpoint.rstrip("/"), get("OPENAI_API_VERSION") or DEFAULT_API_VERSION, key, token
        )
    key = get("OPENAI_API_KEY")
    if key:
        return Credentials(Provider.OPENAI, get("OPENAI_BASE_URL"), "", key, "")
    raise SparktuneError(
        f"no API credentials{where}: for Azure OpenAI set AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_API_KEY "
        "(or AZURE_OPENAI_AD_TOKEN), optionally OPENAI_API_VERSION; for OpenAI set OPENAI_API_KEY"
    )


@dataclass(frozen=True)
class JobSpec:
    """The fine-tuning job's settings; ``None`` leaves a hyperparameter to the service."""

    base_model: str = DEFAULT_BASE_MODEL
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    suffix: str = ""
    seed: int | None = None

    def check(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise SparktuneError(f"--epochs must be a positive integer; found {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SparktuneError(f"--batch-size must be a positive integer; found {self.batch_size}")
        if self.learning_rate_multiplier is not None and self.learning_rate_multiplier <= 0:
            raise SparktuneError(f"--learning-rate-multiplier must be > 0; found {self.learning_rate_multiplier}")
        if len(self.suffix) > 40:  # the service's limit on the model-name suffix
            raise SparktuneError(f"--suffix is at most 40 characters; found {len(self.suffix)}")

    def hyperparameters(self) -> dict:
        out = {
            "n_epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate_multiplier": self.learning_rate_multiplier,
        }
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class SubmitResult:
    job_id: str
    run_id: str
    training_file_id: str
    validation_file_id: str
    status: str


@dataclass
class FollowResult:
    job_id: str
    run_id: str | None
    status: str
    fine_tuned_model: str | None
    trained_tokens: int | None
    steps_logged: int
    error: str | None = None


def upload_file(client, path: str, poll_interval: float = 2.0, timeout: float = 1800.0, say=print) -> str:
    """Upload one JSONL file for fine-tuning and wait until the service has processed it."""
    with open(path, "rb") as handle:
        uploaded = client.files.create(file=(os.path.basename(path), handle), purpose="fine-tune")
    say(f"uploaded {path} as {uploaded.id} ({uploaded.bytes:,} bytes), status {uploaded.status}")
    deadline = time.monotonic() + timeout
    current = uploaded
    while current.status not in ("processed", "error", "deleted"):
        if time.monotonic() > deadline:
            raise SparktuneError(f"file {uploaded.id} ({path}) still {current.status!r} after {timeout:.0f} s; try "
                                 "again later")
        time.sleep(poll_interval)
        current = client.files.retrieve(uploaded.id)
    if current.status != "processed":
        details = getattr(current, "status_details", None) or "no details given"
        raise SparktuneError(f"the service rejected {path} (file {uploaded.id}, status {current.status}): {details}")
    return uploaded.id


def _write_job_file(data_dir: str, record: dict) -> None:
    path = os.path.join(data_dir, JOB_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_job_file(data_dir: str) -> dict:
    path = os.path.join(data_dir, JOB_FILE)
    if not os.path.isfile(path):
        raise SparktuneError(f"{path} not found: run `sparktune openai submit --data {data_dir}` first, or pass --job")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def submit_job(creds: Credentials, data_dir: str, spec: JobSpec, log, report, poll_interval: float = 2.0,
               file_timeout: float = 1800.0, say=print) -> SubmitResult:
    """Upload the validated files, create the job, open its MLflow run; ``report`` is the validation report."""
    from sparktune.openai.export import read_manifest
    from sparktune.openai.tracking import JOB_ID_TAG

    spec.check()
    manifest = read_manifest(data_dir) or {}
    client = creds.client()
    say(f"service: {creds.describe()}")
    train_id = upload_file(client, report.train.path, poll_interval, file_timeout, say)
    validation_id = (
        upload_file(client, report.validation.path, poll_interval, file_timeout, say) if report.validation else None
    )
    kwargs: dict[str, Any] = {
        "model": spec.base_model, "training_file": train_id, "hyperparameters": spec.hyperparameters()
    }
    if validation_id:
        kwargs["validation_file"] = validation_id
    if spec.suffix:
        kwargs["suffix"] = spec.suffix
    if spec.seed is not None:
        kwargs["seed"] = spec.seed
    job = client.fine_tuning.jobs.create(**kwargs)
    say(f"created fine-tuning job {job.id} on {spec.base_model}, status {job.status}")

    source = manifest.get("source", {})
    run_id = log.start_run(
        f"openai {spec.base_model}{' ' + spec.suffix if spec.suffix else ''}",
        tags={
            "sparktune.stage": "openai-finetune",
            "sparktune.model_kind": "hosted",
            JOB_ID_TAG: job.id,
            "sparktune.openai.provider": creds.provider.value,
            "sparktune.openai.training_file_id": train_id,
            "sparktune.openai.validation_file_id": validation_id or "",
            "sparktune.openai.status": job.status,
        },
    )
    log.log_params(
        run_id,
        {
            "base_model": spec.base_model,
            "epochs": spec.epochs if spec.epochs is not None else "auto",
            "batch_size": spec.batch_size if spec.batch_size is not None else "auto",
            "learning_rate_multiplier": spec.learning_rate_multiplier
            if spec.learning_rate_multiplier is not None
            else "auto",
            "suffix": spec.suffix,
            "seed": spec.seed,
            "provider": creds.provider.value,
            "endpoint": creds.endpoint or "api.openai.com",
            "api_version": creds.api_version,
            "source_table": source.get("table"),
            "source_version": source.get("version"),
            "train_examples": report.train.examples,
            "validation_examples": report.validation.examples if report.validation else 0,
            "train_tokens": report.train.total_tokens,
            "estimated_billed_tokens": report.billed_training_tokens,
            "estimated_cost_usd": round(report.estimated_cost, 4),
            "job_id": job.id,
            "training_file_id": train_id,
            "validation_file_id": validation_id,
        },
    )
    log.log_json(run_id, report.to_dict(), "validation_report.json")
    if manifest:
        log.log_json(run_id, manifest, "export_manifest.json")
    _write_job_file(data_dir, {
        "job_id": job.id,
        "run_id": run_id,
        "base_model": spec.base_model,
        "training_file_id": train_id,
        "validation_file_id": validation_id,
        "provider": creds.provider.value,
        "tracking_uri": log.tracking_uri,
        "experiment": log.experiment,
    })
    return SubmitResult(job.id, run_id, train_id, validation_id or "", job.status)


# Result-file columns (OpenAI's and Azure's names) -> <split>/<metric>.
_RESULT_COLUMNS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/token_accuracy",
    "train_mean_token_accuracy": "train/token_accuracy",
    "valid_loss": "validation/loss",
    "valid_mean_token_accuracy": "validation/token_accuracy",
    "full_valid_loss": "validation/full_loss",
    "full_valid_mean_token_accuracy": "validation/full_token_accuracy",
}


def parse_result_file(content: bytes | str) -> list:
    """The job's results CSV -> ``[(step, {metric: value})]``; Azure serves it base64-encoded."""
    raw = content.encode() if isinstance(content, str) else bytes(content)
    text = raw.decode("utf-8", errors="replace")
    if not text.lstrip().startswith("step"):
        try:
            text = base64.b64decode(raw, validate=False).decode("utf-8")
        except Exception as exc:
            raise SparktuneError(f"the job's result file is neither CSV nor base64 CSV ({exc})") from exc
    rows = []
    for record in csv.DictReader(io.StringIO(text)):
        try:
            step = int(float(record.get("step") or 0))
        except ValueError:
            continue
        values = {}
        for column, name in _RESULT_COLUMNS.items():
            cell = (record.get(column) or "").strip()
            if cell:
                try:
                    values[name] = float(cell)
                except ValueError:
                    pass
        if values:
            rows.append((step, values))
    return rows


def _fmt_elapsed(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def follow_job(creds: Credentials, job_id: str, log, run_id: str | None = None, poll_interval: float = 10.0,
               timeout: float = 0.0, say=print) -> FollowResult:
    """Print status and new events until the job ends; log step metrics and the outcome to its run.

    A failed job raises ``SparktuneError`` with the service's error message (after the run is
    marked failed); ``timeout`` (seconds, 0 = none) stops following without touching the job.
    """
    from sparktune.openai.tracking import JOB_ID_TAG

    client = creds.client()
    if run_id is None:
        run_id = log.find_run(JOB_ID_TAG, job_id)
    seen: set = set()
    start = time.monotonic()
    last_status = None
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        page = client.fine_tuning.jobs.list_events(job_id, limit=100)
        fresh = [e for e in page.data if e.id not in seen]
        for event in sorted(fresh, key=lambda e: (e.created_at, e.id)):
            seen.add(event.id)
            say(f"  [{time.strftime('%H:%M:%S', time.gmtime(event.created_at))}] {event.level}: {event.message}")
        if job.status != last_status or fresh:
            estimate = ""
            if getattr(job, "estimated_finish", None) and job.status not in JobStatus.terminal():
                estimate = f", estimated finish {time.strftime('%H:%M:%S', time.gmtime(job.estimated_finish))} UTC"
            say(f"{_fmt_elapsed(time.monotonic() - start)} job {job_id}: {job.status}{estimate}")
            last_status = job.status
            if run_id:
                log.set_tags(run_id, {"sparktune.openai.status": job.status})
        if job.status in JobStatus.terminal():
            break
        if timeout and time.monotonic() - start > timeout:
            raise SparktuneError(
                f"job {job_id} is still {job.status} after {timeout:.0f} s (it keeps running on the service); "
                f"follow it again with `sparktune openai follow --job {job_id}`"
            )
        time.sleep(poll_interval)

    steps = 0
    if job.result_files:
        rows = parse_result_file(client.files.content(job.result_files[0]).content)
        steps = len(rows)
        if run_id and rows:
            log.log_metric_series(run_id, rows)
    error = None
    if job.status == JobStatus.FAILED.value:
        err = job.error
        code = getattr(err, "code", None) if err else None
        message = getattr(err, "message", None) if err else None
        error = f"{code or 'error'}: {message or 'the service gave no message'}"
    if run_id:
        log.set_tags(run_id, {
            "sparktune.openai.status": job.status,
            "sparktune.openai.fine_tuned_model": job.fine_tuned_model,
            "sparktune.openai.error": error,
        })
        if job.trained_tokens is not None:
            log.log_metrics(run_id, {"train/trained_tokens": job.trained_tokens})
        log.log_json(run_id, job.model_dump(mode="json"), "job.json")
        if job.status == JobStatus.SUCCEEDED.value:
            # The last epochs' checkpoints are deployable models too; keep their names with the run.
            checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id)
            log.log_json(run_id, [c.model_dump(mode="json") for c in checkpoints.data], "checkpoints.json")
        log.end_run(run_id, {"succeeded": "FINISHED", "failed": "FAILED"}.get(job.status, "KILLED"))
    result = FollowResult(job_id, run_id, job.status, job.fine_tuned_model, job.trained_tokens, steps, error)
    if error:
        raise SparktuneError(f"fine-tuning job {job_id} failed: {error}")
    if job.status == JobStatus.CANCELLED.value:
        raise SparktuneError(f"fine-tuning job {job_id} was cancelled")
    say(f"job {job_id} succeeded: fine-tuned model {job.fine_tuned_model}"
        + (f", {job.trained_tokens:,} trained tokens" if job.trained_tokens else "") + f", {steps} steps logged")
    return result
