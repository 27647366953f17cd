"""MLflow for training jobs: where the store is, one run per job, params and Delta inputs.

The tracking URI is, in order: the config's ``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``,
``databricks`` on a Databricks cluster, else a local SQLite store at
``$SPARKTUNE_HOME/mlflow.db`` (``SPARKTUNE_HOME`` defaults to ``./.sparktune``). Experiments
created in a local store keep their artifacts next to the database (``mlartifacts/``), so a
job never writes into the current directory. Open the UI with
``mlflow ui --backend-store-uri sqlite:///.sparktune/mlflow.db``.

The launcher (driver) opens the run and logs params and inputs once; ranks get the run id and
only rank 0 logs metrics and the model into it.
"""

from __future__ import annotations

import hashlib
import os
import re

__all__ = [
    "resolve_tracking_uri",
    "default_tracking_uri",
    "setup_experiment",
    "open_run",
    "log_params_safe",
    "log_delta_input",
    "finish_run",
    "MAX_PARAM_VALUE",
]

# MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH) and keys.
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
# Config keys whose values must never reach the tracking server.
_SECRET_KEY = re.compile(r"(token(?!iz)|password|secret|api[_-]?key|credential)", re.IGNORECASE)


def default_tracking_uri() -> str:
    from sparktune.spark import sparktune_home

    return "sqlite:///" + os.path.join(sparktune_home(), "mlflow.db")


def resolve_tracking_uri(configured: str = "") -> str:
    """config > $MLFLOW_TRACKING_URI > 'databricks' on Databricks > local SQLite store."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        return "databricks"
    return default_tracking_uri()


def _local_artifact_root(tracking_uri: str) -> str | None:
    """A folder beside a local store's database, or None for remote stores."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    if tracking_uri.startswith("file:") or "://" not in tracking_uri and tracking_uri != "databricks":
        return None  # a file store keeps artifacts inside itself already
    return None


def setup_experiment(tracking_uri: str, experiment: str) -> str:
    """Point mlflow at the store and the experiment (creating it); returns the experiment id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        root = _local_artifact_root(tracking_uri)
        location = None
        if root is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment).strip("_") or "experiment"
            location = "file://" + os.path.join(root, safe)
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:
            # Another process created it between our lookup and create.
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def log_params_safe(params: dict) -> None:
    """Log params to the active run, values truncated to MLflow's limits, secret-looking keys redacted."""
    import mlflow

    clean = {}
    for key, value in params.items():
        key = str(key)[:MAX_PARAM_KEY]
        text = "***" if _SECRET_KEY.search(key) else ("" if value is None else str(value))
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 15] + "...[truncated]"
        clean[key] = text
    items = list(clean.items())
    for start in range(0, len(items), 100):  # one request takes at most 100 params
        mlflow.log_params(dict(items[start:start + 100]))


def log_delta_input(*, location: str, version: int, name: str, context: str,
                    table_name: str | None = None, sample=None, targets: str | None = None) -> None:
    """``mlflow.log_input`` of a Delta table at ``version`` (a DeltaDatasetSource) to the active run.

    ``sample`` is a small pandas frame of the rows (MLflow records its schema); the digest names
    the table, version and context, so the same input logged again is the same dataset.
    """
    import mlflow
    import pandas as pd
    from mlflow.data.delta_dataset_source import DeltaDatasetSource

    source = None
    if table_name:
        try:  # a catalog name needs an active Spark session to resolve its full name
            source = DeltaDatasetSource(delta_table_name=table_name, delta_table_version=version)
        except Exception:
            source = None
    if source is None:
        source = DeltaDatasetSource(path=location, delta_table_version=version)
    frame = sample if sample is not None else pd.DataFrame()
    digest = hashlib.sha256(f"{location}@{version}:{context}".encode()).hexdigest()[:16]
    dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest,
                                      targets=targets if targets and targets in frame.columns else None)
    mlflow.log_input(dataset, context=context, tags={"delta.version": str(version)})


def open_run(tracking_uri: str, experiment: str, run_name: str = "", run_id: str = "",
             system_metrics: bool = False, tags: dict | None = None) -> str:
    """Start (or continue, given ``run_id``) the job's run as this process's active run."""
    import mlflow

    setup_experiment(tracking_uri, experiment)
    kwargs = {"log_system_metrics": True} if system_metrics and _has_psutil() else {}
    if run_id:
        run = mlflow.start_run(run_id=run_id, **kwargs)
    else:
        run = mlflow.start_run(run_name=run_name or None, tags=tags or None, **kwargs)
    return run.info.run_id


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def finish_run(ok: bool) -> None:
    """End this process's active run as FINISHED or FAILED."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.end_run("FINISHED" if ok else "FAILED")


def log_job(cfg, task: str) -> None:
    """Log the job's config (flattened) and its Delta inputs to the active run; once per job."""
    from sparktune.config import flatten_config
    from sparktune.train import data as tdata

    log_params_safe(flatten_config(cfg.to_dict()))
    table_name = None
    from sparktune.tables import parse_table_ref

    try:
        ref = parse_table_ref(cfg.data.table) if cfg.data.table else None
        table_name = ref.name if ref is not None and not ref.is_path else None
    except Exception:
        table_name = None
    splits = [("training", cfg.data.train_split, cfg.data.train_limit)]
    if cfg.data.eval_split:
        splits.append(("evaluation", cfg.data.eval_split, cfg.data.eval_limit))
    for context, split, limit in splits:
        rows = tdata.read_split(cfg.data.location, cfg.data.version, split, task=task, limit=min(limit or 1000, 1000))
        sample = {"row_id": rows.row_ids, "n_tokens": [len(ids) for ids in rows.input_ids]}
        if rows.labels is not None:
            sample["label"] = rows.labels
        import pandas as pd

        log_delta_input(location=cfg.data.location, version=cfg.data.version,
                        name=f"{cfg.data.table or cfg.data.location}@v{cfg.data.version}:{split}",
                        context=context, table_name=table_name, sample=pd.DataFrame(sample), targets="label")
