"""Databricks: is this a Databricks cluster, where do shared files go, and how do secrets travel.

Everything here reads the environment (``DATABRICKS_RUNTIME_VERSION``, ``DATABRICKS_HOST``, ...)
or Databricks' own objects (``dbutils``, MLflow's Databricks credentials) when they exist, so the
same calls run on a laptop (environment variables) and on a cluster (secret scopes, the job's
context). Importing this module imports neither pyspark nor torch nor mlflow: a bare
``pip install sparktune`` on any machine can import it.

Secrets are returned to the caller and never logged, printed, written to files or to MLflow:
the mapping that carries them to training ranks (``SecretEnv``) hides its values in ``repr``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from sparktune.env import NOTEBOOK_PREFIX, env_value
from sparktune.errors import ConfigError, SparktuneError
from sparktune.redact import REDACTED, is_secret_key

__all__ = [
    "TASK_VALUE_KEYS",
    "SecretEnv",
    "check_tracking_uri_for_ranks",
    "default_output_root",
    "default_volume_path",
    "get_dbutils",
    "get_secret",
    "hub_token_env",
    "is_databricks_tracking_uri",
    "is_shared_path",
    "notebook_dbutils",
    "notebook_param",
    "on_databricks",
    "publish_task_values",
    "rank_env_for_mlflow",
    "require_shared_path",
    "runtime_version",
    "task_values",
    "volume_from_env",
]

log = logging.getLogger("sparktune.databricks")

RUNTIME_ENV = "DATABRICKS_RUNTIME_VERSION"
HOST_ENV = "DATABRICKS_HOST"
TOKEN_ENV = "DATABRICKS_TOKEN"
VOLUME_ENV = "SPARKTUNE_VOLUME"
# Where the Hugging Face token lives in a Databricks secret scope (`databricks secrets put-secret sparktune hf-token`).
HUB_TOKEN_SCOPE, HUB_TOKEN_KEY = "sparktune", "hf-token"
"""``catalog.schema.volume``: the Unity Catalog Volume sparktune writes outputs under on Databricks."""

# Unity Catalog identifiers inside a /Volumes path: one path segment each, no dots (the dot
# separates catalog.schema.volume in SQL), no spaces or control characters.
_UC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
# Storage every node of a cluster reads the same way: UC Volumes and DBFS through the FUSE mount,
# and object stores by URI.
_SHARED_PREFIXES = ("/Volumes/", "/dbfs/")
_SHARED_SCHEMES = ("dbfs", "s3", "s3a", "s3n", "abfs", "abfss", "wasb", "wasbs", "gs", "hdfs")
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")

TASK_VALUE_KEYS = ("run_id", "model_uri")
"""Values the train task publishes for later tasks of a Databricks job (``{{tasks.train.values.KEY}}``)."""


def runtime_version(environ: Mapping[str, str] | None = None) -> str:
    """The Databricks Runtime version (e.g. ``17.3``), or "" off Databricks."""
    env = os.environ if environ is None else environ
    return env.get(RUNTIME_ENV, "")


def on_databricks(environ: Mapping[str, str] | None = None) -> bool:
    """True on a Databricks cluster (driver or worker): the runtime sets ``DATABRICKS_RUNTIME_VERSION``."""
    return bool(runtime_version(environ))


def notebook_dbutils() -> Any | None:
    """The ``dbutils`` of a Databricks notebook (the IPython user namespace holds it), or None in a
    Python script task, spark-submit or anywhere else: there ``pyspark.dbutils`` may still build a
    ``DBUtils``, but its notebook-only parts (``jobs.taskValues``, ``widgets``) are not promised."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return shell.user_ns.get("dbutils") if shell is not None else None


def get_dbutils() -> Any | None:
    """Databricks' ``dbutils``: the notebook's (IPython user namespace), else one built for the
    active SparkSession (``pyspark.dbutils``, which exists only on Databricks); None elsewhere."""
    dbutils = notebook_dbutils()
    if dbutils is not None:
        return dbutils
    try:
        from pyspark.dbutils import DBUtils
        from pyspark.sql import SparkSession
    except ImportError:
        return None
    spark = SparkSession.getActiveSession()
    return DBUtils(spark) if spark is not None else None


