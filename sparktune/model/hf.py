"""The one inference core: loading a fine-tuned transformers model and running it over token ids.

Everything that turns a ``save_pretrained`` folder into numbers lives here, once:

* ``load(path, task)``: tokenizer + model (cached per process), with the pad-id fallback
  (``pad_id``), class names from ``id2label`` (``label_names``) and the one max-length rule
  (``max_length``);
* ``pad_batch``: right-padding of unpadded id lists into ``input_ids`` + ``attention_mask``
  (the training collator can call it too);
* ``predict``: the one task-dispatched prediction (texts or token ids in, ``Predictions`` out)
  that the pyfunc, Spark inference and the in-process baseline all call, with the one rule for
  rows per forward pass (``rows_per_pass``);
* ``classify``: class probabilities; ``lm_losses``: per-row causal-LM losses;
  ``score_answers``: each class's continuation log-probability after a prompt (how an
  instruction-tuned decoder classifies: no free-form parsing), with the prompt's own loss;
  ``generate`` / ``generate_ids``: bounded generation;
* LoRA adapters saved apart from their base (``adapter_config.json`` beside a ``base/``
  save_pretrained folder) load as one model; instruction models carry their prompt
  (``sparktune_prompt.json``, see ``sparktune.prompts``);
* ``pip_requirements``: what a serving environment installs (local build tags such as torch's
  ``+cu132`` stripped: public indexes do not serve them).

This file is shipped inside every MLflow model sparktune logs (as ``code/sparktune_hf.py``,
with ``sparktune/prompts.py`` as ``code/sparktune_prompts.py``) so a server needs only mlflow,
torch and transformers (and peft for adapters saved apart): it imports nothing else from sparktune.
Loops check a per-request deadline (``DEADLINE``, a context variable) between batches, so a
request the server has given up on stops computing.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from dataclasses import dataclass
from typing import Any

try:  # inside a logged model: the prompt builder shipped beside this file
    import sparktune_prompts as prompts
except ImportError:  # inside sparktune
    from sparktune import prompts

__all__ = [
    "ADAPTER_BASE",
    "CAUSAL_LM",
    "CLASSIFICATION",
    "BF16_ENV",
    "INSTRUCTION",
    "AnswerScores",
    "DEADLINE",
    "DeadlineExceeded",
    "Loaded",
    "Predictions",
    "check_deadline",
    "classify",
    "device_for",
    "encode",
    "generate",
    "generate_ids",
    "hf_config_dir",
    "label_names",
    "lm_losses",
    "load",
    "max_length",
    "pad_batch",
    "pad_id",
    "pip_requirements",
    "predict",
    "rows_per_pass",
    "model_inputs",
    "resolve_bf16",
    "resolve_quantize",
    "native_bf16",
    "read_config",
    "read_prompt",
    "score_answers",
    "softmax",
    "task_of_config",
    "task_of_folder",
]

# Same values as sparktune.tasks.Task (a str enum, so Task members compare equal to these).
CLASSIFICATION = "classification"
CAUSAL_LM = "causal-lm"
INSTRUCTION = "instruction"
TASKS = (CLASSIFICATION, CAUSAL_LM, INSTRUCTION)

ADAPTER_BASE = "base"
"""Where a model saved with separate LoRA adapters keeps its base model (a save_pretrained folder)."""
_ADAPTER_CONFIG = "adapter_config.json"

# Fallback when neither the tokenizer nor the config bounds the input length.
_DEFAULT_MAX_LENGTH = 512

DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("sparktune_deadline", default=None)
"""``time.monotonic()`` past which the current request's work stops (None: no deadline)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed; the remaining batches were not computed."""


def check_deadline() -> None:
    deadline = DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded("the request ran past its time limit; its remaining batches were dropped")


