"""The memory plan: each rank's peak memory, predicted before anything starts.

``model_shape`` reads the model's config and builds the model on the meta device (no weights,
no memory) to count its parameters, the trainable ones under LoRA, the sharding units FSDP
would use (``sparktune.train.fsdp.sharding_units``) and what 4-bit quantization would cover.
``plan_memory`` is pure arithmetic over that shape and the job's settings: per-rank bytes for
weights, gradients, AdamW state, activations, communication buffers and the runtime itself, and
the peak they make together (``MemoryPlan.total``): not their sum, since the gradients and the
activations never coexist in full (below).
``check_memory`` refuses a job that cannot fit, with the figures and the settings that would
make it fit (each one re-planned), before any rank starts or any data is staged.

The coefficients (bytes per parameter, tensors saved per token and layer) are the standard
accounting (weights 4 B/param in fp32, gradients as the weights, AdamW 8 B/param, DDP's
gradient buckets another copy of the gradients); bench/bench_fsdp_memory.py measures the
prediction against the real per-rank peak.

When each part is held (how PyTorch and the Trainer hold them, checked per phase on CPU):
weights, AdamW state (from the first optimizer step on) and DDP's buckets live the whole job.
The Trainer frees the gradients after each optimizer step (``zero_grad(set_to_none=True)``), so
the forward pass starts without them; it saves the activations, and backward frees each layer's
saved tensors as it makes that layer's gradients. The activations (with FSDP's gathered layers
and root) peak at the start of backward, the gradients at its end and through the optimizer
step: the peak is ``runtime + weights + optimizer + buckets + max(gradients, activations +
gathered)``.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace

from sparktune.errors import SparktuneError
from sparktune.tasks import Task
from sparktune.train.config import MemoryCheck, Parallelism, Quantization, TrainConfig

__all__ = ["ModelShape", "MemoryPlan", "model_shape", "prefetch_model_shape", "plan_memory", "plan_for_job",
           "check_memory", "rank_memory", "ranks_per_host", "log_plan", "GIB"]

log = logging.getLogger("sparktune.train")

GIB = 1024 ** 3
CPU_RUNTIME = int(1.05 * GIB)
"""A CPU rank's own footprint: the interpreter with torch, transformers' Trainer (which imports
peft, accelerate, datasets, pandas, pyarrow, torch._dynamo, sympy and triton itself: 0.87 GiB
resident), the process group and the pages of torch's libraries the first step touches; a
4M-parameter model's rank holds 0.96 GiB before training and peaks at 1.12-1.20 GiB, ~0.1 of
it that model's own terms (bench/bench_fsdp_memory.py --model tiny)."""
GPU_RUNTIME = int(1.0 * GIB)
"""A GPU rank's CUDA context and kernels, which torch's allocator does not count but the GPU holds."""
NF4_BYTES = 0.5 + 4 / 64 / 8 * 1.1
"""nf4 with double quantization: 4 bits a weight plus ~0.13 bits of block scales."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model, read without its weights."""

    model_type: str
    params: int
    trainable: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    unit_params: int
    """Parameters of the largest sharding unit (one decoder/encoder layer)."""
    root_params: int
    """Parameters outside the units (embeddings, head, final norm)."""
    linear_params: int
    """Parameters of the Linear layers inside the units (what nf4 quantizes)."""
    gated_mlp: bool
    causal: bool
    adapters: int = 0
    """LoRA-adapted Linear layers in one unit (0 without LoRA)."""


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one training job, and the memory a rank has."""

    parallelism: Parallelism
    world_size: int
    device: str
    precision: str
    lora: bool
    quantize: Quantization
    batch_size: int
    seq_len: int
    activation_checkpointing: bool
    cpu_offload: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int
    """DDP's gradient buckets: a copy of the gradients held the whole job."""
    runtime: int
    available: int | None = None
    available_from: str = ""
    gathered: int = 0
    """FSDP: the root (embeddings, head, final norm) gathered for the whole forward and backward
    and two units (the one computing, the next one prefetched); they coexist with the activations."""

    @property
    def total(self) -> int:
        """The peak: the gradients (end of backward, optimizer step) and the activations (start of
        backward) do not coexist in full; see the module's docstring."""
        return (self.runtime + self.weights + self.optimizer + self.buffers
                + max(self.gradients, self.activations + self.gathered))

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def settings(self) -> str:
        parts = [f"{self.parallelism.value} x{self.world_size}", self.device, self.precision]
        if self.lora:
            parts.append("qlora nf4" if self.quantize is Quantization.NF4 else "lora")
        if self.activation_checkpointing:
            parts.append("activation checkpointing")
        if self.cpu_offload:
            parts.append("cpu offload")
        parts.append(f"batch {self.batch_size} x {self.seq_len} tokens")
        return ", ".join(parts)

    def figures(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:.2f}"

        text = (f"{gib(self.total)} GiB per rank = weights {gib(self.weights)} + optimizer {gib(self.optimizer)} "
                f"+ buffers {gib(self.buffers)} + runtime {gib(self.runtime)} + the larger of gradients "
                f"{gib(self.gradients)} and activations {gib(self.activations)}"
                + (f" + gathered {gib(self.gathered)}" if self.gathered else ""))
        if self.available is not None:
            text += f"; a rank has {gib(self.available)} GiB ({self.available_from})"
        return text

    def to_params(self) -> dict:
        """MLflow params (``memory.*``, GiB)."""
        out = {f"memory.{k}_gib": round(getattr(self, k) / GIB, 3)
               for k in ("weights", "gradients", "optimizer", "activations", "buffers", "gathered", "runtime")}
        out["memory.total_gib"] = round(self.total / GIB, 3)
        out["memory.available_gib"] = round(self.available / GIB, 3) if self.available is not None else "unknown"
        out["memory.settings"] = self.settings()
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["parallelism"] = self.parallelism.value
        data["quantize"] = self.quantize.value
        data["total"] = self.total
        return data


