"""The one place that branches on library versions.

sparktune supports two stacks, both run in CI (``.ci/run``; setup.py states the same ranges):

* the oldest: the libraries of Databricks Runtime 17.3 LTS ML (``ci/constraints-dbr-17.3-lts-ml.txt``:
  Spark 4.0.0, delta-spark 4.0.0, torch 2.7, transformers 4.51, MLflow 3.0.1, fastapi 0.117);
* the newest: what ``pip install .[local]`` resolves today.

Code elsewhere is written against the oldest versions' APIs; where a newer version renamed or
added something that matters, the difference is decided here, by version, so that it can be
dropped in one place when the oldest supported version moves up.
"""

from __future__ import annotations

from packaging.version import Version

from sparktune.errors import SparktuneError

__all__ = [
    "MIN_SPARK",
    "check_spark_version",
    "delta_artifact",
    "download_artifacts",
    "from_pretrained_dtype",
]

MIN_SPARK = Version("4.0")
"""Spark 4.0 is Databricks Runtime 17.x's; 3.5 (Runtime 16.4 LTS and older) is refused."""

_TRANSFORMERS_DTYPE = Version("4.56")
"""transformers 4.56 renamed ``from_pretrained(torch_dtype=)`` to ``dtype=`` (the old name warns, then goes)."""

_MLFLOW_DOWNLOAD_REGISTRY_URI = Version("3.5")
"""MLflow 3.5 added ``registry_uri=`` to ``mlflow.artifacts.download_artifacts`` (and 3.1 made it honour
``tracking_uri=`` for an artifact URI: 3.0 ignores it there)."""

_DELTA_PER_SPARK_ARTIFACT = Version("4.1")
"""From Delta 4.1 on, one jar per Spark minor version: ``delta-spark_<spark minor>_2.13``."""


def _installed(module) -> Version:
    # The module's own version: right for mlflow and mlflow-skinny alike (one import name, two distributions).
    return Version(module.__version__)


def check_spark_version(version: str) -> None:
    """Refuse a Spark older than ``MIN_SPARK`` with what is supported and what to do."""
    if Version(version).release[:2] < MIN_SPARK.release[:2]:
        raise SparktuneError(
            f"Spark {version} is not supported: sparktune needs Apache Spark {MIN_SPARK} or newer (pyspark, and on "
            "Databricks the cluster's runtime). On Databricks use Runtime 17.3 LTS ML or newer (Spark 4.0; "
            "Runtime 16.4 LTS and older ship Spark 3.5); elsewhere pip install 'sparktune[local]'"
        )


def delta_artifact(spark_version: str, delta_version: str) -> str:
    """The Maven coordinate of delta-spark ``delta_version``'s jar for pyspark ``spark_version``.

    Delta 4.0.x (and 3.x) is published as ``io.delta:delta-spark_2.13``; from 4.1 on, per Spark
    minor version as ``io.delta:delta-spark_<major.minor>_2.13`` (Maven Central lists 4.1.0 for
    both 4.0 and 4.1). Spark 4 is Scala 2.13 only.
    """
    check_spark_version(spark_version)
    if Version(delta_version) < _DELTA_PER_SPARK_ARTIFACT:
        return f"io.delta:delta-spark_2.13:{delta_version}"
    spark_minor = ".".join(str(part) for part in Version(spark_version).release[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{delta_version}"


def from_pretrained_dtype(dtype) -> dict:
    """The keyword argument that gives ``from_pretrained`` the weights' dtype."""
    import transformers

    key = "dtype" if _installed(transformers) >= _TRANSFORMERS_DTYPE else "torch_dtype"
    return {key: dtype}


def download_artifacts(uri: str, dst: str, tracking_uri: str | None, registry_uri: str | None) -> str:
    """``mlflow.artifacts.download_artifacts`` of ``uri`` into ``dst`` with explicit tracking and registry URIs."""
    import mlflow

    if _installed(mlflow) >= _MLFLOW_DOWNLOAD_REGISTRY_URI:
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri,
                                                   registry_uri=registry_uri)
    from sparktune.tracking import process_uris

    with process_uris(tracking_uri, registry_uri):
        return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst)