def pip_requirements(packages=("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy",
                               "pandas")) -> list[str]:
    """Exact versions of the serving environment, without local build tags (``2.5.0+cu121`` -> ``2.5.0``)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in packages:
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def hf_config_dir(path: str) -> str:
    """The folder holding ``config.json``: ``path``, or its ``base/`` when adapters were saved apart."""
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, _ADAPTER_CONFIG)):
        return os.path.join(path, ADAPTER_BASE)
    return path


def read_config(path: str) -> dict:
    with open(os.path.join(hf_config_dir(path), "config.json"), encoding="utf-8") as handle:
        return json.load(handle)


def read_prompt(path: str):
    """The ``prompts.PromptSpec`` an instruction model was trained with, or None."""
    file = os.path.join(path, prompts.PROMPT_FILE)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as handle:
        return prompts.PromptSpec.from_json(handle.read())


def task_of_folder(path: str) -> str | None:
    """The task of a save_pretrained folder: instruction when it carries a prompt, else from its config."""
    found = task_of_config(read_config(path))
    if found == CAUSAL_LM and read_prompt(path) is not None:
        return INSTRUCTION
    return found


def task_of_config(config: dict) -> str | None:
    """``classification`` / ``causal-lm`` from a config.json's architectures, else None."""
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CLASSIFICATION
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM
    return None


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def label_names(config) -> list[str]:
    """Class names in class-id order from ``id2label`` (keys may be ints or strings)."""
    id2label = _get(config, "id2label") or {}
    n = len(id2label) or int(_get(config, "num_labels", 2) or 2)
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(n)]


def pad_id(tokenizer, config=None) -> int:
    """The id used for padding. GPT-2 style tokenizers have none; any id works because the
    attention mask hides padded positions, so fall back to the config's, then EOS, then 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), _get(config, "pad_token_id") if config else None,
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def max_length(tokenizer, config, configured: int | None = None) -> int:
    """The one max-length rule: the smallest of the configured length (what training used), the
    tokenizer's ``model_max_length`` (unless it is transformers' "unbounded" sentinel) and the
    model's position embeddings."""
    bounds = []
    if configured:
        bounds.append(int(configured))
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 1_000_000:
        bounds.append(int(limit))
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        positions = _get(config, key)
        if positions:
            bounds.append(int(positions))
            break
    return min(bounds) if bounds else _DEFAULT_MAX_LENGTH


def device_for(preferred: str | None = None) -> str:
    """``cuda`` where a GPU is visible (executors and servers that have one), else ``cpu``."""
    if preferred:
        return preferred
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