def _config_of(cfg: TrainConfig, task: Task):
    from transformers import AutoConfig

    from sparktune.models import resolve_pretrained

    overrides = dict(cfg.model.config_overrides)
    extra = {"num_labels": cfg.model.num_labels} if task is Task.CLASSIFICATION else {}
    if "model_type" in overrides:
        return AutoConfig.for_model(overrides.pop("model_type"), **overrides, **extra)
    kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(resolve_pretrained(cfg.model.name),
                                          trust_remote_code=cfg.model.trust_remote_code, **overrides, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        raise SparktuneError(
            f"model.name: could not read the config of {cfg.model.name!r} for the memory plan ({exc}); give a local "
            "folder or a hub name this machine reaches, or set train.memory_check=off") from None


_PREFETCHED: dict[str, Future] = {}
_PREFETCH_LOCK = threading.Lock()


def _shape_key(cfg: TrainConfig, task: Task) -> str:
    return json.dumps([cfg.to_dict(), task.value], sort_keys=True, default=str)


def prefetch_model_shape(cfg: TrainConfig) -> None:
    """Start working out ``model_shape`` in a background thread (torch and transformers imported,
    the model's config read, the model built on the meta device) while the caller starts Spark:
    the driver's memory plan then finds it done. Only for an explicit ``model.task`` (``auto``
    needs the table) and a memory check that is on. A failure here is forgotten: ``model_shape``
    then runs again in the caller's thread and raises there, in the job's usual order."""
    if cfg.train.memory_check is MemoryCheck.OFF or cfg.model.task == "auto":
        return
    try:
        task = Task.parse(cfg.model.task, "model.task")
    except Exception:  # noqa: BLE001  (reported by the job itself, where it checks model.task)
        return
    key = _shape_key(cfg, task)
    future: Future = Future()
    with _PREFETCH_LOCK:
        if key in _PREFETCHED:
            return
        # One prefetch at a time: one that no memory plan took (its job stopped before planning, in a
        # process that runs several jobs) is dropped, not kept or handed to a later job.
        _PREFETCHED.clear()
        _PREFETCHED[key] = future

    def work() -> None:
        try:
            future.set_result(_model_shape(cfg, task))
        except BaseException as exc:  # noqa: BLE001  (recomputed, and raised, by the caller)
            future.set_exception(exc)

    threading.Thread(target=work, name="sparktune-model-shape", daemon=False).start()


def model_shape(cfg: TrainConfig, task: Task) -> ModelShape:
    """The model's shape from its config: built on the meta device, so no weights are read or allocated
    (or the result of ``prefetch_model_shape`` for the same config and task, waited for)."""
    with _PREFETCH_LOCK:
        future = _PREFETCHED.pop(_shape_key(cfg, task), None)
    if future is not None:
        try:
            return future.result()
        except Exception:  # noqa: BLE001  (computed again below, so the error is raised here, as without it)
            pass
    return _model_shape(cfg, task)


def _model_shape(cfg: TrainConfig, task: Task) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from sparktune.train.fsdp import sharding_units
    from sparktune.train.model import apply_lora

    config = _config_of(cfg, task)
    auto = AutoModelForSequenceClassification if task is Task.CLASSIFICATION else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.lora.enabled:
            model = apply_lora(cfg, model, task)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    units = sharding_units(model, cfg.fsdp.units)
    unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    linear = sum(m.weight.numel() for u in units for m in u.modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden)
    gated = any(name.endswith("gate_proj") for name, _ in units[0].named_modules()) if units else False
    adapters = sum(1 for _, m in units[0].named_modules() if hasattr(m, "lora_A")) if units else 0
    return ModelShape(
        model_type=str(config.model_type), params=int(params), trainable=int(trainable), layers=len(units),
        hidden=hidden, intermediate=intermediate, heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        vocab=int(getattr(text, "vocab_size", 0) or 0), unit_params=int(max(unit_sizes, default=0)),
        root_params=int(params - sum(unit_sizes)), linear_params=int(linear),
        gated_mlp=gated, causal=task.is_causal, adapters=adapters)


def _layer_activations(shape: ModelShape, act_bytes: int, frozen: bool) -> int:
    """Bytes one layer saves for backward per token. Fully trained: x, its norm, q, attention out,
    the residual, the second norm (7 hidden-wide), k/v and their rotation (3 kv-wide), the MLP's
    inputs/outputs (gated: 4 intermediate-wide, else 2). A frozen base (LoRA) does not save the
    inputs only its frozen Linear layers need (the two norms' outputs, o_proj's and down_proj's
    inputs: 3 hidden-wide, 1 intermediate-wide); each adapter saves its dropped-out input and the
    dropout mask. (Counted with saved_tensors_hooks on Qwen2/Llama layers: the formula is within 5%.)"""
    kv = shape.hidden * shape.kv_heads // max(shape.heads, 1)
    full = (7 * shape.hidden + 3 * kv + (4 if shape.gated_mlp else 2) * shape.intermediate) * act_bytes
    if not frozen:
        return full
    return full - (3 * shape.hidden + shape.intermediate) * act_bytes + shape.adapters * shape.hidden * (act_bytes + 1)


def _activations(shape: ModelShape, batch: int, seq: int, act_bytes: int, checkpointing: bool,
                 frozen: bool = False) -> int:
    """What is alive at the start of backward: each layer's saved tensors (with checkpointing only
    each layer's input plus one layer's worth, recomputed); a causal LM adds its fp32 logits three
    times over (log-softmax's saved output, its gradient, the logits' gradient)."""
    per_layer = _layer_activations(shape, act_bytes, frozen)
    tokens = batch * seq
    if checkpointing:
        layers = tokens * (shape.layers * shape.hidden * act_bytes + per_layer)
    else:
        layers = tokens * shape.layers * per_layer
    logits = tokens * shape.vocab * 4 * 3 if shape.causal else 0
    return int(layers + logits)


def plan_memory(shape: ModelShape, *, parallelism: Parallelism, world_size: int, gpu: bool, bf16: bool,
                lora: bool, quantize: Quantization, batch_size: int, seq_len: int, checkpointing: bool,
                cpu_offload: bool = False, weight_bytes: int = 4, available: int | None = None,
                available_from: str = "") -> MemoryPlan:
    """Per-rank bytes for ``shape`` trained with these settings (pure arithmetic)."""
    n = world_size if parallelism is Parallelism.FSDP else 1
    fsdp = parallelism is Parallelism.FSDP
    trainable = shape.trainable
    if quantize is Quantization.NF4:
        # 4-bit Linear weights in the layers; embeddings, head and norms in bf16
        weights = int(shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params - trainable) * 2
                      + trainable * 4)
    else:
        weights = shape.params * weight_bytes
    gradients = trainable * 4
    optimizer = trainable * 8
    gathered = buffers = 0
    if fsdp:
        weights, gradients, optimizer = weights // n, gradients // n, optimizer // n
        # the unit in compute and the next one prefetched, and the root for the whole forward and
        # backward (FSDP2 keeps the root gathered after forward)
        gathered = (2 * shape.unit_params + shape.root_params) * (2 if bf16 and gpu else weight_bytes)
        gradients += shape.unit_params * 4 if trainable == shape.params else 0  # one unit's, before reduce-scatter
    elif world_size > 1:
        buffers = gradients  # DDP's gradient buckets: a second copy
    if cpu_offload and fsdp and gpu:
        weights = gradients = optimizer = 0  # held in host memory, streamed per unit
    act_bytes = 2 if bf16 or quantize is Quantization.NF4 else 4
    activations = _activations(shape, batch_size, seq_len, act_bytes, checkpointing,
                               frozen=lora and trainable < shape.params)
    return MemoryPlan(
        parallelism=parallelism, world_size=world_size, device="cuda" if gpu else "cpu",
        precision="bf16" if bf16 else "fp32", lora=lora, quantize=quantize, batch_size=batch_size, seq_len=seq_len,
        activation_checkpointing=checkpointing, cpu_offload=cpu_offload and fsdp, weights=weights, gradients=gradients,
        optimizer=optimizer, activations=activations, buffers=buffers, runtime=GPU_RUNTIME if gpu else CPU_RUNTIME,
        available=available, available_from=available_from, gathered=gathered)


