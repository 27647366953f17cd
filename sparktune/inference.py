"""Model resolution and batch inference: in Spark (a pandas UDF) and in one process (a baseline).

A MODEL_URI is one of

* a local folder written by ``save_pretrained`` (``config.json`` + weights + tokenizer),
* a local MLflow model folder (one with an ``MLmodel`` file),
* an MLflow URI: ``runs:/<run_id>/<name>``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
  ``models:/m-<id>`` (what ``sparktune train`` prints), or any artifact URI MLflow can download.

MLflow models may be the transformers flavor or sparktune's pyfunc (``sparktune.pyfunc_model``);
both hold the same ``save_pretrained`` folder, which is what inference loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile

from sparktune.errors import SparktuneError

__all__ = [
    "ResolvedModel",
    "resolve_model",
    "predict_spark",
    "predict_local",
    "CLASSIFICATION",
    "CAUSAL_LM",
]

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"

# One loaded model per (path, task) per Python worker: Spark reuses its Python workers across
# tasks (spark.python.worker.reuse), so the model is read from disk once per executor process.
_MODEL_CACHE: dict = {}
_TOKENIZER_CACHE: dict = {}


@dataclasses.dataclass
class ResolvedModel:
    uri: str
    model_dir: str
    tokenizer_dir: str
    task: str
    labels: list
    flavor: str  # "hf" (a bare folder), "sparktune-pyfunc" or "transformers"
    run_id: str | None = None
    model_version: str | None = None  # registry version, else the logged model id
    registered_name: str | None = None
    mlflow_dir: str | None = None

    @property
    def pad_id(self) -> int:
        tok = _load_tokenizer(self.tokenizer_dir)
        for candidate in (tok.pad_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0


def _task_of(model_dir: str) -> tuple[str, list]:
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        id2label = config.get("id2label") or {}
        n = len(id2label) or int(config.get("num_labels", 2))
        return CLASSIFICATION, [str(id2label.get(str(i), i)) for i in range(n)]
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return CAUSAL_LM, []
    raise SparktuneError(
        f"model at {model_dir}: expected a sequence classifier or a causal LM, found architectures {archs or 'none'}; "
        "evaluate a model written by `sparktune train`"
    )


def _from_mlflow_dir(path: str) -> tuple[str, str, str]:
    """(model_dir, tokenizer_dir, flavor) inside a local MLflow model folder."""
    import yaml

    with open(os.path.join(path, "MLmodel"), encoding="utf-8") as handle:
        mlmodel = yaml.safe_load(handle) or {}
    flavors = mlmodel.get("flavors") or {}
    artifacts = (flavors.get("python_function") or {}).get("artifacts") or {}
    if "hf_model" in artifacts:
        hf_dir = os.path.join(path, artifacts["hf_model"]["path"])
        return hf_dir, hf_dir, "sparktune-pyfunc"
    if "transformers" in flavors:
        conf = flavors["transformers"]
        model_dir = os.path.join(path, conf.get("model_binary") or "model")
        tok_dir = os.path.join(path, "components", "tokenizer")
        if not os.path.isdir(model_dir):
            raise SparktuneError(
                f"the transformers-flavor model at {path} has no weights (it was logged with "
                "save_pretrained=False, a reference to a hub model); log it with its weights"
            )
        return model_dir, tok_dir if os.path.isdir(tok_dir) else model_dir, "transformers"
    raise SparktuneError(
        f"the MLflow model at {path} has flavors {sorted(flavors)}; sparktune evaluates and serves models "
        "logged by `sparktune train` (transformers flavor or the sparktune pyfunc)"
    )


def _registry_info(uri: str):
    """(run_id, model_version, registered_name) that an MLflow URI points at, as far as known."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    match = re.match(r"^runs:/([^/]+)/?", uri)
    if match:
        return match.group(1), None, None
    match = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/([^/]+))?/?$", uri)
    if not match:
        return None, None, None
    name, alias, version = match.groups()
    if alias:
        mv = client.get_model_version_by_alias(name, alias)
        return mv.run_id, str(mv.version), name
    if version:
        mv = client.get_model_version(name, version)
        return mv.run_id, str(mv.version), name
    logged = client.get_logged_model(name)
    return logged.source_run_id, logged.model_id, None


