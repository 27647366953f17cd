"""sparktune.databricks: the Databricks branches exercised through the environment variables they read.

No workspace is reachable here, so ``DATABRICKS_RUNTIME_VERSION`` makes the code take its
Databricks path; ``dbutils`` does not exist outside Databricks (OSS pyspark has no
``pyspark.dbutils``), which is what the fallbacks are for.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparktune import databricks as dbx
from sparktune.errors import ConfigError, SparktuneError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "dapi-0123456789abcdef-secret"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No Databricks or MLflow variables from the machine running the tests, no ~/.databrickscfg."""
    for name in ("DATABRICKS_RUNTIME_VERSION", "DATABRICKS_HOST", "DATABRICKS_TOKEN", "MLFLOW_TRACKING_URI",
                 "SPARKTUNE_VOLUME", "SPARKTUNE_TEST_SECRET", "DATABRICKS_CONFIG_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_on_databricks_reads_the_runtime_version(clean_env):
    assert not dbx.on_databricks()
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert dbx.on_databricks() and dbx.runtime_version() == "17.3"
    assert not dbx.on_databricks({}) and dbx.on_databricks({"DATABRICKS_RUNTIME_VERSION": "16.4"})


def test_get_secret_off_databricks_reads_the_environment(clean_env, caplog):
    caplog.set_level(logging.DEBUG)
    clean_env.setenv("SPARKTUNE_TEST_SECRET", TOKEN)
    assert dbx.get_secret("sparktune", "hf-token", "SPARKTUNE_TEST_SECRET") == TOKEN
    assert TOKEN not in caplog.text


def test_get_secret_missing_says_where_it_looked(clean_env):
    with pytest.raises(ConfigError) as err:
        dbx.get_secret("sparktune", "azure-openai-key", "SPARKTUNE_TEST_SECRET")
    message = str(err.value)
    assert "SPARKTUNE_TEST_SECRET" in message and "databricks secrets put-secret sparktune azure-openai-key" in message
    assert dbx.get_secret("sparktune", "azure-openai-key", "SPARKTUNE_TEST_SECRET", required=False) is None


def test_get_secret_on_databricks_without_dbutils_falls_back_to_the_environment(clean_env, caplog):
    caplog.set_level(logging.DEBUG)
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert dbx.get_dbutils() is None  # OSS pyspark: no pyspark.dbutils
    with pytest.raises(ConfigError) as err:
        dbx.get_secret("sparktune", "hf-token", "SPARKTUNE_TEST_SECRET")
    assert "secret scope 'sparktune' key 'hf-token' (dbutils is not available here)" in str(err.value)
    clean_env.setenv("SPARKTUNE_TEST_SECRET", TOKEN)
    assert dbx.get_secret("sparktune", "hf-token", "SPARKTUNE_TEST_SECRET") == TOKEN
    assert TOKEN not in caplog.text


def test_rank_env_carries_databricks_credentials_and_hides_them(clean_env, caplog):
    clean_env.setenv("DATABRICKS_HOST", "https://adb-123.4.azuredatabricks.net/")
    clean_env.setenv("DATABRICKS_TOKEN", TOKEN)
    env = dbx.rank_env_for_mlflow("databricks")
    assert dict(env) == {"MLFLOW_TRACKING_URI": "databricks", "DATABRICKS_HOST": "https://adb-123.4.azuredatabricks.net",
                         "DATABRICKS_TOKEN": TOKEN}
    logging.getLogger("sparktune.test").warning("rank env: %s %r", env, env)
    assert TOKEN not in caplog.text and TOKEN not in repr(env) and TOKEN not in str(env)
    assert "DATABRICKS_HOST" in repr(env)
    # A profile exists only in the driver's ~/.databrickscfg: ranks use the plain URI with the env.
    assert dbx.rank_env_for_mlflow("databricks://work")["MLFLOW_TRACKING_URI"] == "databricks"
    assert dbx.rank_env_for_mlflow("databricks-uc")["MLFLOW_TRACKING_URI"] == "databricks-uc"


def test_rank_env_reaches_a_child_process(clean_env, tmp_path):
    """What a rank does with it: a fresh process started with only this env sees the credentials."""
    env = dbx.rank_env_for_mlflow("databricks", environ={"DATABRICKS_HOST": "https://h", "DATABRICKS_TOKEN": TOKEN})
    child = {"PATH": os.environ["PATH"], **env}
    code = ("import os; print(os.environ['MLFLOW_TRACKING_URI'], os.environ['DATABRICKS_HOST'], "
            f"os.environ['DATABRICKS_TOKEN'] == {TOKEN!r})")
    out = subprocess.run([sys.executable, "-c", code], env=child, capture_output=True, text=True, check=True,
                         timeout=60)
    assert out.stdout.split() == ["databricks", "https://h", "True"]


def test_rank_env_for_other_stores_and_none(clean_env):
    assert dbx.rank_env_for_mlflow() == {}
    assert dbx.rank_env_for_mlflow("http://mlflow:5000") == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    clean_env.setenv("MLFLOW_TRACKING_URI", "sqlite:////dbfs/mlflow.db")
    assert dbx.rank_env_for_mlflow() == {"MLFLOW_TRACKING_URI": "sqlite:////dbfs/mlflow.db"}


def test_rank_env_on_databricks_without_credentials_says_what_to_set(clean_env):
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    with pytest.raises(SparktuneError) as err:
        dbx.rank_env_for_mlflow()  # on Databricks the default store is the workspace's
    message = str(err.value)
    assert "DATABRICKS_HOST and DATABRICKS_TOKEN" in message and "mlflow.tracking_uri" in message
    clean_env.setenv("DATABRICKS_TOKEN", TOKEN)
    with pytest.raises(SparktuneError) as err:
        dbx.rank_env_for_mlflow("databricks")
    assert "needs DATABRICKS_HOST for" in str(err.value) and TOKEN not in str(err.value)


def test_local_tracking_store_is_refused_for_executor_ranks():
    dbx.check_tracking_uri_for_ranks("sqlite:///./.sparktune/mlflow.db", local_mode=True)
    dbx.check_tracking_uri_for_ranks("databricks", local_mode=False)
    dbx.check_tracking_uri_for_ranks("http://mlflow:5000", local_mode=False)
    dbx.check_tracking_uri_for_ranks("sqlite:////dbfs/shared/mlflow.db", local_mode=False)
    for uri in ("sqlite:///./.sparktune/mlflow.db", "sqlite:////tmp/mlflow.db", "file:///tmp/mlruns"):
        with pytest.raises(ConfigError, match="mlflow.tracking_uri"):
            dbx.check_tracking_uri_for_ranks(uri, local_mode=False)


def test_default_volume_path():
    assert dbx.default_volume_path("main", "sparktune", "vol") == "/Volumes/main/sparktune/vol"
    assert dbx.default_volume_path("main", "sparktune", "vol", "runs/42", "", "model") == \
        "/Volumes/main/sparktune/vol/runs/42/model"
    for bad in (("main.x", "s", "v"), ("", "s", "v"), ("m", "a/b", "v"), ("m", "s", "v w")):
        with pytest.raises(ConfigError):
            dbx.default_volume_path(*bad)
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        dbx.default_volume_path("m", "s", "v", "../../etc")


_NAMES = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True)
_SEGMENTS = st.lists(st.from_regex(r"[A-Za-z0-9_.=-]{1,12}", fullmatch=True).filter(lambda s: s not in (".", "..")),
                     max_size=4)


