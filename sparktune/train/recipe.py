"""``train(cfg)``: one rank of a fine-tuning job, read top to bottom: setup -> fit -> finish.

Knows nothing about Spark: the launcher (``sparktune.train.distribute``) runs it in each
TorchDistributor process, and it runs as well under plain torchrun
(``python -m sparktune.train.train``) or as a function call in one process.

- setup: join the process group; rank 0 pins the table version (continuing a resumed job on
  the version it recorded), checks the table against the model, and opens or continues the
  job's MLflow run; every rank loads the tokenizer, its rows and the model.
- fit: Hugging Face ``Trainer`` over this rank's shard, resuming from the newest checkpoint
  that verifies; rank 0's MLflow logging is transformers' own ``MLflowCallback``.
- finish: evaluate, rank 0 saves/logs the model, every rank returns rank 0's ``TrainResult``.

A rank that fails writes a failure record (``sparktune.train.failures``) before it exits.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from sparktune.errors import ConfigError, SparktuneError
from sparktune.tasks import TOKENIZED, Task
from sparktune.train import dist
from sparktune.train.checkpoints import CheckpointStore, JobRecord, resume_problems
from sparktune.train.checks import check_rows_fit_model, check_table_matches_model
from sparktune.train.config import Parallelism, TrainConfig, train_config_from_dict
from sparktune.train.failures import DataFilesGone, record_failure
from sparktune.train.result import TrainResult

__all__ = ["train", "resolve_data", "prepare_resume", "table_identity", "check_table_matches_model"]

log = logging.getLogger("sparktune.train")


# Table and resume ---------------------------------------------------------------------------
def resolve_data(cfg: TrainConfig) -> TrainConfig:
    """Fill ``data.location`` from a path-like ``data.table``; names need the launcher (Spark)."""
    if cfg.data.location:
        return cfg
    from sparktune.tables import parse_table_ref

    ref = parse_table_ref(cfg.data.table)
    if ref.path is None:
        raise SparktuneError(
            f"data.table: {cfg.data.table!r} is a catalog name, which only Spark can resolve; launch with "
            "`sparktune train` (it resolves the name) or set data.location to the table's folder"
        )
    cfg.data.location = ref.path
    return cfg


def table_identity(location: str) -> str:
    """The Delta table id (it changes when a table is dropped and written again)."""
    from deltalake import DeltaTable

    try:
        return str(DeltaTable(location).metadata().id)
    except Exception:
        return ""  # a missing table is reported, with what to do, by table_info


def prepare_resume(cfg: TrainConfig, world_size: int, table_id: str) -> JobRecord | None:
    """Check a ``resume=true`` job against its record and pin ``data.version`` to the recorded one.

    Without resume, refuses a checkpoint folder that already holds checkpoints. Raises
    ConfigError naming every problem.
    """
    store = CheckpointStore(cfg.checkpoint_dir)
    if not cfg.resume:
        if store.has_checkpoints():
            raise SparktuneError(
                f"checkpoint.dir: {cfg.checkpoint_dir} already holds checkpoints of an earlier job; pass resume=true "
                "to continue it, or choose another output_dir / checkpoint.dir"
            )
        return None
    record = store.read_job()
    problems = resume_problems(record, location=cfg.data.location, table_id=table_id, version=cfg.data.version,
                               world_size=world_size, written_world_size=store.written_world_size(),
                               where=cfg.checkpoint_dir)
    if problems:
        raise ConfigError(problems)
    if record is not None and record.version is not None and cfg.data.version is None:
        cfg.data.version = int(record.version)
        log.warning("sparktune train: resume continues on %s v%s, the version the job pinned",
                    cfg.data.location, record.version)
    return record


def resolve_task(cfg: TrainConfig, props: dict) -> Task:
    if cfg.model.task != "auto":
        return Task.parse(cfg.model.task, "model.task")
    task = TOKENIZED.task_of(props, "model.task")
    if task is None:
        raise ConfigError([f"model.task: is auto and table {cfg.data.table!r} has no {TOKENIZED.prop_task} "
                           f"property; set model.task={Task.CLASSIFICATION.value} or "
                           f"model.task={Task.CAUSAL_LM.value}"])
    return task


def train_bf16(cfg: TrainConfig, gpu: bool) -> bool:
    """``train.bf16`` resolved for this rank's device (``sparktune.model.hf.resolve_bf16``): ``auto``
    is on where bf16 is faster than fp32 (and off when fp16 is asked for)."""
    from sparktune.model.hf import resolve_bf16

    setting = cfg.train.bf16
    if setting == "auto" and cfg.train.fp16:
        return False
    try:
        return resolve_bf16("auto" if setting == "auto" else bool(setting), "cuda" if gpu else "cpu")
    except ValueError as exc:
        raise ConfigError([f"train.bf16: {exc}"]) from None


# Setup --------------------------------------------------------------------------------------
@dataclass
class Job:
    """Everything setup found or built, for fit and finish."""

    cfg: TrainConfig
    env: dist.DistEnv
    task: Task
    props: dict
    run_id: str
    tracker: Any
    tokenizer: Any
    model: Any
    train_rows: int
    """Training rows selected from the table (all ranks, before padding or dropping)."""
    shard: Any
    """This rank's training rows (``sparktune.train.data.FlatRows``)."""
    eval_rows: Any
    """The evaluation rows (``FlatRows``), or None without an eval split."""
    resume_from: str | None
    bf16: bool = False
    """bf16 autocast for this rank (``train_bf16``)."""
    sharded: bool = False
    """The model is FSDP2-sharded (``train.parallelism: fsdp``)."""
    extra: dict = field(default_factory=dict)

    @property
    def logs_to_mlflow(self) -> bool:
        return self.env.is_main and self.cfg.mlflow.enabled and bool(self.run_id)


