"""Credentials, the SDK client, and the fine-tuning job: upload, create, follow.

Credentials come only from the environment (or, on Databricks, a secret scope), never from
flags or config files, and are checked before any work starts:

- Azure OpenAI: ``AZURE_OPENAI_ENDPOINT`` plus ``AZURE_OPENAI_API_KEY`` or an Entra ID token in
  ``AZURE_OPENAI_AD_TOKEN``; ``OPENAI_API_VERSION`` (default ``DEFAULT_API_VERSION``).
- OpenAI (no Azure endpoint set): ``OPENAI_API_KEY`` and optionally ``OPENAI_BASE_URL``.

With ``--secret-scope SCOPE`` on Databricks each value is read from the scope under the same name
in lower case with dashes (``azure-openai-api-key``, ...), through ``sparktune.databricks.get_secret``
(the environment variable is the fallback).

The job's MLflow run is reached through the shared ``sparktune.tracking.Tracker``; the run is
found again by the job id tag (``JOB_ID_TAG``).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.results import StageResult

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_BASE_MODEL",
    "JOB_FILE",
    "JOB_ID_TAG",
    "Credentials",
    "FollowResult",
    "JobSpec",
    "JobStatus",
    "Provider",
    "SubmitResult",
    "credentials_from_env",
    "find_job_run",
    "follow_job",
    "parse_result_file",
    "read_job_file",
    "remember_model",
    "submit_job",
    "upload_file",
]

DEFAULT_API_VERSION = "2024-10-21"  # Azure OpenAI's GA data-plane version with fine-tuning
DEFAULT_BASE_MODEL = "gpt-4o-mini-2024-07-18"
JOB_FILE = "job.json"  # beside the exported files: what `follow`, `deploy` and `score` pick up
JOB_ID_TAG = "sparktune.openai.job_id"  # the MLflow tag that finds a job's run again
EVENT_PAGE = 100  # events per request (the service's default is 20)


class Provider(str, Enum):
    AZURE = "azure"
    OPENAI = "openai"


class JobStatus(str, Enum):
    """Job states: Azure's 2024-10-21 contract has created/pending/running and the three terminal
    ones; OpenAI's platform also reports validating_files and queued. Any other value is shown
    as the service sent it and followed until it is terminal."""

    CREATED = "created"
    PENDING = "pending"
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

    def scrub(self, text: object) -> str:
        """``text`` without the credentials in it: service and SDK messages reach prints and MLflow."""
        out = "" if text is None else str(text)
        for secret in self.secrets():
            out = out.replace(secret, "***")
        return out

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


def credentials_from_env(secret_scope: str | None = None, environ=None) -> Credentials:
    """Read and check the credentials; raise ``SparktuneError`` saying which variable is missing."""
    from sparktune.databricks import get_secret

    env = os.environ if environ is None else environ

    def get(name: str) -> str:
        if secret_scope:
            value = get_secret(secret_scope, name.lower().replace("_", "-"), name, environ=env, required=False)
        else:
            value = env.get(name)
        return (value or "").strip()

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
class FollowResult(StageResult):
    """How a followed job ended; ``warnings`` says what could not be recorded (e.g. its result file)."""

    job_id: str
    run_id: str | None
    status: str
    fine_tuned_model: str | None
    trained_tokens: int | None
    steps_logged: int
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"job_id: {self.job_id}", f"status: {self.status}",
                 f"fine_tuned_model: {self.fine_tuned_model}", f"run_id: {self.run_id}",
                 f"steps logged: {self.steps_logged}"]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class SubmitResult(StageResult):
    """The uploaded files and the created job (and, with ``--wait``, how it ended)."""

    job_id: str
    run_id: str
    training_file_id: str
    validation_file_id: str
    status: str
    validation: Any = field(default=None, repr=False)  # the ValidationReport the files passed
    followed: FollowResult | None = None

    def summary(self) -> str:
        lines = [self.validation.summary(), ""] if self.validation is not None else []
        lines += [f"job_id: {self.job_id}", f"run_id: {self.run_id}"]
        if self.followed is not None:
            lines += [f"status: {self.followed.status}", f"fine_tuned_model: {self.followed.fine_tuned_model}"]
            lines += [f"warning: {w}" for w in self.followed.warnings]
        return "\n".join(lines)


def upload_file(client, path: str, poll_interval: float = 2.0, timeout: float = 1800.0, say=print) -> str:
    """Upload one JSONL file for fine-tuning and wait until the service has processed it."""
    with open(path, "rb") as handle:
        uploaded = client.files.create(file=(os.path.basename(path), handle), purpose="fine-tune")
    size = getattr(uploaded, "bytes", None)  # optional in Azure's contract ("can be null")
    say(f"uploaded {path} as {uploaded.id} ({f'{size:,} bytes' if size is not None else 'size not reported'}), "
        f"status {uploaded.status}")
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


def remember_model(data_dir: str | None, model: str | None) -> None:
    """Record the fine-tuned model in ``data_dir``'s job.json (what `deploy` reads)."""
    path = os.path.join(data_dir, JOB_FILE) if data_dir else None
    if not model or not data_dir or not path or not os.path.isfile(path):
        return
    record = read_job_file(data_dir)
    record["fine_tuned_model"] = model
    _write_job_file(data_dir, record)