@given(_NAMES, _NAMES, _NAMES, _SEGMENTS)
def test_every_volume_path_is_shared_storage(catalog, schema, volume, parts):
    path = dbx.default_volume_path(catalog, schema, volume, *parts)
    assert path.split("/")[1:5] == ["Volumes", catalog, schema, volume]
    assert path.split("/")[5:] == parts
    assert dbx.is_shared_path(path, local_mode=False)


@pytest.mark.parametrize("path,shared_on_cluster", [
    ("/Volumes/main/s/v/out", True), ("/dbfs/tmp/out", True), ("dbfs:/tmp/out", True),
    ("s3://bucket/out", True), ("s3a://bucket/out", True), ("abfss://c@acct.dfs.core.windows.net/out", True),
    ("gs://bucket/out", True), ("wasbs://c@acct.blob.core.windows.net/x", True),
    ("./out", False), ("out", False), ("/tmp/out", False), ("file:///tmp/out", False), ("~/out", False),
    ("/Workspace/Users/me/out", False), ("ftp://host/out", False), ("", False),
])
def test_is_shared_path(path, shared_on_cluster):
    assert dbx.is_shared_path(path, local_mode=False) is shared_on_cluster
    if path and "://" not in path.replace("file://", "") or shared_on_cluster:
        assert dbx.is_shared_path(path, local_mode=True)


