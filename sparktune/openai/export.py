"""Raw Delta table -> chat-format JSONL for OpenAI fine-tuning, written by Spark.

Each labelled review becomes one line ``{"messages": [system, user, assistant]}``: the system
prompt, the review inside the user template, and the label's name as the answer. A training
file and a validation file are written, each in one piece, with a ``manifest.json`` beside them
that records the source table, its Delta version and every export setting; an export whose
manifest matches (and whose files are intact) is skipped as up to date.

Rows are chosen without collecting anything: a seeded hash of ``row_id`` both shuffles them (the
JSONL order) and carves the validation rows out of the training split when no separate
validation split is named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sparktune.errors import SparktuneError
from sparktune.results import StageResult

__all__ = [
    "DEFAULT_LABEL_NAMES",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_USER_TEMPLATE",
    "MANIFEST_FILE",
    "TRAIN_FILE",
    "VALIDATION_FILE",
    "ExportResult",
    "ExportRows",
    "ExportSpec",
    "PromptTemplate",
    "export_chat_jsonl",
    "read_manifest",
]

TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
TEXT_FIELD = "{text}"

DEFAULT_SYSTEM_PROMPT = (
    "You classify the sentiment of movie reviews. Answer with exactly one word: positive or negative."
)
DEFAULT_USER_TEMPLATE = "Review:\n{text}"
DEFAULT_LABEL_NAMES = ("negative", "positive")


@dataclass(frozen=True)
class PromptTemplate:
    """How a row becomes a conversation; ``label_names[i]`` is the answer for label ``i``."""

    system: str = DEFAULT_SYSTEM_PROMPT
    user: str = DEFAULT_USER_TEMPLATE
    label_names: tuple = DEFAULT_LABEL_NAMES

    def check(self) -> None:
        if self.user.count(TEXT_FIELD) != 1:
            raise SparktuneError(
                f"--user-template must contain {TEXT_FIELD} exactly once (where the review goes); "
                f"found {self.user.count(TEXT_FIELD)} in {self.user!r}"
            )
        names = [str(n).strip() for n in self.label_names]
        if len(names) < 2 or any(not n for n in names) or len({n.lower() for n in names}) != len(names):
            raise SparktuneError(
                "--label-names needs two or more distinct, non-empty names (label i gets name i); found "
                f"{list(self.label_names)}"
            )

    def user_parts(self) -> tuple[str, str]:
        before, after = self.user.split(TEXT_FIELD)
        return before, after

    def messages(self, text: str) -> list:
        """The prompt for one review (no answer): what scoring sends."""
        before, after = self.user_parts()
        out = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        out.append({"role": "user", "content": before + text + after})
        return out


@dataclass(frozen=True, kw_only=True)
class ExportRows:
    """Which rows of the raw table become examples, and where the files go.

    The one declaration of these settings: ``sparktune openai export``'s flags are these fields
    (``sparktune.openai.cli.ExportSettings`` derives from this class), each docstring its help.
    """

    table: str
    """Raw TABLE (row_id, split, text, label)."""
    output: str
    """Folder for train.jsonl, validation.jsonl and manifest.json."""
    train_split: str = "train"
    """Split whose rows become training examples."""
    validation_split: str = ""
    """Split for validation; empty: carve validation_fraction of the training split."""
    validation_fraction: float = 0.1
    """Share of the training split held out."""
    limit: int = 0
    """At most this many training examples (0: all)."""
    validation_limit: int = 0
    """At most this many validation examples (0: all)."""
    seed: int = 42
    """Seed of the shuffle and of the held-out choice."""

    def rows(self) -> dict:
        """These fields' values (``ExportSpec(**settings.rows(), template=...)``)."""
        return {f.name: getattr(self, f.name) for f in fields(ExportRows)}

    def check_rows(self) -> None:
        if not self.train_split:
            raise SparktuneError("--train-split is empty: name the split whose rows become training examples (e.g. "
                                 "train)")
        if not self.validation_split and not 0.0 < self.validation_fraction < 1.0:
            raise SparktuneError(
                "--validation-fraction must be between 0 and 1 (exclusive) when no --validation-split is given; found "
                f"{self.validation_fraction}"
            )
        for flag, value in (("--limit", self.limit), ("--validation-limit", self.validation_limit)):
            if value < 0:
                raise SparktuneError(f"{flag} must be 0 (all rows) or a positive row count; found {value}")


