"""The one MLflow object every stage receives: ``Tracker``.

A ``Tracker`` carries an explicit tracking URI and experiment and talks to MLflow through an
``MlflowClient`` bound to that URI, so no stage depends on what another left in MLflow's
global state. It is a plain picklable value: the launcher hands it to training ranks, where
only rank 0 uses it.

Where the store is (``resolve_tracking_uri``): the configured URI, else ``$MLFLOW_TRACKING_URI``,
else ``databricks`` on a Databricks cluster, else a local SQLite store at
``$SPARKTUNE_HOME/mlflow.db`` whose experiments keep their artifacts beside the database
(``mlartifacts/``), so a job never writes into the current directory.

Metric names follow one convention, ``<split>/<metric>`` (``metric_key``): ``train/loss`` for
the training loop, ``eval/accuracy`` for the evaluation at the end of training (on the
``data.eval_split`` rows it was given), ``test/accuracy`` for ``sparktune evaluate`` on the
``test`` split. Row counts and table versions are params or tags, never metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sparktune.env import env_value
from sparktune.errors import SparktuneError
from sparktune.redact import REDACTED, is_secret_key, redact

__all__ = [
    "Tracker",
    "resolve_tracking_uri",
    "default_tracking_uri",
    "metric_key",
    "clean_params",
    "MAX_PARAM_VALUE",
    "process_uris",
]

# MLflow rejects longer param values (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH) and keys.
MAX_PARAM_VALUE = 6000
MAX_PARAM_KEY = 250
MAX_TAG_VALUE = 4900
# MLflow's HTTP client retries a failed request 7 times with backoff (minutes against a server
# that is down) and waits 120 s for an answer; sparktune's defaults report an unreachable server
# in seconds. Set these variables to change them.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
PROBE_TIMEOUT_S = 5.0
_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-./ ]")


def default_tracking_uri() -> str:
    from sparktune.spark import sparktune_home

    return "sqlite:///" + os.path.join(sparktune_home(), "mlflow.db")


def resolve_tracking_uri(configured: str | None = "") -> str:
    """config > $MLFLOW_TRACKING_URI > 'databricks' on Databricks > local SQLite store."""
    if configured:
        return configured
    if env_value("MLFLOW_TRACKING_URI"):
        return str(env_value("MLFLOW_TRACKING_URI"))
    if env_value("DATABRICKS_RUNTIME_VERSION"):
        return "databricks"
    return default_tracking_uri()


def _local_artifact_root(tracking_uri: str) -> str | None:
    """A folder beside a local SQLite store's database; None for other stores (they know)."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///"):]
        return os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
    return None


def metric_key(split: str, name: str) -> str:
    """``<split>/<metric>``, with characters MLflow refuses in a key replaced by ``_``."""
    return _METRIC_CHARS.sub("_", f"{split}/{name}")


