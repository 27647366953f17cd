"""Entry point for spark-submit and Databricks jobs: the whole pipeline as a script.

    spark-submit jobs/pipeline.py --config jobs/configs/pipeline_local.yaml raw_table=main.imdb.raw

On Databricks the job's SparkSession, catalog and MLflow are used as they are.
"""

import sys

from sparktune.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
