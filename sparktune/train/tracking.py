"""What a training job logs to MLflow beyond metrics: its config as params and its Delta inputs.

Everything goes through the job's ``sparktune.tracking.Tracker`` (explicit URI); metrics come
from transformers' ``MLflowCallback`` on rank 0 (see ``sparktune.train.callbacks``).
"""

from __future__ import annotations

import hashlib

from sparktune.tracking import MAX_PARAM_VALUE, clean_params, default_tracking_uri, resolve_tracking_uri

__all__ = ["log_job", "log_delta_input", "log_params_safe", "resolve_tracking_uri", "default_tracking_uri",
           "MAX_PARAM_VALUE"]


def log_params_safe(params: dict) -> None:
    """Params to MLflow's active run, cut to its limits and redacted (``sparktune.tracking.clean_params``)."""
    import mlflow

    items = list(clean_params(params).items())
    for start in range(0, len(items), 100):  # one request takes at most 100 params
        mlflow.log_params(dict(items[start:start + 100]))


def log_delta_input(tracker, run_id: str, *, location: str, version: int, name: str, context: str,
                    table_name: str | None = None, sample=None, targets: str | None = None) -> None:
    """A Delta table at ``version`` (a DeltaDatasetSource) as an input of ``run_id``.

    ``sample`` is a small pandas frame of the rows (MLflow records its schema); the digest names
    the table, version and context, so the same input logged again is the same dataset.
    """
    import pandas as pd
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.pandas_dataset import from_pandas

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
    dataset = from_pandas(frame, source=source, name=name, digest=digest,
                                      targets=targets if targets and targets in frame.columns else None)
    from mlflow.tracking.fluent import _create_dataset_input

    # The client form of mlflow.log_input: no active run needed (or ended behind the job's back).
    dataset_input = _create_dataset_input(dataset, context, {"delta.version": str(version)})
    tracker.client.log_inputs(run_id, datasets=[dataset_input])


def log_job(tracker, run_id: str, cfg, task) -> None:
    """The job's config (flattened, redacted) as params and its Delta inputs; once per job."""
    import pandas as pd

    from sparktune.config import flatten_config
    from sparktune.tables import parse_table_ref
    from sparktune.train import data as tdata

    tracker.log_params(run_id, flatten_config(cfg.to_dict()))
    try:
        ref = parse_table_ref(cfg.data.table) if cfg.data.table else None
        table_name = ref.name if ref is not None and not ref.is_path else None
    except Exception:
        table_name = None
    splits = [("training", cfg.data.train_split, cfg.data.train_limit)]
    if cfg.data.eval_split:
        splits.append(("evaluation", cfg.data.eval_split, cfg.data.eval_limit))
    for context, split, limit in splits:
        rows = tdata.read_split(cfg.data.location, cfg.data.version, split, task=task,
                                limit=min(limit or 1000, 1000))
        sample = {"row_id": rows.row_ids, "n_tokens": [len(ids) for ids in rows.input_ids]}
        if rows.labels is not None:
            sample["label"] = rows.labels
        log_delta_input(tracker, run_id, location=cfg.data.location, version=cfg.data.version,
                        name=f"{cfg.data.table or cfg.data.location}@v{cfg.data.version}:{split}",
                        context=context, table_name=table_name, sample=pd.DataFrame(sample), targets="label")
