"""The contracts several stages share: the task a model is trained for, and the tokenized table.

``Task`` is the one definition of what a model does (its value is what the CLI, configs and
table properties spell). ``TokenizedTable`` names the tokenized table's columns and the
properties tokenize writes; tokenize writes them, and staging, training, inference and stats
read them through these names, never through string literals of their own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sparktune.errors import ConfigError

__all__ = ["Task", "TokenizedTable", "TOKENIZED", "PROPERTY_PREFIX"]

PROPERTY_PREFIX = "sparktune."


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

    # Table properties (keys as stored, with the sparktune. prefix).
    prop_stage: str = PROPERTY_PREFIX + "stage"
    prop_tokenizer: str = PROPERTY_PREFIX + "tokenizer"
    prop_tokenizer_fingerprint: str = PROPERTY_PREFIX + "tokenizer_fingerprint"
    prop_max_length: str = PROPERTY_PREFIX + "max_length"
    prop_task: str = PROPERTY_PREFIX + "task"
    prop_pack: str = PROPERTY_PREFIX + "pack"
    prop_block_size: str = PROPERTY_PREFIX + "block_size"
    prop_source: str = PROPERTY_PREFIX + "source"
    prop_source_version: str = PROPERTY_PREFIX + "source_version"
    prop_sparktune_version: str = PROPERTY_PREFIX + "sparktune_version"
    prop_template: str = PROPERTY_PREFIX + "template"
    prop_answers: str = PROPERTY_PREFIX + "answers"
    prop_answer_ids: str = PROPERTY_PREFIX + "answer_ids"
    prop_labels: str = PROPERTY_PREFIX + "labels"

    @property
    def columns(self) -> list[str]:
        return [self.row_id, self.split, self.label, self.input_ids, self.n_tokens, self.truncated]

    def columns_for(self, task: Task) -> list[str]:
        return self.columns + [self.prompt_tokens] if task is Task.INSTRUCTION else self.columns

    def schema_for(self, task: Task) -> str:
        return self.instruction_schema if task is Task.INSTRUCTION else self.schema

    def required_columns(self, task: Task) -> list[str]:
        """What a trainer or scorer of ``task`` needs from the table."""
        needed = [self.row_id, self.split, self.input_ids]
        return needed + [self.label] if task.has_labels else needed

    def task_of(self, properties: dict, key: str = "model.task") -> Task | None:
        """The task recorded in the table's properties, or None when it has none."""
        raw = properties.get(self.prop_task)
        return Task.parse(raw, key) if raw else None


TOKENIZED = TokenizedTable()
