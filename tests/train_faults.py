"""Test-only fault injection for training ranks, loaded through ``$SPARKTUNE_TRAIN_CALLBACKS``.

``SPARKTUNE_TRAIN_CALLBACKS=train_faults:kill_at_step`` (with this folder on PYTHONPATH) and
``SPARKTUNE_TEST_KILL_AT_STEP=N`` make the last rank SIGKILL itself after optimizer step N,
once per checkpoint folder (a marker file there remembers), so the fault tests can check
resume-after-failure on real processes. The library never imports this module nor reads its
variable: ``kill_switch`` sets both variables and names the step's in ``SPARKTUNE_FORWARD_ENV``,
the library's general way to hand a plugin's settings to ranks (they reach executors too).
"""

import os
import signal

from transformers import TrainerCallback

KILL_ENV = "SPARKTUNE_TEST_KILL_AT_STEP"
KILL_MARKER = ".sparktune_test_killed"


class KillAtStep(TrainerCallback):
    def __init__(self, step: int, rank: int, world_size: int, checkpoint_dir: str):
        self.step, self.rank, self.world_size, self.checkpoint_dir = step, rank, world_size, checkpoint_dir

    def on_step_end(self, args, state, control, **kwargs):
        marker = os.path.join(self.checkpoint_dir, KILL_MARKER)
        if state.global_step == self.step and self.rank == self.world_size - 1 and not os.path.exists(marker):
            with open(marker, "w", encoding="utf-8") as handle:
                handle.write(f"killed rank {self.rank} at step {self.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(cfg, env):
    step = os.environ.get(KILL_ENV)
    return KillAtStep(int(step), env.rank, env.world_size, cfg.checkpoint_dir) if step else None


def kill_switch(monkeypatch, step: int) -> None:
    """Make the last rank of the next launch SIGKILL itself after optimizer step ``step``
    (this folder goes on the ranks' PYTHONPATH; the step variable is forwarded to them)."""
    here = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SPARKTUNE_TRAIN_CALLBACKS", "train_faults:kill_at_step")
    monkeypatch.setenv("SPARKTUNE_FORWARD_ENV", KILL_ENV)
    monkeypatch.setenv(KILL_ENV, str(step))
