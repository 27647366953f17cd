"""Distributed fine-tuning: ``train(cfg)`` (Trainer, no Spark) and its TorchDistributor launcher.

Modules: ``config`` (TrainConfig), ``data`` (per-rank Delta reading, sharding, batching),
``pinned`` (``PinnedJob``: what the driver decides once and hands to the ranks), ``recipe``
(``train(cfg)``: setup -> fit -> finish), ``dist`` (process group, collectives),
``model`` (tokenizer, model, LoRA), ``callbacks``, ``checkpoints`` (verify, pick, job record),
``failures`` (rank failure records), ``checks`` (table vs model), ``result`` (TrainResult),
``train`` (the torchrun entry), ``distribute`` (launch plan and relaunch loop), ``tracking``
(config params and Delta inputs), ``modelio`` (saving/logging the model), ``cli``
(``sparktune train``). Submodules are imported on use so that importing the package stays light.
"""

__all__ = ["callbacks", "checkpoints", "checks", "cli", "config", "data", "dist", "distribute", "failures", "model",
           "modelio", "pinned", "recipe", "result", "tracking", "train"]