@dataclass(frozen=True, kw_only=True)
class ExportSpec(ExportRows):
    """An export: the rows (``ExportRows``) and how each becomes a conversation."""

    template: PromptTemplate = field(default_factory=PromptTemplate)

    def check(self) -> None:
        self.template.check()
        self.check_rows()

    def settings(self) -> dict:
        """Everything that changes the files' content (the up-to-date key besides the source version)."""
        out = asdict(self)
        out.pop("output")
        out["template"]["label_names"] = list(self.template.label_names)
        return out


@dataclass
class ExportResult(StageResult):
    """The exported files; ``validation`` is their offline check (``sparktune openai validate``) when run."""

    output: str
    train_path: str
    validation_path: str
    manifest_path: str
    table: str
    table_version: int
    train_rows: int
    validation_rows: int
    up_to_date: bool
    validation: Any = None  # sparktune.openai.validate.ValidationReport

    def summary(self) -> str:
        state = "up to date (nothing written)" if self.up_to_date else "written"
        lines = [
            f"source:      {self.table} (Delta version {self.table_version})",
            f"training:    {self.train_rows:>8,} examples  -> {self.train_path}",
            f"validation:  {self.validation_rows:>8,} examples  -> {self.validation_path}",
            f"manifest:    {self.manifest_path}  ({state})",
        ]
        if self.validation is not None:
            lines += ["", self.validation.summary()]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {k: v for k, v in super().to_dict().items() if k != "validation"}
        out["validation"] = self.validation.to_dict() if self.validation is not None else None
        return out


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(output: str) -> dict | None:
    path = os.path.join(output, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _is_current(output: str, manifest: dict | None, table: str, version: int, settings: dict) -> bool:
    if not manifest or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if manifest.get("source", {}).get("table") != table or manifest.get("source", {}).get("version") != version:
        return False
    if manifest.get("settings") != settings:
        return False
    for entry in manifest.get("files", {}).values():
        path = os.path.join(output, entry.get("name", ""))
        if not os.path.isfile(path) or _sha256(path) != entry.get("sha256"):
            return False
    return True


def _chat_lines(df, template: PromptTemplate):
    """``value`` (the conversation as one JSON string, built by Spark: no Python UDF) and ``_key``."""
    from pyspark.sql import functions as F

    before, after = template.user_parts()
    answer = F.element_at(F.array(*[F.lit(str(n).strip()) for n in template.label_names]), F.col("label") + 1)
    messages = []
    if template.system:
        messages.append(F.struct(F.lit("system").alias("role"), F.lit(template.system).alias("content")))
    messages.append(
        F.struct(F.lit("user").alias("role"), F.concat(F.lit(before), F.col("text"), F.lit(after)).alias("content"))
    )
    messages.append(F.struct(F.lit("assistant").alias("role"), answer.alias("content")))
    return df.select(F.to_json(F.struct(F.array(*messages).alias("messages"))).alias("value"), "_key")


def _write_one_file(lines, target: str, order_col: str) -> int:
    """Spark writes ``lines`` (ordered by ``order_col``) as one text file at ``target``; returns rows."""
    staging = os.path.join(os.path.dirname(target), f"._staging_{uuid.uuid4().hex}")
    try:
        # coalesce(1) after the sort keeps the sorted order in the single output file.
        lines.orderBy(order_col).select("value").coalesce(1).write.mode("overwrite").text(staging)
        parts = [name for name in os.listdir(staging) if name.startswith("part-")]
        if len(parts) != 1:
            raise SparktuneError(f"export: expected one part file in {staging}, found {sorted(parts)}")
        tmp_target = target + ".tmp"
        shutil.move(os.path.join(staging, parts[0]), tmp_target)
        os.replace(tmp_target, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with open(target, "rb") as handle:
        return sum(1 for _ in handle)


def export_chat_jsonl(spark, spec: ExportSpec, force: bool = False) -> ExportResult:
    """Write ``train.jsonl``, ``validation.jsonl`` and ``manifest.json`` under ``spec.output``."""
    from sparktune.tables import check_writes, read_table, table_version

    spec.check()
    output = _local_output(spec.output)
    check_writes(spark, "openai export", folders={"--output": output}, inputs={"--table": spec.table})
    version = table_version(spark, spec.table)
    settings = spec.settings()
    train_path = os.path.join(output, TRAIN_FILE)
    validation_path = os.path.join(output, VALIDATION_FILE)
    manifest_path = os.path.join(output, MANIFEST_FILE)
    manifest = read_manifest(output)
    if not force and manifest is not None and _is_current(output, manifest, spec.table, version, settings):
        return ExportResult(output, train_path, validation_path, manifest_path, spec.table, version,
                            manifest["files"]["train"]["rows"], manifest["files"]["validation"]["rows"], True)

    df = read_table(spark, spec.table, version=version, what="--table (raw table)")
    train_df, validation_df = _split_examples(df, spec)
    os.makedirs(output, exist_ok=True)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # a half-finished re-export must never look up to date
    train_rows = _write_one_file(_chat_lines(train_df, spec.template), train_path, "_key")
    validation_rows = _write_one_file(_chat_lines(validation_df, spec.template), validation_path, "_key")
    _check_exported_rows(df, spec, version, train_rows, validation_rows)
    manifest = _manifest(spec.table, version, settings, train_path, train_rows, validation_path, validation_rows)
    _write_json_atomically(manifest, manifest_path)
    return ExportResult(
        output, train_path, validation_path, manifest_path, spec.table, version, train_rows, validation_rows, False
    )


def _local_output(output: str) -> str:
    """``output`` as an absolute local path; a URL is refused (the files are uploaded from this machine)."""
    local = os.path.abspath(os.path.expanduser(output))
    if "://" in output:
        raise SparktuneError(
            f"--output {output!r}: the JSONL files are uploaded from this machine, so give a local or mounted "
            "folder "
            "(on Databricks a Unity Catalog volume such as /Volumes/main/default/openai)"
        )
    return local


def _split_examples(df, spec: ExportSpec):
    """The (train, validation) frames of ``df``'s labelled rows, each with a seeded ``_key`` to order by."""
    from pyspark.sql import functions as F

    missing = [c for c in ("row_id", "split", "text", "label") if c not in df.columns]
    if missing:
        raise SparktuneError(
            f"--table {spec.table}: a raw table needs row_id, split, text and label; missing {missing} (columns: "
            f"{df.columns}). "
            "Create it with `sparktune ingest`."
        )
    n_labels = len(spec.template.label_names)
    labelled = df.where((F.col("label") >= 0) & (F.col("label") < n_labels) & F.col("text").isNotNull())
    labelled = labelled.withColumn("_key", F.xxhash64(F.lit(int(spec.seed)), F.col("row_id")))
    in_train_split = F.col("split") == spec.train_split
    if spec.validation_split:
        train_pool = labelled.where(in_train_split)
        validation_pool = labelled.where(F.col("split") == spec.validation_split)
    else:
        # A seeded hash bucket, not randomSplit: the same row lands on the same side every run.
        bucket = F.pmod(F.xxhash64(F.lit(int(spec.seed) + 1), F.col("row_id")), F.lit(1_000_000)) < int(
            spec.validation_fraction * 1_000_000
        )
        train_pool = labelled.where(in_train_split & ~bucket)
        validation_pool = labelled.where(in_train_split & bucket)
    train_df = train_pool.orderBy("_key").limit(spec.limit) if spec.limit else train_pool
    validation_df = (
        validation_pool.orderBy("_key").limit(spec.validation_limit) if spec.validation_limit else validation_pool
    )
    return train_df, validation_df


def _check_exported_rows(df, spec: ExportSpec, version, train_rows: int, validation_rows: int) -> None:
    """Refuse an export whose train or validation file came out empty, naming the setting to change."""
    if train_rows == 0:
        found = [r["split"] for r in df.select("split").distinct().collect()]
        raise SparktuneError(
            f"--train-split {spec.train_split!r}: no labelled rows in {spec.table} (version {version}); its splits are "
            f"{sorted(map(str, found))}"
        )
    if validation_rows == 0:
        raise SparktuneError(
            f"no validation rows: --validation-split {spec.validation_split!r} / --validation-fraction "
            f"{spec.validation_fraction} "
            f"selected nothing in {spec.table}; name a split that has labelled rows or raise the fraction"
        )


def _manifest(table: str, version, settings: dict, train_path: str, train_rows: int, validation_path: str,
              validation_rows: int) -> dict:
    """The manifest that records what the two files were exported from, and their rows and hashes."""
    return {
        "format": MANIFEST_FORMAT,
        "source": {"table": table, "version": version},
        "settings": settings,
        "files": {
            "train": {"name": TRAIN_FILE, "rows": train_rows, "sha256": _sha256(train_path)},
            "validation": {"name": VALIDATION_FILE, "rows": validation_rows, "sha256": _sha256(validation_path)},
        },
    }


def _write_json_atomically(payload: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
