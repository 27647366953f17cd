"""Staging training data: Spark writes one balanced, length-bucketed shard file per rank.

Training ranks should not each read the whole split and keep 1/N of it (memory per rank would
grow with the corpus). Instead, before any rank starts, one Spark job reads the tokenized table
at the pinned version and writes ``world_size`` Parquet shards (``shards/rank=K/``) into a
staging folder on storage every rank can read; each rank then streams only its own shard
(``sparktune.train.data.read_shard``).

How rows are dealt (DataFrame API only, nothing collected but a few counts):

1. Keep the split (classification: labelled rows, ``label >= 0``), optionally the first
   ``limit`` rows by ``row_id`` (``data.train_limit``), cut to ``max_length`` tokens.
2. Give every row a pseudo-random window from ``xxhash64(row_id, seed)``: windows hold about
   ``window_rows`` rows, a random sample of the split.
3. Within a window, order rows by length (longest first); the row's global position is the
   window's offset (sizes of the windows before it, from a tiny per-window count) plus its place
   in the window. Position ``i`` goes to rank ``i % world_size`` at local position
   ``i // world_size``: neighbouring rows (of nearly equal length) go to different ranks, so the
   k-th row of every shard has about the same length, and ranks that batch the same local
   positions (same seed) pad to about the same width and wait on each other little.
4. Shards are made equal, as ``data.uneven`` says: ``pad`` repeats the first rows,
   ``drop`` drops the last ``rows % world_size``; equal rows mean equal steps on every rank.

The result is cached: the folder is named by a digest of everything that shapes it (Delta table
id, version, split, task, limit, max length, world size, seed, uneven, window, sparktune
version) and is used only when its manifest exists, which is written last, into a temporary
folder renamed into place, so a half-written stage is never read. Labels are validated in the
same pass: a label outside ``[0, num_labels)`` stops the job before any rank launches.

The staging folder must be a path both Spark and the ranks' Python open (a local or shared
file system, a FUSE mount such as ``/dbfs`` or ``/Volumes`` on Databricks).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field

from sparktune.errors import SparktuneError
from sparktune.tasks import TOKENIZED, Task

__all__ = [
    "DEFAULT_WINDOW_ROWS",
    "STAGE_FORMAT",
    "StageKey",
    "StageManifest",
    "StagedData",
    "check_labels",
    "check_stage_labels",
    "default_staging_dir",
    "find_staged",
    "stage_job_data",
    "stage_training_data",
]

STAGE_FORMAT = 1
"""Bumped whenever the shard layout changes, so old stages are never reused."""
DEFAULT_WINDOW_ROWS = 2048
"""Rows per length-sorting window, per rank: bounds how far a row can move to find same-length peers."""
MANIFEST = "manifest.json"
SHARDS = "shards"
_LOCAL = "_local"
_RANK = "_rank"


@dataclass(frozen=True)
class StageKey:
    """Everything that decides a stage's content; its digest names the stage's folder."""

    table_id: str
    version: int
    split: str
    task: str
    limit: int | None
    max_length: int | None
    world_size: int
    seed: int
    uneven: str
    window_rows: int
    stage_format: int = STAGE_FORMAT
    sparktune_version: str = ""

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]

    def folder_name(self) -> str:
        safe_split = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.split)[:40]
        return f"{safe_split}-v{self.version}-w{self.world_size}-{self.digest()}"


@dataclass(frozen=True)
class StageManifest:
    """What a finished stage holds; written last, read by every rank."""

    key: StageKey
    digest: str
    rows: int
    """Rows selected from the table (before padding or dropping)."""
    rows_per_rank: int
    shards: list = field(default_factory=list)
    """Per rank, its shard's Parquet files relative to the stage folder, in read order."""
    label_min: int | None = None
    label_max: int | None = None
    tokens: int = 0
    max_tokens: int = 0
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageManifest:
        data = json.loads(text)
        data["key"] = StageKey(**data["key"])
        return cls(**data)


