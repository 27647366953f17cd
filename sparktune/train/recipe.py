"""``train(cfg)``: one rank of a fine-tuning job, read top to bottom: setup -> fit -> finish.

Knows nothing about Spark: the launcher (``sparktune.train.distribute``) runs it in each
TorchDistributor process, and it runs as well under plain torchrun
(``python -m sparktune.train.train``) or as a function call in one process.

The job arrives pinned (``sparktune.train.pinned.PinnedJob``: table snapshot, task, folders,
MLflow run, where training starts, memory plan), made once by the launcher; without a launcher
rank 0 pins it and broadcasts it. Ranks never re-decide it, and nothing changes ``cfg``.

- setup: join the process group; every rank checks the table against the model and loads the
  tokenizer, its rows and the model (``Job``).
- fit: Hugging Face ``Trainer`` over this rank's shard, from the pinned start (step 0 or a
  verified checkpoint), then the evaluation (``FitOutput``); rank 0's MLflow logging is
  transformers' own ``MLflowCallback``.
- finish: rank 0 saves/logs the model, every rank returns rank 0's ``TrainResult``.

A rank that fails writes a failure record (``sparktune.train.failures``) before it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from sparktune.errors import ConfigError, SparktuneError
from sparktune.redact import install_log_redaction
from sparktune.tasks import TOKENIZED, Task
from sparktune.train import dist
from sparktune.train.checks import check_rows_fit_model, check_table_matches_model
from sparktune.train.config import Parallelism, TrainConfig, train_config_from_dict
from sparktune.train.failures import DataFilesGone, record_failure
from sparktune.train.pinned import PinnedJob, open_job_run, pin_job
from sparktune.train.result import TrainResult

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from sparktune.tracking import Tracker
    from sparktune.train.data import FlatRows, RankData
    from sparktune.train.memory import MemoryPlan

__all__ = ["train", "setup", "fit", "finish", "Job", "FitOutput", "pin_here", "train_bf16"]

log = logging.getLogger("sparktune.train")


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
    """Everything setup built on this rank, for fit and finish; what was decided is in ``pinned``."""

    cfg: TrainConfig
    """The config as the user gave it (``model.task`` may still be auto: the task is ``pinned.task``)."""
    pinned: PinnedJob
    env: dist.DistEnv
    tracker: Tracker | None
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    data: RankData
    """This rank's training shard and the evaluation rows."""
    bf16: bool = False
    """bf16 autocast for this rank (``train_bf16``)."""
    sharded: bool = False
    """The model is FSDP2-sharded (``train.parallelism: fsdp``)."""

    @property
    def task(self) -> Task:
        return self.pinned.task

    @property
    def props(self) -> Mapping[str, str]:
        return self.pinned.table.properties

    @property
    def run_id(self) -> str:
        return self.pinned.run_id

    @property
    def shard(self) -> FlatRows:
        return self.data.train.rows

    @property
    def eval_rows(self) -> FlatRows | None:
        return self.data.eval.rows if self.data.eval is not None else None

    @property
    def logs_to_mlflow(self) -> bool:
        return self.env.is_main and self.cfg.mlflow.enabled and bool(self.run_id) and self.tracker is not None


def _load_data(cfg: TrainConfig, pinned: PinnedJob, env: dist.DistEnv) -> RankData:
    """This rank's shard and the eval rows; a data file that vanished (VACUUM) is a user error."""
    from sparktune.staging import default_staging_dir
    from sparktune.train import data as tdata

    try:
        return tdata.load_rank_data(pinned.bind(cfg), env.rank, env.world_size, pinned.task,
                                    staging_dir=cfg.data.staging_dir or default_staging_dir(pinned.output_dir),
                                    table_id=pinned.table.table_id)
    except SparktuneError:
        raise
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, FileNotFoundError) or "No such file or directory" in text:
            raise DataFilesGone(
                f"data.table: a data file of {pinned.table.table or pinned.table.location} "
                f"v{pinned.table.version} is gone "
                f"({text.splitlines()[0][:300] if text else type(exc).__name__}); VACUUM probably removed it. Train "
                "on the table's latest version (data.version empty; a resumed job must start anew in another "
                "output_dir), or re-run `sparktune tokenize`"
            ) from exc
        raise