BF16_ENV = "SPARKTUNE_BF16"
"""Environment variable choosing bf16 for inference where no argument does (servers, executors):
``auto`` (default), ``true`` or ``false``."""


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls run faster than fp32 on ``device`` (a device type: cpu or cuda).

    CUDA: the GPU supports bf16 (Ampere and later). CPU: only with AMX tiles (Sapphire Rapids and
    later, when the hypervisor exposes them). AVX512-BF16 alone is not enough: its dot-product
    instruction issues on one port where fp32 FMAs issue on two, so the peak is no higher than
    fp32 and the casts cost extra (measured on the dev box: 82 vs 150 GFLOP/s per thread,
    BENCHMARKS.md, issue 12).
    """
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device != "cpu":
        return False
    check = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    if check is not None:
        try:
            return bool(check())
        except Exception:  # noqa: BLE001  (a private probe; treat a failure as no AMX)
            return False
    try:  # older torch: the kernel's CPU flags
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return "amx_bf16" in handle.read()
    except OSError:
        return False


def resolve_bf16(setting: bool | str | None, device: str = "cpu") -> bool:
    """The one bf16 rule: ``True``/``False`` (or "true"/"false") as given; ``auto``/None/"" (and the
    ``SPARKTUNE_BF16`` environment variable when ``setting`` is None) on where ``native_bf16`` says
    bf16 is faster. Forcing it on a device without bf16 support raises ValueError."""
    if setting is None:
        setting = os.environ.get(BF16_ENV, "auto")
    if isinstance(setting, str):
        text = setting.strip().lower()
        if text in ("", "auto"):
            return native_bf16(device)
        if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"bf16: expected auto, true or false, found {setting!r} (check ${BF16_ENV})")
        setting = text in ("true", "1", "yes", "on")
    if setting and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ValueError("bf16 is on but this GPU does not support bfloat16; set it to false or auto")
    return bool(setting)


QUANTIZE_MODES = ("none", "int8")


def resolve_quantize(setting: str | None, device: str = "cpu") -> str:
    """The one quantization rule: ``int8`` (dynamic int8 quantization of every ``nn.Linear``: weights
    int8 per channel, activations quantized per batch at run time; CPU only) or ``none`` (None, "").
    Anything else, or int8 on a GPU, raises ValueError."""
    text = (setting or "none").strip().lower()
    if text not in QUANTIZE_MODES:
        raise ValueError(f"quantize: expected none or int8, found {setting!r}")
    if text == "int8" and not device.startswith("cpu"):
        raise ValueError(f"quantize int8 runs on the CPU only; this model loads on {device}")
    return text


def _quantize_int8(model):
    """``model`` with every ``nn.Linear`` swapped for torch's dynamically quantized int8 Linear
    (the rest, embeddings and layer norms included, stays fp32)."""
    import warnings

    import torch

    with warnings.catch_warnings():  # torch 2.10+ marks torch.ao.quantization deprecated (moving to torchao)
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


@dataclass
class Loaded:
    """A model ready for inference, with what every caller needs beside it."""

    tokenizer: Any
    model: Any
    task: str
    labels: list
    pad_id: int
    max_length: int
    device: str
    bf16: bool = False
    """Weights and activations in bfloat16 (logits are cast back to float32 before softmax)."""
    quantize: str = "none"
    """``int8``: the Linear layers run dynamically quantized (``resolve_quantize``)."""
    prompt: Any = None
    """Instruction models: a ``prompts.PromptEncoder`` (template, answer ids, length budget)."""


_CACHE: dict = {}


def load(path: str, task: str | None = None, configured_max_length: int | None = None,
         device: str | None = None, threads: int | None = None, bf16: bool | str | None = None,
         quantize: str | None = None) -> Loaded:
    """Tokenizer and model from a ``save_pretrained`` folder, once per (path, task, device) per process.

    ``bf16``: run in bfloat16 (``resolve_bf16``: True/False, ``auto``, or None for ``$SPARKTUNE_BF16``).
    Inference needs no fp32 master copy, so the weights themselves are cast: no per-op autocast.
    ``quantize``: ``int8`` or ``none`` (``resolve_quantize``); int8 takes fp32 activations, so it
    turns ``auto`` bf16 off (bf16 forced on with int8 raises ValueError)."""
    config = read_config(path)
    task = str(task or task_of_folder(path) or "")
    if task not in TASKS:
        raise ValueError(f"{path}: expected a sequence classifier or a causal LM, found architectures "
                         f"{config.get('architectures') or 'none'}")
    spec = read_prompt(path)
    if task == INSTRUCTION and spec is None:
        raise ValueError(f"{path}: an instruction model needs its prompt ({prompts.PROMPT_FILE}); it was not "
                         "trained by sparktune's instruction task")
    device = device_for(device)
    quant = resolve_quantize(quantize, device)
    use_bf16 = resolve_bf16(bf16, device)
    if quant == "int8" and use_bf16:
        if isinstance(bf16, bool) or str(bf16 or os.environ.get(BF16_ENV, "auto")).strip().lower() not in ("", "auto"):
            raise ValueError("quantize int8 runs the Linear layers on fp32 activations; set bf16 to false or auto")
        use_bf16 = False
    import torch

    if threads:  # a setting of this process, applied on every call (a cached model included)
        torch.set_num_threads(int(threads))
    key = (os.path.abspath(path), task, device, configured_max_length, use_bf16, quant)
    if key in _CACHE:
        return _CACHE[key]
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    tokenizer = AutoTokenizer.from_pretrained(path)
    auto = AutoModelForSequenceClassification if task == CLASSIFICATION else AutoModelForCausalLM
    base = hf_config_dir(path)
    model = auto.from_pretrained(base)
    if base != path:
        from peft import PeftModel

        # Adapters saved apart: merged here once, so inference runs a plain model.
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    model = model.eval().to(device)
    if use_bf16:
        model = model.to(torch.bfloat16)
    if quant == "int8":
        model = _quantize_int8(model)
    _stop_between_layers(model)
    limit = max_length(tokenizer, model.config, configured_max_length)
    loaded = Loaded(
        tokenizer=tokenizer,
        model=model,
        task=task,
        labels=(label_names(model.config) if task == CLASSIFICATION
                else list(spec.labels) if task == INSTRUCTION and spec is not None else []),
        pad_id=pad_id(tokenizer, model.config),
        max_length=limit,
        device=device,
        bf16=use_bf16,
        quantize=quant,
        prompt=prompts.PromptEncoder(tokenizer, spec, limit) if task == INSTRUCTION and spec is not None else None,
    )
    _CACHE[key] = loaded
    return loaded


def _stop_between_layers(model) -> None:
    """Check the deadline before every transformer layer too: one batch of long rows can take
    seconds, and a request the server gave up on should stop within a layer, not a batch."""
    import torch

    def hook(module, args):
        check_deadline()

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for layer in module:
                layer.register_forward_pre_hook(hook)


def encode(tokenizer, texts, max_len: int) -> list[list[int]]:
    """Token ids of ``texts``, truncated to ``max_len``, unpadded."""
    return tokenizer([str(t) for t in texts], truncation=True, max_length=int(max_len))["input_ids"]


def pad_batch(seqs, pad: int, pad_to_multiple_of: int | None = None, min_width: int = 1):
    """Right-pad unpadded id lists: ``(input_ids, attention_mask)`` as int64 tensors."""
    import numpy as np
    import torch

    width = max([min_width] + [len(s) for s in seqs])
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(seqs), width), int(pad), dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for row, seq in enumerate(seqs):
        n = len(seq)
        if n:
            ids[row, :n] = np.asarray(seq, dtype=np.int64)
            mask[row, :n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _length_batches(token_lists, batch_size: int, min_tokens: int = 0):
    """Row indices in batches of at most ``batch_size``, shortest rows first, rows of fewer than
    ``min_tokens`` left out; the deadline is checked before each batch."""
    # Sorting by length before batching pads each batch to similar lengths (on IMDB this halves
    # the work compared to arrival order); callers put outputs back in input order. A batch also
    # closes before a row longer than its shortest by more than a quarter (16 tokens at least):
    # every row computes at the padded width, so one 512-token review in a batch of 100-token
    # ones multiplies their work, while on CPU a single row of a few hundred tokens already
    # fills the cores (measured: BENCHMARKS.md, model server).
    order = sorted((i for i in range(len(token_lists)) if len(token_lists[i]) >= min_tokens),
                   key=lambda i: len(token_lists[i]))
    batch: list[int] = []
    for i in order:
        if batch:
            shortest = len(token_lists[batch[0]])
            if len(batch) >= batch_size or len(token_lists[i]) - shortest > max(16, shortest // 4):
                check_deadline()
                yield batch
                batch = []
        batch.append(i)
    if batch:
        check_deadline()
        yield batch


def classify(model, token_lists, pad: int, batch_size: int = 32):
    """Class probabilities (float64 array, rows x classes, input order) for unpadded id lists."""
    import numpy as np
    import torch

    n = len(token_lists)
    probs = np.zeros((n, int(model.config.num_labels)), dtype=np.float64)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for idx in _length_batches(token_lists, batch_size):
            ids, mask = pad_batch([token_lists[i] for i in idx], pad)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            probs[idx] = torch.softmax(logits, dim=-1).double().cpu().numpy()
    return probs


def lm_losses(model, token_lists, pad: int, batch_size: int = 16):
    """Per row: (sum of next-token cross-entropy, number of predicted tokens); rows of < 2 tokens get (0, 0)."""
    import numpy as np
    import torch

    n = len(token_lists)
    loss_sum = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for idx in _length_batches(token_lists, batch_size, min_tokens=2):
            ids, mask = pad_batch([token_lists[i] for i in idx], pad)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(idx), ids.size(1) - 1)
            target = mask[:, 1:].float()
            loss_sum[idx] = (nll * target).sum(dim=1).double().cpu().numpy()
            counts[idx] = target.sum(dim=1).long().cpu().numpy()
    return loss_sum, counts


def generate(loaded: Loaded, texts, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations (new text only) of ``texts``, at most ``max_new_tokens`` tokens each;
    the prompt is cut from the left so prompt + continuation fit the model's length."""
    ids = [list(x) for x in loaded.tokenizer([str(t) for t in texts], truncation=False)["input_ids"]]
    return generate_ids(loaded, ids, max_new_tokens, batch_size)


