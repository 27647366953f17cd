"""The contracts several stages share: the task a model is trained for, and the tokenized table.

``Task`` is the one definition of what a model does (its value is what the CLI, configs and
table properties spell). ``TokenizedTable`` names the tokenized table's columns and the
properties tokenize writes; tokenize writes them, and staging, training, inference and stats
read them through these names, never through string literals of their own.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from sparktune.errors import ConfigError

__all__ = ["Task", "TokenizedTable", "TOKENIZED", "PROPERTY_PREFIX", "PropertyKey"]

PROPERTY_PREFIX = "sparktune."


class PropertyKey(str):
    """A table property key as stored (``sparktune.<name>``); ``name`` is the key without the
    prefix, as a commit's user metadata and a stage's result spell it.

    Keys and fixed values never contain ``token`` (nor ``secret``, ``password``, ``url``,
    ``access.key``): Spark's ``SHOW TBLPROPERTIES`` shows the value of any property whose key
    *or* value matches ``spark.redaction.regex`` / ``spark.sql.redaction.options.regex`` as
    ``*********(redacted)``, and an analyst reads provenance with ``SHOW TBLPROPERTIES``.
    """

    __slots__ = ()

    @property
    def name(self) -> str:
        return self[len(PROPERTY_PREFIX):]

    @classmethod
    def of(cls, name: str) -> PropertyKey:
        return cls(PROPERTY_PREFIX + name)


class Task(str, enum.Enum):
    """What a model is trained for; the value is how configs, the CLI and table properties spell it."""

    CLASSIFICATION = "classification"
    """Sequence classification: one label per text (AutoModelForSequenceClassification)."""
    CAUSAL_LM = "causal-lm"
    """Next-token prediction on whole texts (AutoModelForCausalLM), optionally packed into blocks."""
    INSTRUCTION = "instruction"
    """Instruction tuning of a causal LM on prompt/answer pairs built from labelled rows
    (``sparktune.prompts``): the answer is the label's verbalisation, the loss covers the answer
    tokens only, and the model is scored by each label's continuation log-probability."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object, key: str = "task") -> Task:
        """``value`` as a Task; ``causal_lm`` and any case are accepted. ``key`` names the setting."""
        if isinstance(value, Task):
            return value
        text = str(value or "").strip().lower().replace("_", "-")
        for task in cls:
            if task.value == text:
                return task
        raise ConfigError([f"{key}: expected one of {', '.join(t.value for t in cls)}, found {value!r}"])

    @classmethod
    def choices(cls) -> list[str]:
        return [t.value for t in cls]

    @property
    def has_labels(self) -> bool:
        """Rows carry a class label (instruction rows too: their answer is the label's verbalisation)."""
        return self in (Task.CLASSIFICATION, Task.INSTRUCTION)

    @property
    def is_causal(self) -> bool:
        """Trained as a causal LM (AutoModelForCausalLM, token-averaged loss)."""
        return self in (Task.CAUSAL_LM, Task.INSTRUCTION)


