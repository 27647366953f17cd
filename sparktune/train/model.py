"""The tokenizer and the model a job trains: pretrained, GGUF or a fresh config, with optional LoRA."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from sparktune.compat import from_pretrained_dtype
from sparktune.errors import SparktuneError
from sparktune.models import resolve_pretrained
from sparktune.tasks import TOKENIZED, Task
from sparktune.train.config import TrainConfig

__all__ = ["load_tokenizer", "build_model", "apply_lora", "LORA_TARGETS", "model_max_positions", "peft_problems",
           "qlora_problems", "nf4_supported", "skeleton_rank", "return_freed_memory", "CPU_MMAP_THRESHOLD"]

LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


CPU_MMAP_THRESHOLD = 256 * 1024
"""On CPU, blocks of this size and above are mmap-ed (and unmapped when freed), see ``return_freed_memory``."""


def return_freed_memory(gpu: bool) -> bool:
    """On a CPU rank (glibc): serve blocks >= ``CPU_MMAP_THRESHOLD`` with mmap, so freed memory goes back to the OS.

    Called once per training rank, before the model is built, for every parallelism (DDP and
    FSDP alike): it lowers a CPU rank's peak resident memory, it is not a benchmark setting.
    glibc's heap keeps what large temporaries free (its dynamic mmap threshold climbs to 32 MiB
    after the first big free), so the loaded checkpoint, FSDP's gathered weights and gradients
    (freed twice a step) and DDP's bucket copies stayed resident: SmolLM2-135M at 2 ranks peaked
    ~1.3 GiB/rank higher under FSDP and ~0.3 GiB higher under DDP without it
    (bench/bench_fsdp_memory.py, BENCHMARKS.md issue 20). On GPUs the big tensors are not in the
    C heap, so nothing is set; nor where glibc's ``mallopt`` is missing (musl, macOS): False.
    """
    if gpu:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, CPU_MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _load_error(key: str, what: str, exc: Exception) -> SparktuneError:
    return SparktuneError(
        f"{key}: could not load {what} ({exc}); give a local folder, pkg:MODULE, "
        "or a hub name on a machine that reaches the hub"
    )


def load_tokenizer(cfg: TrainConfig, table_props: Mapping[str, str]):
    """``model.tokenizer``, else the table's tokenizer property, else ``model.name``."""
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or table_props.get(TOKENIZED.prop_tokenizer) or cfg.model.name
    key = "model.tokenizer" if cfg.model.tokenizer else "model.name"
    path = resolve_pretrained(source, key)
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.model.trust_remote_code}
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


def nf4_supported(device: str) -> str | None:
    """None if the installed bitsandbytes quantizes to nf4 on ``device`` (tried on a small tensor), else why not."""
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except ImportError:
        return "bitsandbytes is not installed"
    try:
        bnbf.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.bfloat16), quant_type="nf4")
    except Exception as exc:  # noqa: BLE001  (any failure means: not usable here)
        why = str(exc).splitlines()[0][:200] if str(exc) else repr(exc)
        return f"bitsandbytes cannot quantize to nf4 on {device} ({why})"
    return None


def peft_problems(cfg: TrainConfig) -> list[str]:
    """Why a LoRA job cannot start here: peft is missing (Databricks ML runtimes do not ship it,
    and ``pip install sparktune`` leaves it out so as not to touch a runtime's libraries)."""
    if not cfg.lora.enabled:
        return []
    try:
        import peft  # noqa: F401
    except ImportError:
        return ["lora.enabled: LoRA needs the peft package, which this Python environment lacks (Databricks ML "
                "runtimes do not ship it); install it on the driver and the workers (`%pip install "
                "'sparktune[databricks]'` in a notebook, or `pip install peft`), or set lora.enabled=false"]
    return []


