"""The one owner of a job's checkpoint folder: what is in it, what can be trusted, what the job was.

``CheckpointStore(dir)`` answers "which checkpoint do I resume from?" (``latest_complete``):
the newest ``checkpoint-N`` whose files are all there *and* intact (trainer_state.json parses
and names step N, optimizer/scheduler/RNG files are complete zip archives, safetensors
weights have the size their header promises), written by the same number of ranks as this
launch. A corrupt newest checkpoint is moved aside (``corrupt-checkpoint-N``, kept for
inspection and out of Trainer's rotation) and the previous complete one is used.

It also keeps the job record (``sparktune_job.json``): the MLflow run, the table (location,
Delta table id, pinned version) and the world size the checkpoints were written with, so a
resume continues on the same data and refuses what it cannot continue (``resume_problems``).
Written files are fsynced (``fsync_tree``) so a crash of the machine cannot leave a checkpoint
that looks complete but is not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from dataclasses import asdict, dataclass, fields

__all__ = ["CheckpointStore", "JobRecord", "verify_checkpoint", "checkpoint_world_size", "fsync_tree",
           "latest_complete_checkpoint", "resume_problems"]

log = logging.getLogger("sparktune.train")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
JOB_FILE = "sparktune_job.json"
_ZIP_FILES = ("optimizer.pt", "scheduler.pt")
_RNG = re.compile(r"^rng_state(?:_(\d+))?\.pth$")
_SHARDED_DIRS = ("model_dcp", "optimizer_dcp")  # sparktune.train.fsdp.SHARDED_DIRS (torch-free here)


@dataclass
class JobRecord:
    """What a job's checkpoints belong to; written by the launcher (or rank 0 under torchrun)."""

    location: str = ""
    table: str = ""
    table_id: str = ""
    version: int | None = None
    world_size: int = 1
    task: str = ""
    run_id: str = ""
    tracking_uri: str = ""

    @classmethod
    def from_dict(cls, data: dict) -> JobRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _zip_ok(path: str) -> str | None:
    """None if ``path`` is a complete torch.save archive (every member's CRC checks), else why not."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"{os.path.basename(path)} is not a complete torch archive ({exc})"
    return f"{os.path.basename(path)}: member {bad} is corrupt" if bad else None


def _safetensors_ok(path: str) -> str | None:
    """None if the file is as long as its header says; a truncated file is shorter."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            (n,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError) as exc:
        return f"{os.path.basename(path)} has no readable safetensors header ({exc})"
    if size < 8 + n + end:
        return f"{os.path.basename(path)} is truncated ({size} bytes, header promises {8 + n + end})"
    return None


def checkpoint_world_size(path: str) -> int | None:
    """How many ranks wrote ``path``: Trainer saves rng_state.pth for one, rng_state_<r>.pth per rank."""
    try:
        names = os.listdir(path)
    except OSError:
        return None
    ranks = [m.group(1) for m in map(_RNG.match, names) if m]
    if not ranks:
        return None
    if all(r is None for r in ranks):
        return 1
    return len({r for r in ranks if r is not None})


