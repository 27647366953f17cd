"""Launching ``train(cfg)`` on Spark with TorchDistributor: the launch plan and the relaunch loop.

This is the only module that touches ``pyspark.ml.torch.distributor.TorchDistributor``.
``build_launch_plan`` is a pure function of the config and the facts about the cluster (Spark
conf, GPUs, cores, environment), so it is tested without launching anything. ``run_training``
is the driver side of a job: it pins the job once (``sparktune.train.pinned``: the table
version, a resumed job on the version it recorded, the task, the memory plan, the job's one
MLflow run) without changing the config, stages the shards, launches the ranks with the
``PinnedJob``, and after a failure reads the ranks' failure records: a user error (or any failure no retry can
fix) is raised whole; other failures are relaunched, resuming from the newest checkpoint that
verifies, in the same MLflow run, up to ``distributor.max_restarts`` times.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import cast

from sparktune.errors import SparktuneError
from sparktune.train.config import TrainConfig, train_config_from_dict
from sparktune.train.pinned import PinnedJob, ResumeDecision, open_job_run, pin_job
from sparktune.train.plan import LaunchPlan, build_launch_plan, spark_facts
from sparktune.train.result import TrainResult

__all__ = ["run_training", "launch_once"]

log = logging.getLogger("sparktune.train")


def _rank_main(cfg_dict: dict, pinned: PinnedJob, env: dict, tracker=None) -> TrainResult:
    """Runs in every training process (pickled by TorchDistributor): set the env, then train."""
    os.environ.update(env)
    from sparktune.train.recipe import train

    return train(cfg_dict, tracker=tracker, pinned=pinned)


def launch_once(plan: LaunchPlan, cfg: TrainConfig, pinned: PinnedJob, tracker=None) -> TrainResult:
    """One TorchDistributor launch of ``train`` on the pinned job; returns rank 0's result."""
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparktune.databricks import hub_token_env, rank_env_for_mlflow

    distributor = TorchDistributor(num_processes=plan.num_processes, local_mode=plan.local_mode,
                                   use_gpu=plan.use_gpu)
    # Ranks on executors have neither the driver's environment nor a notebook's credentials: hand
    # them what MLflow needs in memory, never through the plan (which is logged).
    env = {**plan.env, **rank_env_for_mlflow(tracker.tracking_uri)} if tracker is not None else dict(plan.env)
    env.update(hub_token_env())
    started = time.time()
    # run() is typed Optional[Any]: it returns rank 0's return value, which _rank_main makes a TrainResult
    result = cast(TrainResult, distributor.run(_rank_main, cfg.to_dict(), pinned, env, tracker))
    entered, left = result.phases.pop("entered_at", None), result.phases.pop("left_at", None)
    if entered is not None and left is not None:
        result.phases.update(launch_s=max(0.0, entered - started), teardown_s=max(0.0, time.time() - left))
    return result


def _pin_on_driver(spark, cfg: TrainConfig, plan: LaunchPlan) -> PinnedJob:
    """The job pinned before any rank starts: a catalog name resolved to its folder with Spark,
    then ``pin_job`` (table snapshot, task, resume) and the memory plan."""
    from sparktune.tables import parse_table_ref, table_location

    location = cfg.data.location
    if not location:
        ref = parse_table_ref(cfg.data.table)
        location = ref.path if ref.path is not None else table_location(spark, ref)
    pinned = pin_job(cfg, plan.num_processes, location=location, spark=spark)
    # Before any data is staged or any rank starts: refuse a job that cannot fit.
    return dataclasses.replace(pinned, memory_plan=_plan_memory(cfg, plan, pinned))


def _plan_memory(cfg: TrainConfig, plan: LaunchPlan, pinned: PinnedJob):
    """The job's memory plan on the driver; refuses one that cannot fit (``train.memory_check``).

    None when the check is off, or when the ranks' memory is unknown here (executor GPUs without
    ``distributor.memory_per_rank_gb``): then rank 0 plans against its own GPU before loading.
    """
    from sparktune.tasks import TOKENIZED
    from sparktune.train import memory
    from sparktune.train.config import MemoryCheck

    if cfg.train.memory_check is MemoryCheck.OFF:
        return None
    task = pinned.task
    seq_len = cfg.data.max_length or int(pinned.table.properties.get(TOKENIZED.prop_max_length) or 512)
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


def _failure_message(pinned: PinnedJob, attempts: list[str], max_restarts: int) -> str:
    """What the user reads when every launch failed: no traceback, what happened and what to do."""
    from sparktune.train.checkpoints import latest_complete_checkpoint

    lines = [f"training failed on all {len(attempts)} launch(es) (distributor.max_restarts={max_restarts}):"]
    lines += [f"  {a}" for a in attempts]
    checkpoint = latest_complete_checkpoint(pinned.checkpoint_dir)
    lines.append(f"failure records (with tracebacks): {os.path.join(pinned.checkpoint_dir, 'failures')}; "
                 + (f"newest complete checkpoint: {checkpoint}; fix the cause and rerun with resume=true"
                    if checkpoint else "no complete checkpoint was written; fix the cause and rerun"))
    return "\n".join(lines)