def generate_ids(loaded: Loaded, prompt_lists, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations (new text only) of prompts given as token ids (cut from the left to fit)."""
    import torch

    model, tok = loaded.model, loaded.tokenizer
    budget = max(1, loaded.max_length - int(max_new_tokens))
    prompts_ = [list(ids)[-budget:] if len(ids) else [loaded.pad_id] for ids in prompt_lists]
    out: list[str] = [""] * len(prompts_)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(prompts_), batch_size):
            check_deadline()
            chunk = prompts_[start:start + batch_size]
            width = max(len(p) for p in chunk)
            # Left padding: generation continues from the last real token of every row.
            ids = torch.full((len(chunk), width), loaded.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(chunk):
                ids[row, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=int(max_new_tokens), do_sample=False,
                                       pad_token_id=loaded.pad_id)
            for row in range(len(chunk)):
                out[start + row] = tok.decode(generated[row, width:], skip_special_tokens=True)
    return out


def softmax(scores):
    """Row-wise softmax of log-probabilities (float64): each class's share of the answers' probability."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass
class AnswerScores:
    logprobs: Any
    """(rows x classes) float64: log P(answer_k | prompt), summed over the answer's tokens."""
    loss_sum: Any
    """Per row: summed next-token cross-entropy over the prompt's own tokens (its perplexity)."""
    n_predicted: Any
    """Per row: prompt tokens that loss covers (length - 1)."""


def _next_token_logprobs(model, seqs, pad: int, device):
    """Right-padded forward pass: (ids, mask, log-softmax logits) for unpadded id lists."""
    import torch

    ids, mask = pad_batch(seqs, pad)
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return ids, mask, torch.log_softmax(logits, dim=-1)


def score_answers(model, prompt_lists, answer_ids, pad: int, batch_size: int = 8) -> AnswerScores:
    """Score every class's answer as the continuation of each prompt (unpadded id lists).

    With one-token answers (" positive"/" negative" for GPT-2 and SmolLM2) one forward pass of
    the prompt gives every class's score; longer answers take one pass per class. The prompt's
    own loss comes from the same first pass, so perplexity costs nothing extra.
    """
    import numpy as np
    import torch

    n, k = len(prompt_lists), len(answer_ids)
    logprobs = np.zeros((n, k), dtype=np.float64)
    loss_sum = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    single = all(len(a) == 1 for a in answer_ids)
    firsts = torch.as_tensor([int(a[0]) for a in answer_ids], dtype=torch.long) if single else None
    device = next(model.parameters()).device
    with torch.inference_mode():
        for idx in _length_batches(prompt_lists, batch_size):
            prompts_ = [list(prompt_lists[i]) or [pad] for i in idx]
            lens = torch.as_tensor([len(p) for p in prompts_], dtype=torch.long, device=device)
            rows = torch.arange(len(idx), device=device)
            for j in range(1 if single else k):
                seqs = prompts_ if single else [p + list(answer_ids[j]) for p in prompts_]
                ids, mask, logp = _next_token_logprobs(model, seqs, pad, device)
                if j == 0:
                    # log P(token t+1 | tokens <= t) over the prompt's own positions only.
                    taken = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
                    within = torch.arange(ids.size(1) - 1, device=device)[None, :] < (lens - 1)[:, None]
                    loss_sum[idx] = (-(taken * within).sum(dim=1)).double().cpu().numpy()
                    counts[idx] = within.sum(dim=1).cpu().numpy()
                if single:
                    assert firsts is not None
                    logprobs[idx] = logp[rows, lens - 1][:, firsts.to(device)].double().cpu().numpy()
                else:
                    total = torch.zeros(len(idx), device=device)
                    for t, token in enumerate(answer_ids[j]):
                        total += logp[rows, lens - 1 + t, int(token)]
                    logprobs[idx, j] = total.double().cpu().numpy()
    return AnswerScores(logprobs, loss_sum, counts)


# Rows per forward pass, per task, as a divisor of the caller's (classifier-sized) batch size.
# A classifier's output is rows x classes; a decoder's is float32 logits of rows x tokens x
# vocabulary (GPT-2: 50,257 x 512 x 4 bytes, ~100 MB a row). lm_losses holds those logits and
# a per-token loss as large again, so it takes half the rows; score_answers holds the logits and
# their log-softmax (and, for answers longer than one token, does so once per class), a quarter.
_ROWS_DIVISOR = {CLASSIFICATION: 1, CAUSAL_LM: 2, INSTRUCTION: 4}


def rows_per_pass(task: str, batch_size: int) -> int:
    """Rows per forward pass for ``task`` when the caller asks for ``batch_size`` (see _ROWS_DIVISOR)."""
    return max(1, int(batch_size) // _ROWS_DIVISOR[str(task)])


@dataclass
class Predictions:
    """What ``predict`` computes for one call, in input order; a field the task does not compute is None."""

    probabilities: Any = None
    """Classifier and instruction model: (rows x classes) float64, class-id order."""
    loss_sum: Any = None
    """Causal LM and instruction model: per row, the summed next-token cross-entropy (the
    instruction model's over its prompt)."""
    n_predicted: Any = None
    """Per row, the tokens ``loss_sum`` covers (int64)."""
    generated: list[str] | None = None
    """Causal LM and instruction model: greedy continuations, when ``max_new_tokens`` > 0."""

    @property
    def prediction(self):
        """The class ids (int64): the most probable class of each row."""
        return self.probabilities.argmax(axis=1)


def model_inputs(loaded: Loaded, texts=None, ids=None) -> list[list[int]]:
    """The token ids the task's forward pass reads: ``texts`` encoded (into the prompts an
    instruction model was trained on), or ``ids`` (a tokenized table's ``input_ids``, an
    instruction model's prompt ids) cut to the model's length. None stands for an empty row."""
    if texts is not None:
        texts = ["" if t is None else t for t in texts]
        if loaded.prompt is not None:
            return loaded.prompt.prompts(texts)[0]
        return encode(loaded.tokenizer, texts, loaded.max_length)
    return [list(v)[: loaded.max_length] if v is not None else [] for v in ids]


def predict(loaded: Loaded, texts=None, *, ids=None, batch_size: int = 32, max_new_tokens: int = 0) -> Predictions:
    """The one prediction of every task over ``texts`` (raw text) or ``ids`` (see ``model_inputs``).

    Classifier: probabilities. Causal LM: per-row losses, and continuations of ``max_new_tokens``
    tokens when > 0 (of the whole text, cut from the left to fit, when texts are given).
    Instruction model: each class's answer scored after the prompt (probabilities) with the
    prompt's loss, and continuations of the prompt when ``max_new_tokens`` > 0."""
    if (texts is None) == (ids is None):
        raise ValueError("predict: give texts or ids, not both")
    if texts is not None:
        texts = ["" if t is None else t for t in texts]
    tokens = model_inputs(loaded, texts, ids)
    rows = rows_per_pass(loaded.task, batch_size)
    new_tokens = int(max_new_tokens or 0)
    if loaded.task == CLASSIFICATION:
        return Predictions(probabilities=classify(loaded.model, tokens, loaded.pad_id, rows))
    if loaded.task == INSTRUCTION:
        scores = score_answers(loaded.model, tokens, loaded.prompt.answer_ids, loaded.pad_id, rows)
        generated = generate_ids(loaded, tokens, new_tokens) if new_tokens > 0 else None
        return Predictions(softmax(scores.logprobs), scores.loss_sum, scores.n_predicted, generated)
    loss_sum, counts = lm_losses(loaded.model, tokens, loaded.pad_id, rows)
    generated = None
    if new_tokens > 0:
        generated = generate(loaded, texts, new_tokens) if texts is not None else generate_ids(loaded, tokens,
                                                                                                  new_tokens)
    return Predictions(None, loss_sum, counts, generated)
