"""``train(cfg)``: fine-tune a transformers model on a tokenized Delta table with ``Trainer``.

Knows nothing about Spark: the launcher (``sparktune.train.distribute``) runs it in each
TorchDistributor process, and it runs as well under plain torchrun::

    torchrun --nproc_per_node 2 -m sparktune.train.train --config jobs/configs/imdb_local.yaml \
        data.table=./data/imdb_tokenized output_dir=./out/imdb

Ranks find their place from torch's env (RANK, WORLD_SIZE, LOCAL_RANK). Rank 0 alone writes
to MLflow and saves the final model; every rank returns the same result dict.

Test-only knob: ``SPARKTUNE_TEST_KILL_AT_STEP=N`` makes the last rank kill itself with SIGKILL
after optimizer step N, once per checkpoint folder (a marker file there remembers), so the
fault tests can check resume-after-failure on real processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time

from sparktune.errors import SparktuneError
from sparktune.models import resolve_pretrained
from sparktune.train.config import TrainConfig, load_train_config, train_config_from_dict

__all__ = ["train", "latest_complete_checkpoint", "resolve_data", "main"]

KILL_ENV = "SPARKTUNE_TEST_KILL_AT_STEP"
KILL_MARKER = ".sparktune_test_killed"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_complete_checkpoint(checkpoint_dir: str, world_size: int | None = None) -> str | None:
    """The newest ``checkpoint-N`` folder that holds a full training state, or None.

    Trainer writes trainer_state.json last, so a folder without it (or without the optimizer,
    scheduler, weights or a rank's RNG state) was cut short by a crash and is skipped.
    """
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return None
    found = []
    for name in os.listdir(checkpoint_dir):
        match = _CHECKPOINT.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(checkpoint_dir, name)))
    for _, path in sorted(found, reverse=True):
        files = set(os.listdir(path))
        weights = any(f.endswith(".safetensors") or f.endswith(".bin") for f in files)
        state = {"trainer_state.json", "optimizer.pt", "scheduler.pt"} <= files
        if world_size and world_size > 1:
            rng = all(f"rng_state_{r}.pth" in files for r in range(world_size))
        else:
            rng = any(f.startswith("rng_state") for f in files)
        if weights and state and rng:
            return path
    return None


def resolve_data(cfg: TrainConfig) -> TrainConfig:
    """Fill ``data.location`` from a path-like ``data.table``; names need the launcher (Spark)."""
    if cfg.data.location:
        return cfg
    from sparktune.tables import parse_table_ref

    ref = parse_table_ref(cfg.data.table)
    if not ref.is_path:
        raise SparktuneError(
            f"data.table: {cfg.data.table!r} is a catalog name, which only Spark can resolve; launch with "
            "`sparktune train` (it resolves the name) or set data.location to the table's folder"
        )
    cfg.data.location = ref.path
    return cfg


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _broadcast(value, world_size: int):
    """Rank 0's ``value`` on every rank."""
    if world_size <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value, world_size: int) -> list:
    if world_size <= 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def _use_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""


def _init_distributed(cfg: TrainConfig, world_size: int, local_rank: int) -> None:
    if world_size <= 1:
        return
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = cfg.distributor.backend
    if backend == "auto":
        backend = "nccl" if _use_gpu() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def _load_error(key: str, what: str, exc: Exception) -> SparktuneError:
    return SparktuneError(
        f"{key}: could not load {what} ({exc}); give a local folder, pkg:MODULE, "
        "or a hub name on a machine that reaches the hub"
    )