def find_job_run(tracker, job_id: str) -> str | None:
    """The newest run of ``tracker``'s experiment tagged with ``job_id``."""
    runs = tracker.client.search_runs([tracker.experiment_id()], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log_json(tracker, run_id: str, obj, name: str, creds: Credentials) -> None:
    """A JSON artifact under ``openai/``, scrubbed of the credentials."""
    tracker.log_dict(run_id, json.loads(creds.scrub(json.dumps(obj, default=str))), f"openai/{name}")


def _tags(tracker, run_id: str, tags: dict, creds: Credentials) -> None:
    tracker.set_tags(run_id, {k: creds.scrub(v) for k, v in tags.items() if v is not None})


def submit_job(creds: Credentials, data_dir: str, spec: JobSpec, tracker, report, poll_interval: float = 2.0,
               file_timeout: float = 1800.0, say=print) -> SubmitResult:
    """Upload the validated files, create the job, open its MLflow run; ``report`` is the validation report."""
    from sparktune.openai.export import read_manifest

    spec.check()
    manifest = read_manifest(data_dir) or {}
    # Reach MLflow (creating the experiment if needed) before anything billable exists: an unreachable
    # tracking server fails here, not after a job was created that no run would record.
    tracker.experiment_id()
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
    run_id = tracker.start_run(
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
    params = {
        "base_model": spec.base_model,
        "epochs": spec.epochs if spec.epochs is not None else "auto",
        "batch_size": spec.batch_size if spec.batch_size is not None else "auto",
        "learning_rate_multiplier": spec.learning_rate_multiplier if spec.learning_rate_multiplier is not None
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
    }
    tracker.log_params(run_id, {k: creds.scrub(v) for k, v in params.items() if v is not None})
    _log_json(tracker, run_id, report.to_dict(), "validation_report.json", creds)
    if manifest:
        _log_json(tracker, run_id, manifest, "export_manifest.json", creds)
    _write_job_file(data_dir, {
        "job_id": job.id,
        "run_id": run_id,
        "base_model": spec.base_model,
        "training_file_id": train_id,
        "validation_file_id": validation_id,
        "provider": creds.provider.value,
        "tracking_uri": tracker.tracking_uri,
        "experiment": tracker.experiment,
    })
    return SubmitResult(job.id, run_id, train_id, validation_id or "", job.status, validation=report)


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


def _event_key(event) -> str:
    # ``id`` is optional in Azure's contract: fall back to what identifies an event on its own.
    return event.id or f"{event.created_at}:{event.message}"


def _new_events(client, job_id: str, seen: set) -> list:
    """The events not seen yet, oldest first. The service lists newest first, a page at a time
    (``has_more``/``after``): the SDK's iteration pages back until an event already seen."""
    fresh = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=EVENT_PAGE):
        if _event_key(event) in seen:
            break
        fresh.append(event)
    return sorted(fresh, key=lambda e: (e.created_at or 0, _event_key(e)))


def _result_rows(client, job, creds: Credentials) -> tuple[list, str | None]:
    """The job's per-step metrics from its result file, or ``[]`` and why they could not be read."""
    import openai

    if not job.result_files:
        return [], None
    file_id = job.result_files[0]
    try:
        return parse_result_file(client.files.content(file_id).content), None
    except (openai.APIError, SparktuneError) as exc:
        return [], (f"the job's result file {file_id} could not be read ({creds.scrub(exc)[:300]}): no per-step "
                    "metrics were logged; the fine-tuned model is recorded all the same")


def follow_job(creds: Credentials, job_id: str, tracker, run_id: str | None = None, poll_interval: float = 10.0,
               timeout: float = 0.0, data_dir: str | None = None, say=print) -> FollowResult:
    """Print status and new events until the job ends; log step metrics and the outcome to its run.

    A succeeded job's model is recorded in ``data_dir``'s job.json and on the run before anything
    else is fetched; a result file that cannot be read is a warning, not a failure; the run is
    ended whatever happens after the job ended. A failed job raises ``SparktuneError`` with the
    service's error message (after the run is marked failed); ``timeout`` (seconds, 0 = none)
    stops following without touching the job.
    """
    client = creds.client()
    if run_id is None:
        run_id = find_job_run(tracker, job_id)
    seen: set = set()
    start = time.monotonic()
    last_status = None
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        fresh = _new_events(client, job_id, seen)
        for event in fresh:
            seen.add(_event_key(event))
            say(f"  [{time.strftime('%H:%M:%S', time.gmtime(event.created_at or 0))}] {event.level}: "
                f"{creds.scrub(event.message)}")
        if job.status != last_status or fresh:
            estimate = ""
            if getattr(job, "estimated_finish", None) and job.status not in JobStatus.terminal():
                estimate = f", estimated finish {time.strftime('%H:%M:%S', time.gmtime(job.estimated_finish))} UTC"
            say(f"{_fmt_elapsed(time.monotonic() - start)} job {job_id}: {job.status}{estimate}")
            last_status = job.status
            if run_id:
                _tags(tracker, run_id, {"sparktune.openai.status": job.status}, creds)
        if job.status in JobStatus.terminal():
            break
        if timeout and time.monotonic() - start > timeout:
            raise SparktuneError(
                f"job {job_id} is still {job.status} after {timeout:.0f} s (it keeps running on the service); "
                f"follow it again with `sparktune openai follow --job {job_id}`"
            )
        time.sleep(poll_interval)
    return _finish(creds, client, job, tracker, run_id, data_dir, say)


def _finish(creds: Credentials, client, job, tracker, run_id: str | None, data_dir: str | None, say) -> FollowResult:
    """Record how the job ended: job.json and the run first, the extras after, the run always ended."""
    succeeded = job.status == JobStatus.SUCCEEDED.value
    if succeeded:
        remember_model(data_dir, job.fine_tuned_model)
    error = None
    if job.status == JobStatus.FAILED.value:
        err = job.error
        code = getattr(err, "code", None) if err else None
        message = getattr(err, "message", None) if err else None
        error = creds.scrub(f"{code or 'error'}: {message or 'the service gave no message'}")
    result = FollowResult(job.id, run_id, job.status, job.fine_tuned_model, job.trained_tokens, 0, error)
    if run_id:
        try:
            _tags(tracker, run_id, {"sparktune.openai.status": job.status,
                                    "sparktune.openai.fine_tuned_model": job.fine_tuned_model,
                                    "sparktune.openai.error": error}, creds)
            if job.trained_tokens is not None:
                tracker.log_metrics(run_id, {"train/trained_tokens": job.trained_tokens})
            _log_json(tracker, run_id, job.model_dump(mode="json"), "job.json", creds)
            rows, warning = _result_rows(client, job, creds)
            if warning:
                result.warnings.append(warning)
                say(f"warning: {warning}")
                _tags(tracker, run_id, {"sparktune.openai.warning": warning}, creds)
            if rows:
                tracker.log_metric_steps(run_id, rows)
            result.steps_logged = len(rows)
            if succeeded:
                # The last epochs' checkpoints are deployable models too; keep their names with the run.
                checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
                _log_json(tracker, run_id, [c.model_dump(mode="json") for c in checkpoints], "checkpoints.json",
                          creds)
        finally:
            status = {"succeeded": "FINISHED", "failed": "FAILED"}.get(job.status, "KILLED")
            tracker.client.set_terminated(run_id, status)
    if error:
        raise SparktuneError(f"fine-tuning job {job.id} failed: {error}")
    if job.status == JobStatus.CANCELLED.value:
        raise SparktuneError(f"fine-tuning job {job.id} was cancelled")
    say(f"job {job.id} succeeded: fine-tuned model {job.fine_tuned_model}"
        + (f", {job.trained_tokens:,} trained tokens" if job.trained_tokens else "")
        + f", {result.steps_logged} steps logged")
    return result
