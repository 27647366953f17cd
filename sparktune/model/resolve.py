"""Which model a MODEL_URI names, and getting its files onto this machine (driver or executor).

A MODEL_URI is one of

* an MLflow URI: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``models:/m-<id>``
  (what ``sparktune train`` prints), ``runs:/<run_id>/model``, or any artifact URI MLflow
  can download;
* a local MLflow model folder (one with an ``MLmodel`` file) written by ``export-model``;
* a ``save_pretrained`` folder (``config.json`` + weights + tokenizer).

``resolve_model`` pins an alias to the version it names now (``fetch_uri``), so every executor
scores with the same model even if the alias moves mid-job. ``fetch_model`` is what an
executor runs: it downloads ``fetch_uri`` itself, once per process and URI, into a local cache
(nothing comes from the driver's disk), holding a file lock so the Python workers of one
machine download it once.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field

from sparktune.env import env_value
from sparktune.errors import SparktuneError
from sparktune.tasks import Task

__all__ = ["ModelKind", "ResolvedModel", "fetch_model", "hf_dir_of", "read_mlmodel", "resolve_model"]

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


class ModelKind(str, enum.Enum):
    PYFUNC = "sparktune-pyfunc"
    """sparktune's MLflow pyfunc (what training logs)."""
    HF_FOLDER = "hf-folder"
    """A bare save_pretrained folder."""


@dataclass
class ResolvedModel:
    """A model found and read on the driver; ``source`` is what executors load."""

    uri: str
    local_dir: str
    hf_dir: str
    kind: ModelKind
    task: Task
    labels: list = field(default_factory=list)
    max_length: int | None = None
    run_id: str | None = None
    model_version: str | None = None
    """The registry version (``models:/<name>/<version>``), else the logged model id."""
    registered_name: str | None = None
    fetch_uri: str | None = None
    """What executors download: the model's storage URI (or ``models:/name/N`` on Unity Catalog),
    never an alias; None for a local folder."""

    @property
    def source(self) -> str:
        return self.fetch_uri or self.local_dir

    @property
    def version_label(self) -> str:
        return self.model_version or self.run_id or ""


def read_mlmodel(path: str) -> dict:
    import yaml

    with open(os.path.join(path, "MLmodel"), encoding="utf-8") as handle:
        return yaml.safe_load(handle) or {}