def test_require_shared_path_names_the_key(clean_env):
    assert dbx.require_shared_path("./out", "output_dir", local_mode=True) == "./out"
    with pytest.raises(ConfigError) as err:
        dbx.require_shared_path("./out", "output_dir", local_mode=False)
    assert "output_dir: './out' is local to the driver" in str(err.value)
    assert "/Volumes/<catalog>/<schema>/<volume>/sparktune" in str(err.value)
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    clean_env.setenv("SPARKTUNE_VOLUME", "main.ml.scratch")
    with pytest.raises(ConfigError, match="/Volumes/main/ml/scratch/sparktune/"):
        dbx.require_shared_path("/local_disk0/out", "checkpoint.dir", local_mode=False)


def test_default_output_root(clean_env):
    assert dbx.default_output_root() is None
    clean_env.setenv("SPARKTUNE_VOLUME", "main.ml.scratch")
    assert dbx.default_output_root() is None  # only on Databricks
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert dbx.default_output_root() == "/Volumes/main/ml/scratch/sparktune"
    clean_env.setenv("SPARKTUNE_VOLUME", "main.scratch")
    with pytest.raises(ConfigError, match="catalog.schema.volume"):
        dbx.default_output_root()


def test_task_values_publish_only_plain_non_secret_fields(clean_env, caplog):
    result = {"run_id": "abc", "model_uri": "runs:/abc/model", "global_step": 10, "eval_loss": 0.5,
              "metrics": {"a": 1}, "api_key": "k", "hf_token": "t", "tokenizer": "gpt2", "total_tokens": 99,
              "db_passwd": "p", "storage_sas": "sv=x"}
    # One notion of a secret key (sparktune.redact): a token count is published, a password is not.
    assert dbx.task_values(result) == {"run_id": "abc", "model_uri": "runs:/abc/model", "global_step": "10",
                                       "eval_loss": "0.5", "tokenizer": "gpt2", "total_tokens": "99"}
    assert dbx.task_values(result, keys=dbx.TASK_VALUE_KEYS) == {"run_id": "abc", "model_uri": "runs:/abc/model"}
    assert dbx.publish_task_values(result) == {}  # not on Databricks: nothing to publish to
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    caplog.set_level(logging.INFO, logger="sparktune.databricks")
    assert dbx.publish_task_values(result) == {}  # a Python script task: no notebook, nothing published
    assert "notebook-only" in caplog.text


class _TaskValues:
    """What a notebook's ``dbutils.jobs.taskValues`` does with ``set``: records it, or refuses it."""

    def __init__(self, refuse: set):
        self.refuse, self.values = refuse, {}

    def set(self, key, value):
        if key in self.refuse:
            raise RuntimeError(f"taskValues.set({key!r}) is not supported here")
        self.values[key] = value


