"""What a training job logs to MLflow beyond metrics: its config as params and its Delta inputs.

Everything goes through the job's ``sparktune.tracking.Tracker`` (explicit URI); metrics come
from transformers' ``MLflowCallback`` on rank 0 (see ``sparktune.train.callbacks``).
"""

from __future__ import annotations

import hashlib
import os
import re

from sparktune.tracking import MAX_PARAM_VALUE, clean_params, default_tracking_uri, resolve_tracking_uri

__all__ = ["log_job", "log_delta_input", "split_rows", "log_params_safe", "resolve_tracking_uri",
           "default_tracking_uri", "MAX_PARAM_VALUE"]


def log_params_safe(params: dict) -> None:
    """Params to MLflow's active run, cut to its limits and redacted (``sparktune.tracking.clean_params``)."""
    import mlflow

    items = list(clean_params(params).items())
    for start in range(0, len(items), 100):  # one request takes at most 100 params
        mlflow.log_params(dict(items[start:start + 100]))


def _delta_source(location: str, version: int, table_name: str | None):
    """A ``DeltaDatasetSource`` that records ``version`` also when it is 0.

    MLflow's ``to_dict`` keeps the version only when it is truthy, so version 0 (a table's
    first) was lost from the run's lineage; the subclass writes it always. The stored JSON is
    MLflow's own format, read back by MLflow's ``DeltaDatasetSource``. A path is stored as a URI
    (``file:///...`` for a local one), usable from any machine that sees the storage."""
    from mlflow.data.delta_dataset_source import DeltaDatasetSource

    class _VersionedDeltaSource(DeltaDatasetSource):
        def to_dict(self) -> dict:
            info = super().to_dict()
            if self._delta_table_version is not None:
                info["delta_table_version"] = int(self._delta_table_version)
            return info

    if table_name:
        try:  # a catalog name needs an active Spark session to resolve its full name
            return _VersionedDeltaSource(delta_table_name=table_name, delta_table_version=version)
        except Exception:  # noqa: BLE001  (no session: fall back to the path)
            pass
    uri = location if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", location) else "file://" + os.path.abspath(location)
    return _VersionedDeltaSource(path=uri, delta_table_version=version)


def log_delta_input(tracker, run_id: str, *, location: str, version: int, name: str, context: str,
                    table_name: str | None = None, sample=None, targets: str | None = None,
                    rows: int | None = None, model_id: str | None = None) -> tuple[str, str]:
    """A Delta table at ``version`` (a DeltaDatasetSource) as an input of ``run_id``.

    ``sample`` is a small pandas frame of the rows (MLflow records its schema); ``rows`` is how
    many rows the run really used (the dataset's profile says that, not the sample's size). The
    digest names the table, version and context, so the same input logged again is the same
    dataset. ``model_id``: a LoggedModel the run used as an input (MLflow 3). Returns the
    dataset's (name, digest), which metrics computed on it name.
    """
    import pandas as pd
    from mlflow.data.pandas_dataset import PandasDataset

    class _TableDataset(PandasDataset):
        @property
        def profile(self):
            used = len(self.df) if rows is None else int(rows)
            return {"num_rows": used, "num_elements": used * len(self.df.columns), "sample_rows": len(self.df)}

    source = _delta_source(location, version, table_name)
    frame = sample if sample is not None else pd.DataFrame()
    digest = hashlib.sha256(f"{location}@{version}:{context}".encode()).hexdigest()[:16]
    dataset = _TableDataset(frame, source=source, name=name, digest=digest,
                            targets=targets if targets and targets in frame.columns else None)
    from mlflow.tracking.fluent import _create_dataset_input

    # The client form of mlflow.log_input: no active run needed (or ended behind the job's back).
    dataset_input = _create_dataset_input(dataset, context, {"delta.version": str(version)})
    if model_id:
        from mlflow.entities import LoggedModelInput

        tracker.client.log_inputs(run_id, datasets=[dataset_input], models=[LoggedModelInput(model_id)])
    else:
        tracker.client.log_inputs(run_id, datasets=[dataset_input])
    return name, digest


def split_rows(location: str, version: int, split: str, task, limit: int | None = None) -> int:
    """Rows of ``split`` that training reads (``sparktune.train.data.read_split``'s selection),
    counted from the Delta table's files without reading the token ids."""
    import pyarrow.compute as pc

    from sparktune.tasks import TOKENIZED, Task
    from sparktune.train.data import _open

    task = Task.parse(task, "model.task")
    filt = pc.field(TOKENIZED.split) == split
    if task.has_labels:
        filt = filt & (pc.field(TOKENIZED.label) >= 0)
    count = _open(location, version).to_pyarrow_dataset().count_rows(filter=filt)
    return min(count, limit) if limit else count


def log_job(tracker, run_id: str, cfg, pinned) -> None:
    """The job's config (flattened, redacted, with what ``pinned`` decided: the table's location
    and version, the task, the folders, the tracking store) as params and its Delta inputs; once
    per job. ``pinned``: the job's ``sparktune.train.pinned.PinnedJob``."""
    import pandas as pd

    from sparktune.config import flatten_config
    from sparktune.tables import parse_table_ref
    from sparktune.train import data as tdata

    table = pinned.table
    params = flatten_config(cfg.to_dict())
    params.update({"data.location": table.location, "data.version": table.version, "model.task": pinned.task.value,
                   "output_dir": pinned.output_dir, "mlflow.tracking_uri": str(tracker.tracking_uri),
                   "mlflow.experiment": tracker.experiment})
    tracker.log_params(run_id, params)
    try:
        ref = parse_table_ref(cfg.data.table) if cfg.data.table else None
        table_name = ref.name if ref is not None and not ref.is_path else None
    except Exception:
        table_name = None
    splits = [("training", cfg.data.train_split, cfg.data.train_limit)]
    if cfg.data.eval_split:
        splits.append(("evaluation", cfg.data.eval_split, cfg.data.eval_limit))
    for context, split, limit in splits:
        rows = tdata.read_split(table.location, table.version, split, task=pinned.task,
                                limit=min(limit or 1000, 1000))
        sample = {"row_id": rows.row_ids, "n_tokens": [len(ids) for ids in rows.input_ids]}
        if rows.labels is not None:
            sample["label"] = rows.labels
        log_delta_input(tracker, run_id, location=table.location, version=table.version,
                        name=f"{table.table or table.location}@v{table.version}:{split}",
                        context=context, table_name=table_name, sample=pd.DataFrame(sample), targets="label",
                        rows=split_rows(table.location, table.version, split, pinned.task, limit))