def hf_dir_of(local_dir: str) -> str:
    """The save_pretrained folder inside a local model folder (an MLflow model or the folder itself)."""
    if os.path.isfile(os.path.join(local_dir, "MLmodel")):
        mlmodel = read_mlmodel(local_dir)
        artifacts = ((mlmodel.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
        if "hf_model" not in artifacts or (mlmodel.get("metadata") or {}).get("sparktune_kind") is None:
            raise SparktuneError(
                f"the MLflow model at {local_dir} (flavors {sorted(mlmodel.get('flavors') or {})}) is not a "
                "sparktune model; sparktune scores and serves the pyfunc that `sparktune train` logs "
                "(or a save_pretrained folder)"
            )
        return os.path.join(local_dir, artifacts["hf_model"]["path"])
    if os.path.isfile(os.path.join(local_dir, "config.json")):
        return local_dir
    raise SparktuneError(f"{local_dir} holds neither an MLmodel file nor a config.json; point at the folder "
                         "save_pretrained wrote or at an MLflow model")


def _registry_info(tracker, uri: str) -> tuple[str | None, str | None, str | None, str]:
    """(run_id, version label, registered name, immutable fetch URI) behind an MLflow URI.

    The fetch URI is the model's storage location where that can be known, so a download needs
    the artifact store only: MLflow resolves ``models:/`` URIs of a local registry through the
    process's global registry URI, not an explicit one. Unity Catalog keeps ``models:/name/N``
    (its repository takes the registry URI given)."""
    client = tracker.client
    match = re.match(r"^runs:/([^/]+)/?", uri)
    if match:
        return match.group(1), None, None, uri
    match = re.match(r"^models:/([^/@]+)(?:@([^/]+)|/([^/]+))?/?$", uri)
    if not match:
        return None, None, None, uri
    name, alias, version = match.groups()
    if alias or version:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        if str(tracker.registry_uri or "").startswith("databricks-uc"):
            fetch = f"models:/{name}/{mv.version}"
        else:
            fetch = client.get_model_version_download_uri(name, str(mv.version))
        return mv.run_id, str(mv.version), name, fetch
    logged = client.get_logged_model(name)
    return logged.source_run_id, logged.model_id, None, logged.artifact_location


def _download(uri: str, dst: str, tracker) -> str:
    from mlflow.exceptions import MlflowException

    from sparktune.compat import download_artifacts

    try:
        return download_artifacts(uri, dst, tracker.tracking_uri, tracker.registry_uri or tracker.tracking_uri)
    except MlflowException as exc:
        raise SparktuneError(
            f"model {uri!r} could not be fetched from MLflow (tracking URI {tracker.tracking_uri}): "
            f"{exc.message.splitlines()[0]}; check the URI and --tracking-uri"
        ) from None


def resolve_model(uri: str, tracker=None, download_dir: str | None = None) -> ResolvedModel:
    """Find and read the model behind ``uri`` (downloading an MLflow model to ``download_dir``)."""
    from sparktune.model import hf
    from sparktune.tracking import Tracker

    raw = str(uri or "").strip()
    if not raw:
        raise SparktuneError("--model is empty: give models:/<name>@<alias>, runs:/<run_id>/model or a model folder")
    local = raw.removeprefix("file://")
    run_id = version = name = fetch_uri = None
    if _URI.match(local) and not os.path.exists(local):
        from mlflow.exceptions import MlflowException

        tracker = tracker or Tracker()
        try:
            run_id, version, name, fetch_uri = _registry_info(tracker, raw)
        except MlflowException as exc:
            raise SparktuneError(f"model {raw!r}: {exc.message.splitlines()[0]} (tracking URI "
                                 f"{tracker.tracking_uri}); check the name, alias or version") from None
        path = _download(fetch_uri, download_dir or tempfile.mkdtemp(prefix="sparktune-model-"), tracker)
    else:
        path = os.path.abspath(os.path.expanduser(local))
        if not os.path.isdir(path):
            raise SparktuneError(f"model {raw!r}: no such folder; give a save_pretrained folder, an MLflow model "
                                 "folder, runs:/<run_id>/model or models:/<name>@<alias>")
    hf_dir = hf_dir_of(path)
    config = hf.read_config(hf_dir)
    if os.path.isfile(os.path.join(path, "MLmodel")):
        mlmodel = read_mlmodel(path)
        meta = mlmodel.get("metadata") or {}
        task = Task.parse(meta.get("task") or hf.task_of_config(config), "model task")
        labels = list(meta.get("labels") or [])
        max_length = meta.get("max_length")
        run_id = run_id or mlmodel.get("run_id")
        version = version or mlmodel.get("model_id")
        kind = ModelKind.PYFUNC
    else:
        found = hf.task_of_folder(hf_dir)
        if found is None:
            raise SparktuneError(f"model at {hf_dir}: expected a sequence classifier or a causal LM, found "
                                 f"architectures {config.get('architectures') or 'none'}")
        task, labels, max_length, kind = Task.parse(found), [], None, ModelKind.HF_FOLDER
    if task is Task.CLASSIFICATION and not labels:
        labels = hf.label_names(config)
    if task is Task.INSTRUCTION and not labels:
        spec = hf.read_prompt(hf_dir)
        labels = list(spec.labels) if spec is not None else []
    return ResolvedModel(raw, path, hf_dir, kind, task, labels, int(max_length) if max_length else None,
                         run_id, version, name, fetch_uri)


# Per executor process: source -> local save_pretrained folder.
_FETCHED: dict = {}


def _cache_root() -> str:
    # SPARK_LOCAL_DIRS is the executor's scratch space on a cluster; else the machine's tmp.
    base = (env_value("SPARKTUNE_MODEL_CACHE") or (env_value("SPARK_LOCAL_DIRS") or "").split(",")[0]
            or tempfile.gettempdir())
    return os.path.join(base, "sparktune-models")


def fetch_model(source: str, tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """The local save_pretrained folder of ``source`` on this machine: a local path as is, an
    MLflow URI downloaded once into the cache (by URI; the driver passes immutable URIs)."""
    if source in _FETCHED:
        return _FETCHED[source]
    if not _URI.match(source) or os.path.exists(source):
        path = source.removeprefix("file://")
        if not os.path.isdir(path):
            raise SparktuneError(f"model folder {path} is not visible on this executor; put the model on storage "
                                 "every worker shares, or pass its MLflow URI (models:/...)")
        _FETCHED[source] = hf_dir_of(path)
        return _FETCHED[source]
    import fcntl

    from sparktune.tracking import Tracker

    root = _cache_root()
    os.makedirs(root, exist_ok=True)
    key = hashlib.sha256(f"{tracking_uri}|{source}".encode()).hexdigest()[:24]
    final = os.path.join(root, key)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per machine; other workers wait for it
        if not os.path.isfile(os.path.join(final, ".complete")):
            staging = tempfile.mkdtemp(prefix=key + ".", dir=root)
            path = _download(source, staging, Tracker(tracking_uri, registry_uri=registry_uri))
            with open(os.path.join(path, ".complete"), "w"):
                pass
            import shutil

            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(path, final)
            shutil.rmtree(staging, ignore_errors=True)  # left behind when the model sat in a subfolder
    _FETCHED[source] = hf_dir_of(final)
    return _FETCHED[source]