@pytest.fixture
def notebook(clean_env):
    """A running IPython shell (what a Databricks notebook is) whose namespace holds ``dbutils``."""
    from types import SimpleNamespace

    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    values = _TaskValues(refuse=set())
    shell.user_ns["dbutils"] = SimpleNamespace(jobs=SimpleNamespace(taskValues=values))
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    yield values
    InteractiveShell.clear_instance()


def test_task_values_are_published_from_a_notebook(notebook):
    assert dbx.notebook_dbutils() is not None
    assert dbx.publish_task_values({"run_id": "abc", "model_uri": "runs:/abc/model"}) == {
        "run_id": "abc", "model_uri": "runs:/abc/model"}
    assert notebook.values == {"run_id": "abc", "model_uri": "runs:/abc/model"}


def test_a_refused_task_value_never_fails_the_stage_after_its_work(notebook, caplog, capsys):
    """Databricks documents ``taskValues.set`` for notebooks only: when it refuses, the stage (whose
    table or model is already written) still exits 0, and the log says which value is missing."""
    from sparktune.cli import _emit
    from sparktune.registry import RegisterResult

    notebook.refuse = {"run_id"}
    caplog.set_level(logging.WARNING, logger="sparktune.databricks")
    result = RegisterResult(name="main.s.m", version="3", model_uri="models:/main.s.m/3",
                            source_model_uri="models:/m-1", run_id="abc", alias="champion", promoted=True,
                            reason="first version")
    assert _emit(result, as_json=True) == 0
    assert '"version": "3"' in capsys.readouterr().out
    assert notebook.values == {"name": "main.s.m", "version": "3", "model_uri": "models:/main.s.m/3",
                               "source_model_uri": "models:/m-1", "alias": "champion", "promoted": "True",
                               "reason": "first version"}
    assert "task value 'run_id' not published (RuntimeError" in caplog.text


def test_importing_sparktune_databricks_loads_no_heavy_stack():
    code = ("import sys, sparktune, sparktune.databricks, sparktune.views; "
            "heavy = [m for m in ('pyspark', 'torch', 'mlflow', 'transformers', 'delta') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout.strip() == "[]"


def test_notebook_param_reads_the_environment_off_databricks(clean_env):
    assert dbx.notebook_param("tokenized_table", "./data/imdb_tokenized") == "./data/imdb_tokenized"
    clean_env.setenv("SPARKTUNE_NB_TOKENIZED_TABLE", "main.sparktune.imdb_tokenized")
    assert dbx.notebook_param("tokenized_table", "./data/imdb_tokenized") == "main.sparktune.imdb_tokenized"
    # On Databricks without dbutils (not a notebook) the environment still answers.
    clean_env.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    assert dbx.notebook_param("tokenized_table", "x") == "main.sparktune.imdb_tokenized"


def test_training_outputs_land_on_the_job_volume_on_databricks(monkeypatch):
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import _place_outputs_on_volume

    def cfg(output_dir):
        return load_train_config(None, ["model.name=x", "data.table=/t", f"output_dir={output_dir}"])

    relative, absolute = cfg("./out/run1"), cfg("/dbfs/runs/run1")
    _place_outputs_on_volume(relative)  # not on Databricks: left alone
    assert relative.output_dir == "./out/run1"
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    monkeypatch.setenv("SPARKTUNE_VOLUME", "main.sparktune.files")
    _place_outputs_on_volume(relative)
    _place_outputs_on_volume(absolute)
    assert relative.output_dir == "/Volumes/main/sparktune/files/sparktune/runs/out/run1"
    assert relative.checkpoint_dir.startswith("/Volumes/main/sparktune/files/")
    assert absolute.output_dir == "/dbfs/runs/run1"


def test_hub_token_reaches_ranks_only_in_memory_and_never_prints():
    from sparktune.databricks import hub_token_env

    assert hub_token_env({}) == {}
    env = hub_token_env({"HF_TOKEN": "hf_plantedSecretValue123"})
    assert env["HF_TOKEN"] == "hf_plantedSecretValue123"
    assert "hf_plantedSecretValue123" not in repr(env) and "hf_plantedSecretValue123" not in str(env)