@dataclass(frozen=True)
class StagedData:
    """A finished stage: its folder, manifest, and whether this call reused it."""

    directory: str
    manifest: StageManifest
    reused: bool

    def shard_paths(self, rank: int) -> list:
        """Absolute paths of rank ``rank``'s Parquet files."""
        return [os.path.join(self.directory, p) for p in self.manifest.shards[rank]]


def default_staging_dir(output_dir: str) -> str:
    """Where stages go when no staging dir is configured: beside the job's outputs (shared storage)."""
    return os.path.join(output_dir, "staging")


def check_labels(label_min: int | None, label_max: int | None, num_labels: int | None, what: str) -> None:
    """The one label check before training: a SparktuneError when ``what`` holds labels outside
    ``[0, num_labels)`` (an IndexError on CPU, a device-side assert on GPU, and no retry fixes it).
    ``label_min``/``label_max``: the smallest and largest label (None: no labelled rows)."""
    if num_labels is None or label_max is None:
        return
    if label_max >= num_labels or (label_min or 0) < 0:
        raise SparktuneError(
            f"model.num_labels: {what} has labels from {label_min} to {label_max}, but "
            f"model.num_labels={num_labels} allows only 0..{num_labels - 1}; set model.num_labels to at least "
            f"{label_max + 1} (and model.label_names to match), or fix the labels and re-run "
            "`sparktune ingest` and `sparktune tokenize`"
        )


def check_stage_labels(manifest: StageManifest, num_labels: int | None, what: str) -> None:
    """``check_labels`` of a classification stage's labels (its manifest records their range)."""
    if manifest.key.task == Task.CLASSIFICATION.value:
        check_labels(manifest.label_min, manifest.label_max, num_labels, what)


def _read_manifest(folder: str) -> StageManifest | None:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            return StageManifest.from_json(handle.read())
    except (OSError, ValueError, TypeError, KeyError):
        return None


def find_staged(staging_dir: str, key: StageKey) -> StagedData | None:
    """The finished stage for ``key`` under ``staging_dir``, or None (also when half-written)."""
    folder = os.path.join(staging_dir, key.folder_name())
    manifest = _read_manifest(folder)
    if manifest is None or manifest.key != key:
        return None
    if any(not os.path.exists(os.path.join(folder, p)) for files in manifest.shards for p in files):
        return None  # files removed by hand: stage again rather than fail in a rank
    return StagedData(folder, manifest, True)


def _select(spark, ref, version: int, split: str, task: Task, limit: int | None, max_length: int | None):
    from pyspark.sql import functions as F

    from sparktune.tables import read_table

    df = read_table(spark, ref, version=version, what="data.table")
    missing = [c for c in TOKENIZED.required_columns(task) if c not in df.columns]
    if missing:
        raise SparktuneError(
            f"data.table: {ref.raw!r} lacks column(s) {missing}; found {df.columns}. "
            "Point data.table at the output of `sparktune tokenize`"
        )
    t = TOKENIZED
    df = df.filter(F.col(t.split) == F.lit(split))
    if task.has_labels:
        df = df.filter(F.col(t.label) >= 0)
    label = F.col(t.label).cast("int") if task.has_labels else F.lit(-1)
    df = df.select(F.col(t.row_id).cast("string").alias(t.row_id), label.alias(t.label),
                   F.col(t.input_ids).cast("array<int>").alias(t.input_ids))
    if limit is not None:
        # data.train_limit means the first N rows by row_id, the same rows on every run.
        df = df.orderBy(t.row_id).limit(int(limit))
    if max_length is not None:
        df = df.withColumn(t.input_ids, F.slice(t.input_ids, 1, int(max_length)))
    return df.withColumn(t.n_tokens, F.size(t.input_ids))