def rank_memory(cfg: TrainConfig, *, gpu: bool, ranks_per_host: int,
                gpu_total: int | None = None) -> tuple[int | None, str]:
    """``(bytes a rank may use, where that figure comes from)``; None when it cannot be known here."""
    if cfg.distributor.memory_per_rank_gb:
        return int(cfg.distributor.memory_per_rank_gb * GIB), "distributor.memory_per_rank_gb"
    if gpu:
        if gpu_total:
            return gpu_total, "the driver's GPU memory"
        return None, "unknown on the driver (executor GPUs)"
    available = _host_available()
    return available // max(ranks_per_host, 1), f"host memory / {ranks_per_host} rank(s)"


def _host_available() -> int:
    """Memory this machine (or its cgroup) has: its total, not what is free this second (a busy
    neighbour would otherwise make the same job fit one minute and be refused the next)."""
    total = None
    try:
        import psutil

        total = int(psutil.virtual_memory().total)
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as handle:
            limit = handle.read().strip()
        if limit != "max":
            total = int(limit) if total is None else min(total, int(limit))
    except (OSError, ValueError):
        pass
    return int(total or 0)


def plan_for_job(cfg: TrainConfig, task: Task, *, seq_len: int, world_size: int, gpu: bool, bf16: bool,
                 ranks_per_host: int, gpu_total: int | None = None, shape: ModelShape | None = None) -> MemoryPlan:
    """The plan of ``cfg`` on this cluster (``seq_len``: the longest row the table holds)."""
    shape = shape or model_shape(cfg, task)
    available, source = rank_memory(cfg, gpu=gpu, ranks_per_host=ranks_per_host, gpu_total=gpu_total)
    weight_bytes = 2 if cfg.model.dtype in ("bfloat16", "float16") else 4
    return plan_memory(shape, parallelism=cfg.train.parallelism, world_size=world_size, gpu=gpu, bf16=bf16,
                       lora=cfg.lora.enabled, quantize=cfg.lora.quantize if cfg.lora.enabled else Quantization.NONE,
                       batch_size=cfg.train.batch_size, seq_len=seq_len, checkpointing=cfg.train.gradient_checkpointing,
                       cpu_offload=cfg.fsdp.cpu_offload, weight_bytes=weight_bytes, available=available,
                       available_from=source)