def _plan_memory(cfg: TrainConfig, env: dist.DistEnv, pinned: PinnedJob) -> MemoryPlan | None:
    """Rank 0's memory plan when the driver did not make one (plain torchrun, or executor GPUs
    the driver cannot see): against this machine's GPU or its share of host memory."""
    from sparktune.train import memory
    from sparktune.train.config import MemoryCheck

    if cfg.train.memory_check is MemoryCheck.OFF:
        return None
    gpu = dist.use_gpu()
    gpu_total = None
    if gpu:
        import torch

        gpu_total = int(torch.cuda.get_device_properties(env.local_rank).total_memory)
    shape = memory.model_shape(cfg, pinned.task)
    seq_len = cfg.data.max_length or _int(pinned.table.properties.get(TOKENIZED.prop_max_length)) or 512
    plan = memory.plan_for_job(cfg, pinned.task, seq_len=seq_len, world_size=env.world_size, gpu=gpu,
                               bf16=train_bf16(cfg, gpu), ranks_per_host=env.local_world_size,
                               gpu_total=gpu_total, shape=shape)
    log.warning("sparktune train: memory plan: %s", plan.figures())
    memory.check_memory(plan, shape, cfg.train.memory_check)
    return plan


def pin_here(cfg: TrainConfig, env: dist.DistEnv, tracker: Tracker | None) -> PinnedJob:
    """Pin the job in this process (plain torchrun or a function call: no launcher pinned it);
    rank 0 alone calls it, before any weights or rows load."""
    pinned = pin_job(cfg, env.world_size)
    pinned = dataclasses.replace(pinned, memory_plan=_plan_memory(cfg, env, pinned))
    return open_job_run(pinned, cfg, tracker)


def _check_rows(cfg: TrainConfig, pinned: PinnedJob, env: dist.DistEnv, data: RankData, model) -> None:
    """What only the rows and the built model can tell: checked on every rank, so each one
    reports the same problems and none is left waiting for the others."""
    import numpy as np

    from sparktune.train.model import model_max_positions

    task = pinned.task
    problems = check_table_matches_model(pinned.table.properties, cfg,
                                         model_max_positions=model_max_positions(model.config))
    eval_rows = data.eval.rows if data.eval is not None else None
    for split, rows in ((cfg.data.train_split, data.train.rows), (cfg.data.eval_split, eval_rows)):
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
            table=f"{pinned.table.table or pinned.table.location} v{pinned.table.version}", split=split)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))


def _log_precision(job: Job, sharding) -> None:
    """Rank 0: what ``train.bf16`` (often auto) and the FSDP units came to on this machine."""
    if not job.logs_to_mlflow:
        return
    assert job.tracker is not None
    from mlflow.exceptions import MlflowException

    params = {"train.precision": "bf16" if job.bf16 else "fp32"}
    if sharding is not None:
        params["train.fsdp_units"] = sharding.describe()
    try:
        job.tracker.log_params(job.run_id, params)
    except MlflowException as exc:  # a resumed job on another machine: keep the first value
        log.warning("sparktune train: train.precision not logged (%s)", str(exc).splitlines()[0])


def setup(cfg: TrainConfig, pinned: PinnedJob, env: dist.DistEnv, tracker: Tracker | None = None) -> Job:
    """This rank's part of the pinned job: checks, tokenizer, rows, model (sharded under FSDP)."""
    from transformers import set_seed

    from sparktune.train.model import build_model, load_tokenizer, return_freed_memory

    return_freed_memory(dist.use_gpu())  # CPU ranks: freed big blocks go back to the OS (lower peaks)
    if env.is_main and pinned.memory_plan is None:
        _plan_memory(cfg, env, pinned)  # the driver could not plan: before any weights or rows load
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg, pinned.table.properties)
    data = _load_data(cfg, pinned, env)
    model = build_model(cfg, pinned.task, tokenizer)
    _check_rows(cfg, pinned, env, data, model)
    bf16 = train_bf16(cfg, dist.use_gpu())
    sharding = _shard(cfg, env, model, bf16) if cfg.train.parallelism is Parallelism.FSDP else None
    job = Job(cfg=cfg, pinned=pinned, env=env, tracker=tracker if env.is_main else None, tokenizer=tokenizer,
              model=model, data=data, bf16=bf16, sharded=sharding is not None)
    _log_precision(job, sharding)
    return job


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
        output_dir=job.pinned.checkpoint_dir,
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

    assert job.tracker is not None  # logs_to_mlflow
    with _environ(env), job.tracker.active(job.run_id):
        try:
            yield
        finally:
            mlflow.flush_async_logging()


