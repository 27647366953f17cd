"""GPU check: ``train(cfg)`` under torchrun on a randomly initialised GPT-2, tokens/s and MFU.

Runs where Spark and Java are absent (``train(cfg)`` needs neither): builds a small packed
causal-LM Delta table with delta-rs (IMDB reviews from ``--imdb`` if present, else synthetic
text, tokenized with the GPT-2 tokenizer, concatenated with EOS and cut into blocks of
``--block`` tokens), writes a training config, and runs

    torchrun --standalone --nproc_per_node=N -m sparktune.train.train --config CONFIG

once without and once with ``torch.compile`` (``--compile``). GPT-2 small (124M: 12 layers,
12 heads, 768 wide, 1024 positions), bf16 mixed precision, fused AdamW (the optimizer
transformers 5 picks by default: ``adamw_torch_fused``). Throughput is read from the run's
MLflow metrics (``tokens_per_second`` per logging interval, summed over ranks; the first
intervals, with compilation and warm-up, are skipped); MFU is

    tokens/s x (6 N + 12 L d T) / (GPUs x peak bf16 FLOP/s)

with N the parameters without position embeddings (the tied LM head does count: it is a
matmul), L layers, d width, T block length (nanoGPT's / PaLM's estimate). The peak is looked up
from the GPU's name (H100/H200 SXM: 989 TFLOP/s dense bf16) or given by ``--peak-tflops``.

    bash bench/gpu_check.sh                       # on a GPU machine: every GPU, 124M, both arms
    python bench/gpu_check.py --smoke             # CPU, tiny GPT-2, a few steps (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name fragment, most specific first.
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
)

GPT2_SMALL: dict[str, Any] = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768}
GPT2_TINY: dict[str, Any] = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64}


def _shared_candidates(*parts: str) -> list:
    roots = [os.environ.get("SPARKTUNE_SHARED", ""), os.path.join(ROOT, "shared"),
             os.path.join(os.path.dirname(ROOT), "shared")]
    return [os.path.join(r, *parts) for r in roots if r]


def _first_existing(paths: list) -> str:
    return next((p for p in paths if os.path.exists(p)), "")


def gpt2_flops_per_token(n_layer: int, n_embd: int, vocab: int, block: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T (N without position embeddings)."""
    per_layer = 12 * n_embd * n_embd + 13 * n_embd  # attention + MLP weights and biases, 2 layer norms
    params = vocab * n_embd + n_layer * per_layer + 2 * n_embd
    return 6 * params + 12 * n_layer * n_embd * block


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for fragment, peak in PEAK_BF16:
        if fragment in device_name:
            return peak
    return None


def _texts(imdb: str, n: int, seed: int) -> list:
    """``n`` review texts from the IMDB Parquet folder, else synthetic sentences."""
    import glob
    import random

    files = sorted(glob.glob(os.path.join(imdb, "*.parquet"))) if imdb else []
    if files:
        import pyarrow.parquet as pq

        texts: list = []
        for path in files:
            texts.extend(pq.read_table(path, columns=["text"]).column("text").to_pylist())
            if len(texts) >= n:
                break
        return texts[:n]
    rng = random.Random(seed)
    words = ["the", "film", "was", "a", "quiet", "great", "terrible", "story", "of", "actors", "who", "play",
             "with", "light", "and", "sound", "while", "plot", "moves", "slowly", "toward", "an", "ending"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) + "." for _ in range(n)]


def build_packed_table(path: str, tokenizer_path: str, imdb: str, blocks: int, block: int, seed: int) -> dict:
    """A packed causal-LM tokenized Delta table of ``blocks`` full blocks; returns its facts."""
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    needed = blocks * block
    stream: list = []
    batch = 256
    start = 0
    while len(stream) < needed:
        texts = _texts(imdb, start + batch, seed)[start:]
        if not texts:
            start = 0  # the source ran out: go round again (a benchmark needs tokens, not novelty)
            continue
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
        start += batch
    ids = np.asarray(stream[:needed], dtype=np.int32).reshape(blocks, block)
    offsets = np.arange(0, needed + 1, block, dtype=np.int32)
    table = pa.table({
        "row_id": pa.array([f"b{i:08d}" for i in range(blocks)]),
        "split": pa.array(["train"] * blocks),
        "label": pa.array(np.full(blocks, -1, dtype=np.int32)),
        "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids.reshape(-1))),
        "n_tokens": pa.array(np.full(blocks, block, dtype=np.int32)),
        "truncated": pa.array(np.zeros(blocks, dtype=bool)),
    })
    write_deltalake(path, table, mode="overwrite")
    return {"blocks": blocks, "block": block, "vocab": len(tokenizer), "source": "imdb" if imdb else "synthetic"}


