"""Session helpers that need no cluster: what get_spark refuses, what check_shared_path skips, spark-submit args."""

import os

import pytest

from sparktune.errors import SparktuneError
from sparktune.spark import (
    check_shared_path,
    delta_maven_coordinate,
    delta_submit_args,
    get_spark,
    is_local_master,
)


def test_a_remote_that_is_not_a_connect_url_is_refused():
    with pytest.raises(SparktuneError, match=r"expected a Spark Connect URL like sc://host:15002, found 'http://x:1'"):
        get_spark(remote="http://x:1")


def test_shared_path_check_on_a_local_master_and_for_uris(spark, tmp_path):
    # local[2]: executors are threads of this process and see its disk; nothing to check, nothing written.
    check_shared_path(spark, str(tmp_path / "out"), "output_dir")
    assert not os.path.exists(tmp_path / "out")
    check_shared_path(spark, "s3://bucket/prefix", "checkpoint.dir")  # shared by construction
    with pytest.raises(SparktuneError, match="output_dir: is empty"):
        check_shared_path(spark, "", "output_dir")
    assert is_local_master("local[2]") and is_local_master("local") and not is_local_master("spark://h:7077")


def test_spark_submit_args_name_delta_jars_that_exist():
    args = delta_submit_args()
    assert args[0] in ("--jars", "--packages")
    if args[0] == "--jars":
        jars = args[1].split(",")
        assert all(os.path.exists(j) for j in jars) and any("delta-spark" in j for j in jars)
    else:
        assert args[1] == delta_maven_coordinate()
    assert delta_maven_coordinate().startswith("io.delta:delta-spark_")


def test_task_count_uses_no_rdd(spark):
    from sparktune.tokenize import _task_count

    assert _task_count(spark.range(0, 100, 1, 3)) == 3
    assert _task_count(spark.range(0, 1 << 16)) == 2  # the local[2] session's cores