@dataclass
class FitOutput:
    """What ``fit`` hands to ``finish``."""

    trainer: Trainer
    """The Trainer, holding the trained (possibly sharded) model."""
    global_step: int
    train_loss: float
    """Mean training loss over the run (Trainer's ``training_loss``)."""
    losses: list[float]
    """``train/loss`` at each logging step."""
    eval_metrics: dict[str, float]
    """The end-of-training evaluation, named ``eval/<metric>``."""
    seconds: float
    samples_per_second: float | None
    pad_share: float
    eval_seconds: float = 0.0
    """The end-of-training evaluation's wall time."""


def fit(job: Job) -> FitOutput:
    """Train on this rank's shard (from ``pinned.resume``), then evaluate."""
    from torch.utils.data import DataLoader, Dataset
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
            rows = cast("Dataset", tdata.ShardDataset(shard))  # a map-style dataset (len, getitem)
            return DataLoader(rows, batch_sampler=sampler, collate_fn=train_collator)

    trainer_class = _fsdp_trainer(ShardTrainer) if job.sharded else ShardTrainer

    throughput, names = ThroughputCallback(train_collator, env), MetricNamesCallback()
    callbacks: list = [throughput, names]
    if job.logs_to_mlflow:
        from transformers.integrations import MLflowCallback

        callbacks.append(MLflowCallback())
    callbacks += [FsyncCallback(), *plugin_callbacks(job.pinned.bind(cfg), env)]
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
    output = trainer.train(resume_from_checkpoint=job.pinned.resume.checkpoint)
    seconds = time.perf_counter() - started
    # MetricNamesCallback renamed evaluate()'s dict in place: keys are eval/<metric>.
    eval_metrics = trainer.evaluate() if job.eval_rows is not None else {}
    eval_seconds = time.perf_counter() - started - seconds
    return FitOutput(trainer=trainer, global_step=int(trainer.state.global_step),
                     train_loss=float(output.training_loss), losses=names.series("train/loss"),
                     eval_metrics={k: float(v) for k, v in eval_metrics.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)},
                     seconds=seconds, samples_per_second=output.metrics.get("train_samples_per_second"),
                     pad_share=throughput.pad_share, eval_seconds=eval_seconds)


def _fsdp_trainer(base: type) -> type:
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
    """Rank 0: the model logged to the job's run (``modelio.log_model``); its URI."""
    from sparktune.instruct import spec_of
    from sparktune.train.modelio import log_model

    return log_model(model, job.tokenizer, task=job.task, save_dir=model_dir, tracker=job.tracker, run_id=job.run_id,
                     label_names=job.cfg.model.label_names or None, max_length=_trained_length(job),
                     prompt=spec_of(job.props), max_shard_size=job.cfg.model.max_shard_size)


def _trained_length(job: Job) -> int | None:
    """The longest row training saw: ``data.max_length`` cuts the table's rows, never lengthens them."""
    lengths = [n for n in (job.cfg.data.max_length, _int(job.props.get(TOKENIZED.prop_max_length))) if n]
    return min(lengths) if lengths else None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _final_model(job: Job, trainer: Trainer) -> Any:
    """The trained model as one plain transformers model on rank 0 (LoRA merged if asked); None
    elsewhere. Every rank takes part in gathering a sharded model."""
    consolidated = _consolidated(job, trainer.model) if job.sharded else None
    if not job.env.is_main:
        return None
    final: Any = consolidated if job.sharded else trainer.model
    assert final is not None  # rank 0 holds the consolidated model
    if job.cfg.lora.enabled and job.cfg.lora.merge_on_save:
        final = final.merge_and_unload()
    return final


def _save(job: Job, final: PreTrainedModel) -> tuple[str, str]:
    """Rank 0: log the model to the job's run (or save it); ``(model_dir, model_uri)``."""
    model_dir = os.path.join(job.pinned.output_dir, "model")
    if job.logs_to_mlflow and job.cfg.mlflow.log_model:
        return model_dir, _log_model(job, final, model_dir)
    from sparktune.instruct import spec_of
    from sparktune.train.modelio import save_model

    save_model(final, job.tokenizer, model_dir, prompt=spec_of(job.props), max_length=_trained_length(job),
               max_shard_size=job.cfg.model.max_shard_size)
    return model_dir, ""