def write_config(path: str, *, table: str, tokenizer: str, output_dir: str, model: dict, block: int,
                 batch_size: int, steps: int, logging_steps: int, bf16: bool, compile_: bool,
                 tracking_uri: str, nproc: int, parallelism: str = "ddp") -> None:
    import yaml

    config = {
        "output_dir": output_dir,
        "model": {"name": tokenizer, "tokenizer": tokenizer, "task": "causal-lm",
                  "config_overrides": dict(model, n_positions=block)},
        "data": {"table": table, "location": table, "version": 0, "eval_split": "", "group_by_length": False},
        "train": {"batch_size": batch_size, "max_steps": steps, "learning_rate": 6e-4, "warmup_steps": 0,
                  "weight_decay": 0.1, "bf16": bf16, "torch_compile": compile_, "logging_steps": logging_steps,
                  "seed": 0, "parallelism": parallelism},
        "checkpoint": {"strategy": "no"},
        "mlflow": {"enabled": True, "tracking_uri": tracking_uri, "experiment": "gpu-check",
                   "log_model": False, "system_metrics": False},
        "distributor": {"num_processes": nproc},
    }
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


def _steady_tokens_per_second(tracking_uri: str, run_id: str, skip: int) -> float | None:
    """Median of the logged tokens/s intervals after the first ``skip`` (compile, warm-up)."""
    if not run_id:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    keys = [k for k in client.get_run(run_id).data.metrics if k.endswith("tokens_per_second")]
    if not keys:
        return None
    history = sorted(client.get_metric_history(run_id, keys[0]), key=lambda m: m.step)
    values = [m.value for m in history[skip:]] or [m.value for m in history[-1:]]
    return statistics.median(values) if values else None