def _load_tokenizer(cfg: TrainConfig, table_props: dict):
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or table_props.get("sparktune.tokenizer") or cfg.model.name
    key = "model.tokenizer" if cfg.model.tokenizer else "model.name"
    path = resolve_pretrained(source, key)
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.gguf_file and source == cfg.model.name:
        kwargs["gguf_file"] = cfg.model.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(key, f"a tokenizer from {source!r}", exc) from None
    if tokenizer.pad_token is None:
        # GPT-2 style tokenizers have no pad token; pad positions are masked, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _build_model(cfg: TrainConfig, task: str, tokenizer):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    dtype = getattr(torch, cfg.model.dtype)
    extra = {}
    if task == "classification":
        extra["num_labels"] = cfg.model.num_labels
        if cfg.model.label_names:
            extra["id2label"] = dict(enumerate(cfg.model.label_names))
            extra["label2id"] = {n: i for i, n in enumerate(cfg.model.label_names)}
    overrides = dict(cfg.model.config_overrides)
    if overrides:
        if "model_type" in overrides:
            model_type = overrides.pop("model_type")
            overrides.setdefault("vocab_size", len(tokenizer))
            config = AutoConfig.for_model(model_type, **overrides, **extra)
        else:
            config = AutoConfig.from_pretrained(resolve_pretrained(cfg.model.name),
                                                trust_remote_code=cfg.model.trust_remote_code, **overrides, **extra)
        model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    else:
        path = resolve_pretrained(cfg.model.name)
        kwargs = dict(extra, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.model.gguf_file:
            kwargs["gguf_file"] = cfg.model.gguf_file
        try:
            model = auto.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error("model.name", f"{cfg.model.name!r} as a {task} model", exc) from None
        if cfg.model.gguf_file:
            # save_pretrained refuses GGUF-loaded models: move the weights into a plain model.
            fresh = auto.from_config(model.config)
            fresh.load_state_dict(model.state_dict(), strict=False)
            model = fresh.to(dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = _apply_lora(cfg, model, task)
    return model


_LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


def _apply_lora(cfg: TrainConfig, model, task: str):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = cfg.lora.target_modules or _LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise SparktuneError(
            f"lora.target_modules: no default for model type {model.config.model_type!r}; "
            "list the module names to adapt (e.g. [q_proj, v_proj])"
        )
    peft_cfg = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(targets),
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, peft_cfg)


def _callbacks(cfg, rank, world_size, train_collator, checkpoint_dir, history):
    from transformers import TrainerCallback

    class ThroughputCallback(TrainerCallback):
        """Loss, learning rate, samples/s, tokens/s and pad share for every logging interval.

        Token counts are summed over ranks (every rank logs at the same steps, so the
        all-reduce is matched); rank 0 sends them to MLflow.
        """

        def __init__(self):
            self.t0 = time.perf_counter()
            self.samples = 0
            self.total_real = 0
            self.total_pad = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.samples += args.per_device_train_batch_size * args.gradient_accumulation_steps

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            if "loss" in logs:
                real, padded = train_collator.take_counts()
                counts = [real, padded, self.samples]
                if world_size > 1:
                    import torch
                    import torch.distributed as dist

                    tensor = torch.tensor(counts, dtype=torch.float64)
                    dist.all_reduce(tensor)
                    counts = [int(x) for x in tensor.tolist()]
                real, padded, samples = counts
                elapsed = max(time.perf_counter() - self.t0, 1e-9)
                logs["samples_per_second"] = samples / elapsed
                logs["tokens_per_second"] = real / elapsed
                logs["pad_share"] = padded / (real + padded) if real + padded else 0.0
                self.total_real += real
                self.total_pad += padded
                self.t0 = time.perf_counter()
                self.samples = 0
            if rank != 0:
                return
            metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
            history.append({"step": state.global_step, **metrics})
            if cfg.mlflow.enabled:
                import mlflow

                if mlflow.active_run() is not None:
                    renamed = {("train/" + k if not k.startswith("eval") else k.replace("eval_", "eval/")): v
                               for k, v in metrics.items()}
                    mlflow.log_metrics(renamed, step=state.global_step)

    class KillForTestCallback(TrainerCallback):
        """Test-only (SPARKTUNE_TEST_KILL_AT_STEP): the last rank dies once, mid-training."""

        def __init__(self, step: int):
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            marker = os.path.join(checkpoint_dir, KILL_MARKER)
            if state.global_step == self.step and rank == world_size - 1 and not os.path.exists(marker):
                with open(marker, "w", encoding="utf-8") as handle:
                    handle.write(f"killed rank {rank} at step {self.step}\n")
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [ThroughputCallback()]
    kill_at = os.environ.get(KILL_ENV)
    if kill_at:
        callbacks.append(KillForTestCallback(int(kill_at)))
    return callbacks


def train(cfg) -> dict:
    """Run one training job (this process's rank of it); returns rank 0's result on every rank.

    ``cfg`` is a ``TrainConfig`` or its ``to_dict()``. Result keys: run_id, model_uri,
    model_dir, global_step, rank_steps, train_loss, first_loss, last_loss, eval metrics
    (eval_loss, eval_accuracy), pad_share, samples_per_second, table, version, resumed_from.
    """
    cfg = train_config_from_dict(cfg) if not isinstance(cfg, TrainConfig) else cfg
    cfg = resolve_data(cfg)
    rank, world_size, local_rank = _dist_env()

    import torch

    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    torch.set_num_threads(threads)
    _init_distributed(cfg, world_size, local_rank)
    try:
        return _train(cfg, rank, world_size)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world_size: int) -> dict:
    from transformers import Trainer, TrainingArguments, set_seed

    from sparktune.train import data as tdata
    from sparktune.train import tracking

    # Rank 0 decides the version (when not pinned by the launcher) so that every rank reads
    # the same snapshot even if the table gets a new commit meanwhile.
    info = tdata.table_info(cfg.data.location, cfg.data.version) if rank == 0 else None
    info = _broadcast(info, world_size)
    cfg.data.version = info["version"]
    props = info["properties"]
    task = cfg.model.task if cfg.model.task != "auto" else props.get("sparktune.task", "")
    if task not in ("classification", "causal-lm"):
        raise SparktuneError(
            f"model.task: is auto and table {cfg.data.table!r} has no sparktune.task property "
            f"(found {task!r}); set model.task=classification or model.task=causal-lm"
        )
    checkpoint_dir = cfg.checkpoint_dir
    resume_from = latest_complete_checkpoint(checkpoint_dir, world_size) if cfg.resume else None
    if not cfg.resume and latest_complete_checkpoint(checkpoint_dir, world_size):
        raise SparktuneError(
            f"checkpoint.dir: {checkpoint_dir} already holds checkpoints of an earlier job; pass resume=true "
            "to continue it, or choose another output_dir / checkpoint.dir"
        )
    os.makedirs(checkpoint_dir, exist_ok=True)

    # MLflow: continue the launcher's run, or (plain torchrun) open one here on rank 0.
    run_id = cfg.mlflow.run_id
    if cfg.mlflow.enabled and rank == 0:
        uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
        opened_here = not run_id
        run_id = tracking.open_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name, run_id=run_id,
                                   system_metrics=cfg.mlflow.system_metrics)
        if opened_here:
            cfg.mlflow.run_id = run_id
            tracking.log_job(cfg, task)
    run_id = _broadcast(run_id, world_size)

    set_seed(cfg.train.seed)
    tokenizer = _load_tokenizer(cfg, props)
    train_rows = tdata.read_split(cfg.data.location, cfg.data.version, cfg.data.train_split, task=task,
                                  limit=cfg.data.train_limit, max_length=cfg.data.max_length)
    if len(train_rows) == 0:
        raise SparktuneError(
            f"data.train_split: table {cfg.data.table!r} v{cfg.data.version} has no "
            f"{'labelled ' if task == 'classification' else ''}rows with split={cfg.data.train_split!r}; "
            "check data.train_split or re-run `sparktune tokenize`"
        )
    shard = train_rows.select(tdata.shard_indices(len(train_rows), rank, world_size, cfg.data.uneven))
    eval_rows = None
    if cfg.data.eval_split:
        eval_rows = tdata.read_split(cfg.data.location, cfg.data.version, cfg.data.eval_split, task=task,
                                     limit=cfg.data.eval_limit, max_length=cfg.data.max_length)
        if len(eval_rows) == 0:
            eval_rows = None
    model = _build_model(cfg, task, tokenizer)
    if cfg.train.gradient_checkpointing:
        model.config.use_cache = False

    pad_id = tokenizer.pad_token_id
    train_collator = tdata.DynamicPaddingCollator(pad_id, task, cfg.data.pad_to_multiple_of)
    eval_collator = tdata.DynamicPaddingCollator(pad_id, task, cfg.data.pad_to_multiple_of)
    sampler = tdata.LengthGroupedBatchSampler(
        [len(ids) for ids in shard.input_ids], cfg.train.batch_size, seed=cfg.train.seed,
        group_by_length=cfg.data.group_by_length,
    )
    gpu = _use_gpu()
    t = cfg.train
    args = TrainingArguments(
        output_dir=checkpoint_dir,
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
        bf16=t.bf16 and gpu,
        fp16=t.fp16 and gpu,
        **_checkpointing_arg(t.gradient_checkpointing),
        torch_compile=t.torch_compile,
        seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy if eval_rows is not None else "no",
        eval_steps=t.eval_steps,
        save_strategy=cfg.checkpoint.strategy,
        save_steps=cfg.checkpoint.steps,
        save_total_limit=cfg.checkpoint.keep,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not gpu,
        ddp_backend=None if world_size <= 1 else ("nccl" if gpu else "gloo"),
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        prediction_loss_only=task != "classification",
        dataloader_num_workers=0,
        log_level="warning",
        # Trainer multiplies the loss by the world size when a model accepts loss kwargs, which
        # is right for token-averaged causal-LM losses but doubles a classifier's batch-mean
        # loss (and its gradients) on 2 ranks.
        average_tokens_across_devices=task == "causal-lm",
    )

    class ShardTrainer(Trainer):
        """Trains on this rank's shard, batched by ``LengthGroupedBatchSampler``.

        The loader is not passed through ``accelerator.prepare``: that would shard the
        already-sharded rows a second time.
        """

        def get_train_dataloader(self):
            from torch.utils.data import DataLoader

            return DataLoader(tdata.RowsDataset(shard), batch_sampler=sampler, collate_fn=train_collator)

    history: list = []
    compute_metrics = _classification_metrics if task == "classification" else None
    trainer = ShardTrainer(
        model=model,
        args=args,
        data_collator=eval_collator,
        train_dataset=tdata.RowsDataset(shard),
        eval_dataset=tdata.RowsDataset(eval_rows) if eval_rows is not None else None,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        callbacks=_callbacks(cfg, rank, world_size, train_collator, checkpoint_dir, history),
    )
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.perf_counter() - started
    eval_metrics = trainer.evaluate() if eval_rows is not None else {}

    steps = _gather(trainer.state.global_step, world_size)
    result = None
    if rank == 0:
        final = trainer.model
        if cfg.lora.enabled and cfg.lora.merge_on_save:
            final = final.merge_and_unload()
        model_dir = os.path.join(cfg.output_dir, "model")
        model_uri = ""
        if cfg.mlflow.enabled and cfg.mlflow.log_model:
            from sparktune.train.modelio import log_model

            model_uri = log_model(final, tokenizer, task=task, save_dir=model_dir)
        else:
            from sparktune.train.modelio import save_model

            save_model(final, tokenizer, model_dir)
        losses = [h["loss"] for h in history if "loss" in h]
        share = _overall_pad_share(trainer)
        result = {
            "run_id": run_id or "",
            "model_uri": model_uri,
            "model_dir": model_dir,
            "output_dir": cfg.output_dir,
            "checkpoint_dir": checkpoint_dir,
            "task": task,
            "table": cfg.data.table,
            "location": cfg.data.location,
            "version": cfg.data.version,
            "world_size": world_size,
            "global_step": trainer.state.global_step,
            "rank_steps": steps,
            "train_rows": len(train_rows),
            "rows_per_rank": len(shard),
            "train_loss": float(output.training_loss),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "losses": losses,
            "pad_share": share,
            "train_seconds": train_seconds,
            "samples_per_second": output.metrics.get("train_samples_per_second"),
            "resumed_from": resume_from,
            **{k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        }
        with open(os.path.join(cfg.output_dir, "result.json"), "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=str)
        if cfg.mlflow.enabled:
            import mlflow

            final_metrics = {"final/train_loss": result["train_loss"], "final/pad_share": share,
                             "final/global_step": float(result["global_step"])}
            final_metrics.update({f"final/{k}": v for k, v in result.items()
                                  if k.startswith("eval_") and isinstance(v, float)})
            mlflow.log_metrics(final_metrics, step=trainer.state.global_step)
            tracking.finish_run(True)
    return _broadcast(result, world_size)


def _checkpointing_arg(enabled: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing (old name warns)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: enabled}


def _overall_pad_share(trainer) -> float:
    for cb in trainer.callback_handler.callbacks:
        if hasattr(cb, "total_real"):
            total = cb.total_real + cb.total_pad
            return cb.total_pad / total if total else 0.0
    return 0.0


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparktune.train.train",
                                     description="One rank of a sparktune training job (run under torchrun).")
    parser.add_argument("--config", required=True, help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        result = train(cfg)
    except SparktuneError as exc:
        print(f"sparktune train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2, default=str))
        print(f"run_id: {result['run_id']}")
        print(f"model_uri: {result['model_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