def qlora_problems(cfg: TrainConfig, task: Task | None, gpu: bool) -> list[str]:
    """Why ``lora.quantize: nf4`` (QLoRA) cannot run with this config on this device (empty: it can)."""
    from sparktune.train.config import Parallelism, Quantization

    if cfg.lora.quantize is not Quantization.NF4:
        return []
    problems = []
    if not cfg.lora.enabled:
        problems.append("lora.quantize: nf4 quantizes the frozen base of a LoRA job; set lora.enabled=true "
                        "(or lora.quantize=none)")
    if task is Task.CLASSIFICATION:
        problems.append("lora.quantize: nf4 (QLoRA) is for decoder models (causal-lm, instruction); use "
                        "lora.quantize=none for a classifier")
    if cfg.train.parallelism is Parallelism.FSDP:
        problems.append("lora.quantize: nf4 with train.parallelism=fsdp is not supported (4-bit weights are not "
                        "sharded); use train.parallelism=ddp: the 4-bit base already fits a 7-8B model on one GPU")
    if cfg.lora.merge_on_save:
        problems.append("lora.merge_on_save: merging adapters into a 4-bit base would round them away; set "
                        "lora.merge_on_save=false with lora.quantize=nf4 (the adapters are saved beside the base)")
    if cfg.model.config_overrides or cfg.model.gguf_file:
        problems.append("lora.quantize: nf4 quantizes pretrained weights as they load; it cannot be combined with "
                        "model.config_overrides or model.gguf_file")
    why = nf4_supported("cuda" if gpu else "cpu")
    if why:
        problems.append(f"lora.quantize: nf4 needs bitsandbytes with 4-bit support on this "
                        f"{'GPU' if gpu else 'CPU'}: {why}; train on GPUs (distributor.use_gpu) with bitsandbytes "
                        "installed, or set lora.quantize=none (plain LoRA)")
    return problems


