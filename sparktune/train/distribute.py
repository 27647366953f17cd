"""Launching ``train(cfg)`` on Spark with TorchDistributor: the launch plan and the relaunch loop.

This is the only module that touches ``pyspark.ml.torch.distributor.TorchDistributor``.
``build_launch_plan`` is a pure function of the config and the facts about the cluster (Spark
conf, GPUs, cores, environment), so it is tested without launching anything. ``run_training``
is the driver side of a job: it pins the table version (a resumed job: the version it
recorded), checks the table against the model, opens the job's one MLflow run, launches, and
after a failure reads the ranks' failure records: a user error (or any failure no retry can
fix) is raised whole; other failures are relaunched, resuming from the newest checkpoint that
verifies, in the same MLflow run, up to ``distributor.max_restarts`` times.
"""

from __future__ import annotations

import logging
import os
from typing import cast

from sparktune.errors import ConfigError, SparktuneError
from sparktune.train.config import TrainConfig, train_config_from_dict
from sparktune.train.plan import LaunchPlan, build_launch_plan, spark_facts
from sparktune.train.result import TrainResult

__all__ = ["run_training", "launch_once"]

log = logging.getLogger("sparktune.train")


def _rank_main(cfg_dict: dict, env: dict, tracker=None) -> TrainResult:
    """Runs in every training process (pickled by TorchDistributor): set the env, then train."""
    os.environ.update(env)
    from sparktune.train.recipe import train

    return train(cfg_dict, tracker=tracker)


