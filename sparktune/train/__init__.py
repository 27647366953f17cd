"""Distributed fine-tuning: ``train(cfg)`` (Trainer, no Spark) and its TorchDistributor launcher.

Modules: ``config`` (TrainConfig), ``data`` (per-rank Delta reading, sharding, batching),
``train`` (the training function), ``distribute`` (launch plan and TorchDistributor),
``tracking`` (MLflow), ``modelio`` (saving/logging the model), ``cli`` (``sparktune train``).
Submodules are imported on use so that importing the package stays light.
"""

__all__ = ["config", "data", "train", "distribute", "tracking", "modelio", "cli"]