def _load_data(cfg: TrainConfig, env: dist.DistEnv, task: Task):
    """This rank's shard and the eval rows; a data file that vanished (VACUUM) is a user error."""
    from sparktune.staging import default_staging_dir
    from sparktune.train import data as tdata

    try:
        return tdata.load_rank_data(cfg, env.rank, env.world_size, task,
                                    staging_dir=cfg.data.staging_dir or default_staging_dir(cfg.output_dir))
    except SparktuneError:
        raise
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, FileNotFoundError) or "No such file or directory" in text:
            raise DataFilesGone(
                f"data.table: a data file of {cfg.data.table or cfg.data.location} v{cfg.data.version} is gone "
                f"({text.splitlines()[0][:300] if text else type(exc).__name__}); VACUUM probably removed it. Train "
                "on the table's latest version (data.version empty; a resumed job must start anew in another "
                "output_dir), or re-run `sparktune tokenize`"
            ) from exc
        raise


def _open_run(cfg: TrainConfig, tracker, task: Task, record: JobRecord | None) -> tuple[str, bool]:
    """The job's MLflow run: the launcher's, the one a resumed job recorded, or a new one (torchrun)."""
    from sparktune.train.tracking import log_job

    run_id = cfg.mlflow.run_id or (record.run_id if record is not None and cfg.resume else "")
    if run_id and tracker.run_exists(run_id):
        return run_id, False
    run_id = tracker.start_run(cfg.mlflow.run_name)
    cfg.mlflow.run_id = run_id
    log_job(tracker, run_id, cfg, task)
    return run_id, True


