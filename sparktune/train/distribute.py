"""Launching ``train(cfg)`` on Spark with TorchDistributor: the launch plan and the relaunch loop.

This is the only module that touches ``pyspark.ml.torch.distributor.TorchDistributor``.
``build_launch_plan`` is a pure function of the config and the facts about the cluster (Spark
conf, GPUs, cores, environment), so it is tested without launching anything. ``run_training``
is the driver side of a job: it pins the table version, opens the MLflow run, launches, and
relaunches after a failure (resuming from the latest complete checkpoint, same MLflow run).
"""

from __future__ import annotations

import logging
import os
import re

from sparktune.errors import SparktuneError
from sparktune.train.config import TrainConfig, train_config_from_dict
from sparktune.train.plan import (  # noqa: F401  (moved to plan.py; re-exported for callers)
    FORWARDED_ENV,
    LaunchPlan,
    _task_slots,
    build_launch_plan,
    spark_facts,
)

__all__ = ["LaunchPlan", "build_launch_plan", "run_training", "launch_once", "spark_facts"]

log = logging.getLogger("sparktune.train")


def _rank_main(cfg_dict: dict, env: dict) -> dict:
    """Runs in every training process (pickled by TorchDistributor): set the env, then train."""
    os.environ.update(env)
    from sparktune.train.train import train

    return train(cfg_dict)


def launch_once(plan: LaunchPlan, cfg: TrainConfig) -> dict:
    """One TorchDistributor launch of ``train``; returns rank 0's result."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=plan.num_processes, local_mode=plan.local_mode,
                                   use_gpu=plan.use_gpu)
    return distributor.run(_rank_main, cfg.to_dict(), dict(plan.env))


def _resolve_table(spark, cfg: TrainConfig) -> None:
    """Pin ``data.location`` and ``data.version`` on the driver, before any rank starts."""
    from sparktune.tables import parse_table_ref, table_location
    from sparktune.train.data import table_info

    if not cfg.data.location:
        ref = parse_table_ref(cfg.data.table)
        cfg.data.location = ref.path if ref.is_path else table_location(spark, ref)
    info = table_info(cfg.data.location, cfg.data.version)
    cfg.data.version = info["version"]
    if cfg.model.task == "auto":
        task = info["properties"].get("sparktune.task", "")
        if task not in ("classification", "causal-lm"):
            raise SparktuneError(
                f"model.task: is auto and table {cfg.data.table!r} has no sparktune.task property (found "
                f"{task!r}); set model.task=classification or model.task=causal-lm"
            )
        cfg.model.task = task


_RUN_FILE = "sparktune_run.json"
_USER_ERROR = re.compile(r"sparktune\.errors\.(?:SparktuneError|ConfigError): (.*)")


def _user_error_in(output: str) -> str | None:
    """The message of a SparktuneError a rank died of (from its output tail), if any."""
    found = _USER_ERROR.findall(output)
    return found[-1].strip() if found else None


def _record_run_id(checkpoint_dir: str, run_id: str, tracking_uri: str) -> None:
    import json

    os.makedirs(checkpoint_dir, exist_ok=True)
    with open(os.path.join(checkpoint_dir, _RUN_FILE), "w", encoding="utf-8") as handle:
        json.dump({"run_id": run_id, "tracking_uri": tracking_uri}, handle)


def _recorded_run_id(checkpoint_dir: str) -> str:
    import json

    try:
        with open(os.path.join(checkpoint_dir, _RUN_FILE), encoding="utf-8") as handle:
            return str(json.load(handle).get("run_id", ""))
    except (OSError, ValueError):
        return ""


def run_training(cfg, spark=None, plan: LaunchPlan | None = None) -> dict:
    """Driver side of a training job on Spark; returns the result of the successful launch.

    Opens one MLflow run (params, Delta inputs) that every relaunch continues, launches the
    ranks, and after a failure relaunches up to ``distributor.max_restarts`` times with
    ``resume`` on, so training picks up from the latest complete checkpoint.
    """
    from sparktune.train import tracking
    from sparktune.train.train import latest_complete_checkpoint

    cfg = train_config_from_dict(cfg) if not isinstance(cfg, TrainConfig) else cfg
    if spark is None:
        from sparktune.spark import get_spark

        spark = get_spark()
    _resolve_table(spark, cfg)
    if plan is None:
        plan = build_launch_plan(cfg, **spark_facts(spark))
    log.warning("sparktune train: %s", plan.describe())
    if not cfg.resume and latest_complete_checkpoint(cfg.checkpoint_dir):
        raise SparktuneError(
            f"checkpoint.dir: {cfg.checkpoint_dir} already holds checkpoints of an earlier job; pass resume=true "
            "to continue it, or choose another output_dir / checkpoint.dir"
        )
    opened = False
    if cfg.mlflow.enabled:
        cfg.mlflow.tracking_uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        if cfg.resume and not cfg.mlflow.run_id:
            # A job continued by hand (resume=true) goes on in the run it started.
            cfg.mlflow.run_id = _recorded_run_id(cfg.checkpoint_dir)
        continuing = bool(cfg.mlflow.run_id)
        cfg.mlflow.run_id = tracking.open_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment,
                                              cfg.mlflow.run_name, run_id=cfg.mlflow.run_id)
        opened = True
        if not continuing:
            tracking.log_job(cfg, cfg.model.task)
        _record_run_id(cfg.checkpoint_dir, cfg.mlflow.run_id, cfg.mlflow.tracking_uri)
    attempts = []
    try:
        for attempt in range(plan.max_restarts + 1):
            try:
                result = launch_once(plan, cfg)
            except Exception as exc:  # TorchDistributor reports failed ranks as RuntimeError
                attempts.append(f"attempt {attempt + 1}: {str(exc).splitlines()[0][:300]}")
                user_error = _user_error_in(str(exc))
                if user_error is not None:
                    # Bad input fails the same way on every try: report it instead of relaunching.
                    raise SparktuneError(user_error) from None
                if isinstance(exc, SparktuneError) or attempt == plan.max_restarts:
                    raise
                checkpoint = latest_complete_checkpoint(cfg.checkpoint_dir, plan.num_processes)
                log.warning("sparktune train: launch failed (%s); relaunching from %s", attempts[-1],
                            checkpoint or "the start (no complete checkpoint yet)")
                cfg.resume = True
                continue
            result = dict(result or {})
            result["attempts"] = attempt + 1
            result["failures"] = attempts
            if opened:
                import mlflow

                mlflow.log_metric("job/attempts", attempt + 1)
                tracking.finish_run(True)
                opened = False
            return result
    finally:
        if opened:
            tracking.finish_run(False)
    raise AssertionError("unreachable")
