"""``sparktune register``: put a training run's model in the MLflow Model Registry under an alias.

The new version carries the run's metrics and the Delta versions of its data as tags, so a
version can be traced to what it was trained and tested on. With ``--promote-if-better METRIC``
the alias moves only when the new run's METRIC beats the current alias holder's (higher is
better, except for metrics whose name says loss or perplexity); the version is registered
either way, and tagged with the decision.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from sparktune.errors import SparktuneError
from sparktune.results import StageResult
from sparktune.settings import Stage, add_stage, option
from sparktune.tracking import process_uris

__all__ = [
    "RegisterResult",
    "RegisterSettings",
    "add_cli",
    "find_run_model",
    "metric_greater_is_better",
    "register_model",
    "register_stage",
    "run_lineage_tags",
]

# MLflow tag values are capped (5000 chars on most stores); longer ones are cut, never dropped.
_MAX_TAG = 4900


@dataclass
class RegisterResult(StageResult):
    """The version ``register`` created and what happened to the alias."""

    name: str
    version: str
    model_uri: str
    """``models:/<name>/<version>``."""
    source_model_uri: str
    """The logged model (``models:/m-...``) that was registered, as is."""
    run_id: str
    alias: str | None
    promoted: bool
    reason: str
    previous_version: str | None = None
    alias_uri: str | None = None

    def summary(self) -> str:
        lines = [f"registered {self.source_model_uri} as {self.name} version {self.version}", self.reason]
        if self.alias_uri:
            lines.append(f"load it with {self.alias_uri}")
        return "\n".join(lines)


def metric_greater_is_better(metric: str) -> bool:
    return not re.search(r"loss|perplexity|error|mse|mae", metric, re.IGNORECASE)


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= _MAX_TAG else text[: _MAX_TAG - 14] + "...[truncated]"


def find_run_model(client, run_id: str, model_name: str | None = None):
    """The model logged by ``run_id`` (an mlflow LoggedModel): the one named ``model_name``,
    else the only one, else the newest."""
    run = client.get_run(run_id)
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", max_results=100
    )
    models = list(models)
    if model_name:
        models = [m for m in models if m.name == model_name]
    if not models:
        which = f" named {model_name!r}" if model_name else ""
        raise SparktuneError(
            f"run {run_id} has no logged model{which}; register a run that `sparktune train` finished "
            "(it logs the model at the end), or pass --model-name with the name it was logged under"
        )
    return max(models, key=lambda m: m.creation_timestamp or 0)


def run_lineage_tags(run) -> dict:
    """Tags for a model version: the run's metrics and where its data came from (Delta versions)."""
    tags = {"sparktune.run_id": run.info.run_id}
    for key, value in sorted((run.data.metrics or {}).items()):
        tags[f"metric.{key}"] = f"{value:.6g}" if isinstance(value, float) else str(value)
    for key, value in sorted((run.data.params or {}).items()):
        if "version" in key.lower() or key.lower().endswith(("table", "_path", ".path")):
            tags[f"data.{key}"] = _short(value)
    for i, dataset_input in enumerate(getattr(run.inputs, "dataset_inputs", None) or []):
        ds = dataset_input.dataset
        context = next((t.value for t in dataset_input.tags if t.key == "mlflow.data.context"), None) or f"input{i}"
        try:
            source = json.loads(ds.source)
        except (TypeError, ValueError):
            source = {}
        where = source.get("delta_table_name") or source.get("path") or ds.name
        version = source.get("delta_table_version")
        if version is None:  # MLflow's DeltaDatasetSource drops version 0; training tags it too
            version = next((t.value for t in dataset_input.tags if t.key == "delta.version"), None)
        # Dataset names are table paths ("/x/tokens@v3"): not valid in a tag key, so key by context.
        key = f"data.{context}" if f"data.{context}" not in tags else f"data.{context}.{i}"
        tags[key] = _short(f"{where}@{version}" if version is not None else where)
    return tags


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def _decide(metric: str, candidate: float, current, higher: bool, holder_version: str, alias: str) -> tuple[bool, str]:
    """Whether the candidate takes the alias. A holder without a usable value (missing or NaN:
    NaN compares false with everything) never blocks a candidate that has one."""
    if not _finite(current):
        shown = "no" if current is None else f"a non-finite ({current})"
        return True, f"version {holder_version} (current {alias}) has {shown} {metric}; promoted"
    better = candidate > current if higher else candidate < current
    if better:
        return True, f"{metric} {candidate:.6g} beats {current:.6g} of version {holder_version}"
    return False, (f"{metric} {candidate:.6g} does not beat {current:.6g} of version {holder_version}; "
                   f"{alias!r} stays on version {holder_version}")


