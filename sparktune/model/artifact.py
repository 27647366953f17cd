"""Writing the one model artifact: sparktune's pyfunc around a ``save_pretrained`` folder.

``save_model`` writes it to a folder, ``log_model`` logs it to an MLflow run; both give the
same files: ``MLmodel`` (signature, input example, the task, labels and max length in its
metadata), the model code (``python_model.py``, the pyfunc) and the inference core
(``code/sparktune_hf.py``), pinned requirements, and the weights + tokenizer under
``artifacts/model/`` (the pyfunc's artifact named ``hf_model``), a folder that plain transformers
loads too (``pipeline("text-classification", model=".../artifacts/model", truncation=True)``).
Training logs it, register registers it as is, serve and export-model serve and copy it as is,
and Spark inference loads its ``artifacts/model`` folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from sparktune import prompts
from sparktune.errors import SparktuneError
from sparktune.model import hf
from sparktune.prompts import PROMPT_FILE
from sparktune.tasks import Task

__all__ = [
    "CORE_MODULE",
    "DEFAULT_MAX_NEW_TOKENS",
    "MODEL_KIND",
    "WEIGHTS_FOLDER",
    "default_input_example",
    "log_model",
    "model_kwargs",
    "save_model",
    "signature",
]

WEIGHTS_FOLDER = "model"
"""The folder under the MLflow model's ``artifacts/`` that holds the ``save_pretrained`` files,
whatever the folder they were saved in was called."""
MODEL_KIND = "sparktune-model"
"""``sparktune_kind`` in the MLmodel metadata: how sparktune recognises its own models."""
CORE_MODULE = "sparktune_hf"
PROMPTS_MODULE = "sparktune_prompts"
# Bounded generation keeps serving defaults (and MLflow's input-example check) inside small
# models' context windows; a request may ask for fewer, never more.
DEFAULT_MAX_NEW_TOKENS = 32


def default_input_example(task: Task):
    if task.has_labels:
        return ["A wonderful, moving film with a great cast.", "Dull and far too long."]
    return ["Once upon a time"]


def signature(task: Task, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import (
        Array,
        ColSpec,
        DataType,
        ParamSchema,
        ParamSpec,
        Schema,
    )

    from sparktune.model.pyfunc import TEXT_COLUMN

    inputs = Schema([ColSpec(DataType.string, TEXT_COLUMN)])
    if task is Task.CLASSIFICATION:
        outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.long, "prediction"),
                          ColSpec(Array(DataType.double), "probabilities")])
        return ModelSignature(inputs=inputs, outputs=outputs)
    if task is Task.INSTRUCTION:
        # The label comes from scoring each class's answer; generated text only when asked for.
        outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.long, "prediction"),
                          ColSpec(Array(DataType.double), "probabilities"), ColSpec(DataType.string, "generated_text")])
        params = ParamSchema([ParamSpec("max_new_tokens", DataType.long, 0)])
        return ModelSignature(inputs=inputs, outputs=outputs, params=params)
    outputs = Schema([ColSpec(DataType.string, "generated_text"), ColSpec(DataType.double, "loss"),
                      ColSpec(DataType.long, "n_tokens")])
    params = ParamSchema([ParamSpec("max_new_tokens", DataType.long, int(max_new_tokens))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _check_hf_dir(hf_dir: str, task: Task) -> dict:
    if not os.path.isfile(os.path.join(hf.hf_config_dir(hf_dir), "config.json")):
        raise SparktuneError(f"{hf_dir} has no config.json: pass the folder that save_pretrained wrote")
    config = hf.read_config(hf_dir)
    found = hf.task_of_config(config)
    if task is Task.INSTRUCTION and hf.read_prompt(hf_dir) is None:
        raise SparktuneError(f"{hf_dir} has no {PROMPT_FILE}: an instruction model is scored with the prompt it "
                             "was trained on; train it with a table from `sparktune tokenize --task instruction`")
    if found != (Task.CAUSAL_LM.value if task is Task.INSTRUCTION else task.value):
        raise SparktuneError(f"{hf_dir} holds {config.get('architectures') or 'an unknown architecture'}, "
                             f"which is not a {task.value} model; set model.task to match the model")
    return config


@contextlib.contextmanager
def model_kwargs(hf_dir: str, task: Task | str, label_names=None, max_length: int | None = None,
                 input_example=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Iterator[dict]:
    """Arguments of ``mlflow.pyfunc.save_model`` / ``log_model`` for ``hf_dir`` (valid inside the block)."""
    import pandas as pd

    from sparktune.model import pyfunc

    task = Task.parse(task, "task")
    config = _check_hf_dir(hf_dir, task)
    spec = hf.read_prompt(hf_dir)
    labels = ([str(x) for x in label_names] if label_names else hf.label_names(config) if task is Task.CLASSIFICATION
              else list(spec.labels) if task is Task.INSTRUCTION and spec is not None else [])
    example = input_example if input_example is not None else default_input_example(task)
    if isinstance(example, (list, tuple)):
        example = pd.DataFrame({pyfunc.TEXT_COLUMN: list(example)})
    model_config = {"task": task.value, "max_length": int(max_length) if max_length else None, "labels": labels,
                    "max_new_tokens": int(max_new_tokens) if task.is_causal else 0, **pyfunc.LOAD_OPTIONS}
    with tempfile.TemporaryDirectory(prefix="sparktune-code-") as code, _as_weights_folder(hf_dir) as weights:
        # The core travels as a top-level module so the model loads without sparktune installed.
        core = os.path.join(code, CORE_MODULE + ".py")
        shutil.copyfile(hf.__file__, core)
        prompt_code = os.path.join(code, PROMPTS_MODULE + ".py")
        shutil.copyfile(prompts.__file__, prompt_code)
        packages = hf.pip_requirements()
        if hf.hf_config_dir(hf_dir) != hf_dir:  # adapters saved apart: peft joins them at load
            packages += hf.pip_requirements(("peft",))
        yield {
            "python_model": pyfunc.__file__,
            "artifacts": {pyfunc.HF_ARTIFACT: weights},
            "code_paths": [core, prompt_code],
            "signature": signature(task, max_new_tokens),
            "input_example": example,
            "pip_requirements": packages,
            "model_config": model_config,
            "metadata": {"sparktune_kind": MODEL_KIND, "task": task.value, "labels": labels,
                         "max_length": model_config["max_length"]},
        }


@contextlib.contextmanager
def _as_weights_folder(hf_dir: str) -> Iterator[str]:
    """``hf_dir`` under the name ``WEIGHTS_FOLDER`` (valid inside the block): MLflow stores an
    artifact folder under its own base name, and the docs (and users' code) point at
    ``artifacts/model/``. MLflow refuses symlinks, so another name is a tree of hard links beside
    ``hf_dir`` (no copy of the weights), or a copy where links cannot be made."""
    hf_dir = os.path.abspath(hf_dir)
    if os.path.basename(hf_dir.rstrip(os.sep)) == WEIGHTS_FOLDER:
        yield hf_dir
        return
    try:
        scratch = tempfile.mkdtemp(prefix=".sparktune-weights-", dir=os.path.dirname(hf_dir))
    except OSError:  # a read-only parent
        scratch = tempfile.mkdtemp(prefix="sparktune-weights-")
    try:
        target = os.path.join(scratch, WEIGHTS_FOLDER)
        shutil.copytree(hf_dir, target, copy_function=_link_or_copy)
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def save_model(hf_dir: str, path: str, task: Task | str | None = None, **kwargs) -> str:
    """Write the artifact for ``hf_dir`` as a local MLflow model folder at ``path``."""
    import mlflow

    task = Task.parse(task or hf.task_of_folder(hf_dir) or "", "task")
    with model_kwargs(hf_dir, task, **kwargs) as mkw:
        mlflow.pyfunc.save_model(path=path, **mkw)
    return path


def log_model(hf_dir: str, task: Task | str, *, tracker=None, run_id: str | None = None, name: str = "model",
              **kwargs) -> str:
    """Log the artifact for ``hf_dir`` to ``run_id`` (through ``tracker``) or to the active run;
    returns its ``models:/m-...`` URI."""
    import mlflow

    with model_kwargs(hf_dir, task, **kwargs) as mkw:
        if tracker is not None and run_id:
            with tracker.active(run_id):
                info = mlflow.pyfunc.log_model(name=name, **mkw)
        else:
            info = mlflow.pyfunc.log_model(name=name, **mkw)
    return info.model_uri
