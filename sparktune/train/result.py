"""``TrainResult``: what a training job returns (every rank, and the launcher after it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparktune.results import StageResult
from sparktune.tasks import Task

__all__ = ["TrainResult"]


@dataclass
class TrainResult(StageResult):
    """One training job's outcome.

    ``model_uri`` is the logged MLflow model (empty when ``mlflow.log_model`` is off);
    ``eval_metrics`` holds the end-of-training evaluation on ``data.eval_split`` under the names
    logged to MLflow (``eval/loss``, ``eval/accuracy``, ...); ``rank_steps`` is every rank's
    final step; ``attempts``/``failures`` are filled by the launcher (one line per failed launch).
    """

    run_id: str
    model_uri: str
    model_dir: str
    output_dir: str
    checkpoint_dir: str
    task: Task
    table: str
    location: str
    version: int
    world_size: int
    global_step: int
    rank_steps: list[int]
    train_rows: int
    rows_per_rank: int
    eval_rows: int
    train_loss: float
    """Mean training loss over the run (Trainer's ``training_loss``)."""
    losses: list[float] = field(default_factory=list)
    """``train/loss`` at each logging step of the last launch."""
    eval_metrics: dict[str, float] = field(default_factory=dict)
    pad_share: float = 0.0
    samples_per_second: float | None = None
    train_seconds: float = 0.0
    resumed_from: str | None = None
    attempts: int = 1
    failures: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds of the job's parts (``*_s``): ``pin_s`` and ``staging_s`` (driver: table
    snapshot, memory plan; shards), ``mlflow_run_s`` (the job's run opened, config and inputs
    logged), ``launch_s`` (the ranks' start until ``train`` runs in rank 0:
    processes, imports), ``rank_setup_s`` (process group, rows, model), ``training_loop_s``,
    ``final_eval_s``, ``model_logging_s`` (gather, save, MLflow), ``teardown_s`` (rank 0 done until
    the launcher has the result). The launch's parts are of the last (successful) launch."""

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict:
        return {**super().to_dict(), "first_loss": self.first_loss, "last_loss": self.last_loss}

    def metric(self, name: str) -> float | None:
        """An end-of-training eval metric by bare name (``accuracy``) or full name (``eval/accuracy``)."""
        return self.eval_metrics.get(name if "/" in name else f"eval/{name}")

    def summary(self) -> str:
        lines = ["sparktune train: done"]
        rows = [("table", self.table), ("version", self.version), ("task", self.task.value),
                ("world_size", self.world_size), ("global_step", self.global_step), ("attempts", self.attempts),
                ("train_loss", self.train_loss), *sorted(self.eval_metrics.items()),
                ("pad_share", self.pad_share), ("samples_per_second", self.samples_per_second),
                ("train_seconds", self.train_seconds), ("resumed_from", self.resumed_from),
                ("model_dir", self.model_dir)]
        for key, value in rows:
            if value is not None:
                lines.append(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
        lines.append(f"run_id: {self.run_id}")
        lines.append(f"model_uri: {self.model_uri}")
        return "\n".join(lines)
