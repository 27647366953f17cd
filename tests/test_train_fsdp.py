"""``train.parallelism: fsdp`` on real processes (2 gloo ranks, CPU): it shards, it matches DDP,
its checkpoints resume after a killed rank, and its artifact serves.

Each rank writes what it really holds after its first optimizer step (``tests/train_probe.py``):
local shard sizes of the parameters, gradients and AdamW state, and whether any
``DistributedDataParallel`` exists in the process (a silent fallback to DDP fails the test).
"""

import json
import os
import subprocess
import sys

import pytest
import yaml
from test_train_support import nest as _nest
from test_train_support import write_tokenized_table

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY_LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
SLACK = 0.02  # FSDP pads each flattened shard to a multiple of the world size


def _torchrun(tmp_path, table, name, *, parallelism, lora=False, steps=20, checkpoint="no"):
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(out),
        "model": {"name": "tiny-llama", "config_overrides": TINY_LLAMA},
        "data": {"table": str(table), "eval_split": ""},
        "train": {"batch_size": 2, "max_steps": steps, "learning_rate": 1e-3, "parallelism": parallelism,
                  "seed": 7},
        "lora": {"enabled": lora, "r": 4},
        "checkpoint": {"strategy": checkpoint, "steps": 10},
        "mlflow": {"enabled": False},
    }))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", SPARKTUNE_TRAIN_CALLBACKS="train_probe:probe",
               SPARKTUNE_TEST_PROBE_DIR=str(tmp_path / f"probe-{name}"),
               PYTHONPATH=os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "-m", "sparktune.train.train", "--config", str(config), "--json"],
        capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    probes = [json.loads((tmp_path / f"probe-{name}" / f"rank-{r}.json").read_text()) for r in range(2)]
    return result, probes


@pytest.fixture(scope="module")
def llama_table(tmp_path_factory, gpt2_tokenizer_path):
    folder = tmp_path_factory.mktemp("fsdp")
    return write_tokenized_table(folder / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=80, n_test=4,
                                 max_length=32)


