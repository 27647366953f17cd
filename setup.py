"""sparktune: fine-tune language models where the data lives, in Spark and Delta Lake."""

from setuptools import find_packages, setup

# delta-spark's Python package and its Maven jars are versioned together and the jar is
# built per Spark minor version: keep pyspark's range inside what delta-spark accepts and
# pin delta-spark exactly, so `configure_spark_with_delta_pip` asks Maven for a jar that exists.
INSTALL_REQUIRES = [
    "pyspark[sql,ml]>=4.1,<4.2",
    "delta-spark==4.4.0",
    "deltalake>=1.0,<2",
    "torch>=2.4,<2.16",
    "transformers>=5.0,<6",
    "tokenizers>=0.21",
    "accelerate>=1.1,<2",
    "datasets>=3.0,<6",
    "mlflow>=3.1,<4",
    "scikit-learn>=1.4,<2",
    "pandas>=2.1,<3",
    "pyarrow>=15",
    "numpy>=1.26",
    "peft>=0.15,<1",
    "gguf>=0.10",
    "pyyaml>=6",
    "matplotlib>=3.8",
]

setup(
    name="sparktune",
    version="0.1.0",
    description="Fine-tune language models on Spark and Delta Lake tables",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sparktune", "sparktune.*"]),
    package_data={"sparktune": ["ivysettings.xml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": ["pytest>=8", "pytest-timeout>=2.3", "requests>=2.31"]},
    entry_points={"console_scripts": ["sparktune=sparktune.cli:main"]},
)