def _deal(df, rows: int, key: StageKey):
    """Rank and local position of every row (plus padding rows), as described in the module doc."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    t = TOKENIZED
    world = key.world_size
    windows = max(1, -(-rows // (key.window_rows * world)))
    scrambled = F.xxhash64(F.col(t.row_id), F.lit(key.seed))
    df = df.withColumn("_h", scrambled).withColumn("_w", F.pmod(F.col("_h"), F.lit(windows)))
    by_length = Window.partitionBy("_w").orderBy(F.col(t.n_tokens).desc(), F.col("_h"), F.col(t.row_id))
    df = df.withColumn("_p", F.row_number().over(by_length) - 1)
    # Offsets of the windows: a running sum over one small row per window (a few thousand at most).
    sizes = df.groupBy("_w").count()
    before = Window.orderBy("_w").rowsBetween(Window.unboundedPreceding, -1)
    offsets = sizes.select("_w", F.coalesce(F.sum("count").over(before), F.lit(0)).alias("_o"))
    df = df.join(F.broadcast(offsets), "_w").withColumn("_i", F.col("_o") + F.col("_p"))
    if key.uneven == "drop":
        df = df.filter(F.col("_i") < (rows // world) * world)
    else:
        extra = (-rows) % world
        if extra:
            # As torch's DistributedSampler: wrap around to the first rows.
            df = df.unionByName(df.filter(F.col("_i") < extra).withColumn("_i", F.col("_i") + rows))
    return df.select(
        (F.col("_i") % world).cast("int").alias(_RANK),
        (F.col("_i") / world).cast("long").alias(_LOCAL),
        t.row_id, t.label, t.input_ids, t.n_tokens,
    )


def stage_training_data(spark, table, version: int, split: str, world_size: int, *, seed: int,
                        limit: int | None = None, max_length: int | None = None, staging_dir: str,
                        num_labels: int | None = None, task: Task | str = Task.CLASSIFICATION,
                        uneven: str = "pad", window_rows: int = DEFAULT_WINDOW_ROWS,
                        row_group_bytes: int = 8 << 20, table_id: str | None = None) -> StagedData:
    """Write (or reuse) ``world_size`` balanced shards of ``split`` at ``version``; returns the stage.

    ``table``: a Delta path or table name. ``num_labels``: when given (classification), labels
    outside ``[0, num_labels)`` raise SparktuneError before anything is written.
    ``row_group_bytes`` bounds the Parquet row groups a rank reads at a time. ``table_id``: the
    table's Delta id when the caller already read it (the launcher's pinned snapshot), else read here.
    """
    # Long (~90 lines) on purpose: checks, the cached stage, one aggregate, then the write, as one readable story.
    from pyspark.sql import functions as F

    from sparktune import __version__
    from sparktune.tables import check_writes, parse_table_ref, read_snapshot

    check_writes(spark, "train", folders={"data.staging_dir": staging_dir}, inputs={"data.table": table})
    task = Task.parse(task, "model.task")
    if world_size < 1:
        raise SparktuneError(f"distributor.num_processes: must be >= 1, got {world_size}")
    if uneven not in ("pad", "drop"):
        raise SparktuneError(f"data.uneven: expected pad or drop, found {uneven!r}")
    if version is None:
        raise SparktuneError("data.version: staging needs a pinned table version (the launcher pins it)")
    ref = parse_table_ref(table)
    if not table_id:
        table_id = read_snapshot(spark, ref, what="data.table").table_id  # the same id at every version
    key = StageKey(table_id=table_id, version=int(version), split=split, task=task.value,
                   limit=limit, max_length=max_length, world_size=world_size, seed=int(seed), uneven=uneven,
                   window_rows=int(window_rows), sparktune_version=__version__)
    what = f"split {split!r} of {ref.raw!r} v{version}"
    found = find_staged(staging_dir, key)
    if found is not None:
        check_stage_labels(found.manifest, num_labels, what)
        return found

    t = TOKENIZED
    selected = _select(spark, ref, int(version), split, task, limit, max_length)
    stats = selected.agg(F.count(F.lit(1)).alias("rows"), F.min(t.label).alias("lo"), F.max(t.label).alias("hi"),
                         F.sum(t.n_tokens).alias("tokens"), F.max(t.n_tokens).alias("longest")).first()
    rows = int(stats["rows"])
    if rows == 0:
        raise SparktuneError(
            f"data.train_split: {what} has no {'labelled ' if task.has_labels else ''}rows; "
            "check data.train_split / data.eval_split or re-run `sparktune tokenize`"
        )
    if uneven == "drop" and rows < world_size:
        raise SparktuneError(
            f"data.uneven: drop leaves no rows ({rows} rows for {world_size} processes); "
            "use data.uneven=pad or fewer distributor.num_processes"
        )
    rows_per_rank = rows // world_size if uneven == "drop" else -(-rows // world_size)
    draft = StageManifest(key=key, digest=key.digest(), rows=rows, rows_per_rank=rows_per_rank,
                          label_min=stats["lo"] if task.has_labels else None,
                          label_max=stats["hi"] if task.has_labels else None,
                          tokens=int(stats["tokens"] or 0), max_tokens=int(stats["longest"] or 0))
    check_stage_labels(draft, num_labels, what)

    os.makedirs(staging_dir, exist_ok=True)
    final = os.path.join(staging_dir, key.folder_name())
    scratch = os.path.join(staging_dir, f".tmp-{key.folder_name()}-{uuid.uuid4().hex[:8]}")
    try:
        dealt = _deal(selected, rows, key)
        # One task per rank writes that rank's rows in local order (sorted within the partition),
        # so each shard is one file whose row order is the rank's sample order.
        (dealt.repartition(world_size, _RANK).sortWithinPartitions(_RANK, _LOCAL)
         .write.mode("errorifexists").option("parquet.block.size", str(int(row_group_bytes)))
         .option("compression", "zstd").partitionBy(_RANK).parquet(os.path.join(scratch, SHARDS)))
        shards = []
        for rank in range(world_size):
            files = sorted(glob.glob(os.path.join(glob.escape(scratch), SHARDS, f"{_RANK}={rank}", "*.parquet")))
            if not files:
                raise SparktuneError(f"staging: rank {rank}'s shard was not written under {scratch}; "
                                     "is the staging dir a path Spark's executors and this driver both see?")
            shards.append([os.path.relpath(f, scratch) for f in files])
        manifest = StageManifest(**{**asdict(draft), "key": key, "shards": shards,
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        with open(os.path.join(scratch, MANIFEST), "w", encoding="utf-8") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.rename(scratch, final)
        except OSError:
            # Another job staged the same data meanwhile (or a stale half-stage sits there).
            other = find_staged(staging_dir, key)
            if other is not None:
                return other
            shutil.rmtree(final, ignore_errors=True)
            os.rename(scratch, final)
        return StagedData(final, manifest, False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def stage_job_data(spark, cfg, task: Task | str, staging_dir: str | None = None, table_id: str | None = None) -> dict:
    """Stage a training job's data before its ranks launch: ``{split: StagedData}``.

    The training split is dealt into ``distributor.num_processes`` shards; the evaluation split
    (if any) into one, which every rank reads (Trainer splits evaluation batches among ranks).
    ``cfg.data.version`` must be pinned. ``staging_dir`` defaults to ``<output_dir>/staging``.
    ``table_id``: the pinned snapshot's (saves reading the table's detail again).
    The ranks find these stages with ``sparktune.train.data.load_rank_data`` (same key).
    """
    task = Task.parse(task, "model.task")
    d = cfg.data
    folder = staging_dir or default_staging_dir(cfg.output_dir)
    table = d.location or d.table
    from sparktune.tables import check_writes

    check_writes(spark, "train", folders={"output_dir": cfg.output_dir, "checkpoint.dir": cfg.checkpoint_dir},
                 inputs={"data.table": table})
    num_labels = cfg.model.num_labels if task.has_labels else None
    staged = {d.train_split: stage_training_data(
        spark, table, d.version, d.train_split, cfg.distributor.num_processes, seed=cfg.train.seed,
        limit=d.train_limit, max_length=d.max_length, staging_dir=folder, num_labels=num_labels, task=task,
        uneven=d.uneven, table_id=table_id)}
    if d.eval_split:
        try:
            staged[d.eval_split] = stage_training_data(
                spark, table, d.version, d.eval_split, 1, seed=cfg.train.seed, limit=d.eval_limit,
                max_length=d.max_length, staging_dir=folder, num_labels=num_labels, task=task, uneven="pad",
                table_id=table_id)
        except SparktuneError as exc:
            if "has no" not in str(exc):
                raise  # an empty evaluation split means no evaluation, as before; bad labels stop the job
    return staged
