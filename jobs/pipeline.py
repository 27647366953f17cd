"""Entry point for spark-submit and Databricks jobs: the whole pipeline as a script.

    spark-submit jobs/pipeline.py --config jobs/configs/pipeline_local.yaml \
        ingest.output=main.imdb.raw tokenize.output=main.imdb.tokens evaluate.limit=500

Overrides are the config's dotted keys (``sparktune pipeline --help`` lists them); the stages'
inputs follow the outputs before them (``tokenize.output`` is what train and evaluate read).
On Databricks the job's SparkSession, catalog and MLflow are used as they are.
"""

import sys

from sparktune.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