def _create_version(client, tracker, name: str, logged, run_id: str, tags: dict):
    """A new version of ``name`` whose source is the LoggedModel's URI (``models:/m-...``), as
    ``mlflow.register_model`` makes it: the registry links the version to the model (its
    ``model_id`` where the store keeps it: Unity Catalog), the model lists the version in its
    ``mlflow.modelVersions`` tag, and downloads read the model's own artifacts (no copy)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # created meanwhile by another register
    # A registry store resolves a ``models:/m-...`` source through the process's global tracking
    # URI, not through the client that called it (MLflow's own TODO in its SQL and file stores).
    with process_uris(str(tracker.tracking_uri), tracker.registry_uri or str(tracker.tracking_uri)):
        version = client.create_model_version(name, source=f"models:/{logged.model_id}", run_id=run_id, tags=tags,
                                              model_id=logged.model_id)
    listed = json.loads(client.get_logged_model(logged.model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    listed.append({"name": version.name, "version": version.version})
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})
    return version


def register_model(
    run_id: str,
    name: str,
    *,
    tracker=None,
    alias: str | None = "champion",
    promote_if_better: str | None = None,
    greater_is_better: bool | None = None,
    model_name: str | None = None,
) -> RegisterResult:
    """Register the run's logged model, as is, as a new version of ``name``; set ``alias`` (maybe).

    The alias URI ``models:/<name>@<alias>`` loads the promoted version.
    """
    from mlflow.exceptions import MlflowException

    from sparktune.tracking import Tracker

    tracker = tracker or Tracker()
    client = tracker.client
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SparktuneError(
            f"--run-id {run_id}: no such run in the MLflow store {tracker.tracking_uri}; "
            "use the run id `sparktune train` printed, and the same --tracking-uri"
        ) from None
    candidate_value = None
    if promote_if_better:
        candidate_value = run.data.metrics.get(promote_if_better)
        if candidate_value is None:
            raise SparktuneError(
                f"--promote-if-better {promote_if_better}: run {run_id} has no such metric; it has "
                f"{sorted(run.data.metrics) or 'no metrics'} (run `sparktune evaluate --model runs:/{run_id}/model` "
                "to add test metrics)"
            )
        if not _finite(candidate_value):
            raise SparktuneError(f"--promote-if-better {promote_if_better}: run {run_id} has {candidate_value}, "
                                 "not a number to compare; evaluate the model again")
    logged = find_run_model(client, run_id, model_name)
    source = f"models:/{logged.model_id}"
    tags = run_lineage_tags(run)
    tags["sparktune.model_uri"] = source
    try:
        version = _create_version(client, tracker, name, logged, run_id, tags)
    except MlflowException as exc:
        raise SparktuneError(f"could not register {source} as {name!r}: {exc.message.splitlines()[0]}") from None
    number = str(version.version)
    result = RegisterResult(name=name, version=number, model_uri=f"models:/{name}/{number}", source_model_uri=source,
                            run_id=run_id, alias=alias, promoted=False, reason="")
    if not alias:
        result.reason = "no alias requested"
        return result

    promote, reason = True, f"alias {alias!r} set"
    if promote_if_better:
        higher = metric_greater_is_better(promote_if_better) if greater_is_better is None else greater_is_better
        try:
            holder = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            holder = None
        if holder is not None and str(holder.version) != number:
            assert candidate_value is not None  # read (and checked) above when promote_if_better is set
            current = client.get_run(holder.run_id).data.metrics.get(promote_if_better) if holder.run_id else None
            promote, reason = _decide(promote_if_better, float(candidate_value), current, higher,
                                      str(holder.version), alias)
            result.previous_version = str(holder.version)
        else:
            reason = f"no current {alias!r}; promoted with {promote_if_better} {candidate_value:.6g}"
    if promote:
        client.set_registered_model_alias(name, alias, number)
        result.alias_uri = f"models:/{name}@{alias}"
    client.set_model_version_tag(name, number, "sparktune.promoted", str(promote).lower())
    client.set_model_version_tag(name, number, "sparktune.promotion_reason", _short(reason))
    result.promoted, result.reason = promote, reason
    return result


@dataclass(frozen=True, kw_only=True)
class RegisterSettings:
    """``sparktune register``'s flags and the pipeline's ``register`` section."""

    run_id: str = option("", cli_required=True)
    """The MLflow run whose model to register: the run id `sparktune train` printed (the pipeline registers train's
    run)."""
    name: str = option("", cli_required=True)
    """Registered model name (catalog.schema.model under Databricks Unity Catalog); in the pipeline, empty: skip
    registering."""
    alias: str = "champion"
    """Alias to point at the new version; empty: none."""
    promote_if_better: str = option("", metavar="METRIC")
    """Move the alias only when the run's METRIC (e.g. test/f1) beats the alias holder's; empty: always."""
    better: Literal["higher", "lower"] | None = None
    """Direction of promote_if_better's metric; empty: lower for loss/perplexity, else higher."""
    model_name: str = ""
    """Name the model was logged under in the run, if it logged several."""


def register_stage(spark, settings: RegisterSettings, tracker=None) -> RegisterResult:
    """The register stage: ``sparktune register`` and the pipeline's last step (no Spark: ``spark`` is unused)."""
    s = settings
    if not s.name:
        raise SparktuneError("--name: required, the registered model name")
    return register_model(s.run_id, s.name, tracker=tracker, alias=s.alias or None,
                          promote_if_better=s.promote_if_better or None,
                          greater_is_better={"higher": True, "lower": False}.get(s.better or ""),
                          model_name=s.model_name or None)


def add_cli(subparsers) -> None:
    add_stage(subparsers, Stage(
        "register", RegisterSettings, register_stage, spark=False, tracker=True,
        help="register a training run's model in the MLflow Model Registry and set an alias",
        description="Register the model a run logged, tag it with the run's metrics and data versions, set an alias."))