def _log_row_counts(job: Job) -> None:
    if not job.logs_to_mlflow:
        return
    assert job.tracker is not None
    from mlflow.exceptions import MlflowException

    try:  # row counts are facts about the inputs: params, not metrics
        job.tracker.log_params(job.run_id, {
            "data.train_rows": job.data.train_rows, "data.rows_per_rank": len(job.shard),
            "data.eval_rows": len(job.eval_rows) if job.eval_rows is not None else 0})
    except MlflowException as exc:  # a resumed job with other limits: keep the first values
        log.warning("sparktune train: row counts not logged (%s)", str(exc).splitlines()[0])


def finish(job: Job, fitted: FitOutput) -> TrainResult:
    """Save/log the model (rank 0), write result.json; every rank returns rank 0's ``TrainResult``."""
    pinned, env = job.pinned, job.env
    started = time.perf_counter()
    steps = dist.gather(fitted.global_step, env)
    final = _final_model(job, fitted.trainer)
    result = None
    if env.is_main:
        assert final is not None
        model_dir, model_uri = _save(job, final)
        saved = time.perf_counter() - started
        _log_row_counts(job)
        result = TrainResult(
            run_id=pinned.run_id, model_uri=model_uri, model_dir=model_dir, output_dir=pinned.output_dir,
            checkpoint_dir=pinned.checkpoint_dir, task=pinned.task, table=pinned.table.table,
            location=pinned.table.location, version=pinned.table.version, world_size=env.world_size,
            global_step=fitted.global_step, rank_steps=[int(s) for s in steps], train_rows=job.data.train_rows,
            rows_per_rank=len(job.shard), eval_rows=len(job.eval_rows) if job.eval_rows is not None else 0,
            train_loss=fitted.train_loss, losses=fitted.losses, eval_metrics=fitted.eval_metrics,
            pad_share=fitted.pad_share, samples_per_second=fitted.samples_per_second,
            train_seconds=fitted.seconds, resumed_from=pinned.resume.checkpoint,
            phases={"training_loop_s": fitted.seconds, "final_eval_s": fitted.eval_seconds, "model_logging_s": saved},
        )
        os.makedirs(pinned.output_dir, exist_ok=True)
        with open(os.path.join(pinned.output_dir, "result.json"), "w", encoding="utf-8") as handle:
            handle.write(result.to_json())
    return dist.broadcast(result, env)


# The recipe ---------------------------------------------------------------------------------
def train(cfg, tracker: Tracker | None = None, pinned: PinnedJob | None = None) -> TrainResult:
    """Run this process's rank of a training job; every rank returns rank 0's ``TrainResult``.

    ``cfg``: a ``TrainConfig`` or its ``to_dict()`` (never changed); ``tracker``: the job's
    ``sparktune.tracking.Tracker`` (rank 0 builds one from ``cfg.mlflow`` when it pins the job);
    ``pinned``: the job the launcher pinned. Without one (plain torchrun, a function call) rank 0
    pins it (``pin_here``) and broadcasts it: the other ranks never decide.
    """
    entered = time.time()  # wall clock: the launcher compares it with its own (TrainResult.phases)
    install_log_redaction()  # this rank's log records are redacted as the driver's are (sparktune.redact)
    cfg = cfg if isinstance(cfg, TrainConfig) else train_config_from_dict(cfg)
    env = dist.dist_env()
    dist.set_threads(cfg.train.num_threads, env)
    failures_dir = pinned.checkpoint_dir if pinned is not None else cfg.checkpoint_dir
    try:
        dist.init_process_group(cfg.distributor.backend, env)
        if pinned is None:
            if env.is_main and cfg.mlflow.enabled and tracker is None:
                from sparktune.tracking import Tracker

                tracker = Tracker(cfg.mlflow.tracking_uri or None, cfg.mlflow.experiment)
            pinned = dist.broadcast(pin_here(cfg, env, tracker) if env.is_main else None, env)
            assert pinned is not None
            failures_dir = pinned.checkpoint_dir
        job = setup(cfg, pinned, env, tracker)
        set_up = time.time()
        with mlflow_run(job):
            result = finish(job, fit(job))
        if env.is_main:  # the launcher's share: from its launch to `entered`, from `left` to its return
            result.phases.update(rank_setup_s=set_up - entered, entered_at=entered, left_at=time.time())
        return result
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt) and failures_dir:
            record_failure(failures_dir, env.rank, env.world_size, exc)
        raise
    finally:
        dist.destroy_process_group()
