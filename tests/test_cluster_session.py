"""Session helpers that need no cluster: what get_spark refuses, what check_shared_path skips, spark-submit args."""

import os
import shutil
import subprocess

import pytest

from sparktune.errors import SparktuneError
from sparktune.spark import (
    check_shared_path,
    delta_maven_coordinate,
    delta_submit_args,
    gc_java_options,
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


# The collectors' MXBean names in HotSpot (JDK 17+; G1 adds "G1 Concurrent GC" from JDK 20).
_COLLECTOR_BEANS = {"-XX:+UseParallelGC": {"PS Scavenge", "PS MarkSweep"},
                    "-XX:+UseG1GC": {"G1 Young Generation", "G1 Old Generation"}}


def test_the_started_jvm_runs_the_collector_sparktune_chose(spark):
    # The suite's shared session was started by get_spark with no Java options of its own, so its
    # driver JVM got gc_java_options() of this environment: parallel unless the run's env says otherwise.
    flag = gc_java_options()
    if not flag:
        pytest.skip("this run's environment chose the collector (SPARKTUNE_SPARK_GC=none or a Java options variable)")
    management = spark._jvm.java.lang.management.ManagementFactory
    beans = {str(b.getName()) for b in management.getGarbageCollectorMXBeans()}
    args = [str(a) for a in management.getRuntimeMXBean().getInputArguments()]
    assert _COLLECTOR_BEANS[flag] <= beans, (flag, beans)
    assert args.count(flag) == 1 and sum(1 for a in args if a.startswith("-XX:+Use") and a.endswith("GC")) == 1, args


def test_the_collector_flag_and_when_none_is_added():
    assert gc_java_options(environ={}) == "-XX:+UseParallelGC"  # the default: throughput batch work
    assert gc_java_options(environ={"SPARKTUNE_SPARK_GC": " G1 "}) == "-XX:+UseG1GC"
    assert gc_java_options(environ={"SPARKTUNE_SPARK_GC": "none"}) == ""
    assert gc_java_options(environ={"SPARKTUNE_SPARK_GC": ""}) == "-XX:+UseParallelGC"  # empty is unset
    # The user chose: a collector in any Java options variable, or the driver's own JVM options.
    for name in ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "SPARK_SUBMIT_OPTS"):
        assert gc_java_options(environ={name: "-Xss4m -XX:+UseZGC"}) == "", name
        assert gc_java_options(environ={name: "-Xss4m -XX:+UseGCOverheadLimit"}) == "-XX:+UseParallelGC", name
    assert gc_java_options({"spark.driver.extraJavaOptions": "-Dx=1"}, environ={}) == ""
    assert gc_java_options({"spark.driver.defaultJavaOptions": "-XX:+UseSerialGC"}, environ={}) == ""
    assert gc_java_options({"spark.driver.defaultJavaOptions": "-Dx=1"}, environ={}) == "-XX:+UseParallelGC"
    assert gc_java_options({"spark.executor.memory": "1g"}, environ={"SPARKTUNE_SPARK_GC": "g1"}) == "-XX:+UseG1GC"
    with pytest.raises(SparktuneError, match=r"\$SPARKTUNE_SPARK_GC: expected one of parallel, g1, none, found 'zgc'"):
        gc_java_options(environ={"SPARKTUNE_SPARK_GC": "zgc"})


@pytest.mark.skipif(shutil.which("java") is None, reason="no java on PATH")
def test_two_collector_flags_stop_the_jvm():
    # Why gc_java_options adds nothing when a collector is already chosen elsewhere.
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS")}
    both = subprocess.run(["java", "-XX:+UseG1GC", "-XX:+UseParallelGC", "-version"], capture_output=True,
                          text=True, env=env, check=False)
    assert both.returncode != 0 and "Multiple garbage collectors selected" in both.stdout + both.stderr