@pytest.mark.timeout(600)
def test_fsdp_shards_params_grads_and_adam_state_and_matches_ddp_loss(tmp_path, llama_table):
    ddp, ddp_probes = _torchrun(tmp_path, llama_table, "ddp", parallelism="ddp")
    fsdp, fsdp_probes = _torchrun(tmp_path, llama_table, "fsdp", parallelism="fsdp", checkpoint="steps")

    total = fsdp_probes[0]["total_params"]
    assert total > 6_000_000  # tiny layers, but GPT-2's 50k vocabulary in the embeddings and head
    for probe in ddp_probes:  # the baseline: DDP holds everything on every rank
        assert probe["ddp"] and probe["params"] == total and probe["optimizer"] == 2 * total
    for probe in fsdp_probes:
        assert not probe["ddp"], "the FSDP job fell back to DistributedDataParallel"
        assert probe["sharded"]
        assert probe["params"] <= total * (0.5 + SLACK), probe
        assert probe["grads"] <= total * (0.5 + SLACK), probe
        assert probe["optimizer"] <= 2 * total * (0.5 + SLACK), probe  # AdamW: exp_avg + exp_avg_sq
        assert probe["grads"] > 0 and probe["optimizer"] > 0
    assert sum(p["params"] for p in fsdp_probes) >= total  # together they hold the whole model
    _assert_sharded_loading(fsdp_probes, total)

    # Same seed, same rows: FSDP's reduce-scatter averages the same gradients DDP's all-reduce does.
    assert len(ddp["losses"]) == len(fsdp["losses"]) == 20
    for a, b in zip(ddp["losses"], fsdp["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a), (ddp["losses"], fsdp["losses"])
    assert fsdp["losses"][-1] < fsdp["losses"][0]

    # The sharded checkpoint: one file per rank, verified against its metadata; a truncated shard
    # is caught before it is trusted.
    from sparktune.train.checkpoints import CheckpointStore, verify_checkpoint

    store = CheckpointStore(fsdp["checkpoint_dir"])
    newest = store.latest_complete(2)
    assert newest and newest.endswith("checkpoint-20")
    assert sorted(os.listdir(os.path.join(newest, "model_dcp"))) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert verify_checkpoint(newest, 2) == []
    shard = os.path.join(newest, "optimizer_dcp", "__1_0.distcp")
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    problems = verify_checkpoint(newest, 2)
    assert problems and "truncated" in problems[0], problems
    assert store.latest_complete(2).endswith("checkpoint-10")

    # The final model: one consolidated safetensors model, what DDP trained up to float noise
    # (AdamW normalises tiny gradients of rarely used embedding rows, so those drift most).
    from safetensors.torch import load_file

    a = load_file(os.path.join(ddp["model_dir"], "model.safetensors"))
    b = load_file(os.path.join(fsdp["model_dir"], "model.safetensors"))
    assert a.keys() == b.keys()

    for key in a:
        diff = (a[key] - b[key]).abs()
        assert diff.mean() < 1e-4 and diff.max() < 2e-2, (key, float(diff.mean()), float(diff.max()))


def _assert_sharded_loading(probes, total):
    """Only rank 0 ever held the whole model (the one it built); rank 1 built a meta skeleton (no
    weights) and allocated only its shards, receiving rank 0's weights one tensor at a time."""
    first, second = (p["load"] for p in probes)
    assert first["rank"] == 0 and first["before"] == total, first
    assert second["rank"] == 1 and second["before"] == 0, second
    for load in (first, second):
        assert load["total"] == total
        assert 0 < load["sharded"] <= total * (0.5 + SLACK), load
        assert load["largest_received"] < total / 2, load  # one tensor at a time, never the model


@pytest.mark.timeout(300)
def test_fsdp_lora_shards_the_frozen_base_and_saves_a_merged_model(tmp_path, llama_table):
    result, probes = _torchrun(tmp_path, llama_table, "lora", parallelism="fsdp", lora=True, steps=4)
    for probe in probes:
        assert not probe["ddp"] and probe["sharded"]
        assert probe["trainable_params"] < probe["total_params"] / 100  # only the adapters train
        assert probe["params"] <= probe["total_params"] * (0.5 + SLACK)
        assert 0 < probe["grads"] <= probe["trainable_params"] * (0.5 + SLACK)
    _assert_sharded_loading(probes, probes[0]["total_params"])
    from safetensors.torch import load_file

    saved = load_file(os.path.join(result["model_dir"], "model.safetensors"))
    assert not any("lora" in key for key in saved)  # merged into the base weights


@pytest.mark.timeout(600)
def test_fsdp_under_torchdistributor_resumes_after_a_killed_rank_and_serves(spark, tmp_path, gpt2_tokenizer_path,
                                                                            mlflow_uri, monkeypatch):
    import mlflow
    import pandas as pd

    from sparktune.errors import ConfigError
    from sparktune.tracking import process_uris
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    table = write_tokenized_table(tmp_path / "tok", gpt2_tokenizer_path, task="causal-lm", n_train=16, n_test=4,
                                  max_length=32)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [HERE, ROOT, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SPARKTUNE_TRAIN_CALLBACKS", "train_faults:kill_at_step")
    monkeypatch.setenv("SPARKTUNE_TEST_KILL_AT_STEP", "5")  # rank 1 SIGKILLs itself after step 5
    overrides = {
        "output_dir": str(tmp_path / "out"), "model.name": "tiny-llama", "model.config_overrides": TINY_LLAMA,
        "data.table": str(table), "data.eval_split": "", "train.batch_size": 2, "train.max_steps": 8,
        "train.learning_rate": 1e-3, "train.parallelism": "fsdp", "checkpoint.steps": 2, "checkpoint.keep": 3,
        "distributor.max_restarts": 1, "distributor.num_processes": 2, "mlflow.tracking_uri": mlflow_uri,
        "mlflow.experiment": "fsdp", "mlflow.system_metrics": False,
    }
    cfg = load_train_config(data=_nest(overrides))
    result = run_training(cfg, spark)

    assert result.attempts == 2 and result.resumed_from.endswith("checkpoint-4")
    assert result.global_step == 8 and result.rank_steps == [8, 8]
    run = mlflow.MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.data.params["train.fsdp_units"].startswith("FSDP2 over 2 rank(s): 2 unit(s) of LlamaDecoderLayer")
    assert float(run.data.params["memory.total_gib"]) > 0  # the memory plan, logged before launch

    # The artifact of an FSDP run loads and scores like any other.
    with process_uris(mlflow_uri, None):
        model = mlflow.pyfunc.load_model(result.model_uri)
    scored = model.predict(pd.DataFrame({"text": ["A touching, beautifully acted film."]}))
    assert len(scored) == 1

    # Resuming these checkpoints at another world size is refused, naming the setting.
    again = load_train_config(data=_nest({**overrides, "resume": True, "distributor.num_processes": 1}))
    with pytest.raises(ConfigError, match="distributor.num_processes: is 1, but the checkpoints"):
        run_training(again, spark)


RESHARD_SCRIPT = '''
import sys, torch, torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM
from sparktune.train.fsdp import load_sharded, save_sharded, shard_model
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=64, vocab_size=1000)
torch.manual_seed(0)
if rank == 0:
    model = AutoModelForCausalLM.from_config(cfg)
else:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
shard_model(model, world_size=world)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
x = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1))
def step():
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
if sys.argv[2] == "save":
    step()
    save_sharded(sys.argv[1], model, opt)
else:
    load_sharded(sys.argv[1], model)
    load_sharded(sys.argv[1], model, opt)
step()
loss = float(model(input_ids=x, labels=x).loss)  # a forward is collective: every rank takes part
if rank == 0:
    print("LOSS", loss)
dist.destroy_process_group()
'''


@pytest.mark.timeout(300)
def test_sharded_checkpoint_of_2_ranks_loads_into_1_rank(tmp_path):
    """torch.distributed.checkpoint reshards weights and AdamW state: a checkpoint written by 2
    ranks continues on 1 exactly where 2 ranks would have gone (the same loss after one more
    step). A training job still refuses another world size (its rows and RNG are per rank)."""
    script = tmp_path / "reshard.py"
    script.write_text(RESHARD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    losses = []
    for ranks, mode in ((2, "save"), (1, "load")):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={ranks}",
             str(script), str(tmp_path / "ckpt"), mode], capture_output=True, text=True, env=env, timeout=250)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        losses.append(float(next(line for line in proc.stdout.splitlines() if line.startswith("LOSS")).split()[1]))
    assert sorted(os.listdir(tmp_path / "ckpt" / "model_dcp")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0]), losses