def _plan_memory(cfg: TrainConfig, env: dist.DistEnv, task: Task, props: dict):
    """Rank 0's memory plan when the driver did not make one (plain torchrun, or executor GPUs
    the driver cannot see): against this machine's GPU or its share of host memory."""
    from sparktune.env import env_flag
    from sparktune.train import memory
    from sparktune.train.config import MemoryCheck

    if cfg.train.memory_check is MemoryCheck.OFF or env_flag(memory.PLANNED_ENV):
        return None
    gpu = dist.use_gpu()
    gpu_total = None
    if gpu:
        import torch

        gpu_total = int(torch.cuda.get_device_properties(env.local_rank).total_memory)
    shape = memory.model_shape(cfg, task)
    seq_len = cfg.data.max_length or _int(props.get(TOKENIZED.prop_max_length)) or 512
    plan = memory.plan_for_job(cfg, task, seq_len=seq_len, world_size=env.world_size, gpu=gpu,
                               bf16=train_bf16(cfg, gpu), ranks_per_host=env.local_world_size,
                               gpu_total=gpu_total, shape=shape)
    log.warning("sparktune train: memory plan: %s", plan.figures())
    memory.check_memory(plan, shape, cfg.train.memory_check)
    return plan


def setup(cfg: TrainConfig, env: dist.DistEnv, tracker=None) -> Job:
    from transformers import set_seed

    from sparktune.train.model import build_model, load_tokenizer, model_max_positions

    resolve_data(cfg)
    store = CheckpointStore(cfg.checkpoint_dir)
    decided: dict | None = None
    if env.is_main:
        # Rank 0 decides (version, task, run) so every rank reads the same snapshot even if the
        # table gets a new commit meanwhile; the others receive its decisions.
        from sparktune.train.data import table_info

        table_id = table_identity(cfg.data.location)
        record = prepare_resume(cfg, env.world_size, table_id)
        info = table_info(cfg.data.location, cfg.data.version)
        cfg.data.version = info["version"]
        task = resolve_task(cfg, info["properties"])
        memory_plan = _plan_memory(cfg, env, task, info["properties"])  # before any weights or rows load
        run_id = ""
        if cfg.mlflow.enabled:
            from sparktune.tracking import Tracker

            tracker = tracker or Tracker(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
            run_id, opened = _open_run(cfg, tracker, task, record)
            if opened and memory_plan is not None:
                from sparktune.train.memory import log_plan

                log_plan(tracker, run_id, memory_plan)
        os.makedirs(cfg.checkpoint_dir, exist_ok=True)
        store.write_job(JobRecord(location=cfg.data.location, table=cfg.data.table, table_id=table_id,
                                  version=cfg.data.version, world_size=env.world_size, task=task.value,
                                  run_id=run_id, tracking_uri=str(tracker.tracking_uri) if tracker else ""))
        resume_from = store.latest_complete(env.world_size, set_aside=True) if cfg.resume else None
        decided = {"version": cfg.data.version, "props": info["properties"], "task": task, "run_id": run_id,
                   "resume_from": resume_from}
    decided = dist.broadcast(decided, env)
    assert decided is not None
    cfg.data.version = decided["version"]
    cfg.mlflow.run_id = decided["run_id"]
    task, props = decided["task"], decided["props"]
    problems = check_table_matches_model(props, cfg)
    tokenized_length = _int(props.get(TOKENIZED.prop_max_length))
    if task is Task.INSTRUCTION and cfg.data.max_length and cfg.data.max_length < (tokenized_length or 0):
        problems.append(f"data.max_length: {cfg.data.max_length} would cut instruction rows, which end with their "
                        f"answer (tokenized at {tokenized_length}); leave it empty and set tokenize.max_length")
    if problems:
        raise ConfigError(problems)

    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg, props)
    data = _load_data(cfg, env, task)
    shard = data.train.rows
    eval_rows = data.eval.rows if data.eval is not None else None
    model = build_model(cfg, task, tokenizer)

    # What only the rows and the built model can tell: checked on every rank, so each one
    # reports the same problems and none is left waiting for the others.
    problems = check_table_matches_model(props, cfg, model_max_positions=model_max_positions(model.config))
    table = cfg.data.table or cfg.data.location
    import numpy as np

    for split, rows in ((cfg.data.train_split, shard), (cfg.data.eval_split, eval_rows)):
        if rows is None:
            continue
        # Each rank holds other rows: agree on their extremes so every rank raises the same problems.
        local = (int(rows.ids.max()) if len(rows.ids) else 0,
                 [int(x) for x in np.unique(rows.labels)] if task.has_labels and rows.labels is not None else [])
        gathered = dist.gather(local, env)
        problems += check_rows_fit_model(
            labels=sorted({x for _, labels in gathered for x in labels}) if task.has_labels else None,
            max_token_id=max(m for m, _ in gathered),
            vocab_size=model.get_input_embeddings().num_embeddings, num_labels=cfg.model.num_labels,
            table=f"{table} v{cfg.data.version}", split=split)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    bf16 = train_bf16(cfg, dist.use_gpu())
    sharding = _shard(cfg, env, model, bf16) if cfg.train.parallelism is Parallelism.FSDP else None
    if env.is_main and cfg.mlflow.enabled and decided["run_id"] and tracker is not None:
        from mlflow.exceptions import MlflowException

        try:  # what train.bf16 (often auto) came to on this machine
            params = {"train.precision": "bf16" if bf16 else "fp32"}
            if sharding is not None:
                params["train.fsdp_units"] = sharding.describe()
            tracker.log_params(decided["run_id"], params)
        except MlflowException as exc:  # a resumed job on another machine: keep the first value
            log.warning("sparktune train: train.precision not logged (%s)", str(exc).splitlines()[0])
    return Job(cfg=cfg, env=env, task=task, props=props, run_id=decided["run_id"], tracker=tracker,
               tokenizer=tokenizer, model=model, train_rows=data.train_rows, shard=shard, eval_rows=eval_rows,
               resume_from=decided["resume_from"], bf16=bf16, sharded=sharding is not None)


