"""Every environment variable sparktune reads: one declaration each, one reader.

``VARIABLES`` declares each variable once: its name, its default, what it does and where it
takes effect. The table in ``docs/environment.md`` is rendered from it (``python -m
sparktune.env``) and a test keeps the two equal, so a variable cannot be added without a row.

Reading: ``env_value`` / ``env_int`` / ``env_flag`` take a declared name (an undeclared one is
a ``KeyError``: a bug, caught by the tests) and read the environment *at the call*, not once at
import: a value can legitimately differ between calls (a test's ``monkeypatch``, a training rank
whose launcher set its variables after sparktune was imported). An empty value counts as unset.

Two kinds of variables:

* ``SPARKTUNE_*``: sparktune's own settings. Library code reads them only through this module,
  except the model artifact's files (``model/pyfunc.py``, ``model/hf.py``), which run in model
  servers without sparktune installed and read their two variables themselves.
* other tools' conventions (MLflow, Databricks, Spark, torchrun, Azure, Hugging Face): declared
  here so the table lists everything sparktune looks at, with the module that reads it. The
  modules that read them take an injectable ``environ`` mapping (their tests pass plain dicts)
  and the variables mean what their owners document, so they are read where they are used.

``forwarded_env`` is what a training rank gets from the driver's environment: the variables
declared ``forwarded`` plus the names listed in ``$SPARKTUNE_FORWARD_ENV`` (a plugin's own
settings), never the environment wholesale (it may hold credentials).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from sparktune.errors import ConfigError

__all__ = [
    "NOTEBOOK_PREFIX",
    "VARIABLES",
    "Variable",
    "declared",
    "env_flag",
    "env_int",
    "env_value",
    "forwarded_env",
    "render_table",
    "sparktune_home",
]

NOTEBOOK_PREFIX = "SPARKTUNE_NB_"
"""``SPARKTUNE_NB_<NAME>``: a notebook parameter when run outside Databricks (one variable per widget)."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str | None
    """The value used when unset or empty (None: no value; ``shown`` says what happens then)."""
    meaning: str
    where: str
    """The module (or process) that reads it."""
    owner: str = "sparktune"
    """Whose convention it is: sparktune, or the tool that defines it."""
    forwarded: bool = False
    """The driver hands it to training ranks (``forwarded_env``)."""
    shown: str = ""
    """The default as the table shows it, when ``default`` alone would mislead."""


