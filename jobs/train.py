"""Entry point for spark-submit and Databricks jobs: ``sparktune train`` as a script.

    spark-submit jobs/train.py --config jobs/configs/imdb_local.yaml data.table=main.imdb.tokenized

On Databricks, point a Python script task at this file with the same parameters; the job's
SparkSession is reused and MLflow tracks to the workspace.
"""

import sys

from sparktune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