def launch_once(plan: LaunchPlan, cfg: TrainConfig, tracker=None) -> TrainResult:
    """One TorchDistributor launch of ``train``; returns rank 0's result."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparktune.databricks import hub_token_env, rank_env_for_mlflow

    distributor = TorchDistributor(num_processes=plan.num_processes, local_mode=plan.local_mode,
                                   use_gpu=plan.use_gpu)
    # Ranks on executors have neither the driver's environment nor a notebook's credentials: hand
    # them what MLflow needs in memory, never through the plan (which is logged).
    env = {**plan.env, **rank_env_for_mlflow(tracker.tracking_uri)} if tracker is not None else dict(plan.env)
    env.update(hub_token_env())
    # run() is typed Optional[Any]: it returns rank 0's return value, which _rank_main makes a TrainResult
    return cast(TrainResult, distributor.run(_rank_main, cfg.to_dict(), env, tracker))


def _resolve_table(spark, cfg: TrainConfig, world_size: int) -> dict:
    """Pin ``data.location``, ``data.version`` and ``model.task`` on the driver, before any rank starts."""
    from sparktune.tables import parse_table_ref, table_location
    from sparktune.train.checks import check_table_matches_model
    from sparktune.train.data import table_info
    from sparktune.train.recipe import prepare_resume, resolve_task, table_identity

    if not cfg.data.location:
        ref = parse_table_ref(cfg.data.table)
        cfg.data.location = ref.path if ref.path is not None else table_location(spark, ref)
    prepare_resume(cfg, world_size, table_identity(cfg.data.location))
    info = table_info(cfg.data.location, cfg.data.version)
    cfg.data.version = info["version"]
    cfg.model.task = resolve_task(cfg, info["properties"]).value
    problems = check_table_matches_model(info["properties"], cfg)
    if problems:
        raise ConfigError(problems)
    return info["properties"]


def _plan_memory(cfg: TrainConfig, plan: LaunchPlan, props: dict):
    """The job's memory plan on the driver; refuses one that cannot fit (``train.memory_check``).

    None when the check is off, or when the ranks' memory is unknown here (executor GPUs without
    ``distributor.memory_per_rank_gb``): then rank 0 plans against its own GPU before loading.
    """
    from sparktune.tasks import TOKENIZED, Task
    from sparktune.train import memory
    from sparktune.train.config import MemoryCheck

    if cfg.train.memory_check is MemoryCheck.OFF:
        return None
    task = Task.parse(cfg.model.task, "model.task")
    seq_len = cfg.data.max_length or int(props.get(TOKENIZED.prop_max_length) or 512)
    gpu_total = None
    if plan.use_gpu and plan.local_mode:
        import torch

        gpu_total = int(torch.cuda.get_device_properties(0).total_memory)
    shape = memory.model_shape(cfg, task)
    mplan = memory.plan_for_job(cfg, task, seq_len=seq_len, world_size=plan.num_processes, gpu=plan.use_gpu,
                                bf16=bool(plan.bf16), ranks_per_host=memory.ranks_per_host(cfg),
                                gpu_total=gpu_total, shape=shape)
    if mplan.available is None:
        return None
    log.warning("sparktune train: memory plan: %s", mplan.figures())
    memory.check_memory(mplan, shape, cfg.train.memory_check)
    plan.env[memory.PLANNED_ENV] = "1"
    return mplan


def _describe_failure(records, world_size: int, exc: Exception) -> str:
    """One line: which ranks died without a record (a signal, the OOM killer), then the first record."""
    parts = []
    missing = sorted(set(range(world_size)) - {r.rank for r in records})
    if missing:
        parts.append(f"rank(s) {', '.join(map(str, missing))} died without a failure record (killed by a signal "
                     "or out of memory?)")
    if records:
        parts.append(min(records, key=lambda r: r.time).headline())  # the first to fail; the others lost a peer
    if not parts:
        parts.append((str(exc).strip().splitlines() or [type(exc).__name__])[0][:500])
    return "; ".join(parts)


def _failure_message(cfg: TrainConfig, attempts: list[str]) -> str:
    """What the user reads when every launch failed: no traceback, what happened and what to do."""
    from sparktune.train.checkpoints import latest_complete_checkpoint

    lines = [f"training failed on all {len(attempts)} launch(es) (distributor.max_restarts="
             f"{cfg.distributor.max_restarts}):"]
    lines += [f"  {a}" for a in attempts]
    checkpoint = latest_complete_checkpoint(cfg.checkpoint_dir)
    lines.append(f"failure records (with tracebacks): {os.path.join(cfg.checkpoint_dir, 'failures')}; "
                 + (f"newest complete checkpoint: {checkpoint}; fix the cause and rerun with resume=true"
                    if checkpoint else "no complete checkpoint was written; fix the cause and rerun"))
    return "\n".join(lines)


def _place_outputs_on_volume(cfg: TrainConfig) -> None:
    """On Databricks with a job Volume, a relative output_dir lands on that Volume: a driver-local
    ``./out`` is neither shared with the ranks nor kept after the cluster stops."""
    from sparktune.databricks import default_output_root

    root = default_output_root()
    if root and not os.path.isabs(cfg.output_dir) and "://" not in cfg.output_dir:
        cfg.output_dir = os.path.join(root, "runs", os.path.normpath(cfg.output_dir))
        log.warning("sparktune train: output_dir is %s (the job's Volume)", cfg.output_dir)


def run_training(cfg, spark=None, tracker=None, plan: LaunchPlan | None = None) -> TrainResult:
    """Driver side of a training job on Spark; returns the ``TrainResult`` of the successful launch.

    ``tracker``: the ``sparktune.tracking.Tracker`` to log to (default: one from ``cfg.mlflow``).
    Opens one MLflow run (params, Delta inputs) that every relaunch continues; ranks get the
    tracker and the run id, rank 0 logs. Raises SparktuneError/ConfigError, never a launcher
    traceback, when training cannot succeed.
    """
    from sparktune.train import failures
    from sparktune.train.checkpoints import CheckpointStore, JobRecord
    from sparktune.train.recipe import table_identity
    from sparktune.train.tracking import log_job

    cfg = train_config_from_dict(cfg) if not isinstance(cfg, TrainConfig) else cfg
    if spark is None:
        from sparktune.spark import get_spark

        spark = get_spark()
    _place_outputs_on_volume(cfg)
    if plan is None:
        plan = build_launch_plan(cfg, **spark_facts(spark))
    props = _resolve_table(spark, cfg, plan.num_processes)
    # Before any data is staged or any rank starts: refuse a job that cannot fit.
    memory_plan = _plan_memory(cfg, plan, props)
    from sparktune.staging import default_staging_dir, stage_job_data

    if not plan.local_mode:
        # Ranks on executors write checkpoints and read shards that the driver reads and writes:
        # find out now, not after the first checkpoint, whether they see the same folders.
        from sparktune.spark import check_shared_path

        check_shared_path(spark, cfg.output_dir, "output_dir")
        check_shared_path(spark, cfg.checkpoint_dir, "checkpoint.dir")
        check_shared_path(spark, cfg.data.staging_dir or default_staging_dir(cfg.output_dir), "data.staging_dir")

    # Spark deals the rows into one shard per rank (and checks their labels) before any rank
    # starts; each rank then reads only its own shard.
    stage_job_data(spark, cfg, cfg.model.task, staging_dir=cfg.data.staging_dir or None)
    log.warning("sparktune train: %s", plan.describe())
    store = CheckpointStore(cfg.checkpoint_dir)
    record = store.read_job() if cfg.resume else None
    run_id = ""
    if cfg.mlflow.enabled:
        if tracker is None:
            from sparktune.tracking import Tracker

            tracker = Tracker(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
        cfg.mlflow.tracking_uri = str(tracker.tracking_uri)
        cfg.mlflow.experiment = tracker.experiment
        # A job continued by hand (resume=true) goes on in the run it started.
        run_id = cfg.mlflow.run_id or (record.run_id if record is not None else "")
        if not (run_id and tracker.run_exists(run_id)):
            run_id = tracker.start_run(cfg.mlflow.run_name)
            log_job(tracker, run_id, cfg, cfg.model.task)
            if memory_plan is not None:
                from sparktune.train.memory import log_plan

                log_plan(tracker, run_id, memory_plan)
        cfg.mlflow.run_id = run_id
    store.write_job(JobRecord(location=cfg.data.location, table=cfg.data.table,
                              table_id=table_identity(cfg.data.location), version=cfg.data.version,
                              world_size=plan.num_processes, task=cfg.model.task, run_id=run_id,
                              tracking_uri=cfg.mlflow.tracking_uri if run_id else ""))
    attempts: list[str] = []
    ok = False
    try:
        for attempt in range(plan.max_restarts + 1):
            failures.clear_failures(cfg.checkpoint_dir)
            try:
                result = launch_once(plan, cfg, tracker if run_id else None)
            except SparktuneError:
                raise
            except Exception as exc:  # TorchDistributor reports failed ranks as RuntimeError
                records = failures.read_failures(cfg.checkpoint_dir)
                fatal = failures.user_error(records)
                if fatal is not None:
                    raise fatal from None
                fallback = failures.user_error_in_output(str(exc)) if not records else None
                if fallback is not None:
                    raise SparktuneError(fallback) from None
                attempts.append(f"launch {attempt + 1}: {_describe_failure(records, plan.num_processes, exc)[:600]}")
                if attempt == plan.max_restarts:
                    raise SparktuneError(_failure_message(cfg, attempts)) from None
                checkpoint = store.latest_complete(plan.num_processes)
                log.warning("sparktune train: launch failed (%s); relaunching from %s", attempts[-1],
                            checkpoint or "the start (no complete checkpoint yet)")
                cfg.resume = True
                continue
            result.attempts = attempt + 1
            result.failures = attempts
            if run_id:
                tracker.set_tags(run_id, {"sparktune.attempts": attempt + 1})
            ok = True
            return result
    finally:
        if run_id:
            tracker.end_run(run_id, ok)
    raise AssertionError("unreachable")