@dataclass(frozen=True)
class TokenizedTable:
    """Columns and properties of the table ``sparktune tokenize`` writes.

    ``input_ids`` is unpadded (``array<int>``); ``label`` is -1 for unlabelled rows and for
    packed causal-LM blocks.

    Instruction tables (``Task.INSTRUCTION``) hold one row per labelled text: ``input_ids`` is
    the prompt (template + truncated text), then the label's answer tokens, then EOS;
    ``prompt_tokens`` (an extra int column) is the prompt's length, so ``input_ids[:prompt_tokens]``
    is what a scorer continues and ``input_ids[prompt_tokens:]`` is what the loss covers. The
    answer of label ``k`` is ``answer_ids[k] + [eos]`` (properties ``sparktune.answers`` and
    ``sparktune.answer_ids``, JSON lists in label order; ``sparktune.template`` is the prompt and
    ``sparktune.labels`` the class names).

    Properties record what made the table, so a reader can check that
    its tokenizer, max length and task agree with the model it trains or scores.
    """

    row_id: str = "row_id"
    split: str = "split"
    label: str = "label"
    input_ids: str = "input_ids"
    n_tokens: str = "n_tokens"
    truncated: str = "truncated"
    prompt_tokens: str = "prompt_tokens"

    schema: str = "row_id string, split string, label int, input_ids array<int>, n_tokens int, truncated boolean"
    instruction_schema: str = schema + ", prompt_tokens int"

    # Table properties (keys as stored, with the sparktune. prefix; ``.name`` without it).
    prop_stage: PropertyKey = PropertyKey.of("stage")
    """``encode``: the stage that wrote the table (``sparktune tokenize``; not spelled "tokenize",
    which Spark would redact)."""
    prop_tokenizer: PropertyKey = PropertyKey.of("vocab")
    """The tokenizer the ids come from (name, folder or ``pkg:``), credentials redacted."""
    prop_tokenizer_fingerprint: PropertyKey = PropertyKey.of("vocab_fingerprint")
    """A content hash of that tokenizer (``sparktune.tokenize.tokenizer_fingerprint``)."""
    prop_gguf_file: PropertyKey = PropertyKey.of("gguf_file")
    prop_max_length: PropertyKey = PropertyKey.of("max_length")
    prop_task: PropertyKey = PropertyKey.of("task")
    prop_pack: PropertyKey = PropertyKey.of("pack")
    prop_block_size: PropertyKey = PropertyKey.of("block_size")
    prop_source: PropertyKey = PropertyKey.of("source")
    """The raw table read: its full catalog name, or its location as a fully qualified URI."""
    prop_source_version: PropertyKey = PropertyKey.of("source_version")
    prop_source_table_id: PropertyKey = PropertyKey.of("source_table_id")
    prop_sparktune_version: PropertyKey = PropertyKey.of("sparktune_version")
    prop_template: PropertyKey = PropertyKey.of("template")
    prop_answers: PropertyKey = PropertyKey.of("answers")
    prop_answer_ids: PropertyKey = PropertyKey.of("answer_ids")
    prop_labels: PropertyKey = PropertyKey.of("labels")

    stage_name: str = "encode"
    """The value of ``prop_stage`` on a tokenized table."""
    legacy_keys: tuple = (PROPERTY_PREFIX + "tokenizer", PROPERTY_PREFIX + "tokenizer_fingerprint")
    """Keys that sparktune before 0.1.0's release wrote instead of ``vocab``/``vocab_fingerprint``
    (Spark's SHOW TBLPROPERTIES redacted them)."""

    @property
    def columns(self) -> list[str]:
        return [self.row_id, self.split, self.label, self.input_ids, self.n_tokens, self.truncated]

    def columns_for(self, task: Task) -> list[str]:
        return self.columns + [self.prompt_tokens] if task is Task.INSTRUCTION else self.columns

    def schema_for(self, task: Task) -> str:
        return self.instruction_schema if task is Task.INSTRUCTION else self.schema

    def arrow_schema(self, task: Task | None = None):
        """The columns as a ``pyarrow.Schema`` (for writers without Spark: delta-rs, tests, benches)."""
        import pyarrow as pa

        types = {self.row_id: pa.string(), self.split: pa.string(), self.label: pa.int32(),
                 self.input_ids: pa.list_(pa.int32()), self.n_tokens: pa.int32(), self.truncated: pa.bool_(),
                 self.prompt_tokens: pa.int32()}
        return pa.schema([(c, types[c]) for c in self.columns_for(task or Task.CLASSIFICATION)])

    def required_columns(self, task: Task) -> list[str]:
        """What a trainer or scorer of ``task`` needs from the table."""
        needed = [self.row_id, self.split, self.input_ids]
        return needed + [self.label] if task.has_labels else needed

    def properties(self, provenance: dict) -> dict[str, str]:
        """``provenance`` (keyed by ``PropertyKey.name``) as table properties (keyed as stored)."""
        return {PROPERTY_PREFIX + k: str(v) for k, v in provenance.items()}

    def legacy_problems(self, properties: Mapping[str, str], table: str, key: str = "data.table") -> list[str]:
        """A problem when ``properties`` are those of a table tokenized with the old property keys.

        Such a table is not read with guessed keys: tokenize rebuilds it (its properties differ
        from what tokenize writes now, so a plain re-run writes a new version)."""
        old = [k for k in self.legacy_keys if k in properties]
        if not old or self.prop_tokenizer in properties:
            return []
        return [f"{key}: table {table!r} was tokenized by an older sparktune: it has {', '.join(old)} where "
                f"sparktune now writes {self.prop_tokenizer} and {self.prop_tokenizer_fingerprint} (Spark's SHOW "
                f"TBLPROPERTIES redacted the old keys); re-run `sparktune tokenize` with the same --input and "
                "--output to rebuild it as a new version"]

    def task_of(self, properties: Mapping[str, str], key: str = "model.task") -> Task | None:
        """The task recorded in the table's properties, or None when it has none."""
        raw = properties.get(self.prop_task)
        return Task.parse(raw, key) if raw else None


TOKENIZED = TokenizedTable()