def get_secret(scope: str, key: str, env_var: str, *, environ: Mapping[str, str] | None = None,
               required: bool = True) -> str | None:
    """A secret: from Databricks secret scope ``scope``/``key`` on Databricks, else ``$env_var``.

    On Databricks a missing scope or key falls back to ``$env_var`` (e.g. set by a cluster's
    ``spark_env_vars`` from ``{{secrets/scope/key}}``). Raises ConfigError saying both places
    when neither has it and ``required``; returns None then otherwise. The value is never logged.
    """
    env = os.environ if environ is None else environ
    tried = []
    if on_databricks(env):
        dbutils = get_dbutils()
        if dbutils is None:
            tried.append(f"Databricks secret scope {scope!r} key {key!r} (dbutils is not available here)")
        else:
            try:
                value = dbutils.secrets.get(scope=scope, key=key)
            except Exception as exc:  # noqa: BLE001 (dbutils raises py4j/IllegalArgument errors)
                tried.append(f"Databricks secret scope {scope!r} key {key!r} ({type(exc).__name__})")
            else:
                log.debug("secret %s/%s read from the Databricks secret scope", scope, key)
                return value
    value = env.get(env_var)
    if value:
        log.debug("secret %s/%s read from $%s", scope, key, env_var)
        return value
    tried.append(f"environment variable ${env_var} (unset)")
    if not required:
        return None
    raise ConfigError([
        f"{env_var}: secret not found; looked in " + ", then ".join(tried) + ". "
        f"Set ${env_var}, or on Databricks run `databricks secrets put-secret {scope} {key}`"
    ])


def hub_token_env(environ: Mapping[str, str] | None = None) -> SecretEnv:
    """``HF_TOKEN`` for processes that load gated or private hub models: from the secret scope
    ``sparktune``/``hf-token`` on Databricks, else the environment; empty when neither has one.
    Handed to training ranks in memory, like the MLflow credentials."""
    token = get_secret(HUB_TOKEN_SCOPE, HUB_TOKEN_KEY, "HF_TOKEN", environ=environ, required=False)
    return SecretEnv({"HF_TOKEN": token} if token else {})


class SecretEnv(dict):
    """Environment variables for another process; values of credential keys never show in repr/str,
    so logging the mapping (or a dataclass holding it) cannot leak them."""

    def __repr__(self) -> str:
        shown = {k: (REDACTED if is_secret_key(k) else v) for k, v in self.items()}
        return f"SecretEnv({shown!r})"

    __str__ = __repr__


def is_databricks_tracking_uri(uri: str) -> bool:
    """``databricks``, ``databricks://PROFILE`` or ``databricks-uc``: the workspace's MLflow."""
    return uri == "databricks" or uri.startswith(("databricks://", "databricks-uc"))


def _databricks_creds() -> tuple[str, str]:
    """Host and token of the notebook or job context, through MLflow's Databricks helper."""
    try:
        from mlflow.utils.databricks_utils import get_databricks_host_creds
    except ImportError:
        return "", ""
    try:
        creds = get_databricks_host_creds("databricks")
    except Exception:  # noqa: BLE001 (MlflowException, SDK ValueError: no context, no credentials)
        return "", ""
    return str(creds.host or ""), str(creds.token or "")


