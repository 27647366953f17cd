"""The launch plan: how many training processes, where, on which device, with which backend.

``build_launch_plan`` is a pure function of the config and the facts about the cluster (Spark
conf, GPUs, cores, environment, whether the session is Spark Connect), so every branch is tested
without launching anything or owning a GPU. ``spark_facts`` reads those facts from a live
session through ``spark.conf`` only (no ``sparkContext``: Spark Connect has none).

GPUs: TorchDistributor only hands GPUs to ranks that Spark scheduled them for. In local mode it
reads ``spark.driver.resource.gpu.amount`` and the driver's GPU resources (found by the
discovery script); in executor mode every barrier task must ask for exactly one GPU
(``spark.task.resource.gpu.amount=1``) on executors that offer them
(``spark.executor.resource.gpu.amount``). Both are static settings fixed when the session
starts, so the plan checks them and says which to set; ``gpu_session_conf`` builds them for a
local session.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from sparktune.env import forwarded_env
from sparktune.errors import SparktuneError
from sparktune.train.config import TrainConfig

__all__ = [
    "SPARK_CONF_KEYS",
    "LaunchPlan",
    "build_launch_plan",
    "gpu_session_conf",
    "is_connect_session",
    "spark_facts",
    "write_gpu_discovery_script",
]


DRIVER_GPU_AMOUNT = "spark.driver.resource.gpu.amount"
DRIVER_GPU_SCRIPT = "spark.driver.resource.gpu.discoveryScript"
EXECUTOR_GPU_AMOUNT = "spark.executor.resource.gpu.amount"
EXECUTOR_GPU_SCRIPT = "spark.executor.resource.gpu.discoveryScript"
TASK_GPU_AMOUNT = "spark.task.resource.gpu.amount"

SPARK_CONF_KEYS = (
    "spark.master",
    "spark.task.cpus",
    "spark.executor.cores",
    DRIVER_GPU_AMOUNT,
    DRIVER_GPU_SCRIPT,
    EXECUTOR_GPU_AMOUNT,
    EXECUTOR_GPU_SCRIPT,
    TASK_GPU_AMOUNT,
)
"""The Spark settings the plan reads (``spark_facts`` asks the session for each of them)."""


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
    bf16: bool | None = False
    """bf16 mixed precision: True when the driver's GPUs support it (local mode), None when each
    rank must decide (executor mode: the driver cannot see the executors' GPUs), False on CPU."""

    def describe(self) -> str:
        where = "on the driver" if self.local_mode else "as Spark barrier tasks"
        device = "GPU" if self.use_gpu else "CPU"
        precision = {True: ", bf16", None: ", bf16 where the GPU supports it", False: ""}[self.bf16]
        return (f"{self.num_processes} {device} process(es) {where}, backend {self.backend}{precision}, "
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


def _amount(conf: dict, key: str) -> float:
    try:
        return float(conf.get(key) or 0)
    except ValueError:
        raise SparktuneError(f"{key}: expected a number, found {conf.get(key)!r}; fix the Spark setting") from None


def _check_local_gpus(n: int, conf: dict, driver_gpus: int) -> None:
    """Local mode on GPUs: one rank per driver GPU, and Spark told about them (TorchDistributor asks it)."""
    if driver_gpus < n:
        raise SparktuneError(
            f"distributor.num_processes: {n} GPU processes on the driver need {n} GPUs (one rank per GPU), "
            f"found {driver_gpus}; lower distributor.num_processes, or set distributor.use_gpu=false"
        )
    told = _amount(conf, DRIVER_GPU_AMOUNT)
    if told < n or not conf.get(DRIVER_GPU_SCRIPT):
        raise SparktuneError(
            f"distributor.use_gpu: the driver has {driver_gpus} GPU(s) but Spark was not told about them "
            f"({DRIVER_GPU_AMOUNT}={conf.get(DRIVER_GPU_AMOUNT) or 'unset'}, "
            f"{DRIVER_GPU_SCRIPT}={conf.get(DRIVER_GPU_SCRIPT) or 'unset'}), so TorchDistributor cannot give "
            f"them to the {n} rank(s). Start the session with {DRIVER_GPU_AMOUNT}={driver_gpus} and a discovery "
            f"script (sparktune.train.plan.gpu_session_conf builds both; spark-submit: --conf), "
            "or set distributor.use_gpu=false to train on CPU"
        )


def _check_executor_gpus(conf: dict) -> None:
    """Executor mode on GPUs: each barrier task (rank) gets exactly one GPU of an executor that has some."""
    task = _amount(conf, TASK_GPU_AMOUNT)
    if task != 1:
        raise SparktuneError(
            f"distributor.use_gpu: executor-mode GPU training needs {TASK_GPU_AMOUNT}=1 (one rank per GPU), "
            f"found {conf.get(TASK_GPU_AMOUNT) or 'unset'}; set it (and {EXECUTOR_GPU_AMOUNT} plus a "
            f"discovery script on the executors) when starting the application, or set distributor.use_gpu=false"
        )
    executor = conf.get(EXECUTOR_GPU_AMOUNT)
    if executor is not None and _amount(conf, EXECUTOR_GPU_AMOUNT) < 1:
        raise SparktuneError(
            f"distributor.use_gpu: {TASK_GPU_AMOUNT}=1 but {EXECUTOR_GPU_AMOUNT}={executor}: no executor can run "
            f"a GPU task; set {EXECUTOR_GPU_AMOUNT} to the GPUs per executor"
        )


def build_launch_plan(cfg: TrainConfig, *, spark_conf: dict, driver_gpus: int, cpu_count: int,
                      environ: dict, config_path: str = "config.yaml", driver_bf16: bool = False,
                      connect: bool = False) -> LaunchPlan:
    """The launch plan for ``cfg`` given the cluster's facts; raises SparktuneError if it cannot run.

    ``spark_conf``: the Spark settings in ``SPARK_CONF_KEYS`` that are set; ``driver_gpus``: CUDA
    devices the driver sees; ``driver_bf16``: whether they support bf16; ``environ``: the
    driver's environment (only ``sparktune.env.forwarded_env`` of it is passed on); ``connect``: the session
    is a Spark Connect client.
    """
    d = cfg.distributor
    n = d.num_processes
    if connect and d.local_mode:
        # TorchDistributor's local mode runs the ranks where this Python process runs: over Spark
        # Connect that is the client (a laptop, a notebook container), not the cluster's driver.
        raise SparktuneError(
            "distributor.local_mode: this is a Spark Connect session, and TorchDistributor's local mode would "
            "run the training processes on this client machine, not on the cluster. Set "
            "distributor.local_mode=false to run them as barrier tasks on the executors, or submit the job "
            "to the cluster (spark-submit / a Databricks job on a classic cluster) so it gets a classic session"
        )
    task_gpus = _amount(spark_conf, TASK_GPU_AMOUNT)
    executor_gpus = _amount(spark_conf, EXECUTOR_GPU_AMOUNT)
    if d.use_gpu == "auto":
        if d.local_mode:
            use_gpu = driver_gpus > 0
        else:
            use_gpu = task_gpus > 0 or executor_gpus > 0
    else:
        use_gpu = bool(d.use_gpu)
    if use_gpu and d.local_mode:
        _check_local_gpus(n, spark_conf, driver_gpus)
    if use_gpu and not d.local_mode:
        _check_executor_gpus(spark_conf)
    if not d.local_mode:
        slots = _task_slots(spark_conf, cpu_count)
        if slots is not None and slots < n:
            raise SparktuneError(
                f"distributor.num_processes: {n} barrier tasks need {n} free task slots, but master "
                f"{spark_conf.get('spark.master')!r} with spark.task.cpus={spark_conf.get('spark.task.cpus', '1')} "
                f"offers {slots}; lower distributor.num_processes or give Spark more cores"
            )
    from sparktune.tasks import Task
    from sparktune.train.model import peft_problems, qlora_problems

    task = Task.parse(cfg.model.task, "model.task") if cfg.model.task != "auto" else None
    problems = peft_problems(cfg)
    problems += qlora_problems(cfg, task, use_gpu) if (use_gpu and d.local_mode) or not use_gpu else []
    if problems:
        raise SparktuneError("; ".join(problems))
    backend = d.backend if d.backend != "auto" else ("nccl" if use_gpu else "gloo")
    if backend == "nccl" and not use_gpu:
        raise SparktuneError("distributor.backend: nccl needs GPUs; use gloo (or auto) for CPU training")

    env = forwarded_env(environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    if use_gpu:
        # A rank that dies must fail the others' collectives instead of leaving them hung in NCCL.
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        bf16: bool | None = bool(driver_bf16) if d.local_mode else None
    else:
        bf16 = False
        # A CPU plan stays on CPU even on a driver with GPUs (train() uses any GPU it sees).
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Processes on one machine share its cores: more threads than cores only thrash. On a
        # 2-core box the default 2 ranks x 1 thread matched 1 x 2 threads when idle (1.05x, noise)
        # and was 9x faster under contention, where OpenMP's barriers wait for descheduled
        # threads (bench_train_efficiency.py, BENCHMARKS.md issue 12).
        per_host = n if d.local_mode else max(1, min(n, _task_slots(spark_conf, cpu_count) or 1))
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count // per_host))
    if d.local_mode:
        launcher = ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={n}"]
    else:
        launcher = ["torchrun", f"--nnodes={n}", "--nproc_per_node=1", "--rdzv_endpoint=MASTER:PORT"]
    command = launcher + ["-m", "sparktune.train.train", "--config", config_path]
    return LaunchPlan(num_processes=n, local_mode=d.local_mode, use_gpu=use_gpu, backend=backend,
                      max_restarts=d.max_restarts, env=env, command=command, bf16=bf16)


def is_connect_session(spark) -> bool:
    """True for a Spark Connect client session (``pyspark.sql.connect.session.SparkSession``)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def _local_gpus() -> tuple[int, bool]:
    """(CUDA devices this process sees, whether all of them support bf16)."""
    try:
        import torch

        count = torch.cuda.device_count()
        return count, bool(count and torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001  (no torch build with CUDA, or a broken driver: no GPUs as far as we can use them)
        return 0, False


def spark_facts(spark) -> dict:
    """The facts ``build_launch_plan`` needs, read from a live session (classic or Connect)."""
    spark_conf = {}
    for key in SPARK_CONF_KEYS:
        value = spark.conf.get(key, None)
        if value is not None:
            spark_conf[key] = value
    driver_gpus, bf16 = _local_gpus()
    return {"spark_conf": spark_conf, "driver_gpus": driver_gpus, "cpu_count": os.cpu_count() or 1,
            "environ": dict(os.environ), "driver_bf16": bf16, "connect": is_connect_session(spark)}


_DISCOVERY_SCRIPT = """#!/usr/bin/env bash
# Spark GPU discovery script (written by sparktune): prints the GPUs this host has, as Spark expects.
ADDRS=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | sed -e 's/^ *//' -e 's/.*/"&"/' | paste -sd, -)
echo "{\\"name\\": \\"gpu\\", \\"addresses\\": [${ADDRS}]}"
"""


def write_gpu_discovery_script(folder: str) -> str:
    """Write Spark's GPU discovery script (nvidia-smi based) into ``folder``; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "sparktune_gpu_discovery.sh")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(_DISCOVERY_SCRIPT)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def gpu_session_conf(gpus: int, discovery_script: str, *, local: bool = True) -> dict:
    """Spark settings that let TorchDistributor hand ``gpus`` GPUs to ranks, one rank per GPU.

    ``local``: for a session whose ranks run on the driver (``spark.driver.resource.*``);
    otherwise for executors with ``gpus`` GPUs each, one GPU per task.
    """
    if gpus < 1:
        return {}
    if local:
        return {DRIVER_GPU_AMOUNT: str(gpus), DRIVER_GPU_SCRIPT: discovery_script}
    return {EXECUTOR_GPU_AMOUNT: str(gpus), EXECUTOR_GPU_SCRIPT: discovery_script, TASK_GPU_AMOUNT: "1"}
