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

__all__ = ["ShardReport", "LoadRecord", "last_load", "LocalSizes", "fsdp_api", "sharding_units", "shard_model",
           "is_sharded", "local_sizes", "save_sharded", "load_sharded", "full_state_dict", "trainer_view",
           "checkpoint_dcp_problems", "SHARDED_DIRS"]

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
    """What ``shard_model`` did: the unit class(es), how many units, the mesh size, and how the
    weights reached the shards (``LoadRecord``)."""

    unit_classes: tuple[str, ...]
    units: int
    world_size: int
    load: LoadRecord | None = None

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


@dataclass(frozen=True)
class LoadRecord:
    """Parameter elements this rank held in real memory while its shards were filled.

    ``before``: when ``shard_model`` was called (rank 0: the whole model; the other ranks: 0, a
    meta-device skeleton); ``sharded``: its local shards afterwards; ``largest_received``: the
    largest single tensor it was sent (rank 0's weights travel one tensor at a time).
    """

    rank: int
    before: int
    sharded: int
    total: int
    largest_received: int


_LOADS: list[LoadRecord] = []


def last_load() -> LoadRecord | None:
    """How the last ``shard_model`` of this process filled its shards (None: none ran)."""
    return _LOADS[-1] if _LOADS else None


def _meta_parameters(model, dtypes: dict | None = None) -> None:
    """Every parameter of ``model`` replaced by an empty one on the meta device (tied parameters
    stay one parameter); ``dtypes`` (name -> dtype) casts them as they go."""
    import torch

    done: dict[int, torch.nn.Parameter] = {}
    for owner, module in model.named_modules(remove_duplicate=False):
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                dtype = (dtypes or {}).get(f"{owner}.{leaf}" if owner else leaf, param.dtype)
                done[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta", dtype=dtype),
                                                     requires_grad=param.requires_grad)
            module._parameters[leaf] = done[id(param)]


def _layout(model) -> dict:
    return {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters(remove_duplicate=False)}


def _prepare_scatter(model, rank: int):
    """Before ``fully_shard``: rank 0 keeps its weights aside (``(state dict, buffers)``) and empties
    its model; every rank checks its skeleton against rank 0's (names, shapes, dtypes)."""
    import torch.distributed as dist

    layout = [_layout(model) if rank == 0 else None]
    dist.broadcast_object_list(layout, src=0)
    ours = _layout(model)
    if rank == 0:
        state = model.state_dict()  # the tensors themselves, no copy
        buffers = {name: b.detach().cpu() for name, b in model.named_buffers(remove_duplicate=False)}
        _meta_parameters(model)
        return state, buffers
    theirs = layout[0]
    assert theirs is not None
    differ = [n for n in sorted(set(ours) | set(theirs)) if ours.get(n, (None,))[0] != theirs.get(n, (None,))[0]]
    if differ:
        raise SparktuneError(f"train.parallelism: fsdp: rank {rank} built a model that differs from rank 0's at "
                             f"{', '.join(differ[:5])}; every rank must build the same model (same model.* settings)")
    _meta_parameters(model, {n: dtype for n, (_, dtype) in theirs.items()})
    return {}, None


def _scatter(model, state: dict, buffers: dict | None, device) -> int:
    """After ``fully_shard``: allocate this rank's shards, fill them from rank 0's weights (one
    tensor at a time), and give every rank rank 0's buffers. Returns the largest tensor received."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    sent = [buffers]
    dist.broadcast_object_list(sent, src=0)  # small: rotary frequencies, masks
    for name, value in (sent[0] or {}).items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # each tensor travels whole, and the receiver keeps its slice of it
    return max((int(p.numel()) for p in model.parameters()), default=0)


def shard_model(model, *, units=(), reshard_after_forward: bool = True, cpu_offload: bool = False,
                gpu: bool = False, bf16: bool = False, world_size: int = 1) -> ShardReport:
    """``fully_shard`` ``model`` in place over all ``world_size`` ranks of the process group.

    With several ranks, rank 0 holds the built model (its weights) and the other ranks a
    meta-device skeleton (``sparktune.train.model.skeleton_rank``): the model is sharded empty,
    each rank allocates only its shards, and rank 0's weights are scattered into them one tensor
    at a time (``set_model_state_dict(broadcast_from_rank0=True)``), so only rank 0 ever holds a
    full copy, and only until its shards are filled.

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
    rank = mesh.get_rank()
    before = sum(int(p.numel()) for p in set(model.parameters()) if not p.is_meta)
    total = sum(int(p.numel()) for p in model.parameters())
    scatter = world_size > 1
    if scatter:
        state, buffers = _prepare_scatter(model, rank)
    for unit in found:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=offload)
    # The root (embeddings, head, final norm) is gathered for the whole step anyway: FSDP2 keeps
    # the root's weights after forward.
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=offload)
    received = 0
    if scatter:
        device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        received = _scatter(model, state, buffers, device)
        del state, buffers
    load = LoadRecord(rank=rank, before=before, sharded=sum(_local_numel(p) for p in model.parameters()),
                      total=total, largest_received=received)
    _LOADS.append(load)
    return ShardReport(unit_classes=classes, units=len(found), world_size=world_size, load=load)


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
