"""The MLflow pyfunc model that serves a fine-tuned text classifier with every class probability.

Why not the transformers flavor's own pyfunc: for ``text-classification`` it returns only the
top label and its score (``top_k=None`` gives nested lists that it flattens into an unusable
DataFrame), so a client cannot see the probability of each class. This model wraps the same
``save_pretrained`` folder and answers, per input text::

    label (str), prediction (int class id), probabilities (list of float, in class-id order)

The file is self-contained on purpose: it is logged as *model from code* (MLflow copies this
file into the model), so a server (``mlflow models serve``, Databricks Model Serving, Azure ML)
needs mlflow, torch and transformers, but not sparktune. Keep its imports to those.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

__all__ = [
    "SparktuneTextClassifier",
    "classify_token_batches",
    "log_pyfunc_model",
    "save_pyfunc_model",
    "pyfunc_signature",
    "pip_requirements",
    "HF_ARTIFACT",
    "MODEL_KIND",
]

# The artifact key under which the save_pretrained folder (model + tokenizer) is stored.
HF_ARTIFACT = "hf_model"
# Written into the MLmodel metadata so sparktune recognises its own models among others.
MODEL_KIND = "sparktune-text-classifier"
TEXT_COLUMN = "text"


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE maps to HTTP 400 in the scoring server: the client's fault.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def classify_token_batches(model, token_lists, pad_id: int, batch_size: int = 32):
    """Class probabilities for unpadded token id lists, as a float64 array (rows, classes).

    Rows are sorted by length before batching so that each batch pads to a similar length
    (on IMDB this halves the work compared to padding in arrival order); the output is in
    input order.
    """
    import torch

    n = len(token_lists)
    num_labels = int(model.config.num_labels)
    probs = np.zeros((n, num_labels), dtype=np.float64)
    order = sorted(range(n), key=lambda i: len(token_lists[i]))
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            width = max(1, max(len(token_lists[i]) for i in idx))
            ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = list(token_lists[i])
                if seq:
                    ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            probs[idx] = torch.softmax(logits, dim=-1).double().cpu().numpy()
    return probs


def _texts_from_input(model_input) -> list[str]:
    """Accept what the scoring server hands over: a DataFrame, a dict of columns, a list, a str."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            values = model_input[TEXT_COLUMN].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise _bad_input(
                f"expected a column named {TEXT_COLUMN!r} with the review text, found columns "
                f"{list(map(str, model_input.columns))}; send e.g. "
                '{"dataframe_split": {"columns": ["text"], "data": [["A great film"]]}}'
            )
    elif isinstance(model_input, dict):
        if TEXT_COLUMN not in model_input:
            raise _bad_input(f"expected the key {TEXT_COLUMN!r}, found keys {sorted(map(str, model_input))}")
        values = model_input[TEXT_COLUMN]
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    elif isinstance(model_input, (list, tuple, np.ndarray, pd.Series)):
        values = list(model_input)
    else:
        raise _bad_input(f"expected review text (a string or a list of strings), found {type(model_input).__name__}")
    if not values:
        raise _bad_input("no rows to score: send at least one review text")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise _bad_input(f"row {i}: expected the review text as a string, found {type(value).__name__} {value!r:.80}")
    return values


class SparktuneTextClassifier(mlflow.pyfunc.PythonModel):
    """Loads the save_pretrained folder once per process; predicts in batches."""

    batch_size = 32

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts[HF_ARTIFACT]
        threads = os.environ.get("SPARKTUNE_TORCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        self.pad_id = _pad_id(self.tokenizer, self.model.config)
        id2label = self.model.config.id2label or {}
        self.labels = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.model.config.num_labels)]
        limit = getattr(self.tokenizer, "model_max_length", None) or 512
        positions = getattr(self.model.config, "max_position_embeddings", None) or limit
        self.max_length = int(min(limit, positions))

    def predict(self, context, model_input, params=None):
        texts = _texts_from_input(model_input)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        probs = classify_token_batches(self.model, encoded, self.pad_id, self.batch_size)
        preds = probs.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.labels[p] for p in preds],
                "prediction": preds.astype(np.int64),
                "probabilities": [row.tolist() for row in probs],
            }
        )


def _pad_id(tokenizer, config) -> int:
    # GPT-2 style tokenizers have no pad token; any id works because the attention mask hides it.
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.string, TEXT_COLUMN)])
    outputs = Schema(
        [
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.long, "prediction"),
            ColSpec(Array(DataType.double), "probabilities"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements() -> list[str]:
    """Exact versions of what the model needs at serving time (local build tags dropped,
    e.g. torch's ``+cu132``, because package indexes do not serve them)."""
    from importlib.metadata import version

    reqs = []
    for name in ("mlflow", "torch", "transformers", "tokenizers", "pandas", "numpy"):
        try:
            reqs.append(f"{name}=={version(name).split('+')[0]}")
        except Exception:
            reqs.append(name)
    return reqs


def _check_classifier_dir(hf_dir: str) -> list[str]:
    import json

    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{hf_dir} has no config.json: pass the folder that save_pretrained wrote")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(
            f"{hf_dir} holds {architectures or 'an unknown architecture'}, not a sequence classifier; "
            "the sparktune pyfunc serves text classifiers (log causal LMs with the transformers flavor)"
        )
    id2label = config.get("id2label") or {}
    return [str(id2label.get(str(i), i)) for i in range(len(id2label) or int(config.get("num_labels", 2)))]


def _model_kwargs(hf_dir: str, input_example):
    labels = _check_classifier_dir(hf_dir)
    if input_example is None:
        input_example = pd.DataFrame({TEXT_COLUMN: ["A wonderful, moving film.", "Dull and far too long."]})
    elif isinstance(input_example, (list, tuple)):
        input_example = pd.DataFrame({TEXT_COLUMN: list(input_example)})
    return dict(
        python_model=os.path.abspath(__file__),
        artifacts={HF_ARTIFACT: os.path.abspath(hf_dir)},
        signature=pyfunc_signature(),
        input_example=input_example,
        pip_requirements=pip_requirements(),
        metadata={"sparktune_kind": MODEL_KIND, "labels": labels},
    )


def log_pyfunc_model(hf_dir: str, name: str = "model", input_example=None, registered_model_name=None) -> str:
    """Log ``hf_dir`` (model + tokenizer from save_pretrained) to the active MLflow run.

    Returns the model URI (``models:/m-...``) that evaluate, register and serve accept.
    """
    info = mlflow.pyfunc.log_model(
        name=name, registered_model_name=registered_model_name, **_model_kwargs(hf_dir, input_example)
    )
    return info.model_uri


def save_pyfunc_model(hf_dir: str, path: str, input_example=None) -> str:
    """Write the model as a self-contained MLflow model folder (for serving or upload)."""
    mlflow.pyfunc.save_model(path=path, **_model_kwargs(hf_dir, input_example))
    return path


# Logged as model-from-code: MLflow imports this file under a generated module name and takes
# the model that set_model registers. Importing it as sparktune.pyfunc_model must not do that.
if __name__ != "sparktune.pyfunc_model" and __name__ != "__main__":
    mlflow.models.set_model(SparktuneTextClassifier())