def resolve_model(uri: str, download_dir: str | None = None) -> ResolvedModel:
    """Find the save_pretrained folder behind ``uri`` (downloading MLflow artifacts if needed)."""
    raw = str(uri or "").strip()
    if not raw:
        raise SparktuneError("--model is empty: give a model folder, runs:/<run_id>/model or models:/<name>@<alias>")
    local = raw[len("file://"):] if raw.startswith("file://") else raw
    is_uri = bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/", local)) and not os.path.exists(local)
    run_id = version = name = None
    if not is_uri:
        path = os.path.abspath(os.path.expanduser(local))
        if not os.path.isdir(path):
            raise SparktuneError(
                f"model {raw!r}: no such folder; give a save_pretrained folder, an MLflow model folder, "
                "runs:/<run_id>/model or models:/<name>@<alias>"
            )
    else:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            run_id, version, name = _registry_info(raw)
            dst = download_dir or tempfile.mkdtemp(prefix="sparktune-model-")
            path = mlflow.artifacts.download_artifacts(artifact_uri=raw, dst_path=dst)
        except MlflowException as exc:
            raise SparktuneError(
                f"model {raw!r} could not be fetched from MLflow (tracking URI {mlflow.get_tracking_uri()}): "
                f"{exc.message.splitlines()[0]}; check the URI and MLFLOW_TRACKING_URI"
            ) from None
    mlflow_dir = None
    if os.path.isfile(os.path.join(path, "MLmodel")):
        mlflow_dir = path
        model_dir, tok_dir, flavor = _from_mlflow_dir(path)
        if run_id is None:
            import yaml

            with open(os.path.join(path, "MLmodel"), encoding="utf-8") as handle:
                run_id = (yaml.safe_load(handle) or {}).get("run_id")
    elif os.path.isfile(os.path.join(path, "config.json")):
        model_dir, tok_dir, flavor = path, path, "hf"
    else:
        raise SparktuneError(
            f"model {raw!r}: {path} holds neither an MLmodel file nor a config.json; "
            "point at the folder save_pretrained wrote or at an MLflow model"
        )
    task, labels = _task_of(model_dir)
    return ResolvedModel(raw, model_dir, tok_dir, task, labels, flavor, run_id, version, name, mlflow_dir)