def _nf4_kwargs(cfg: TrainConfig) -> dict:
    """from_pretrained arguments that load the base in nf4 (double quantization, bf16 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def build_model(cfg: TrainConfig, task: Task, tokenizer):
    """The model to train (LoRA-wrapped when ``lora.enabled``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task is Task.CLASSIFICATION else AutoModelForCausalLM
    dtype = getattr(torch, cfg.model.dtype)
    extra: dict = {}
    if task is Task.CLASSIFICATION:
        extra["num_labels"] = cfg.model.num_labels
        if cfg.model.label_names:
            extra["id2label"] = dict(enumerate(cfg.model.label_names))
            extra["label2id"] = {n: i for i, n in enumerate(cfg.model.label_names)}
    overrides = dict(cfg.model.config_overrides)
    if cfg.model.attention_dropout is not None:
        extra.update(_attention_dropout(cfg, overrides))
    skeleton = skeleton_rank(cfg)
    if overrides:
        if "model_type" in overrides:
            model_type = overrides.pop("model_type")
            overrides.setdefault("vocab_size", len(tokenizer))
            config = AutoConfig.for_model(model_type, **overrides, **extra)
        else:
            config = AutoConfig.from_pretrained(resolve_pretrained(cfg.model.name),
                                                trust_remote_code=cfg.model.trust_remote_code, **overrides, **extra)
        with torch.device("meta") if skeleton else contextlib.nullcontext():
            model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    elif skeleton:
        # the pretrained model's structure only: rank 0 loads the weights and scatters them
        gguf = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
        try:
            config = AutoConfig.from_pretrained(resolve_pretrained(cfg.model.name),
                                                trust_remote_code=cfg.model.trust_remote_code, **extra, **gguf)
        except (OSError, ValueError) as exc:
            raise _load_error("model.name", f"the config of {cfg.model.name!r}", exc) from None
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code).to(dtype)
    else:
        path = resolve_pretrained(cfg.model.name)
        kwargs = dict(extra, **from_pretrained_dtype(dtype), trust_remote_code=cfg.model.trust_remote_code)
        quantized = cfg.lora.enabled and cfg.lora.quantize.value == "nf4"
        if quantized:
            kwargs.update(_nf4_kwargs(cfg))
        if cfg.model.gguf_file:
            kwargs["gguf_file"] = cfg.model.gguf_file
        try:
            model = auto.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as exc:
            raise _load_error("model.name", f"{cfg.model.name!r} as a {task} model", exc) from None
        if cfg.model.gguf_file:
            # save_pretrained refuses GGUF-loaded models: move the weights into a plain model.
            model = _adopt(auto.from_config, model).to(dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.train.gradient_checkpointing:
        model.config.use_cache = False
    if cfg.lora.enabled:
        if getattr(model, "is_loaded_in_4bit", False):
            from peft import prepare_model_for_kbit_training

            # fp32 norms/head, input grads for checkpointing: peft's recipe for training on a 4-bit base
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
        with torch.device("meta") if skeleton else contextlib.nullcontext():
            model = apply_lora(cfg, model, task)
    return model


def skeleton_rank(cfg: TrainConfig) -> bool:
    """True on the ranks of a multi-rank FSDP job other than rank 0: they build the model on the
    meta device (no weights, no memory) and receive only their shards of rank 0's weights
    (``sparktune.train.fsdp.shard_model``), so no rank but rank 0 ever holds a full copy."""
    from sparktune.train.config import Parallelism

    if cfg.train.parallelism is not Parallelism.FSDP:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0


def _adopt(from_config, loaded):
    """A plain model of ``loaded``'s config that takes over ``loaded``'s tensors (no copy): built
    with its parameters on the meta device, then given the loaded ones (``assign=True``)."""
    import torch

    with torch.device("meta"):
        fresh = from_config(loaded.config)
    fresh.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    getattr(fresh, "tie_weights", lambda: None)()
    # buffers left out of the state dict (non-persistent: rotary frequencies, masks) come across as they are
    for name, buffer in loaded.named_buffers(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        module = fresh.get_submodule(owner)
        if leaf in module._buffers and module._buffers[leaf] is not None and module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffer
    left = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    if left:
        raise SparktuneError(f"model.gguf_file: the GGUF model has no weights for {', '.join(left[:5])}; "
                             "it does not match its own config")
    return fresh


ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attn_pdrop", "attention_dropout")
"""Config attributes that hold the attention-probability dropout (BERT family, GPT-2, Llama family)."""


def _attention_dropout(cfg: TrainConfig, overrides: dict) -> dict:
    """``{config key: model.attention_dropout}`` for the model's architecture (a config kwarg);
    ``auto``: 0 on CPU where the architecture has the key, else nothing (the model's own)."""
    from transformers import AutoConfig

    from sparktune.train.dist import use_gpu

    auto = cfg.model.attention_dropout == "auto"
    if auto and use_gpu():
        return {}
    if "model_type" in overrides:
        base = AutoConfig.for_model(overrides["model_type"])
    else:
        kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
        base = AutoConfig.from_pretrained(resolve_pretrained(cfg.model.name),
                                          trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    key = next((k for k in ATTENTION_DROPOUT_KEYS if hasattr(base, k)), None)
    if auto:
        return {key: 0.0} if key is not None else {}
    if key is None:
        raise SparktuneError(
            f"model.attention_dropout: model type {base.model_type!r} has none of {', '.join(ATTENTION_DROPOUT_KEYS)} "
            "in its config; leave model.attention_dropout empty for this model"
        )
    assert cfg.model.attention_dropout is not None  # the caller checks
    return {key: float(cfg.model.attention_dropout)}


def apply_lora(cfg: TrainConfig, model, task: Task):
    from peft import LoraConfig, TaskType, get_peft_model

    targets = cfg.lora.target_modules or LORA_TARGETS.get(model.config.model_type)
    if not targets:
        raise SparktuneError(
            f"lora.target_modules: no default for model type {model.config.model_type!r}; "
            "list the module names to adapt (e.g. [q_proj, v_proj])"
        )
    # A classifier's head is new (random): it trains in full and is saved with the adapters
    # (peft's modules_to_save; decoders call it score, encoders classifier).
    heads = [name for name in ("score", "classifier") if task is Task.CLASSIFICATION and hasattr(model, name)]
    peft_cfg = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=list(targets),
        task_type=TaskType.SEQ_CLS if task is Task.CLASSIFICATION else TaskType.CAUSAL_LM,
        modules_to_save=heads or None,
    )
    return get_peft_model(model, peft_cfg)


def model_max_positions(config) -> int | None:
    """The longest sequence a model config accepts (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