def _shard(cfg: TrainConfig, env: dist.DistEnv, model, bf16: bool):
    """FSDP2: activation checkpointing first (non-reentrant, as FSDP2 needs), then ``fully_shard``."""
    from sparktune.train.fsdp import shard_model

    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = shard_model(model, units=cfg.fsdp.units, reshard_after_forward=cfg.fsdp.reshard_after_forward,
                         cpu_offload=cfg.fsdp.cpu_offload, gpu=dist.use_gpu(), bf16=bf16,
                         world_size=env.world_size)
    if env.is_main:
        log.warning("sparktune train: %s", report.describe())
    return report


# Fit ----------------------------------------------------------------------------------------
def _checkpointing_arg(enabled: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled}


def training_arguments(job: Job):
    from transformers import TrainingArguments

    cfg, t = job.cfg, job.cfg.train
    gpu = dist.use_gpu()
    return TrainingArguments(
        output_dir=cfg.checkpoint_dir,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        bf16=job.bf16,
        fp16=t.fp16 and gpu and not job.bf16,
        # FSDP: enabled on the model before sharding (_shard), not by Trainer afterwards
        **_checkpointing_arg(t.gradient_checkpointing and not job.sharded),
        torch_compile=t.torch_compile,
        seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # validated strategies are "no", "steps" or "epoch" (a YAML False was read back as "no")
        eval_strategy=str(t.eval_strategy) if job.eval_rows is not None else "no",
        eval_steps=t.eval_steps,
        save_strategy=str(cfg.checkpoint.strategy),
        save_steps=cfg.checkpoint.steps,
        save_total_limit=cfg.checkpoint.keep,
        # MLflowCallback is added by hand (callbacks.py says why its place in the list matters).
        report_to="none",
        disable_tqdm=True,
        use_cpu=not gpu,
        ddp_backend=None if not job.env.distributed else ("nccl" if gpu else "gloo"),
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        prediction_loss_only=job.task is not Task.CLASSIFICATION,
        dataloader_num_workers=0,
        log_level="warning",
        # Trainer multiplies the loss by the world size when a model accepts loss kwargs, which
        # is right for token-averaged causal-LM losses but doubles a classifier's batch-mean
        # loss (and its gradients) on 2 ranks.
        average_tokens_across_devices=job.task.is_causal,
    )