def rank_env_for_mlflow(tracking_uri: str | None = None, *,
                        environ: Mapping[str, str] | None = None) -> SecretEnv:
    """The environment a training rank needs to log to ``tracking_uri``'s MLflow.

    TorchDistributor does not pass the driver's environment to ranks on executors, and the
    notebook/job context that gives the driver its Databricks credentials does not exist
    there. For a Databricks tracking URI this returns ``MLFLOW_TRACKING_URI=databricks``,
    ``DATABRICKS_HOST`` and ``DATABRICKS_TOKEN`` (from the environment, else from the job's
    context through MLflow); for any other URI only ``MLFLOW_TRACKING_URI``. Empty when no
    URI is given or set. Pass it to the ranks in memory (never into params, logs or files).
    """
    env = os.environ if environ is None else environ
    uri = tracking_uri or env.get("MLFLOW_TRACKING_URI", "") or ("databricks" if on_databricks(env) else "")
    if not uri:
        return SecretEnv()
    if not is_databricks_tracking_uri(uri):
        return SecretEnv(MLFLOW_TRACKING_URI=uri)
    host, token = env.get(HOST_ENV, ""), env.get(TOKEN_ENV, "")
    if not (host and token) and on_databricks(env):
        ctx_host, ctx_token = _databricks_creds()
        host, token = host or ctx_host, token or ctx_token
    if not (host and token):
        missing = [name for name, value in ((HOST_ENV, host), (TOKEN_ENV, token)) if not value]
        raise SparktuneError(
            f"mlflow.tracking_uri: {uri!r} needs {' and '.join(missing)} for the training ranks, found none "
            "in the environment or the Databricks job context; run as a Databricks job/notebook, or set "
            f"${HOST_ENV} and ${TOKEN_ENV} (a token from a secret scope), or track to another URI"
        )
    # A profile name (databricks://PROFILE) means a ~/.databrickscfg the ranks do not have.
    rank_uri = "databricks-uc" if uri.startswith("databricks-uc") else "databricks"
    return SecretEnv(MLFLOW_TRACKING_URI=rank_uri, DATABRICKS_HOST=host.rstrip("/"), DATABRICKS_TOKEN=token)


def check_tracking_uri_for_ranks(tracking_uri: str, *, local_mode: bool, key: str = "mlflow.tracking_uri") -> None:
    """Refuse a tracking store ranks on other machines cannot reach (executor mode + a local file)."""
    match = re.match(r"^(sqlite|file):/*(.*)$", tracking_uri)
    if local_mode or not match:
        return
    path = "/" + match.group(2) if tracking_uri.startswith(("sqlite:////", "file:///")) else match.group(2)
    if not is_shared_path(path, local_mode=False):
        raise ConfigError([(
            f"{key}: {tracking_uri!r} is a file on the driver; training ranks on executors cannot log to it. "
            "Use the workspace's MLflow ('databricks') or a tracking server (http://...), "
            "or run with distributor.local_mode=true"
        )])


def _check_uc_name(value: str, what: str) -> str:
    if not _UC_NAME.match(value or ""):
        raise ConfigError([(
            f"{what}: expected a Unity Catalog name (letters, digits, '_' or '-'; no '.', '/' or spaces), "
            f"found {value!r}"
        )])
    return value


def default_volume_path(catalog: str, schema: str, volume: str, *parts: str) -> str:
    """``/Volumes/<catalog>/<schema>/<volume>/<parts...>``: a Unity Catalog Volume path every node reads.

    Each of catalog, schema and volume must be one Unity Catalog name; ``parts`` are joined
    below it ("a/b" splits into two segments; empty segments are skipped, ".." is refused).
    """
    segments = [_check_uc_name(catalog, "catalog"), _check_uc_name(schema, "schema"), _check_uc_name(volume, "volume")]
    for part in parts:
        for segment in str(part).split("/"):
            if segment in ("", "."):
                continue
            if segment == "..":
                raise ConfigError([f"volume path: '..' is not allowed in {part!r}; give a path inside the volume"])
            segments.append(segment)
    return "/Volumes/" + "/".join(segments)


def volume_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, str, str] | None:
    """``$SPARKTUNE_VOLUME`` (``catalog.schema.volume``) as three names, or None when unset."""
    env = os.environ if environ is None else environ
    value = (env_value(VOLUME_ENV, env) or "").strip()
    if not value:
        return None
    names = value.split(".")
    if len(names) != 3:
        raise ConfigError([f"{VOLUME_ENV}: expected catalog.schema.volume, found {value!r}"])
    return (_check_uc_name(names[0], f"{VOLUME_ENV} catalog"), _check_uc_name(names[1], f"{VOLUME_ENV} schema"),
            _check_uc_name(names[2], f"{VOLUME_ENV} volume"))


def default_output_root(environ: Mapping[str, str] | None = None) -> str | None:
    """Where outputs and checkpoints go by default: on Databricks with ``$SPARKTUNE_VOLUME`` set,
    ``/Volumes/<catalog>/<schema>/<volume>/sparktune``; None elsewhere (keep the configured path)."""
    env = os.environ if environ is None else environ
    volume = volume_from_env(env)
    if volume is None or not on_databricks(env):
        return None
    return default_volume_path(*volume, "sparktune")