def _load_tokenizer(path: str):
    if path not in _TOKENIZER_CACHE:
        from transformers import AutoTokenizer

        _TOKENIZER_CACHE[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZER_CACHE[path]


def _load_model(path: str, task: str, threads: int | None = None):
    key = (path, task)
    if key not in _MODEL_CACHE:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        if task == CLASSIFICATION:
            from transformers import AutoModelForSequenceClassification as Auto
        else:
            from transformers import AutoModelForCausalLM as Auto
        _MODEL_CACHE[key] = Auto.from_pretrained(path).eval()
    return _MODEL_CACHE[key]


def causal_lm_token_losses(model, token_lists, pad_id: int, batch_size: int = 16):
    """Per row: (sum of next-token cross-entropy, number of predicted tokens)."""
    import numpy as np
    import torch

    n = len(token_lists)
    loss_sum = np.zeros(n, dtype=np.float64)
    counts = np.zeros(n, dtype=np.int64)
    order = sorted(range(n), key=lambda i: len(token_lists[i]))
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = [i for i in order[start:start + batch_size] if len(token_lists[i]) > 1]
            if not idx:
                continue
            width = max(len(token_lists[i]) for i in idx)
            ids = torch.full((len(idx), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = list(token_lists[i])
                ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(idx), width - 1)
            target_mask = mask[:, 1:].float()
            loss_sum[idx] = (nll * target_mask).sum(dim=1).double().numpy()
            counts[idx] = target_mask.sum(dim=1).long().numpy()
    return loss_sum, counts


def _tokens_from(values, from_text: bool, tokenizer_dir: str, max_length: int):
    if from_text:
        tok = _load_tokenizer(tokenizer_dir)
        return tok([str(v) for v in values], truncation=True, max_length=max_length)["input_ids"]
    return [list(v) if v is not None else [] for v in values]


def _max_length(resolved: ResolvedModel) -> int:
    tok = _load_tokenizer(resolved.tokenizer_dir)
    with open(os.path.join(resolved.model_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 512
    limit = tok.model_max_length if tok.model_max_length and tok.model_max_length < 1e6 else positions
    return int(min(limit, positions))


def _input_column(df) -> tuple[str, bool]:
    if "input_ids" in df.columns:
        return "input_ids", False
    if "text" in df.columns:
        return "text", True
    raise SparktuneError(
        f"the table has columns {df.columns}; expected `input_ids` (a tokenized table from "
        "`sparktune tokenize`) or `text` (raw reviews)"
    )


def predict_spark(df, resolved: ResolvedModel, batch_size: int = 32, threads: int | None = None):
    """Add a struct column ``_out`` with the model's output to ``df``, computed by a pandas UDF.

    Classification: ``_out.prediction`` (int), ``_out.probabilities`` (array<double>).
    Causal LM: ``_out.loss_sum`` (double), ``_out.n_predicted`` (long).
    """
    import pandas as pd
    from pyspark.sql import functions as F

    from sparktune.pyfunc_model import classify_token_batches

    column, from_text = _input_column(df)
    spark = df.sparkSession
    parallelism = spark.sparkContext.defaultParallelism
    if threads is None and spark.sparkContext.master.startswith("local"):
        # local[k] runs k tasks at once on this machine: split the cores between them rather
        # than letting each torch use all of them and thrash.
        threads = max(1, (os.cpu_count() or 1) // max(1, parallelism))
    if df.rdd.getNumPartitions() < parallelism:
        df = df.repartition(parallelism)
    model_dir, tok_dir, task = resolved.model_dir, resolved.tokenizer_dir, resolved.task
    pad_id, max_length = resolved.pad_id, _max_length(resolved)

    if task == CLASSIFICATION:
        schema = "prediction int, probabilities array<double>"

        def run(batches):
            model = _load_model(model_dir, task, threads)
            for values in batches:
                seqs = _tokens_from(values.tolist(), from_text, tok_dir, max_length)
                probs = classify_token_batches(model, seqs, pad_id, batch_size)
                yield pd.DataFrame({"prediction": probs.argmax(axis=1).astype("int32"), "probabilities": list(probs)})
    else:
        schema = "loss_sum double, n_predicted long"

        def run(batches):
            model = _load_model(model_dir, task, threads)
            for values in batches:
                seqs = _tokens_from(values.tolist(), from_text, tok_dir, max_length)
                loss_sum, counts = causal_lm_token_losses(model, seqs, pad_id, max(1, batch_size // 2))
                yield pd.DataFrame({"loss_sum": loss_sum, "n_predicted": counts})

    from typing import Iterator

    run.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.DataFrame]}
    udf = F.pandas_udf(run, schema)
    return df.withColumn("_out", udf(F.col(column)))


def predict_local(values, resolved: ResolvedModel, batch_size: int = 32, from_text: bool = False):
    """The same inference in this process, no Spark: the baseline bench_batch_inference compares to."""
    from sparktune.pyfunc_model import classify_token_batches

    model = _load_model(resolved.model_dir, resolved.task)
    seqs = _tokens_from(values, from_text, resolved.tokenizer_dir, _max_length(resolved))
    if resolved.task == CLASSIFICATION:
        return classify_token_batches(model, seqs, resolved.pad_id, batch_size)
    return causal_lm_token_losses(model, seqs, resolved.pad_id, max(1, batch_size // 2))