def run_arm(args, work: str, table: str, facts: dict, compile_: bool, parallelism: str = "ddp") -> dict:
    arm = ("compile" if compile_ else "eager") + ("-fsdp" if parallelism == "fsdp" else "")
    out = os.path.join(work, arm)
    os.makedirs(out, exist_ok=True)
    config = os.path.join(out, "config.yaml")
    tracking_uri = "sqlite:///" + os.path.join(out, "mlflow.db")
    model = GPT2_TINY if args.smoke else GPT2_SMALL
    write_config(config, table=table, tokenizer=args.tokenizer, output_dir=os.path.join(out, "job"), model=model,
                 block=args.block, batch_size=args.batch_size, steps=args.steps, logging_steps=args.logging_steps,
                 bf16=not args.smoke, compile_=compile_, tracking_uri=tracking_uri, nproc=args.nproc,
                 parallelism=parallelism)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               SPARKTUNE_HOME=os.path.join(out, "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke mode is the CPU path, wherever it runs
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={args.nproc}", "-m", "sparktune.train.train", "--config", config]
    started = time.perf_counter()
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"gpu_check: the {arm} run failed (exit {done.returncode}); its output is above")
    with open(os.path.join(out, "job", "result.json"), encoding="utf-8") as handle:
        result = json.load(handle)
    tokens = result["global_step"] * args.batch_size * args.block * args.nproc
    overall = tokens / result["train_seconds"]
    skip = max(1, args.warmup_steps // args.logging_steps)
    steady = _steady_tokens_per_second(tracking_uri, result.get("run_id", ""), skip)
    flops = gpt2_flops_per_token(model["n_layer"], model["n_embd"], facts["vocab"], args.block)
    peak = facts.get("peak")
    rate = steady or overall
    plan_gib = None
    if result.get("run_id"):
        from mlflow import MlflowClient

        plan_gib = MlflowClient(tracking_uri).get_run(result["run_id"]).data.params.get("memory.total_gib")
    return {
        "arm": arm, "plan_gib": float(plan_gib) if plan_gib else None,
        "steps": result["global_step"], "tokens": tokens, "wall_s": wall,
        "train_s": result["train_seconds"], "tokens_per_s_overall": overall, "tokens_per_s_steady": steady,
        "model_tflops": rate * flops / 1e12, "mfu": rate * flops / (peak * args.nproc) if peak else None,
        "first_loss": result.get("first_loss"), "last_loss": result.get("last_loss"),
    }


def _device_facts(args) -> dict:
    import torch

    if args.smoke or not torch.cuda.is_available():
        name = "cpu"
    else:
        name = torch.cuda.get_device_name(0)
    return {"device": name, "peak": peak_flops(name, args.peak_tflops)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny GPT-2, a few steps (for CI)")
    parser.add_argument("--nproc", type=int, default=0, help="ranks (default: every GPU; 1 with --smoke)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per arm (default 60; 4 with --smoke)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="steps left out of the steady tokens/s")
    parser.add_argument("--logging-steps", type=int, default=0, help="default 10 (2 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=0, help="blocks per rank per step (default 16; 2 smoke)")
    parser.add_argument("--block", type=int, default=0, help="tokens per block (default 1024; 64 smoke)")
    parser.add_argument("--compile", choices=("both", "on", "off"), default="", help="default both (off smoke)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak, if unknown")
    parser.add_argument("--tokenizer", default="", help="GPT-2 tokenizer folder (default: "
                                                        "shared/models/gpt2-tokenizer)")
    parser.add_argument("--imdb", default=None, help="IMDB Parquet folder (default: shared/data/imdb; '' synthetic)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temp folder)")
    parser.add_argument("--parallelism", default="", help="comma list of ddp,fsdp (default both; ddp with --smoke)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.steps = args.steps or (4 if smoke else 60)
    args.logging_steps = args.logging_steps or (2 if smoke else 10)
    args.batch_size = args.batch_size or (2 if smoke else 16)
    args.block = args.block or (64 if smoke else 1024)
    args.compile = args.compile or ("off" if smoke else "both")
    if smoke:
        args.warmup_steps = min(args.warmup_steps, args.logging_steps)
    args.tokenizer = args.tokenizer or _first_existing(_shared_candidates("models", "gpt2-tokenizer"))
    if not args.tokenizer:
        raise SystemExit("gpu_check: no GPT-2 tokenizer found; pass --tokenizer DIR (shared/models/gpt2-tokenizer)")
    if args.imdb is None:
        args.imdb = _first_existing(_shared_candidates("data", "imdb"))
    facts = _device_facts(args)
    if not args.nproc:
        import torch

        args.nproc = 1 if smoke or not torch.cuda.is_available() else torch.cuda.device_count()
    work = args.work or tempfile.mkdtemp(prefix="sparktune-gpu-check-")
    table = os.path.join(work, "packed")
    blocks = args.steps * args.batch_size * args.nproc + args.batch_size * args.nproc
    if not os.path.exists(os.path.join(table, "_delta_log")):
        facts.update(build_packed_table(table, args.tokenizer, args.imdb, blocks, args.block, seed=0))
    else:
        from transformers import AutoTokenizer

        facts["vocab"] = len(AutoTokenizer.from_pretrained(args.tokenizer))
    arms = {"both": (False, True), "on": (True,), "off": (False,)}[args.compile]
    modes = (args.parallelism or ("ddp" if smoke else "ddp,fsdp")).split(",")
    results = [run_arm(args, work, table, facts, compile_) for compile_ in arms] if "ddp" in modes else []
    if "fsdp" in modes:  # the sharded path (a world of one still runs fully_shard and the DCP code)
        results.append(run_arm(args, work, table, facts, False, parallelism="fsdp"))
    peak = f"{facts['peak'] / 1e12:.0f} TFLOP/s bf16 peak" if facts["peak"] else "peak unknown (--peak-tflops)"
    print(f"device: {facts['device']} x {args.nproc} ({peak}); GPT-2 {'tiny' if smoke else 'small 124M'}, "
          f"block {args.block}, batch {args.batch_size}/rank, {args.steps} steps, data {facts.get('source', 'cached')}")
    print(f"{'arm':>11} {'tokens/s (steady)':>18} {'tokens/s (all)':>15} {'model TFLOP/s':>14} {'MFU':>7} "
          f"{'loss first->last':>18} {'plan GiB':>9}")
    for r in results:
        steady = f"{r['tokens_per_s_steady']:.0f}" if r["tokens_per_s_steady"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        loss = f"{r['first_loss'] or 0:.2f}->{r['last_loss'] or 0:.2f}"
        print(f"{r['arm']:>11} {steady:>18} {r['tokens_per_s_overall']:>15.0f} {r['model_tflops']:>14.3f} "
              f"{mfu:>7} {loss:>18} {r['plan_gib'] or 'n/a':>9}")
    if args.json:
        print(json.dumps({"device": facts["device"], "nproc": args.nproc, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