def verify_checkpoint(path: str, world_size: int | None = None) -> list[str]:
    """Why ``path`` cannot be resumed from (empty: it can)."""
    try:
        files = set(os.listdir(path))
    except OSError as exc:
        return [f"cannot list {path} ({exc})"]
    problems = []
    # An FSDP job's checkpoint holds the weights and AdamW state as torch.distributed.checkpoint
    # folders (one file per rank), verified against their .metadata.
    sharded = any(name in files for name in _SHARDED_DIRS)
    for name in ("trainer_state.json", *(("scheduler.pt",) if sharded else _ZIP_FILES)):
        if name not in files:
            problems.append(f"{name} is missing")
    if sharded:
        from sparktune.train.fsdp import checkpoint_dcp_problems

        problems += checkpoint_dcp_problems(path)
    elif not any(f.endswith(".safetensors") or f.endswith(".bin") for f in files):
        problems.append("no model weights (*.safetensors or *.bin)")
    if world_size and world_size > 1:
        missing = [r for r in range(world_size) if f"rng_state_{r}.pth" not in files]
        if missing:
            problems.append(f"rng_state_<rank>.pth is missing for rank(s) {missing}")
    elif not any(_RNG.match(f) for f in files):
        problems.append("no rng_state file")
    if problems:
        return problems  # cut short by a crash: Trainer writes trainer_state.json last
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            state = json.load(handle)
        match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
        if match and int(state.get("global_step", -1)) != int(match.group(1)):
            problems.append(f"trainer_state.json says step {state.get('global_step')}, the folder {match.group(1)}")
    except (OSError, ValueError, AttributeError) as exc:
        problems.append(f"trainer_state.json does not parse ({exc})")
    for name in sorted(files):
        full = os.path.join(path, name)
        if name in _ZIP_FILES or _RNG.match(name) or name.endswith(".bin"):
            problem = _zip_ok(full)
        elif name.endswith(".safetensors"):
            problem = _safetensors_ok(full)
        else:
            continue
        if problem:
            problems.append(problem)
    return problems


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the folders themselves (a rename or create is only
    durable once its folder is)."""
    for root, _, names in os.walk(path):
        for name in names:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue  # rotated away meanwhile
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


class CheckpointStore:
    """A job's checkpoint folder (Trainer's ``output_dir``)."""

    def __init__(self, directory: str):
        self.dir = directory

    def checkpoints(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every ``checkpoint-N`` folder, newest first."""
        if not self.dir or not os.path.isdir(self.dir):
            return []
        found = [(int(m.group(1)), os.path.join(self.dir, name))
                 for name in os.listdir(self.dir) if (m := _CHECKPOINT.match(name))]
        return sorted(found, reverse=True)

    def has_checkpoints(self) -> bool:
        return bool(self.checkpoints())

    def latest_complete(self, world_size: int | None = None, *, set_aside: bool = False) -> str | None:
        """The newest checkpoint that verifies, or None.

        ``set_aside``: rename newer, broken ones to ``corrupt-checkpoint-N`` so Trainer neither
        counts them in its rotation nor writes into them (only one process may do this).
        """
        for step, path in self.checkpoints():
            problems = verify_checkpoint(path, world_size)
            if not problems:
                return path
            log.warning("sparktune train: skipping %s: %s", path, "; ".join(problems))
            if set_aside:
                target = os.path.join(self.dir, f"corrupt-checkpoint-{step}")
                suffix = 1
                while os.path.exists(target):
                    target = os.path.join(self.dir, f"corrupt-checkpoint-{step}.{suffix}")
                    suffix += 1
                try:
                    os.replace(path, target)
                except OSError:
                    pass
        return None

    def written_world_size(self) -> int | None:
        """The world size of the newest checkpoint that has RNG files."""
        for _, path in self.checkpoints():
            size = checkpoint_world_size(path)
            if size:
                return size
        return None

    # The job record -----------------------------------------------------------------------
    @property
    def job_file(self) -> str:
        return os.path.join(self.dir, JOB_FILE)

    def read_job(self) -> JobRecord | None:
        try:
            with open(self.job_file, encoding="utf-8") as handle:
                return JobRecord.from_dict(json.load(handle))
        except (OSError, ValueError, TypeError):
            return None

    def write_job(self, record: JobRecord) -> None:
        record = JobRecord(**{**asdict(record), "tracking_uri": _without_userinfo(record.tracking_uri)})
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{self.job_file}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(asdict(record), handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.job_file)
        _fsync_dir(self.dir)


def _without_userinfo(uri: str) -> str:
    """``https://user:secret@host/x`` -> ``https://host/x``: the record is a plain file on shared storage."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return ""
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


def latest_complete_checkpoint(checkpoint_dir: str, world_size: int | None = None) -> str | None:
    """The newest ``checkpoint-N`` folder under ``checkpoint_dir`` that verifies, or None."""
    return CheckpointStore(checkpoint_dir).latest_complete(world_size)


def resume_problems(record: JobRecord | None, *, location: str, table_id: str, version: int | None,
                    world_size: int, written_world_size: int | None, where: str) -> list[str]:
    """Why ``resume=true`` cannot continue the job recorded in ``record`` (empty: it can).

    ``version`` is what the user asked for (None: continue on the recorded one);
    ``written_world_size`` is what the checkpoints on disk say.
    """
    problems = []
    recorded_ws = (record.world_size if record else None) or written_world_size
    if written_world_size and recorded_ws != written_world_size:
        recorded_ws = written_world_size  # the files are the truth
    if recorded_ws and recorded_ws != world_size:
        problems.append(
            f"distributor.num_processes: is {world_size}, but the checkpoints in {where} were written by "
            f"{recorded_ws} process(es) (each rank's data shard and RNG state belong to that world size); resume "
            f"with distributor.num_processes={recorded_ws}, or start a new job in another output_dir/checkpoint.dir"
        )
    if record is None:
        return problems
    if record.location and location and os.path.normpath(record.location) != os.path.normpath(location):
        problems.append(
            f"data.table: resume=true continues the job in {where}, which trained on {record.location}, but "
            f"data.table now points at {location}; point data.table back, or start a new job elsewhere"
        )
    elif record.table_id and record.table_id != table_id:  # an unknown ("") id is a mismatch, never a pass
        problems.append(
            f"data.table: the table at {location} was recreated since the job in {where} started (Delta table id "
            f"{table_id}, recorded {record.table_id}), so the data the checkpoints were trained on is gone; "
            "start a new job in another output_dir/checkpoint.dir"
        )
    if version is not None and record.version is not None and int(version) != int(record.version):
        problems.append(
            f"data.version: resume=true continues the job in {where} on the version it pinned, v{record.version}, "
            f"but data.version={version} was asked; drop data.version to continue on v{record.version}, or start "
            "a new job (another output_dir/checkpoint.dir) to train on v" + str(version)
        )
    return problems
