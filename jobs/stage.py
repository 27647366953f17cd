"""Entry point for spark-submit and Databricks jobs: any `sparktune` stage as a script.

    spark-submit jobs/stage.py ingest --source /dbfs/imdb --output main.imdb.raw
    spark-submit jobs/stage.py tokenize --input main.imdb.raw --output main.imdb.tokens --tokenizer bert-base-uncased

On Databricks, one Python script task per stage (parameters: the stage and its flags) makes
a multi-task job whose tasks each leave a Delta table for the next.
"""

import sys

from sparktune.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
