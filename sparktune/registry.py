"""``sparktune register``: put a training run's model in the MLflow Model Registry under an alias.

The new version carries the run's metrics and the Delta versions of its data as tags, so a
version can be traced to what it was trained and tested on. With ``--promote-if-better METRIC``
the alias moves only when the new run's METRIC beats the current alias holder's (higher is
better, except for metrics whose name says loss or perplexity); the version is registered
either way, and tagged with the decision.
"""

from __future__ import annotations

import json
import re

from sparktune.errors import SparktuneError

__all__ = [
    "register_model",
    "find_run_model",
    "run_lineage_tags",
    "use_tracking_uri",
    "metric_greater_is_better",
    "add_cli",
]

# MLflow tag values are capped (5000 chars on most stores); longer ones are cut, never dropped.
_MAX_TAG = 4900


def use_tracking_uri(configured: str | None = None) -> str:
    """Point MLflow at the store `sparktune train` uses (same rules), and return its URI."""
    import os

    import mlflow

    try:
        from sparktune.train.tracking import resolve_tracking_uri
    except ImportError:  # training not installed in this checkout: same order of precedence
        def resolve_tracking_uri(configured=""):
            if configured:
                return configured
            if os.environ.get("MLFLOW_TRACKING_URI"):
                return os.environ["MLFLOW_TRACKING_URI"]
            from sparktune.spark import sparktune_home

            return "sqlite:///" + os.path.join(sparktune_home(), "mlflow.db")

    uri = resolve_tracking_uri(configured or "")
    mlflow.set_tracking_uri(uri)
    if uri == "databricks" and not os.environ.get("MLFLOW_REGISTRY_URI"):
        mlflow.set_registry_uri("databricks-uc")  # Unity Catalog names: catalog.schema.model
    return uri


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


def _metric_of(client, run_id: str, metric: str):
    return client.get_run(run_id).data.metrics.get(metric)


def register_model(
    run_id: str,
    name: str,
    alias: str | None = "champion",
    promote_if_better: str | None = None,
    greater_is_better: bool | None = None,
    model_name: str | None = None,
) -> dict:
    """Register the run's logged model as a new version of ``name``; set ``alias`` (maybe).

    Returns ``{"name", "version", "model_uri", "alias", "promoted", "reason", ...}``; the alias
    URI ``models:/<name>@<alias>`` loads the promoted version.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise SparktuneError(
            f"--run-id {run_id}: no such run in the MLflow store {mlflow.get_tracking_uri()}; "
            "use the run id `sparktune train` printed, and the same MLFLOW_TRACKING_URI"
        ) from None
    candidate_value = None
    if promote_if_better:
        candidate_value = run.data.metrics.get(promote_if_better)
        if candidate_value is None:
            raise SparktuneError(
                f"--promote-if-better {promote_if_better}: run {run_id} has no such metric; "
                f"it has {sorted(run.data.metrics) or 'no metrics'} (run `sparktune evaluate --model runs:/{run_id}/model` to add test metrics)"
            )
    logged = find_run_model(client, run_id, model_name)
    model_uri = f"models:/{logged.model_id}"
    tags = run_lineage_tags(run)
    tags["sparktune.model_uri"] = model_uri
    try:
        version = mlflow.register_model(model_uri, name, tags=tags)
    except MlflowException as exc:
        raise SparktuneError(f"could not register {model_uri} as {name!r}: {exc.message.splitlines()[0]}") from None

    result = {
        "name": name,
        "version": str(version.version),
        "model_uri": f"models:/{name}/{version.version}",
        "source_model_uri": model_uri,
        "run_id": run_id,
        "alias": alias,
        "promoted": False,
        "reason": "",
    }
    if not alias:
        result["reason"] = "no alias requested"
        return result

    promote, reason = True, f"alias {alias!r} set"
    if promote_if_better:
        higher = metric_greater_is_better(promote_if_better) if greater_is_better is None else greater_is_better
        try:
            holder = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            holder = None
        if holder is not None and str(holder.version) != str(version.version):
            current = _metric_of(client, holder.run_id, promote_if_better) if holder.run_id else None
            if current is None:
                reason = f"version {holder.version} (current {alias}) has no {promote_if_better}; promoted"
            elif (candidate_value > current) if higher else (candidate_value < current):
                reason = f"{promote_if_better} {candidate_value:.6g} beats {current:.6g} of version {holder.version}"
            else:
                promote = False
                reason = (f"{promote_if_better} {candidate_value:.6g} does not beat {current:.6g} of version "
                          f"{holder.version}; {alias!r} stays on version {holder.version}")
            result["previous_version"] = str(holder.version)
        else:
            reason = f"no current {alias!r}; promoted with {promote_if_better} {candidate_value:.6g}"
    if promote:
        client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "sparktune.promoted", str(promote).lower())
    client.set_model_version_tag(name, version.version, "sparktune.promotion_reason", _short(reason))
    result.update(promoted=promote, reason=reason)
    if promote:
        result["alias_uri"] = f"models:/{name}@{alias}"
    return result


def _run(args) -> int:
    use_tracking_uri(args.tracking_uri)
    result = register_model(
        args.run_id,
        args.name,
        alias=args.alias or None,
        promote_if_better=args.promote_if_better,
        greater_is_better={"higher": True, "lower": False}.get(args.better),
        model_name=args.model_name,
    )
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"registered {result['source_model_uri']} as {result['name']} version {result['version']}")
        print(result["reason"])
        if result.get("alias_uri"):
            print(f"load it with {result['alias_uri']}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "register",
        help="register a training run's model in the MLflow Model Registry and set an alias",
        description="Register the model a run logged, tag it with the run's metrics and data versions, set an alias.",
    )
    p.add_argument("--run-id", required=True, help="the MLflow run id that `sparktune train` printed")
    p.add_argument("--name", required=True, help="registered model name (catalog.schema.model on Databricks Unity Catalog)")
    p.add_argument("--alias", default="champion", help="alias to point at the new version (default champion; '' for none)")
    p.add_argument("--promote-if-better", metavar="METRIC", help="move the alias only if the run's METRIC beats the alias holder's")
    p.add_argument("--better", choices=["higher", "lower"], help="direction of METRIC (default: lower for loss/perplexity, else higher)")
    p.add_argument("--model-name", help="name the model was logged under in the run, if it logged several")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: as `sparktune train`)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=_run)
