"""Saving the trained model and logging it to MLflow as sparktune's one model artifact.

``log_model`` is the one place a trained model becomes an MLflow model: the sparktune pyfunc
(``sparktune.model.pyfunc``) that ``sparktune register`` registers, ``sparktune serve`` serves,
``sparktune export-model`` copies and ``sparktune evaluate`` / ``predict`` score in Spark.
"""

from __future__ import annotations

import os

__all__ = ["inference_tokenizer", "log_model", "save_model"]


def inference_tokenizer(tokenizer, max_length: int | None, classifier: bool):
    """A copy of ``tokenizer`` set up the way training cut and padded the rows, so that plain
    transformers (``pipeline(..., truncation=True)``, ``AutoTokenizer``) reading the saved folder
    feeds the model what sparktune's pyfunc feeds it.

    ``model_max_length`` becomes ``max_length``, the length training truncated to (the hub's
    value, e.g. 512, would let a pipeline see tokens the model never saw). Truncation keeps the
    head (``tokenize`` truncates on the right whatever the tokenizer says). A classifier pads on
    the right, as training and the pyfunc do (absolute positions would shift otherwise); a
    decoder keeps its own padding side, which generation needs.
    """
    import copy

    settings: dict = {"truncation_side": "right"}
    if max_length:
        settings["model_max_length"] = int(max_length)
    if classifier:
        settings["padding_side"] = "right"
    copied = copy.deepcopy(tokenizer)
    for key, value in settings.items():
        setattr(copied, key, value)
        # transformers 4.x saves init_kwargs (plus model_max_length), not every attribute.
        copied.init_kwargs[key] = value
    return copied


def save_model(model, tokenizer, save_dir: str, prompt=None, max_length: int | None = None,
               max_shard_size: str | None = None) -> str:
    """``save_pretrained`` model (safetensors) and tokenizer into ``save_dir``; returns it.

    ``max_length``: the length training truncated to; the saved tokenizer carries it
    (``inference_tokenizer``).

    A peft model (LoRA with ``lora.merge_on_save: false``) is saved as its adapters (with a
    classifier's trained head, peft's ``modules_to_save``) in ``save_dir`` and its base model in
    ``save_dir/base``, so the folder stays self-contained; ``sparktune.model.hf.load`` joins
    them. ``prompt`` (an instruction model's ``PromptSpec``) is written beside the weights.
    ``max_shard_size`` (e.g. "5GB"): safetensors files past it are split, with an index.
    """
    from sparktune.model import hf
    from sparktune.prompts import PROMPT_FILE

    os.makedirs(save_dir, exist_ok=True)
    split = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if hasattr(model, "peft_config") and hasattr(model, "unload"):
        model.save_pretrained(save_dir, safe_serialization=True)
        # unload() strips the adapter layers (the adapters are saved above) and gives the base back.
        model.unload().save_pretrained(os.path.join(save_dir, hf.ADAPTER_BASE), safe_serialization=True, **split)
    else:
        model.save_pretrained(save_dir, safe_serialization=True, **split)
    # PeftModelForSequenceClassification too
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    inference_tokenizer(tokenizer, max_length, classifier).save_pretrained(save_dir)
    if prompt is not None:
        with open(os.path.join(save_dir, PROMPT_FILE), "w", encoding="utf-8") as handle:
            handle.write(prompt.to_json())
    return save_dir


def log_model(model, tokenizer, *, task, save_dir: str, tracker=None, run_id: str | None = None,
              label_names=None, max_length: int | None = None, prompt=None,
              max_shard_size: str | None = None) -> str:
    """Save ``model`` + ``tokenizer`` to ``save_dir`` and log the sparktune pyfunc around them.

    ``task`` is a ``sparktune.tasks.Task`` (or its spelling). With ``tracker`` and ``run_id``
    the model goes into that run (``tracker.active``); else into MLflow's active run.
    ``label_names`` (class names in class-id order) are written into the model's ``id2label``
    so every reader agrees; ``max_length`` is the length training used, the bound inference
    truncates to; ``prompt`` is an instruction model's ``PromptSpec``. Returns the model URI
    (``models:/m-...``).
    """
    from sparktune.model import artifact
    from sparktune.tasks import Task

    task = Task.parse(task, "model.task")
    if label_names and task is Task.CLASSIFICATION:
        names = [str(x) for x in label_names]
        model.config.id2label = dict(enumerate(names))
        model.config.label2id = {name: i for i, name in enumerate(names)}
    save_model(model, tokenizer, save_dir, prompt=prompt, max_length=max_length, max_shard_size=max_shard_size)
    return artifact.log_model(save_dir, task, tracker=tracker, run_id=run_id, label_names=label_names,
                              max_length=max_length)