def _classification_metrics(eval_pred) -> dict:
    """End-of-training evaluation with the same scikit-learn code as `sparktune evaluate`."""
    import numpy as np

    from sparktune.evaluate import compute_metrics

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    metrics = compute_metrics(labels, np.argmax(logits, axis=-1), shifted / shifted.sum(axis=-1, keepdims=True))
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


@contextlib.contextmanager
def _environ(changes: dict[str, str | None]):
    """Set (or, with None, unset) environment variables for a block, then restore them."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def mlflow_run(job: Job):
    """Rank 0: the job's run is MLflow's active run while Trainer runs, so ``MLflowCallback`` logs
    into it and, having not started it, neither restarts nor ends it."""
    if not job.logs_to_mlflow:
        yield
        return
    import importlib.util

    system = job.cfg.mlflow.system_metrics and importlib.util.find_spec("psutil") is not None
    env = {
        # With MLFLOW_RUN_ID set, MLflowCallback would start the run again (an error while it is
        # active) and end it at on_train_end, before the final evaluation and the model log.
        "MLFLOW_RUN_ID": None,
        "MLFLOW_NESTED_RUN": None,
        # The job's config is logged once as params (data.*, train.*, ...); TrainingArguments'
        # 150 keys would log the same settings a second time under other names.
        "MLFLOW_MAX_LOG_PARAMS": "0",
        "HF_MLFLOW_LOG_ARTIFACTS": None,
        "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "true" if system else None,
    }
    import mlflow

    with _environ(env), job.tracker.active(job.run_id):
        try:
            yield
        finally:
            mlflow.flush_async_logging()


def fit(job: Job):
    """Train on this rank's shard; returns (trainer, train output, eval metrics, seconds, callbacks)."""
    from torch.utils.data import DataLoader
    from transformers import Trainer

    from sparktune.instruct import answer_lengths_of
    from sparktune.train import data as tdata
    from sparktune.train.callbacks import FsyncCallback, MetricNamesCallback, ThroughputCallback, plugin_callbacks

    cfg, env = job.cfg, job.env
    pad_id = job.tokenizer.pad_token_id
    answers = answer_lengths_of(job.props)
    train_collator = tdata.DynamicPaddingCollator(pad_id, job.task, cfg.data.pad_to_multiple_of, answer_lengths=answers)
    eval_collator = tdata.DynamicPaddingCollator(pad_id, job.task, cfg.data.pad_to_multiple_of, answer_lengths=answers)
    sampler = tdata.LengthGroupedBatchSampler(
        job.shard.lengths, cfg.train.batch_size, seed=cfg.train.seed,
        group_by_length=cfg.data.group_by_length,
    )
    shard = job.shard

    class ShardTrainer(Trainer):
        """Trains on this rank's shard, batched by ``LengthGroupedBatchSampler``; the loader is not
        passed through ``accelerator.prepare``, which would shard the shard a second time."""

        def get_train_dataloader(self):
            return DataLoader(tdata.ShardDataset(shard), batch_sampler=sampler, collate_fn=train_collator)

    trainer_class = _fsdp_trainer(ShardTrainer) if job.sharded else ShardTrainer

    throughput, names = ThroughputCallback(train_collator, env), MetricNamesCallback()
    callbacks: list = [throughput, names]
    if job.logs_to_mlflow:
        from transformers.integrations import MLflowCallback

        callbacks.append(MLflowCallback())
    callbacks += [FsyncCallback(), *plugin_callbacks(cfg, env)]
    trainer = trainer_class(
        model=job.model,
        args=training_arguments(job),
        data_collator=eval_collator,
        train_dataset=tdata.ShardDataset(shard),
        eval_dataset=tdata.ShardDataset(job.eval_rows) if job.eval_rows is not None else None,
        processing_class=job.tokenizer,
        compute_metrics=_classification_metrics if job.task is Task.CLASSIFICATION else None,
        callbacks=callbacks,
    )
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=job.resume_from)
    seconds = time.perf_counter() - started
    # MetricNamesCallback renamed evaluate()'s dict in place: keys are eval/<metric>.
    eval_metrics = trainer.evaluate() if job.eval_rows is not None else {}
    return trainer, output, eval_metrics, seconds, throughput, names