def is_shared_path(path: str, *, local_mode: bool) -> bool:
    """Whether every training rank (and executor) sees ``path`` as the driver does.

    Shared: UC Volumes (``/Volumes/...``), DBFS (``/dbfs/...``, ``dbfs:/...``) and object stores
    (``s3://``, ``abfss://``, ``gs://``, ...). A local path (relative, absolute or ``file:``) is
    shared only in local mode, where every rank runs on the driver's machine.
    """
    path = str(path or "").strip()
    if not path:
        return False
    if path.startswith(_SHARED_PREFIXES):
        return True
    match = _URI.match(path)
    if match and len(match.group(1)) > 1:  # not a Windows drive letter
        scheme = match.group(1).lower()
        if scheme in _SHARED_SCHEMES:
            return True
        if scheme != "file":
            return False  # an unknown scheme: do not promise it is shared
    return local_mode


def require_shared_path(path: str, key: str, *, local_mode: bool) -> str:
    """``path`` if ranks can share it, else a ConfigError naming ``key`` (checked before launching)."""
    if not is_shared_path(path, local_mode=local_mode):
        example = default_output_root() or "/Volumes/<catalog>/<schema>/<volume>/sparktune"
        raise ConfigError([(
            f"{key}: {path!r} is local to the driver, but training ranks run on executors "
            f"(distributor.local_mode=false) and cannot read or write it; use shared storage such as "
            f"{example}/..., /dbfs/..., s3://..., abfss://... or gs://..."
        )])
    return path


def task_values(values: Mapping[str, Any], *, keys: tuple[str, ...] | None = None) -> dict[str, str]:
    """The fields of a result a job task can publish: plain scalars (as strings), ``keys`` only
    when given, never a credential-like key."""
    return {
        k: str(v) for k, v in values.items()
        if (keys is None or k in keys) and isinstance(v, (str, int, float, bool)) and not is_secret_key(k)
    }


def publish_task_values(values: Mapping[str, Any], *, keys: tuple[str, ...] | None = None,
                        environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Publish a stage's result fields as Databricks job task values, for later tasks'
    ``{{tasks.<task>.values.<key>}}`` references.

    Only plain scalar values are published (``keys`` picks which; default all), and never a
    credential-like key. Databricks documents ``dbutils.jobs.taskValues.set`` for Python notebooks
    only, so values are published only from a notebook (a job's notebook task); in a Python script
    task, off Databricks or without ``dbutils`` nothing is published. Called after a stage's work
    is done, it never raises: a refused ``set`` is logged as a warning and the values published
    until then are returned (the values a job would see).
    """
    env = os.environ if environ is None else environ
    chosen = task_values(values, keys=keys)
    if not chosen or not on_databricks(env):
        return {}
    dbutils = notebook_dbutils()
    if dbutils is None:
        log.info("not a notebook (dbutils.jobs.taskValues is notebook-only): task values %s not published",
                 sorted(chosen))
        return {}
    published: dict[str, str] = {}
    for key, value in chosen.items():
        try:
            dbutils.jobs.taskValues.set(key=key, value=value)
        except Exception as exc:  # noqa: BLE001 (py4j and dbutils errors; the stage's work is already done)
            log.warning("task value %r not published (%s: %s); later tasks that read "
                        "{{tasks.<this task>.values.%s}} will fail", key, type(exc).__name__, exc, key)
            continue
        published[key] = value
    return published


def notebook_param(name: str, default: str, *, environ: Mapping[str, str] | None = None) -> str:
    """A notebook parameter: a text widget on Databricks (created with ``default``; job runs set it
    with ``base_parameters``), else ``$SPARKTUNE_NB_<NAME>``, else ``default``."""
    env = os.environ if environ is None else environ
    dbutils = get_dbutils() if on_databricks(env) else None
    if dbutils is not None:
        dbutils.widgets.text(name, default)
        return str(dbutils.widgets.get(name))
    return env_value(NOTEBOOK_PREFIX + re.sub(r"\W", "_", name).upper(), env) or default
