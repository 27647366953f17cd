"""The pinned job: what is decided once, before any rank starts, and handed to every rank.

A training job's facts are decided in one place and never again: the table snapshot (location,
Delta version, table id, properties), the task (``model.task: auto`` resolved from the table),
the world size, where outputs and checkpoints go, the one MLflow run, where training starts
(a fresh start or a verified checkpoint) and the memory plan. ``pin_job`` makes a
``PinnedJob`` from the user's config without changing it; ``open_job_run`` opens (or
continues) the job's MLflow run and writes the job record. The launcher
(``sparktune.train.distribute``) does both on the driver and ships the frozen result to the
ranks; under plain torchrun rank 0 does them and broadcasts the result. A relaunch after a
failure is ``dataclasses.replace(pinned, resume=...)``: the ranks never re-decide.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sparktune.errors import ConfigError, SparktuneError
from sparktune.tables import TableSnapshot, read_snapshot
from sparktune.tasks import TOKENIZED, Task
from sparktune.train.checkpoints import CheckpointStore, JobRecord, resume_problems
from sparktune.train.config import TrainConfig

if TYPE_CHECKING:
    from sparktune.tracking import Tracker
    from sparktune.train.memory import MemoryPlan

__all__ = ["ResumeDecision", "PinnedJob", "pin_job", "open_job_run", "snapshot_table",
           "placed_output_dir", "path_location"]

log = logging.getLogger("sparktune.train")


@dataclass(frozen=True)
class ResumeDecision:
    """Where the ranks' training starts: from step 0, or from a checkpoint that verified."""

    checkpoint: str | None = None
    """The newest complete checkpoint (verified on the driver, broken newer ones set aside); None: step 0."""

    @property
    def fresh(self) -> bool:
        return self.checkpoint is None

    def describe(self) -> str:
        return self.checkpoint or "the start (no complete checkpoint)"


@dataclass(frozen=True)
class PinnedJob:
    """Everything the ranks must agree on, decided once (``pin_job``, ``open_job_run``)."""

    table: TableSnapshot
    task: Task
    world_size: int
    output_dir: str
    """``output_dir``, placed on the job's Volume on Databricks (``placed_output_dir``)."""
    checkpoint_dir: str
    resume: ResumeDecision = ResumeDecision()
    run_id: str = ""
    """The job's one MLflow run (empty: not tracked)."""
    tracking_uri: str = ""
    memory_plan: MemoryPlan | None = None
    """The memory plan the driver made and checked; None when it could not (rank 0 plans then)."""

    def record(self) -> JobRecord:
        """The job record (``sparktune_job.json``) that a later ``resume=true`` is checked against."""
        return JobRecord(location=self.table.location, table=self.table.table, table_id=self.table.table_id,
                         version=self.table.version, world_size=self.world_size, task=self.task.value,
                         run_id=self.run_id, tracking_uri=self.tracking_uri if self.run_id else "")

    def bind(self, cfg: TrainConfig) -> TrainConfig:
        """A copy of ``cfg`` with the pinned table location, version and output folder, for the
        readers that take a config (``train.data.load_rank_data``, ``staging.stage_job_data``,
        plugin callbacks); ``cfg`` itself is left as the user gave it."""
        bound = copy.deepcopy(cfg)
        data = dataclasses.replace(bound.data, location=self.table.location, version=self.table.version)
        return dataclasses.replace(bound, data=data, output_dir=self.output_dir)


def placed_output_dir(cfg: TrainConfig) -> str:
    """``output_dir``; on Databricks with a job Volume a relative one lands on that Volume: a
    driver-local ``./out`` is neither shared with the ranks nor kept after the cluster stops."""
    from sparktune.databricks import default_output_root

    root = default_output_root()
    if root and not os.path.isabs(cfg.output_dir) and "://" not in cfg.output_dir:
        placed = os.path.join(root, "runs", os.path.normpath(cfg.output_dir))
        log.warning("sparktune train: output_dir is %s (the job's Volume)", placed)
        return placed
    return cfg.output_dir


def path_location(cfg: TrainConfig) -> str:
    """``data.location``, or the folder a path-like ``data.table`` names; catalog names need Spark."""
    if cfg.data.location:
        return cfg.data.location
    from sparktune.tables import parse_table_ref

    ref = parse_table_ref(cfg.data.table)
    if ref.path is None:
        raise SparktuneError(
            f"data.table: {cfg.data.table!r} is a catalog name, which only Spark can resolve; launch with "
            "`sparktune train` (it resolves the name) or set data.location to the table's folder"
        )
    return ref.path


def snapshot_table(spark, table: str, location: str, version: int | None) -> TableSnapshot:
    """The table at ``location`` at ``version`` (None: the latest), read by ``tables.read_snapshot``
    (Spark SQL with a session, the Delta log without one, as under plain torchrun); a missing
    table or version is a SparktuneError. ``table`` stays as the user gave it (may be empty)."""
    snapshot = read_snapshot(spark, location, version, what="data.table")
    return dataclasses.replace(snapshot, table=table or snapshot.table)


