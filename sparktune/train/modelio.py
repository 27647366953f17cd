"""Saving the trained model and logging it to MLflow with the transformers flavor.

``log_model`` is the one place a trained model becomes an MLflow model; evaluate, register and
serve load what it returns (``models:/<model id>``) with ``mlflow.pyfunc.load_model`` or
``mlflow.transformers.load_model``.
"""

from __future__ import annotations

import os

__all__ = ["log_model", "save_model", "PIPELINE_TASKS", "default_input_example"]

# sparktune task -> transformers pipeline task (what the pyfunc flavor calls at predict time).
PIPELINE_TASKS = {"classification": "text-classification", "causal-lm": "text-generation"}


def default_input_example(task: str):
    if task == "classification":
        return ["A wonderful, moving film with a great cast.", "Dull and far too long."]
    return ["Once upon a time"]


def _pip_requirements() -> list:
    """Pinned requirements of the serving environment.

    Given explicitly because MLflow's default list adds torchvision (absent here, unused by
    text models) and its inference step reloads the model in a subprocess, which is slow.
    """
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("transformers", "torch", "accelerate", "tokenizers", "safetensors"):
        try:
            reqs.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return reqs


def save_model(model, tokenizer, save_dir: str) -> str:
    """``save_pretrained`` model (safetensors) and tokenizer into ``save_dir``; returns it."""
    os.makedirs(save_dir, exist_ok=True)
    model.save_pretrained(save_dir, safe_serialization=True)
    tokenizer.save_pretrained(save_dir)
    return save_dir


def log_model(model, tokenizer, *, task: str, save_dir: str, name: str = "model",
              input_example=None, registered_model_name: str | None = None) -> str:
    """Save ``model`` + ``tokenizer`` to ``save_dir`` and log them to the active MLflow run.

    ``task`` is sparktune's (``classification`` or ``causal-lm``). The input example (a list of
    strings; a default per task when None) gives the model its signature. Returns the model
    URI (``models:/m-...``) that ``mlflow.pyfunc.load_model`` accepts.
    """
    import mlflow

    if task not in PIPELINE_TASKS:
        raise ValueError(f"task must be one of {sorted(PIPELINE_TASKS)}, got {task!r}")
    save_model(model, tokenizer, save_dir)
    example = input_example if input_example is not None else default_input_example(task)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name=name,
        task=PIPELINE_TASKS[task],
        input_example=example,
        registered_model_name=registered_model_name,
        pip_requirements=_pip_requirements(),
        # Bounded generation keeps the signature check (and serving defaults) inside small
        # models' context windows.
        model_config={"max_new_tokens": 16} if task == "causal-lm" else None,
    )
    return info.model_uri