def _stage(spark, cfg: TrainConfig, plan: LaunchPlan, pinned: PinnedJob) -> None:
    """Spark deals the rows into one shard per rank (and checks their labels) before any rank
    starts; each rank then reads only its own shard."""
    from sparktune.staging import default_staging_dir, stage_job_data

    if not plan.local_mode:
        # Ranks on executors write checkpoints and read shards that the driver reads and writes:
        # find out now, not after the first checkpoint, whether they see the same folders.
        from sparktune.spark import check_shared_path

        check_shared_path(spark, pinned.output_dir, "output_dir")
        check_shared_path(spark, pinned.checkpoint_dir, "checkpoint.dir")
        check_shared_path(spark, cfg.data.staging_dir or default_staging_dir(pinned.output_dir), "data.staging_dir")
    stage_job_data(spark, pinned.bind(cfg), pinned.task, staging_dir=cfg.data.staging_dir or None,
                   table_id=pinned.table.table_id)


def _launch_until_done(plan: LaunchPlan, cfg: TrainConfig, pinned: PinnedJob, tracker=None) -> TrainResult:
    """Launch; after a failure, raise a user error (or one no retry fixes) whole, else relaunch
    from the newest checkpoint that verifies, up to ``plan.max_restarts`` times."""
    from sparktune.train import failures
    from sparktune.train.checkpoints import CheckpointStore

    store = CheckpointStore(pinned.checkpoint_dir)
    attempts: list[str] = []
    for attempt in range(plan.max_restarts + 1):
        failures.clear_failures(pinned.checkpoint_dir)
        try:
            result = launch_once(plan, cfg, pinned, tracker)
        except SparktuneError:
            raise
        except Exception as exc:  # TorchDistributor reports failed ranks as RuntimeError
            records = failures.read_failures(pinned.checkpoint_dir)
            fatal = failures.user_error(records)
            if fatal is not None:
                raise fatal from None
            fallback = failures.user_error_in_output(str(exc)) if not records else None
            if fallback is not None:
                raise SparktuneError(fallback) from None
            attempts.append(f"launch {attempt + 1}: {_describe_failure(records, plan.num_processes, exc)[:600]}")
            if attempt == plan.max_restarts:
                raise SparktuneError(_failure_message(pinned, attempts, plan.max_restarts)) from None
            # The ranks are gone: the driver alone picks (and sets broken ones aside) where they go on.
            resume = ResumeDecision(store.latest_complete(plan.num_processes, set_aside=True))
            log.warning("sparktune train: launch failed (%s); relaunching from %s", attempts[-1], resume.describe())
            pinned = dataclasses.replace(pinned, resume=resume)
            continue
        result.attempts = attempt + 1
        result.failures = attempts
        if tracker is not None:
            tracker.set_tags(pinned.run_id, {"sparktune.attempts": attempt + 1})
        return result
    raise AssertionError("unreachable")


def run_training(cfg, spark=None, tracker=None, plan: LaunchPlan | None = None) -> TrainResult:
    """Driver side of a training job on Spark; returns the ``TrainResult`` of the successful launch.

    ``tracker``: the ``sparktune.tracking.Tracker`` to log to (default: one from ``cfg.mlflow``).
    Pins the job once (``PinnedJob``: table snapshot, task, folders, resume, memory plan, the one
    MLflow run that every relaunch continues) and hands it to the ranks; ``cfg`` is not changed.
    Raises SparktuneError/ConfigError, never a launcher traceback, when training cannot succeed.
    """
    cfg = train_config_from_dict(cfg) if not isinstance(cfg, TrainConfig) else cfg
    if spark is None:
        from sparktune.spark import get_spark

        spark = get_spark()
    if plan is None:
        plan = build_launch_plan(cfg, **spark_facts(spark))
    started = time.perf_counter()
    pinned = _pin_on_driver(spark, cfg, plan)
    pinned_s = time.perf_counter() - started
    _stage(spark, cfg, plan, pinned)
    staged_s = time.perf_counter() - started - pinned_s
    log.warning("sparktune train: %s", plan.describe())
    if cfg.mlflow.enabled and tracker is None:
        from sparktune.tracking import Tracker

        tracker = Tracker(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
    started = time.perf_counter()
    pinned = open_job_run(pinned, cfg, tracker)
    run_s = time.perf_counter() - started
    ok = False
    try:
        result = _launch_until_done(plan, cfg, pinned, tracker if pinned.run_id else None)
        result.phases.update(pin_s=pinned_s, staging_s=staged_s, mlflow_run_s=run_s)
        ok = True
        return result
    finally:
        if pinned.run_id and tracker is not None:
            tracker.end_run(pinned.run_id, ok)
