"""Distributed setup for one training process: where it is, the process group, and collectives.

A rank learns its place from torch's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``),
which torchrun and TorchDistributor both set. With one process every helper is a no-op, so
``train(cfg)`` also runs as a plain function call.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

__all__ = ["DistEnv", "dist_env", "use_gpu", "init_process_group", "destroy_process_group", "broadcast", "gather",
           "all_reduce_sum", "set_threads"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env(environ=None) -> DistEnv:
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", 1))
    return DistEnv(rank=int(env.get("RANK", 0)), world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)))


def use_gpu() -> bool:
    """CUDA is there and the launcher did not hide it (a CPU plan sets CUDA_VISIBLE_DEVICES='')."""
    import torch

    return torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""


def set_threads(num_threads: int | None, env: DistEnv) -> None:
    """Processes on one machine share its cores: more threads than cores only thrash."""
    import torch

    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // max(env.local_world_size, 1)))


def init_process_group(backend: str, env: DistEnv) -> None:
    """Join the job's process group (``backend``: auto, gloo or nccl); nothing for one process."""
    if not env.distributed:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if use_gpu() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value, env: DistEnv):
    """Rank 0's ``value`` on every rank."""
    if not env.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, env: DistEnv) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if not env.distributed:
        return [value]
    import torch.distributed as dist

    out = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over ranks (every rank must call it at the same point)."""
    if not env.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