def _redact_value(key: str, value: Any) -> str:
    text = "" if value is None else str(value)
    if is_secret_key(key) and text:
        return REDACTED
    return redact(text)  # credentials inside values (URL userinfo, SAS tokens, key patterns)


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow accepts them: keys and values cut to its limits, secrets redacted."""
    clean = {}
    for key, value in params.items():
        key = str(key)[:MAX_PARAM_KEY]
        text = _redact_value(key, value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 15] + "...[truncated]"
        clean[key] = text
    return clean


@dataclass
class Tracker:
    """MLflow at an explicit URI: runs, params, metrics, artifacts and the registry.

    ``Tracker(None)`` resolves the URI as ``resolve_tracking_uri`` says; ``registry_uri``
    defaults to Unity Catalog (``databricks-uc``) when tracking to Databricks.
    """

    tracking_uri: str | None = None
    experiment: str = "sparktune"
    registry_uri: str | None = None
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.tracking_uri = resolve_tracking_uri(self.tracking_uri)
        if self.registry_uri is None:
            if env_value("MLFLOW_REGISTRY_URI"):
                self.registry_uri = env_value("MLFLOW_REGISTRY_URI")
            elif self.tracking_uri == "databricks":
                self.registry_uri = "databricks-uc"  # Unity Catalog names: catalog.schema.model

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None  # clients hold connections; ranks build their own
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
            check_reachable(str(self.tracking_uri))

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client

    # Experiments and runs ---------------------------------------------------------------
    def experiment_id(self, name: str | None = None) -> str:
        """The id of experiment ``name`` (default: this tracker's), created when missing."""
        name = name or self.experiment
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        root = _local_artifact_root(str(self.tracking_uri))
        location = None
        if root is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "experiment"
            location = "file://" + os.path.join(root, safe)
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            # Another process created it between the lookup and the create.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, run_name: str = "", tags: Mapping[str, str] | None = None,
                  experiment: str | None = None) -> str:
        """Create a run (status RUNNING) and return its id."""
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name or None,
                                     tags={k: self._tag(k, v) for k, v in (tags or {}).items()})
        return run.info.run_id

    def end_run(self, run_id: str, ok: bool = True) -> None:
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")

    def run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    @contextlib.contextmanager
    def active(self, run_id: str) -> Iterator[None]:
        """Make ``run_id`` MLflow's active run in this process, for fluent-only APIs.

        ``mlflow.<flavor>.log_model`` and transformers' MLflow integration log to the active
        run; everything else goes through the client. The process's tracking and registry URIs
        (MLflow's module state and the variables it mirrors them into) are restored afterwards.
        """
        import mlflow

        current = mlflow.active_run()
        if current is not None and current.info.run_id == run_id:
            yield  # already active here (training keeps its run active for transformers' callback)
            return
        with process_uris(str(self.tracking_uri), self.registry_uri), mlflow.start_run(run_id=run_id):
            yield

    # Logging ----------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params with values cut to MLflow's limit and secrets redacted (by key and inside values)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in clean_params(params).items()]
        for start in range(0, len(items), 100):  # one request takes at most 100 params
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0, *, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """Finite numeric metrics (NaN and inf are dropped: MLflow stores them, comparisons break).

        ``model_id``: the LoggedModel (``m-...``) they describe: MLflow 3 lists them on the model
        too. ``dataset``: (name, digest) of the run's dataset input they were computed on."""
        self.log_metric_steps(run_id, [(step, metrics)], model_id=model_id, dataset=dataset)

    def log_metric_steps(self, run_id: str, rows: Iterable[tuple[int, Mapping[str, float]]], *,
                         model_id: str | None = None, dataset: tuple[str, str] | None = None) -> None:
        """Metric histories, ``rows`` of ``(step, {name: value})``, in as few requests as MLflow takes."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        linked = {"model_id": model_id, "dataset_name": name, "dataset_digest": digest} if model_id or dataset else {}
        items = [Metric(_METRIC_CHARS.sub("_", k), float(v), now, int(step), **linked) for step, metrics in rows
                 for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, self._tag(k, v)) for k, v in tags.items()]
        if items:
            self.client.log_batch(run_id, tags=items)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    @staticmethod
    def _tag(key: str, value: Any) -> str:
        text = _redact_value(key, value)
        return text if len(text) <= MAX_TAG_VALUE else text[: MAX_TAG_VALUE - 14] + "...[truncated]"


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise a SparktuneError, in seconds, when an ``http(s)://`` tracking server cannot be reached.

    Any HTTP answer counts as reachable (MLflow then reports its own errors); only a refused,
    unresolvable or silent address is this error. The message carries the URI with its
    credentials removed. Other stores (sqlite, file, databricks) are not probed.
    """
    from urllib.parse import urlsplit

    if not uri.lower().startswith(("http://", "https://")):
        return
    import requests

    parts = urlsplit(uri)
    bare = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")
                          if parts.hostname else parts.netloc).geturl()
    try:
        requests.get(bare.rstrip("/") + "/health", timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        kind = ("timed out" if isinstance(exc, requests.Timeout)
                else "refused the connection or could not be resolved" if isinstance(exc, requests.ConnectionError)
                else type(exc).__name__)
        raise SparktuneError(
            f"the MLflow tracking server {redact(uri)} is unreachable ({kind} within {timeout:g} s); nothing was "
            "logged or registered. Check --tracking-uri / MLFLOW_TRACKING_URI and that the server is running"
        ) from None


@contextlib.contextmanager
def process_uris(tracking_uri: str | None, registry_uri: str | None):
    """MLflow's process-wide tracking and registry URIs set for a block (a falsy one is left as it
    is), then put back exactly as they were: MLflow's module state and the environment variables
    it mirrors them into.

    Needed where MLflow reads only those: fluent APIs (``Tracker.active``), a registry store
    resolving a ``models:/m-...`` source (``registry``), downloads before MLflow 3.5 (``compat``)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = (tracking._tracking_uri, registry._registry_uri, [os.environ.get(name) for name in names])
    try:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if registry_uri:
            mlflow.set_registry_uri(registry_uri)
        yield
    finally:
        tracking._tracking_uri, registry._registry_uri = saved[0], saved[1]
        for name, value in zip(names, saved[2]):
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