def _fsdp_trainer(base):
    """``base`` taught to train an FSDP2-sharded model: no DDP around it, sharded checkpoints.

    Checkpoints keep Trainer's layout (trainer_state.json, scheduler.pt, rng_state_<rank>.pth)
    with the weights and AdamW state as ``torch.distributed.checkpoint`` folders, each rank
    writing and reading only its shard (``sparktune.train.fsdp.save_sharded``).
    """
    from sparktune.train import fsdp

    class FsdpTrainer(base):
        def _wrap_model(self, model, training=True, dataloader=None):
            # Anything but self.model: Trainer then skips accelerate's DDP wrap (see trainer_view).
            if getattr(self, "_sharded_view", None) is None:
                self._sharded_view = fsdp.trainer_view(self.model)
            return self._sharded_view

        def save_model(self, output_dir=None, _internal_call=False):
            if not _internal_call:
                raise SparktuneError("an FSDP model is saved by sparktune's finish step, not Trainer.save_model")
            # the weights go with the optimizer state in _save_optimizer_and_scheduler

        def _save_optimizer_and_scheduler(self, output_dir):
            import torch

            fsdp.save_sharded(output_dir, self.model, self.optimizer)
            if self.args.should_save:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            fsdp.load_sharded(resume_from_checkpoint, self.model)

        def _load_optimizer_and_scheduler(self, checkpoint):
            import torch

            if checkpoint is None:
                return
            fsdp.load_sharded(checkpoint, self.model, self.optimizer)
            self.lr_scheduler.load_state_dict(
                torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    return FsdpTrainer


def _consolidated(job: Job, model):
    """An FSDP model as a plain (unsharded) transformers model on rank 0, None elsewhere.

    The ranks gather the weights one tensor at a time into rank 0's CPU memory
    (``fsdp.full_state_dict``); rank 0 builds the model's skeleton on the meta device (no
    memory) and adopts those tensors (``assign=True``), so it holds one full copy, not two.
    """
    import torch

    from sparktune.train.fsdp import _base_model, full_state_dict
    from sparktune.train.model import apply_lora

    state = full_state_dict(model)
    if state is None:
        return None
    base = _base_model(model)
    with torch.device("meta"):
        skeleton = type(base)(base.config)
        if job.cfg.lora.enabled:
            skeleton = apply_lora(job.cfg, skeleton, job.task)
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    # tied weights (lm_head = embed_tokens) are one entry in the state dict: tie them again
    getattr(skeleton, "tie_weights", lambda: None)()
    left = [k for k in missing if any(p.is_meta for n, p in skeleton.named_parameters() if n == k)]
    if left or unexpected:
        raise SparktuneError(f"the FSDP model could not be consolidated: missing {left[:5]}, unexpected "
                             f"{list(unexpected)[:5]}")
    return skeleton


# Finish -------------------------------------------------------------------------------------
def _log_model(job: Job, model, model_dir: str) -> str:
    """``modelio.log_model``, passing the extra arguments only to a version that takes them."""
    from sparktune.instruct import spec_of
    from sparktune.train.modelio import log_model

    wanted = {"tracker": job.tracker, "run_id": job.run_id, "label_names": job.cfg.model.label_names or None,
              "max_length": _trained_length(job),
              "prompt": spec_of(job.props), "max_shard_size": job.cfg.model.max_shard_size}
    params = inspect.signature(log_model).parameters
    extra = {k: v for k, v in wanted.items() if k in params}
    return log_model(model, job.tokenizer, task=job.task, save_dir=model_dir, **extra)


def _trained_length(job: Job) -> int | None:
    """The longest row training saw: ``data.max_length`` cuts the table's rows, never lengthens them."""
    lengths = [n for n in (job.cfg.data.max_length, _int(job.props.get(TOKENIZED.prop_max_length))) if n]
    return min(lengths) if lengths else None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def finish(job: Job, trainer, output, eval_metrics: dict, seconds: float, throughput, names) -> TrainResult:
    cfg, env = job.cfg, job.env
    steps = dist.gather(trainer.state.global_step, env)
    result = None
    # every rank takes part in gathering a sharded model; rank 0 alone gets it
    consolidated = _consolidated(job, trainer.model) if job.sharded else None
    if env.is_main:
        final = consolidated if job.sharded else trainer.model
        assert final is not None  # rank 0 holds the consolidated model
        if cfg.lora.enabled and cfg.lora.merge_on_save:
            final = final.merge_and_unload()
        model_dir = os.path.join(cfg.output_dir, "model")
        model_uri = ""
        if job.logs_to_mlflow and cfg.mlflow.log_model:
            model_uri = _log_model(job, final, model_dir)
        else:
            from sparktune.instruct import spec_of
            from sparktune.train.modelio import save_model

            save_model(final, job.tokenizer, model_dir, prompt=spec_of(job.props), max_length=_trained_length(job),
                       max_shard_size=job.cfg.model.max_shard_size)
        if job.logs_to_mlflow:
            from mlflow.exceptions import MlflowException

            try:  # row counts are facts about the inputs: params, not metrics
                job.tracker.log_params(job.run_id, {
                    "data.train_rows": job.train_rows, "data.rows_per_rank": len(job.shard),
                    "data.eval_rows": len(job.eval_rows) if job.eval_rows is not None else 0})
            except MlflowException as exc:  # a resumed job with other limits: keep the first values
                log.warning("sparktune train: row counts not logged (%s)", str(exc).splitlines()[0])
        result = TrainResult(
            run_id=job.run_id, model_uri=model_uri, model_dir=model_dir, output_dir=cfg.output_dir,
            checkpoint_dir=cfg.checkpoint_dir, task=job.task, table=cfg.data.table, location=cfg.data.location,
            version=int(cfg.data.version or 0), world_size=env.world_size, global_step=trainer.state.global_step,
            rank_steps=[int(s) for s in steps], train_rows=job.train_rows, rows_per_rank=len(job.shard),
            eval_rows=len(job.eval_rows) if job.eval_rows is not None else 0,
            train_loss=float(output.training_loss), losses=names.series("train/loss"),
            eval_metrics={k: float(v) for k, v in eval_metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)},
            pad_share=throughput.pad_share, samples_per_second=output.metrics.get("train_samples_per_second"),
            train_seconds=seconds, resumed_from=job.resume_from,
        )
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "result.json"), "w", encoding="utf-8") as handle:
            handle.write(result.to_json())
    return dist.broadcast(result, env)


# The recipe ---------------------------------------------------------------------------------
def train(cfg, tracker=None) -> TrainResult:
    """Run this process's rank of a training job; every rank returns rank 0's ``TrainResult``.

    ``cfg``: a ``TrainConfig`` or its ``to_dict()``; ``tracker``: the job's
    ``sparktune.tracking.Tracker`` (rank 0 builds one from ``cfg.mlflow`` when not given).
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else train_config_from_dict(cfg)
    env = dist.dist_env()
    dist.set_threads(cfg.train.num_threads, env)
    try:
        dist.init_process_group(cfg.distributor.backend, env)
        job = setup(cfg, env, tracker)
        with mlflow_run(job):
            trainer, output, eval_metrics, seconds, throughput, names = fit(job)
            return finish(job, trainer, output, eval_metrics, seconds, throughput, names)
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and cfg.output_dir:
            record_failure(cfg.checkpoint_dir, env.rank, env.world_size, exc)
        raise
    finally:
        dist.destroy_process_group()
