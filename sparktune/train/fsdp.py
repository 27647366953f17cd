"""Sharded data parallel (``train.parallelism: fsdp``): torch FSDP2 ``fully_shard`` wired by hand.

Why not Trainer's ``fsdp=`` or accelerate's FSDP plugin: on CPU (gloo) transformers'
``Trainer(use_cpu=True, fsdp=...)`` silently trains plain DDP (every rank a full replica), so
the sharding could neither be tested here nor trusted. Torch's own ``fully_shard`` shards on a
CPU device mesh as on GPUs, so this module applies it to the model before ``Trainer`` sees it,
and ``recipe.fit`` keeps Trainer from wrapping the sharded model in DDP (``trainer_view``).

- ``sharding_units``: the modules gathered one at a time (a model's decoder/encoder layers:
  transformers' ``_no_split_modules``, else the children of its longest ``ModuleList``);
- ``shard_model``: ``fully_shard`` each unit, then the root (embeddings, head, final norm),
  with reshard-after-forward, bf16 mixed precision on GPUs and optional CPU offload;
- ``save_sharded`` / ``load_sharded``: each rank writes and reads only its shard of the
  weights and AdamW state (``torch.distributed.checkpoint``);
- ``full_state_dict``: the whole model on rank 0 only (CPU), for the final artifact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sparktune.errors import SparktuneError

__all__ = ["ShardReport", "LocalSizes", "fsdp_api", "sharding_units", "shard_model", "is_sharded", "local_sizes",
           "save_sharded", "load_sharded", "full_state_dict", "trainer_view", "checkpoint_dcp_problems", "SHARDED_DIRS"]

SHARDED_DIRS = ("model_dcp", "optimizer_dcp")
"""Folders of a sharded checkpoint (``torch.distributed.checkpoint``: one file per rank + .metadata)."""


def fsdp_api():
    """``(fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy)``: public from torch 2.6,
    under ``torch.distributed._composable.fsdp`` in 2.4-2.5."""
    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import (  # type: ignore[no-redef,unused-ignore]
                CPUOffloadPolicy,
                MixedPrecisionPolicy,
                OffloadPolicy,
                fully_shard,
            )
        except ImportError:
            import torch

            raise SparktuneError(
                f"train.parallelism: fsdp needs torch >= 2.4 (FSDP2 fully_shard), found torch {torch.__version__}; "
                "upgrade torch or use train.parallelism=ddp"
            ) from None
    return fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy


@dataclass(frozen=True)
class ShardReport:
    """What ``shard_model`` did: the unit class(es), how many units, the mesh size."""

    unit_classes: tuple[str, ...]
    units: int
    world_size: int

    def describe(self) -> str:
        return f"FSDP2 over {self.world_size} rank(s): {self.units} unit(s) of {', '.join(self.unit_classes)} + root"


def _base_model(model):
    """The transformers model under a peft wrapper (where ``_no_split_modules`` is declared)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def sharding_units(model, names=()) -> list:
    """The modules that become FSDP units, outermost first.

    ``names``: module class names (``fsdp.units``); empty: the model's ``_no_split_modules``
    (transformers declares its layer classes there), else the children of its longest
    ``ModuleList``. Units nested in other units are dropped (the outer one covers them).
    """
    import torch

    wanted = set(names or ())
    if not wanted:
        wanted = set(getattr(_base_model(model), "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in wanted] if wanted else []
    if not found:
        if names:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise SparktuneError(
                f"fsdp.units: no module of class {', '.join(sorted(names))} in the model; its classes are "
                f"{', '.join(present[:40])}; name the layer class (or leave fsdp.units empty)"
            )
        lists: list[torch.nn.ModuleList] = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        if lists:
            sizes = [len(m) for m in lists]
            found = list(lists[sizes.index(max(sizes))])
    if not found:
        raise SparktuneError(
            f"fsdp.units: found no repeated layers in {type(_base_model(model)).__name__} to shard (no "
            "_no_split_modules, no ModuleList); set fsdp.units to its layer class name(s)"
        )
    inside: set[int] = set()
    for unit in found:
        for sub in unit.modules():
            if sub is not unit:
                inside.add(id(sub))
    return [m for m in found if id(m) not in inside and any(True for _ in m.parameters())]


def shard_model(model, *, units=(), reshard_after_forward: bool = True, cpu_offload: bool = False,
                gpu: bool = False, bf16: bool = False, world_size: int = 1) -> ShardReport:
    """``fully_shard`` ``model`` in place over all ``world_size`` ranks of the process group.

    On GPUs with ``bf16`` the gathered weights and the compute are bf16 and gradients are
    reduced in fp32 (the shards and AdamW stay fp32); on CPU ``bf16`` casts the same way.
    Needs an initialised process group (a world of one works too).
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy = fsdp_api()
    mesh = init_device_mesh("cuda" if gpu else "cpu", (world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    found = sharding_units(model, units)
    classes = tuple(sorted({type(u).__name__ for u in found}))  # before fully_shard renames them FSDP<name>
    for unit in found:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=offload)
    # The root (embeddings, head, final norm) is gathered for the whole step anyway: FSDP2 keeps
    # the root's weights after forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=offload)
    return ShardReport(unit_classes=classes, units=len(found),
                       world_size=world_size)


def is_sharded(model) -> bool:
    """True when ``model`` (or a module in it) was ``fully_shard``-ed."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule  # type: ignore[no-redef,unused-ignore]
        except ImportError:
            return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


@dataclass(frozen=True)
class LocalSizes:
    """Elements this rank holds: parameters, gradients, optimizer state; and the model's totals."""

    params: int
    grads: int
    optimizer: int
    total_params: int
    trainable_params: int


def _local_numel(tensor) -> int:
    local = getattr(tensor, "to_local", None)
    return int((local() if callable(local) else tensor).numel())


def local_sizes(model, optimizer=None) -> LocalSizes:
    """What this rank really holds (a DTensor counts its local shard only)."""
    params = list(model.parameters())
    grads = sum(_local_numel(p.grad) for p in params if p.grad is not None)
    state = 0
    if optimizer is not None:
        for per_param in getattr(optimizer, "state", {}).values():
            for value in per_param.values():
                if hasattr(value, "numel") and value.dim() > 0:
                    state += _local_numel(value)
    return LocalSizes(params=sum(_local_numel(p) for p in params), grads=grads, optimizer=state,
                      total_params=sum(int(p.numel()) for p in params),
                      trainable_params=sum(int(p.numel()) for p in params if p.requires_grad))


def save_sharded(folder: str, model, optimizer) -> None:
    """Each rank writes its shard of the weights (``model_dcp``) and AdamW state (``optimizer_dcp``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save(get_model_state_dict(model), checkpoint_id=os.path.join(folder, SHARDED_DIRS[0]))
    if optimizer is not None:
        dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=os.path.join(folder, SHARDED_DIRS[1]))


def load_sharded(folder: str, model, optimizer=None) -> None:
    """Read this rank's shard of a ``save_sharded`` checkpoint into the sharded ``model``/``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer is None:
        state = get_model_state_dict(model)
        dcp.load(state, checkpoint_id=os.path.join(folder, SHARDED_DIRS[0]))
        set_model_state_dict(model, state)
        return
    optim = get_optimizer_state_dict(model, optimizer)
    dcp.load(optim, checkpoint_id=os.path.join(folder, SHARDED_DIRS[1]))
    set_optimizer_state_dict(model, optimizer, optim)


def full_state_dict(model) -> dict[str, Any] | None:
    """The whole model's weights, gathered one tensor at a time into CPU memory of rank 0 only
    (None on the other ranks): the only full copy any process holds."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return state


def trainer_view(model):
    """A thin module around the sharded ``model`` for ``Trainer._wrap_model`` to return.

    Trainer skips ``accelerator.prepare(model)`` (which wraps a multi-process model in DDP, or
    refuses DTensor parameters) exactly when ``_wrap_model`` returns something other than
    ``self.model``; that holds in transformers 4.x and 5.x alike. FSDP2 does its own gradient
    reduction, so nothing else is needed.
    """
    import torch

    class ShardedModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    return ShardedModel(model)


def checkpoint_dcp_problems(path: str) -> list[str]:
    """Why the sharded (DCP) part of checkpoint ``path`` cannot be trusted (empty: it can).

    Every byte range the ``.metadata`` file points at must be there: a rank killed while
    writing leaves a missing or short ``__<rank>_0.distcp`` file.
    """
    problems = []
    for name in SHARDED_DIRS:
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            problems.append(f"{name}/ is missing")
            continue
        try:
            from torch.distributed.checkpoint import FileSystemReader

            metadata = FileSystemReader(folder).read_metadata()
        except Exception as exc:  # noqa: BLE001  (any unreadable metadata means: not trusted)
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            problems.append(f"{name}/.metadata does not load ({why})")
            continue
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            rel = info.relative_path
            needed[rel] = max(needed.get(rel, 0), int(info.offset) + int(info.length))
        for rel, end in sorted(needed.items()):
            full = os.path.join(folder, rel)
            size = os.path.getsize(full) if os.path.exists(full) else -1
            if size < 0:
                problems.append(f"{name}/{rel} is missing")
            elif size < end:
                problems.append(f"{name}/{rel} is truncated ({size} bytes, the metadata needs {end})")
    return problems