def resolve_task(cfg: TrainConfig, props: Mapping[str, str]) -> Task:
    """``model.task``, or with ``auto`` the task the table was tokenized for."""
    if cfg.model.task != "auto":
        return Task.parse(cfg.model.task, "model.task")
    task = TOKENIZED.task_of(props, "model.task")
    if task is None:
        raise ConfigError([f"model.task: is auto and table {cfg.data.table!r} has no {TOKENIZED.prop_task} "
                           f"property; set model.task={Task.CLASSIFICATION.value} or "
                           f"model.task={Task.CAUSAL_LM.value}"])
    return task


def _resumed_record(cfg: TrainConfig, store: CheckpointStore, world_size: int, location: str,
                    latest_id: str) -> JobRecord | None:
    """The record of the job ``resume=true`` continues, checked against this launch (ConfigError
    naming every problem); without resume, refuses a folder that already holds checkpoints."""
    if not cfg.resume:
        if store.has_checkpoints():
            raise SparktuneError(
                f"checkpoint.dir: {store.dir} already holds checkpoints of an earlier job; pass resume=true "
                "to continue it, or choose another output_dir / checkpoint.dir"
            )
        return None
    record = store.read_job()
    problems = resume_problems(record, location=location, table_id=latest_id, version=cfg.data.version,
                               world_size=world_size, written_world_size=store.written_world_size(),
                               where=store.dir)
    if problems:
        raise ConfigError(problems)
    return record


def _check_table(cfg: TrainConfig, table: TableSnapshot, task: Task) -> None:
    """The table's properties against the model and the data settings (ConfigError)."""
    from sparktune.train.checks import check_table_matches_model

    problems = check_table_matches_model(table.properties, cfg)
    raw = table.properties.get(TOKENIZED.prop_max_length)
    tokenized_length = int(raw) if raw and str(raw).isdigit() else 0
    if task is Task.INSTRUCTION and cfg.data.max_length and cfg.data.max_length < tokenized_length:
        problems.append(f"data.max_length: {cfg.data.max_length} would cut instruction rows, which end with their "
                        f"answer (tokenized at {tokenized_length}); leave it empty and set tokenize.max_length")
    if problems:
        raise ConfigError(problems)


def pin_job(cfg: TrainConfig, world_size: int, *, location: str | None = None, spark=None) -> PinnedJob:
    """Pin a job: its table snapshot, task, folders and where training starts (no MLflow run yet).

    ``location``: where ``data.table`` is (the launcher resolves catalog names with Spark);
    default ``path_location(cfg)``. ``spark``: the driver's session, through which the table is
    read (None under plain torchrun: the Delta log). A ``resume=true`` job is checked against its record and
    continues on the version it pinned. Checks the table against the model (ConfigError).
    Only one process may call it (it sets broken checkpoints aside).
    """
    location = location or path_location(cfg)
    output_dir = placed_output_dir(cfg)
    store = CheckpointStore(cfg.checkpoint.dir or os.path.join(output_dir, "checkpoints"))
    latest = snapshot_table(spark, cfg.data.table, location, None)  # a missing table is reported here
    record = _resumed_record(cfg, store, world_size, location, latest.table_id)
    version = cfg.data.version
    if version is None and record is not None and record.version is not None:
        version = int(record.version)
        log.warning("sparktune train: resume continues on %s v%s, the version the job pinned", location, version)
    table = latest if version is None or version == latest.version else \
        snapshot_table(spark, cfg.data.table, location, version)
    task = resolve_task(cfg, table.properties)
    _check_table(cfg, table, task)
    resume = ResumeDecision(store.latest_complete(world_size, set_aside=True) if cfg.resume else None)
    return PinnedJob(table=table, task=task, world_size=world_size, output_dir=output_dir,
                     checkpoint_dir=store.dir, resume=resume,
                     run_id=record.run_id if record is not None else "")


def open_job_run(pinned: PinnedJob, cfg: TrainConfig, tracker: Tracker | None) -> PinnedJob:
    """The job's MLflow run (``mlflow.run_id``, the one a resumed job recorded, or a new one,
    which gets the config, the Delta inputs and the memory plan), then the job record written."""
    run_id = ""
    if cfg.mlflow.enabled and tracker is not None:
        from sparktune.train.tracking import log_job

        # A job continued by hand (resume=true) goes on in the run it started.
        run_id = cfg.mlflow.run_id or pinned.run_id
        if not (run_id and tracker.run_exists(run_id)):
            run_id = tracker.start_run(cfg.mlflow.run_name)
            log_job(tracker, run_id, cfg, pinned)
            if pinned.memory_plan is not None:
                from sparktune.train.memory import log_plan

                log_plan(tracker, run_id, pinned.memory_plan)
    pinned = dataclasses.replace(pinned, run_id=run_id, tracking_uri=str(tracker.tracking_uri) if run_id and tracker
                                 else "")
    CheckpointStore(pinned.checkpoint_dir).write_job(pinned.record())
    return pinned
