"""The MLflow pyfunc that sparktune logs, registers, serves, exports and scores in Spark.

One artifact for every use. Per input text it answers:

* classifier: ``label`` (class name), ``prediction`` (class id) and ``probabilities`` (every
  class, in class-id order). The transformers flavor's pyfunc returns only the top label,
  which is why sparktune does not log that flavor.
* causal LM: ``generated_text`` (greedy, at most ``max_new_tokens`` new tokens: a request
  param, capped by the model's own bound), ``loss`` (mean next-token cross-entropy of the
  text) and ``n_tokens`` (tokens it was computed on).
* instruction-tuned decoder: what a classifier answers (``label``, ``prediction``,
  ``probabilities``: each class's answer scored as the continuation of the text's prompt, no
  parsing of free text) and ``generated_text``, empty unless the request asks for
  ``max_new_tokens`` (capped like a causal LM's).

This file is logged as *model from code* (MLflow copies it into the model) together with the
inference core (``sparktune/model/hf.py``, copied as ``code/sparktune_hf.py``), so a server
(``mlflow models serve``, Databricks Model Serving, Azure ML) needs mlflow, torch and
transformers, but not sparktune. Keep its imports to those.
"""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel  # the class itself: mypy sees mlflow.pyfunc as mlflow's LazyLoader

try:  # inside a logged model: the core shipped beside this file (code/ is on sys.path)
    import sparktune_hf as hf
except ImportError:  # inside sparktune
    from sparktune.model import hf

__all__ = ["HF_ARTIFACT", "LOAD_OPTIONS", "TEXT_COLUMN", "THREADS_ENV", "SparktuneModel", "texts_from_input"]

HF_ARTIFACT = "hf_model"
THREADS_ENV = "SPARKTUNE_TORCH_THREADS"
"""Torch threads of a process that loads the model, where its ``torch_threads`` config is unset."""
LOAD_OPTIONS = {"bf16": None, "torch_threads": None, "batch_size": None, "quantize": None}
"""Model-config keys a loader may set for its own process (``load_model(uri, model_config=...)``).
Logged with every model, unset: MLflow only lets a loader override keys the MLmodel holds."""
TEXT_COLUMN = "text"


def _bad_input(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE maps to HTTP 400 in the scoring server: the client's fault.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def texts_from_input(model_input) -> list[str]:
    """What the scoring server hands over (a DataFrame, a dict of columns, a list, a str) as texts."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            values = model_input[TEXT_COLUMN].tolist()
        elif len(model_input.columns) == 1:
            values = model_input.iloc[:, 0].tolist()
        else:
            raise _bad_input(
                f"expected a column named {TEXT_COLUMN!r} with the text, found columns "
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
        raise _bad_input(f"expected text (a string or a list of strings), found {type(model_input).__name__}")
    if not values:
        raise _bad_input("no rows to score: send at least one text")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise _bad_input(f"row {i}: expected the text as a string, found {type(value).__name__}")
    return values


class SparktuneModel(PythonModel):
    """Loads the save_pretrained folder once per process (on the GPU if there is one); predicts in batches.

    Load-time options come from the model config (``context.model_config``): what training
    logged (task, max length, labels, batch size, generation bound) and what a loader overrides
    for its own process with ``mlflow.pyfunc.load_model(uri, model_config={...})`` (or, for
    ``mlflow models serve``, ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"bf16": "true"}'``):

    * ``bf16``: auto, true or false (None: ``$SPARKTUNE_BF16``, else auto; see ``hf.resolve_bf16``);
    * ``torch_threads``: torch threads (None or 0: ``$SPARKTUNE_TORCH_THREADS``, else torch's default);
    * ``batch_size``: rows per forward pass (None: 32; ``hf.rows_per_pass`` divides it for decoders);
    * ``quantize``: ``int8`` (dynamic int8 Linear layers, CPU only) or None/``none`` (``hf.resolve_quantize``).
    """

    DEADLINE = hf.DEADLINE
    """The context variable the server sets to stop a request's work between batches."""

    def load_context(self, context):
        cfg = dict(context.model_config or {})
        threads = cfg.get("torch_threads") or os.environ.get(THREADS_ENV)
        self.core = hf.load(context.artifacts[HF_ARTIFACT], cfg.get("task"), cfg.get("max_length"),
                            threads=int(threads) if threads else None, bf16=cfg.get("bf16"),
                            quantize=cfg.get("quantize"))
        self.batch_size = int(cfg.get("batch_size") or 32)
        self.max_new_tokens = int(cfg.get("max_new_tokens") or 0)
        self.labels = list(cfg.get("labels") or self.core.labels)

    def predict(self, context, model_input, params=None):
        texts = texts_from_input(model_input)
        task = self.core.task
        wanted = (params or {}).get("max_new_tokens")
        # A causal LM generates by default (its bound is the default); an instruction model only when asked.
        default = self.max_new_tokens if task == hf.CAUSAL_LM else 0
        new_tokens = default if wanted is None else max(0, min(int(wanted), self.max_new_tokens))
        out = hf.predict(self.core, texts, batch_size=self.batch_size, max_new_tokens=new_tokens)
        columns: dict = {}
        if out.probabilities is not None:
            preds = out.prediction
            columns.update(label=[self.labels[p] for p in preds], prediction=preds.astype(np.int64),
                           probabilities=[row.tolist() for row in out.probabilities])
        if task != hf.CLASSIFICATION:
            columns["generated_text"] = out.generated if out.generated is not None else [""] * len(texts)
        if task == hf.CAUSAL_LM:
            counts = out.n_predicted
            loss = np.where(counts > 0, out.loss_sum / np.maximum(counts, 1), np.nan)
            columns.update(loss=loss.astype(np.float64), n_tokens=counts.astype(np.int64))
        return pd.DataFrame(columns)


# Logged as model-from-code: MLflow imports this file under a generated module name and takes
# the model that set_model registers. Importing it as sparktune.model.pyfunc must not do that.
if __name__ not in ("sparktune.model.pyfunc", "__main__"):
    mlflow.models.set_model(SparktuneModel())
