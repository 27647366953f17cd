"""Trainer callbacks of a sparktune job, in the order Trainer must call them.

``on_log`` hands every callback the same ``logs`` dict, in list order, so the order is the
contract: ``ThroughputCallback`` adds samples/s, tokens/s and pad share; ``MetricNamesCallback``
renames Trainer's keys to sparktune's ``<split>/<metric>`` (``loss`` -> ``train/loss``,
``eval_accuracy`` -> ``eval/accuracy``); then transformers' own ``MLflowCallback`` (rank 0
only) logs them to the job's run. ``FsyncCallback`` makes each saved checkpoint durable.

Extra callbacks (profilers, probes, fault injection) come from ``$SPARKTUNE_TRAIN_CALLBACKS``:
comma-separated ``module:callable`` names; each callable gets ``(cfg, env)`` and returns a
callback, a list of them, or None. The driver forwards that variable to the ranks, and the
variables named in ``$SPARKTUNE_FORWARD_ENV`` for a plugin's own settings (``sparktune.env``).
"""

from __future__ import annotations

import importlib
import math
import os
import time

from transformers import TrainerCallback

from sparktune.env import env_value
from sparktune.errors import ConfigError
from sparktune.tracking import metric_key
from sparktune.train.checkpoints import fsync_tree
from sparktune.train.dist import DistEnv, all_reduce_sum

__all__ = ["ThroughputCallback", "MetricNamesCallback", "FsyncCallback", "plugin_callbacks", "metric_names",
           "PLUGINS_ENV"]

PLUGINS_ENV = "SPARKTUNE_TRAIN_CALLBACKS"

# Trainer's end-of-training summary keys, renamed so they do not land in the per-interval series.
_SUMMARY = {
    "train_loss": "mean_loss",
    "train_runtime": "runtime_seconds",
    "train_samples_per_second": "overall_samples_per_second",
    "train_steps_per_second": "overall_steps_per_second",
    "total_flos": "total_flos",
}


def metric_names(logs: dict) -> dict:
    """Trainer's log keys as ``<split>/<metric>``; keys that already have a split are kept."""
    out = {}
    for key, value in logs.items():
        if "/" in key:
            out[key] = value
        elif key.startswith("eval_"):
            out[metric_key("eval", key[len("eval_"):])] = value
        elif key in _SUMMARY:
            out[metric_key("train", _SUMMARY[key])] = value
        else:
            out[metric_key("train", key)] = value
    return out


class ThroughputCallback(TrainerCallback):
    """Samples/s, tokens/s and pad share of each logging interval, summed over ranks.

    Every rank logs at the same steps, so the all-reduce in ``on_log`` is matched; the collator
    counts real and pad tokens of the batches it made since the last log.
    """

    def __init__(self, collator, env: DistEnv):
        self.collator = collator
        self.env = env
        self.t0 = time.perf_counter()
        self.samples = 0
        self.total_real = 0
        self.total_pad = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.samples += args.per_device_train_batch_size * args.gradient_accumulation_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        real, padded = self.collator.take_counts()
        real, padded, samples = (int(x) for x in all_reduce_sum([real, padded, self.samples], self.env))
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        logs["samples_per_second"] = samples / elapsed
        logs["tokens_per_second"] = real / elapsed
        logs["pad_share"] = padded / (real + padded) if real + padded else 0.0
        self.total_real += real
        self.total_pad += padded
        self.t0 = time.perf_counter()
        self.samples = 0

    @property
    def pad_share(self) -> float:
        total = self.total_real + self.total_pad
        return self.total_pad / total if total else 0.0


class MetricNamesCallback(TrainerCallback):
    """Renames the shared logs dict in place, so callbacks after it (MLflow) see sparktune's names.

    Also keeps rank 0's history of finite numbers for the job's result.
    """

    def __init__(self):
        self.history: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        renamed = metric_names(logs)
        logs.clear()
        logs.update(renamed)
        numbers = {k: float(v) for k, v in renamed.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.history.append({"step": state.global_step, **numbers})

    def series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if key in h]


class FsyncCallback(TrainerCallback):
    """fsync the checkpoint Trainer just wrote (its files, then its folder)."""

    def on_save(self, args, state, control, **kwargs):
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(path):
            fsync_tree(path)


def plugin_callbacks(cfg, env: DistEnv, environ=None) -> list:
    """Callbacks named in ``$SPARKTUNE_TRAIN_CALLBACKS`` (``module:callable``, comma-separated)."""
    spec = env_value(PLUGINS_ENV, environ) or ""
    found: list = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        module_name, _, attr = item.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr or "callbacks")
        except (ImportError, AttributeError) as exc:
            raise ConfigError([f"${PLUGINS_ENV}: cannot load {item!r} ({exc}); expected module:callable "
                               "importable on every rank"]) from None
        made = factory(cfg, env)
        if made is None:
            continue
        found.extend(made if isinstance(made, (list, tuple)) else [made])
    return found
