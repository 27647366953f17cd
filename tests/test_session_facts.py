"""``sparktune.spark.SessionFacts``: the one place a session's master and settings are worked out."""

import pytest

from sparktune.spark import SessionFacts, SessionKind, local_cores, session_facts


@pytest.mark.parametrize("master, cores", [
    ("local", 1), ("local[4]", 4), ("local[*]", 16), ("local[3,2]", 3), ("local[*, 4]", 16),
    ("local-cluster[2,3,1024]", 6), ("spark://h:7077", None), ("yarn", None), ("k8s://https://h", None),
    ("", None), ("local[x]", None),
])
def test_local_cores(master, cores):
    assert local_cores(master, cpu_count=16) == cores


def test_local_session():
    facts = SessionFacts.from_conf({"spark.master": "local[4]", "spark.task.cpus": "2"}, cpu_count=8, environ={})
    assert facts.kind is SessionKind.LOCAL and facts.is_local and not facts.connect
    assert (facts.local_cores, facts.local_task_slots, facts.task_slots) == (4, 2, 2)
    star = SessionFacts.from_conf({"spark.master": "local[*]"}, cpu_count=8, environ={})
    assert (star.local_cores, star.task_slots, star.task_cpus) == (8, 8, 1)


def test_cluster_session_counts_executors_and_gpus():
    conf = {"spark.master": "spark://h:7077", "spark.executor.instances": "3", "spark.executor.cores": "4",
            "spark.task.cpus": "2", "spark.executor.resource.gpu.amount": "2", "spark.task.resource.gpu.amount": "1"}
    facts = SessionFacts.from_conf(conf, environ={})
    assert facts.kind is SessionKind.CLUSTER and facts.local_cores is None and facts.local_task_slots is None
    assert facts.task_slots == 6 and (facts.executor_gpus, facts.task_gpus) == (2.0, 1.0)
    assert SessionFacts.from_conf({**conf, "spark.default.parallelism": "40"}, environ={}).task_slots == 40
    unknown = SessionFacts.from_conf({"spark.master": "yarn"}, environ={})
    assert unknown.task_slots is None and unknown.default_parallelism is None


def test_connect_and_databricks():
    connect = SessionFacts.from_conf({}, connect=True, environ={})
    assert connect.kind is SessionKind.CONNECT and connect.connect and connect.master == ""
    assert connect.task_slots is None and connect.task_cpus == 1
    remote = SessionFacts.from_conf({"spark.master": "sc://h:15002"}, environ={})
    assert remote.kind is SessionKind.CONNECT and remote.connect
    tagged = SessionFacts.from_conf({"spark.master": "spark://10.0.0.1:7077",
                                     "spark.databricks.clusterUsageTags.clusterId": "0101-abc"}, environ={})
    assert tagged.kind is SessionKind.DATABRICKS and not tagged.is_local
    runtime = SessionFacts.from_conf({}, connect=True, environ={"DATABRICKS_RUNTIME_VERSION": "15.4"})
    assert runtime.kind is SessionKind.DATABRICKS and runtime.connect


def test_garbage_settings_are_unknown_not_a_crash():
    facts = SessionFacts.from_conf({"spark.master": "local[2]", "spark.task.cpus": "two",
                                    "spark.default.parallelism": "", "spark.executor.resource.gpu.amount": "x"},
                                   environ={})
    assert (facts.task_cpus, facts.default_parallelism, facts.executor_gpus, facts.task_slots) == (1, None, 0.0, 2)


def test_session_facts_of_the_live_session(spark):
    facts = session_facts(spark)
    assert facts.master == "local[2]" and facts.kind is SessionKind.LOCAL and facts.local_cores == 2
    assert facts.shuffle_partitions == 2 and facts.task_slots == 2
