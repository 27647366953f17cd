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
from dataclasses import dataclass, field

from sparktune.errors import ConfigError, SparktuneError
from sparktune.train.config import TrainConfig, train_config_from_dict
from sparktune.train.result import TrainResult

__all__ = ["LaunchPlan", "build_launch_plan", "run_training", "launch_once", "spark_facts"]

log = logging.getLogger("sparktune.train")

# Environment variables the ranks get from the driver when set there. Only these: the
# driver's environment may hold credentials, so it is never forwarded wholesale.
FORWARDED_ENV = (
    "SPARKTUNE_HOME",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HOME",
    "SPARKTUNE_TEST_KILL_AT_STEP",
)


@dataclass
class LaunchPlan:
    """What TorchDistributor will be asked to run, and with which environment per rank."""

    num_processes: int
    local_mode: bool
    use_gpu: bool
    backend: str
    max_restarts: int
    env: dict = field(default_factory=dict)
    command: list = field(default_factory=list)
    """The equivalent plain-torchrun command (for logs, and for running without Spark)."""

    def describe(self) -> str:
        where = "on the driver" if self.local_mode else "as Spark barrier tasks"
        device = "GPU" if self.use_gpu else "CPU"
        return (f"{self.num_processes} {device} process(es) {where}, backend {self.backend}, "
                f"up to {self.max_restarts} relaunch(es)")


def _task_slots(conf: dict, cpu_count: int) -> int | None:
    """Concurrent tasks a local master offers (local[N] / N cores per task), None if unknown."""
    master = conf.get("spark.master", "")
    cpus_per_task = int(conf.get("spark.task.cpus", "1") or 1)
    if master == "local":
        cores = 1
    elif master.startswith("local["):
        inner = master[len("local["):].split("]")[0].split(",")[0]
        cores = cpu_count if inner == "*" else int(inner)
    else:
        return None  # a cluster: the scheduler knows, and fails the barrier stage if short
    return max(cores // max(cpus_per_task, 1), 0)


def build_launch_plan(cfg: TrainConfig, *, spark_conf: dict, driver_gpus: int, cpu_count: int,
                      environ: dict, config_path: str = "config.yaml") -> LaunchPlan:
    """The launch plan for ``cfg`` given the cluster's facts; raises SparktuneError if it cannot run.

    ``spark_conf``: the Spark settings that matter (``spark.master``, ``spark.task.cpus``,
    ``spark.task.resource.gpu.amount``); ``driver_gpus``: CUDA devices the driver sees;
    ``environ``: the driver's environment (only ``FORWARDED_ENV`` keys are passed on).
    """
    d = cfg.distributor
    n = d.num_processes
    task_gpus = float(spark_conf.get("spark.task.resource.gpu.amount", "0") or 0)
    if d.use_gpu == "auto":
        use_gpu = driver_gpus > 0 if d.local_mode else task_gpus > 0
    else:
        use_gpu = bool(d.use_gpu)
    if use_gpu and d.local_mode and driver_gpus < n:
        raise SparktuneError(
            f"distributor.num_processes: {n} GPU processes on the driver need {n} GPUs, found {driver_gpus}; "
            f"lower distributor.num_processes, or set distributor.use_gpu=false"
        )
    if use_gpu and not d.local_mode and task_gpus < 1:
        raise SparktuneError(
            "distributor.use_gpu: true with local_mode=false needs spark.task.resource.gpu.amount >= 1 "
            f"(found {task_gpus or 'unset'}); configure GPU scheduling on the cluster or set distributor.use_gpu=false"
        )
    if not d.local_mode:
        slots = _task_slots(spark_conf, cpu_count)
        if slots is not None and slots < n:
            raise SparktuneError(
                f"distributor.num_processes: {n} barrier tasks need {n} free task slots, but master "
                f"{spark_conf.get('spark.master')!r} with spark.task.cpus={spark_conf.get('spark.task.cpus', '1')} "
                f"offers {slots}; lower distributor.num_processes or give Spark more cores"
            )
    backend = d.backend if d.backend != "auto" else ("nccl" if use_gpu else "gloo")
    if backend == "nccl" and not use_gpu:
        raise SparktuneError("distributor.backend: nccl needs GPUs; use gloo (or auto) for CPU training")

    env = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if not use_gpu:
        # A CPU plan stays on CPU even on a driver with GPUs (train() uses any GPU it sees).
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Processes on one machine share its cores: more threads than cores only thrash.
        per_host = n if d.local_mode else max(1, min(n, _task_slots(spark_conf, cpu_count) or 1))
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count // per_host))
    if d.local_mode:
        launcher = ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={n}"]
    else:
        launcher = ["torchrun", f"--nnodes={n}", "--nproc_per_node=1", "--rdzv_endpoint=MASTER:PORT"]
    command = launcher + ["-m", "sparktune.train.train", "--config", config_path]
    return LaunchPlan(num_processes=n, local_mode=d.local_mode, use_gpu=use_gpu, backend=backend,
                      max_restarts=d.max_restarts, env=env, command=command)


def spark_facts(spark) -> dict:
    """The facts ``build_launch_plan`` needs, read from a live session."""
    conf = spark.sparkContext.getConf()
    keys = ("spark.master", "spark.task.cpus", "spark.task.resource.gpu.amount", "spark.executor.cores")
    spark_conf = {k: conf.get(k) for k in keys if conf.get(k) is not None}
    driver_gpus = 0
    try:
        import torch

        driver_gpus = torch.cuda.device_count()
    except Exception:
        driver_gpus = 0
    return {"spark_conf": spark_conf, "driver_gpus": driver_gpus, "cpu_count": os.cpu_count() or 1,
            "environ": dict(os.environ)}


def _rank_main(cfg_dict: dict, env: dict, tracker=None) -> TrainResult:
    """Runs in every training process (pickled by TorchDistributor): set the env, then train."""
    os.environ.update(env)
    from sparktune.train.recipe import train

    return train(cfg_dict, tracker=tracker)


def launch_once(plan: LaunchPlan, cfg: TrainConfig, tracker=None) -> TrainResult:
    """One TorchDistributor launch of ``train``; returns rank 0's result."""
    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=plan.num_processes, local_mode=plan.local_mode,
                                   use_gpu=plan.use_gpu)
    return distributor.run(_rank_main, cfg.to_dict(), dict(plan.env), tracker)


def _resolve_table(spark, cfg: TrainConfig, world_size: int) -> None:
    """Pin ``data.location``, ``data.version`` and ``model.task`` on the driver, before any rank starts."""
    from sparktune.tables import parse_table_ref, table_location
    from sparktune.train.checks import check_table_matches_model
    from sparktune.train.data import table_info
    from sparktune.train.recipe import prepare_resume, resolve_task, table_identity

    if not cfg.data.location:
        ref = parse_table_ref(cfg.data.table)
        cfg.data.location = ref.path if ref.is_path else table_location(spark, ref)
    prepare_resume(cfg, world_size, table_identity(cfg.data.location))
    info = table_info(cfg.data.location, cfg.data.version)
    cfg.data.version = info["version"]
    cfg.model.task = resolve_task(cfg, info["properties"]).value
    problems = check_table_matches_model(info["properties"], cfg)
    if problems:
        raise ConfigError(problems)


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
    if plan is None:
        plan = build_launch_plan(cfg, **spark_facts(spark))
    _resolve_table(spark, cfg, plan.num_processes)
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
