"""Test-only probe for training ranks, loaded through ``$SPARKTUNE_TRAIN_CALLBACKS``.

``train_probe:probe`` writes ``$SPARKTUNE_TEST_PROBE_DIR/rank-N.json`` after the first optimizer
step: what this rank really holds (local shard sizes of parameters, gradients and AdamW state,
``sparktune.train.fsdp.local_sizes``) and whether any ``DistributedDataParallel`` exists in the
process (a silent fallback to DDP); and for a sharded model how its shards were filled
(``sparktune.train.fsdp.last_load``: what the rank held before sharding). The library never imports this module.
"""

import gc
import json
import os

from transformers import TrainerCallback

PROBE_ENV = "SPARKTUNE_TEST_PROBE_DIR"


class Probe(TrainerCallback):
    def __init__(self, folder: str, rank: int):
        self.folder, self.rank, self.done = folder, rank, False

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.done:
            return
        self.done = True
        from torch.nn.parallel import DistributedDataParallel

        from sparktune.train.fsdp import is_sharded, last_load, local_sizes

        sizes = local_sizes(model, getattr(optimizer, "optimizer", optimizer))
        ddp = any(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank-{self.rank}.json"), "w", encoding="utf-8") as handle:
            json.dump({"params": sizes.params, "grads": sizes.grads, "optimizer": sizes.optimizer,
                       "total_params": sizes.total_params, "trainable_params": sizes.trainable_params,
                       "ddp": ddp, "sharded": is_sharded(model),
                       "load": last_load().__dict__ if last_load() else None}, handle)


def probe(cfg, env):
    folder = os.environ.get(PROBE_ENV)
    return Probe(folder, env.rank) if folder else None