_S = "sparktune"
VARIABLES: tuple[Variable, ...] = (
    # sparktune's own settings ----------------------------------------------------------
    Variable("SPARKTUNE_HOME", ".sparktune", "Local state: the Derby metastore, the Spark warehouse, "
             "the default MLflow store (`mlflow.db`), log4j settings.", "spark.py", forwarded=True),
    Variable("SPARKTUNE_SPARK_MASTER", "local[*]", "Master of a session sparktune starts itself "
             "(`--master` wins; ignored under spark-submit, Connect or an active session).", "spark.py"),
    Variable("SPARKTUNE_DRIVER_MEMORY", "4g", "`spark.driver.memory` of a session sparktune starts.", "spark.py"),
    Variable("SPARKTUNE_SHUFFLE_PARTITIONS", "8", "`spark.sql.shuffle.partitions` of a session sparktune "
             "starts or is handed by spark-submit.", "spark.py"),
    Variable("SPARKTUNE_SPARK_LOG_LEVEL", None, "Spark's log level.", "spark.py",
             shown="ERROR (WARN under spark-submit)"),
    Variable("SPARKTUNE_IVY_DIR", None, "Ivy cache for Delta's jars (`spark.jars.ivy`).", "spark.py",
             shown="`~/.ivy2`"),
    Variable("SPARKTUNE_IVY_SETTINGS", None, "Ivy settings file used to resolve Delta's jars the first time.",
             "spark.py", shown="`sparktune/ivysettings.xml`"),
    Variable("SPARKTUNE_SPARK_GC", "parallel", "Garbage collector of the driver JVM (and a local cluster's "
             "executors) of a session sparktune starts: `parallel` (throughput: the stages are batch work), `g1`, "
             "or `none` (the JVM's own choice). Not added when `spark.driver.extraJavaOptions` is given or a "
             "Java options variable already picks a collector.", "spark.py"),
    Variable("SPARKTUNE_VERBOSE", None, "`1`: errors keep their traceback and Java stack (as `--verbose`).",
             "cli.py", shown="off"),
    Variable("SPARKTUNE_MODEL_CACHE", None, "Where executors and servers keep models downloaded from MLflow.",
             "model/resolve.py", shown="$SPARK_LOCAL_DIRS, else the temp folder"),
    Variable("SPARKTUNE_SHARD_CACHE", None, "Where a training rank keeps its staged shard files.",
             "train/data.py", shown="`<tmp>/sparktune-shards`"),
    Variable("SPARKTUNE_TRAIN_CALLBACKS", None, "Extra Trainer callbacks: comma-separated `module:callable`, "
             "each called with `(cfg, dist_env)` on every rank (profilers, probes, fault injection).",
             "train/callbacks.py", forwarded=True, shown="none"),
    Variable("SPARKTUNE_FORWARD_ENV", None, "Comma-separated names of further variables the training ranks "
             "get from the driver (a callback plugin's own settings, NCCL tuning).", "train/plan.py",
             shown="none"),
    Variable("SPARKTUNE_SERVE_LOG_LEVEL", "warning", "uvicorn's log level in `sparktune serve`.", "serve.py"),
    Variable("SPARKTUNE_TORCH_THREADS", None, "torch threads per model process (servers, Spark UDF workers).",
             "model/pyfunc.py (the artifact)", shown="torch's default"),
    Variable("SPARKTUNE_BF16", "auto", "bfloat16 inference: `true`, `false` or `auto` (on where the GPU "
             "supports it).", "model/hf.py (the artifact)"),
    Variable("SPARKTUNE_VOLUME", None, "`catalog.schema.volume`: on Databricks, relative outputs and "
             "checkpoints go under `/Volumes/<catalog>/<schema>/<volume>/sparktune`.", "databricks.py",
             shown="none"),
    Variable(NOTEBOOK_PREFIX + "<NAME>", None, "A notebook's parameter `<NAME>` when it runs as a script "
             "outside Databricks (there: its widget).", "databricks.py", shown="the widget's default"),
    # other tools' conventions ----------------------------------------------------------
    Variable("MLFLOW_TRACKING_URI", None, "Tracking URI when the config and `--tracking-uri` give none.",
             "tracking.py, databricks.py", owner="MLflow", shown="`databricks` on Databricks, else "
             "sqlite:///$SPARKTUNE_HOME/mlflow.db"),
    Variable("MLFLOW_REGISTRY_URI", None, "Registry URI when none is given.", "tracking.py", owner="MLflow",
             shown="`databricks-uc` when tracking to Databricks"),
    Variable("DATABRICKS_RUNTIME_VERSION", None, "Set on Databricks clusters: sparktune is on Databricks.",
             "tracking.py, databricks.py", owner="Databricks", shown="unset"),
    Variable("DATABRICKS_HOST", None, "Workspace URL handed to training ranks on executors.", "databricks.py",
             owner="Databricks", shown="the job's context"),
    Variable("DATABRICKS_TOKEN", None, "Token handed to training ranks on executors.", "databricks.py",
             owner="Databricks", shown="the job's context"),
    Variable("SPARK_REMOTE", None, "Spark Connect URL (`sc://...`): connect instead of starting a JVM.",
             "spark.py", owner="Spark", shown="unset"),
    Variable("PYSPARK_GATEWAY_PORT", None, "Set by spark-submit: take its session.", "spark.py",
             owner="Spark", shown="unset"),
    Variable("SPARK_SUBMIT_OPTS", None, "JVM options of the driver a local start launches: one naming a "
             "collector (`-XX:+Use...GC`) keeps `SPARKTUNE_SPARK_GC` out.", "spark.py", owner="Spark", shown="unset"),
    *(Variable(name, None, "JVM options every JVM picks up: one naming a collector (`-XX:+Use...GC`) keeps "
               "`SPARKTUNE_SPARK_GC` out.", "spark.py", owner="Java", shown="unset")
      for name in ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS")),
    Variable("SPARK_LOCAL_DIRS", None, "An executor's scratch space (model cache fallback).",
             "model/resolve.py", owner="Spark", shown="unset"),
    Variable("RANK", "0", "This process's rank (set by torchrun).", "train/dist.py, train/train.py",
             owner="torchrun"),
    Variable("WORLD_SIZE", "1", "Number of ranks (set by torchrun).", "train/dist.py", owner="torchrun"),
    Variable("LOCAL_RANK", "0", "Rank on this host (set by torchrun).", "train/dist.py", owner="torchrun"),
    Variable("LOCAL_WORLD_SIZE", None, "Ranks on this host (set by torchrun).", "train/dist.py",
             owner="torchrun", shown="WORLD_SIZE"),
    Variable("CUDA_VISIBLE_DEVICES", None, "Empty hides the GPUs (a CPU launch plan sets it for its ranks).",
             "train/dist.py", owner="CUDA", shown="all GPUs"),
    Variable("HF_TOKEN", None, "Hugging Face token for gated models (else the `sparktune/hf-token` "
             "Databricks secret).", "databricks.py", owner="Hugging Face", shown="none"),
    Variable("HF_HOME", None, "Hugging Face cache, forwarded to training ranks.", "train/plan.py",
             owner="Hugging Face", forwarded=True, shown="~/.cache/huggingface"),
    *(Variable(name, None, "Forwarded to training ranks.", "train/plan.py", owner=owner, forwarded=True, shown="unset")
      for owner, name in (("Hugging Face", "HF_HUB_OFFLINE"), ("Hugging Face", "TRANSFORMERS_OFFLINE"),
                          ("Hugging Face", "HF_DATASETS_OFFLINE"), ("NCCL", "NCCL_DEBUG"),
                          ("NCCL", "NCCL_SOCKET_IFNAME"), ("NCCL", "NCCL_IB_DISABLE"))),
    Variable("AZURE_OPENAI_ENDPOINT", None, "Azure OpenAI resource endpoint.", "openai/client.py, openai/deploy.py",
             owner="Azure OpenAI", shown="none"),
    Variable("AZURE_OPENAI_API_KEY", None, "Azure OpenAI key (or `AZURE_OPENAI_AD_TOKEN`).", "openai/client.py",
             owner="Azure OpenAI", shown="none"),
    Variable("AZURE_OPENAI_AD_TOKEN", None, "Entra ID token instead of a key.", "openai/client.py",
             owner="Azure OpenAI", shown="none"),
    Variable("OPENAI_API_VERSION", None, "Azure OpenAI API version.", "openai/client.py", owner="Azure OpenAI",
             shown="`DEFAULT_API_VERSION`"),
    Variable("OPENAI_API_KEY", None, "OpenAI (not Azure) key.", "openai/client.py", owner="OpenAI", shown="none"),
    Variable("OPENAI_BASE_URL", None, "OpenAI-compatible endpoint instead of OpenAI's.", "openai/client.py",
             owner="OpenAI", shown="OpenAI's"),
    Variable("AZURE_OPENAI_RESOURCE", None, "Azure OpenAI account name for deployments.", "openai/deploy.py",
             owner="Azure", shown="the endpoint's host"),
    Variable("AZURE_SUBSCRIPTION_ID", None, "Subscription of the account (deploy).", "openai/deploy.py",
             owner="Azure", shown="none"),
    Variable("AZURE_RESOURCE_GROUP", None, "Resource group of the account (deploy).", "openai/deploy.py",
             owner="Azure", shown="none"),
    Variable("AZURE_MANAGEMENT_TOKEN", None, "Azure Resource Manager bearer token (deploy).", "openai/deploy.py",
             owner="Azure", shown="none"),
    Variable("AZURE_MANAGEMENT_ENDPOINT", None, "Resource Manager URL (sovereign clouds).", "openai/deploy.py",
             owner="Azure", shown="https://management.azure.com"),
    Variable("TIKTOKEN_CACHE_DIR", None, "tiktoken's encodings cache (openai validate).", "openai/validate.py",
             owner="tiktoken", shown="`<tmp>/sparktune-tiktoken`"),
)

_BY_NAME = {v.name: v for v in VARIABLES}


def declared(name: str) -> Variable:
    """The declaration of ``name`` (``SPARKTUNE_NB_<anything>`` is the notebook-parameter pattern)."""
    if name.startswith(NOTEBOOK_PREFIX):
        return _BY_NAME[NOTEBOOK_PREFIX + "<NAME>"]
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not declared in sparktune.env.VARIABLES") from None


def env_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of a declared variable, else its declared default (empty counts as unset)."""
    variable = declared(name)
    value = (os.environ if environ is None else environ).get(name)
    return value if value else variable.default


def env_int(name: str, environ: Mapping[str, str] | None = None) -> int | None:
    """A declared variable as a positive integer (None when unset); a bad value is a ConfigError naming it."""
    value = env_value(name, environ)
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise ConfigError([f"${name}: expected a positive integer, found {value!r}"])
    return number


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """A declared on/off variable: unset, empty, ``0``, ``false``, ``no`` and ``off`` are off."""
    return (env_value(name, environ) or "").strip().lower() not in ("", "0", "false", "no", "off")


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What training ranks get from the driver's ``environ``: the variables declared ``forwarded``
    and those named in ``$SPARKTUNE_FORWARD_ENV``, when set (never the environment wholesale)."""
    extra = [n.strip() for n in (environ.get("SPARKTUNE_FORWARD_ENV") or "").split(",") if n.strip()]
    names = [v.name for v in VARIABLES if v.forwarded] + extra
    return {name: environ[name] for name in dict.fromkeys(names) if environ.get(name)}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_table() -> str:
    """The Markdown table of ``VARIABLES`` (what ``docs/environment.md`` holds between its markers)."""
    rows = ["| variable | default | what it does | read by | ranks |", "|---|---|---|---|---|"]
    for owner in (_S, None):
        for v in VARIABLES:
            if (v.owner == _S) != (owner == _S):
                continue
            name = f"`{v.name}`" + ("" if v.owner == _S else f" ({v.owner})")
            default = v.shown or f"`{v.default}`"
            rows.append(f"| {name} | {_cell(default)} | {_cell(v.meaning)} | {v.where} | "
                        f"{'forwarded' if v.forwarded else ''} |")
    return "\n".join(rows) + "\n"



def sparktune_home() -> str:
    """``$SPARKTUNE_HOME`` as an absolute folder, created if missing (local state: metastore,
    warehouse, the default MLflow store). Here, not in spark.py: tracking needs it without Spark."""
    home = os.path.abspath(str(env_value("SPARKTUNE_HOME")))
    os.makedirs(home, exist_ok=True)
    return home

if __name__ == "__main__":
    sys.stdout.write(render_table())
