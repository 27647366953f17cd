"""Every MLflow call of the hosted path, in one small class with an explicit tracking URI.

Kept in one place so it can be swapped for the shared ``sparktune.tracking.Tracker`` without
touching the stages. Every string that reaches MLflow (params, tags, artifacts) is scrubbed of
the credentials it is given, and secret-looking keys are redacted, so a key cannot leak even
through an error message.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time

__all__ = ["DEFAULT_EXPERIMENT", "JOB_ID_TAG", "RunLog"]

DEFAULT_EXPERIMENT = "sparktune-imdb"  # the open model's experiment (jobs/configs/imdb_local.yaml): side by side
JOB_ID_TAG = "sparktune.openai.job_id"
_MAX_PARAM = 6000
_SECRET_KEY = re.compile(r"(token(?!iz)|password|secret|api[_-]?key|credential)", re.IGNORECASE)


class RunLog:
    """One MLflow experiment, reached through ``MlflowClient(tracking_uri)`` (no global state)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT, secrets=()):
        self.experiment = experiment
        self._secrets = [s for s in secrets if s]
        try:  # the shared Tracker, where this checkout has it: same store, same experiment rules
            from sparktune.tracking import Tracker
        except ImportError:
            pass
        else:
            tracker = Tracker(tracking_uri or None, experiment)
            self.tracking_uri, self.client = str(tracker.tracking_uri), tracker.client
            self.experiment_id = tracker.experiment_id()
            return
        from mlflow import MlflowClient

        from sparktune.train.tracking import resolve_tracking_uri

        self.tracking_uri = resolve_tracking_uri(tracking_uri or "")
        self.client = MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            try:
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=self._artifact_location()
                )
            except Exception:
                found = self.client.get_experiment_by_name(experiment)  # created concurrently
                if found is None:
                    raise
                self.experiment_id = found.experiment_id

    def _artifact_location(self) -> str | None:
        # Beside a local SQLite store, as `sparktune train` does, not ./mlruns in the cwd.
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        root = os.path.join(os.path.dirname(os.path.abspath(self.tracking_uri[len("sqlite:///"):])), "mlartifacts")
        return "file://" + os.path.join(
            root, re.sub(r"[^A-Za-z0-9_.-]+", "_", self.experiment).strip("_") or "experiment"
        )

    def scrub(self, text) -> str:
        text = "" if text is None else str(text)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def start_run(self, name: str, tags: dict | None = None) -> str:
        clean = {k: self.scrub(v) for k, v in (tags or {}).items()}
        return self.client.create_run(self.experiment_id, run_name=name, tags=clean).info.run_id

    def find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{tag}` = '{value}'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        batch = []
        for key, value in params.items():
            if value is None:
                continue
            text = "***" if _SECRET_KEY.search(key) else self.scrub(value)[:_MAX_PARAM]
            if key not in existing:  # MLflow refuses to change a logged param
                batch.append(Param(key, text))
        if batch:
            self.client.log_batch(run_id, params=batch)

    def set_tags(self, run_id: str, tags: dict) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(run_id, key, self.scrub(value)[:_MAX_PARAM])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items() if v is not None]
        for start in range(0, len(batch), 900):  # MLflow caps a batch at 1,000 entries
            self.client.log_batch(run_id, metrics=batch[start:start + 900])

    def log_metric_series(self, run_id: str, rows: list) -> None:
        """``rows``: ``(step, {name: value})`` pairs, logged as one history per name."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, int(step)) for step, values in rows for k, v in values.items() if v is not None
        ]
        for start in range(0, len(batch), 900):
            self.client.log_batch(run_id, metrics=batch[start:start + 900])

    def log_json(self, run_id: str, obj, name: str, folder: str = "openai") -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(self.scrub(json.dumps(obj, indent=2, sort_keys=True, default=str)))
            self.client.log_artifact(run_id, path, folder)

    def run_metrics(self, run_id: str) -> dict:
        return dict(self.client.get_run(run_id).data.metrics)

    def run_name(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        return run.info.run_name or run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