def _alternatives(plan: MemoryPlan, shape: ModelShape) -> list[tuple[str, MemoryPlan]]:
    """Each setting that would lower the peak, with its plan."""
    options: list[tuple[str, dict]] = []
    if plan.parallelism is Parallelism.DDP and plan.world_size > 1:
        options.append(("train.parallelism=fsdp", {"parallelism": Parallelism.FSDP}))
    if not plan.lora:
        options.append(("lora.enabled=true", {"lora": True}))
    if shape.causal and plan.device == "cuda" and plan.quantize is Quantization.NONE:
        options.append(("lora.enabled=true lora.quantize=nf4", {"lora": True, "quantize": Quantization.NF4}))
    if not plan.activation_checkpointing:
        options.append(("train.gradient_checkpointing=true", {"checkpointing": True}))
    if plan.batch_size > 1:
        options.append((f"train.batch_size={plan.batch_size // 2} (and gradient_accumulation_steps x2)",
                        {"batch_size": plan.batch_size // 2}))
    if plan.parallelism is Parallelism.FSDP and plan.device == "cuda" and not plan.cpu_offload:
        options.append(("fsdp.cpu_offload=true", {"cpu_offload": True}))
    base = {"parallelism": plan.parallelism, "world_size": plan.world_size, "gpu": plan.device == "cuda",
            "bf16": plan.precision == "bf16", "lora": plan.lora, "quantize": plan.quantize,
            "batch_size": plan.batch_size, "seq_len": plan.seq_len, "checkpointing": plan.activation_checkpointing,
            "cpu_offload": plan.cpu_offload, "available": plan.available, "available_from": plan.available_from}
    out = []
    for label, change in options:
        kwargs = {**base, **change}
        trainable, adapters = shape.trainable, shape.adapters
        if kwargs["lora"] and not plan.lora:
            # ~r*(in+out) per adapted projection (q and v of each layer at r=8): 2 x 8 x 2h per layer
            trainable, adapters = shape.layers * 2 * 8 * 2 * shape.hidden, 2
        out.append((label, plan_memory(replace(shape, trainable=trainable, adapters=adapters), **kwargs)))
    return out


def check_memory(plan: MemoryPlan, shape: ModelShape, mode: MemoryCheck) -> None:
    """Refuse (``refuse``) or warn (``warn``) when ``plan`` does not fit."""
    if mode is MemoryCheck.OFF or plan.fits:
        return
    lines = [f"train.memory_check: this job needs ~{plan.figures()} ({plan.settings()}; "
             f"{shape.params / 1e6:.0f}M parameters, {shape.trainable / 1e6:.1f}M trainable). It does not fit. To fit:"]
    for label, alternative in _alternatives(plan, shape):
        verdict = "fits" if alternative.fits else "still too large"
        lines.append(f"  - {label}: {alternative.total / GIB:.2f} GiB per rank ({verdict})")
    lines.append("  - or a lower data.max_length / tokenize.max_length, more or larger GPUs; "
                 "train.memory_check=warn runs it anyway")
    message = "\n".join(lines)
    if mode is MemoryCheck.WARN:
        log.warning("sparktune train: %s", message)
        return
    raise SparktuneError(message)


def ranks_per_host(cfg: TrainConfig) -> int:
    return cfg.distributor.num_processes if cfg.distributor.local_mode else 1


def log_plan(tracker, run_id: str, plan: MemoryPlan) -> None:
    """The plan as MLflow params (``memory.*``) and ``memory_plan.json``."""
    tracker.log_params(run_id, plan.to_params())
    tracker.log_dict(run_id, plan.to_dict(), "memory_plan.json")
