"""Prompt/answer pairs for instruction tuning a decoder on a labelled table (``Task.INSTRUCTION``).

A row ``(text, label)`` becomes ``prompt + answer + [eos]`` where

* prompt = the template with ``{text}`` replaced by the text, e.g. ``"Review: {text}\\nSentiment:"``;
  only the text is ever truncated (from its end), never the template or the answer;
* answer = the label's verbalisation (``" {label}"`` of the class names: ``" positive"``).

Pieces are tokenized separately and joined as token ids, so a prompt has the same ids at
training, in Spark evaluation and in the served model, and the answer tokens are exactly
``answer_ids[label] + [eos]`` (the loss covers those, the prompt is labelled -100). Spaces at
the end of the template's head (``"Review: "``) move to the front of the text so that BPE
tokenizers see ``" great"`` as they do in running text.

Pure (numpy only, the tokenizer passed in): it is shipped inside every instruction model as
``code/sparktune_prompts.py`` next to the inference core, so it imports nothing from sparktune.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_ANSWER_FORMAT",
    "DEFAULT_TEMPLATE",
    "PROMPT_FILE",
    "TEXT_FIELD",
    "PromptEncoder",
    "PromptSpec",
    "answer_only_labels",
    "prompt_lengths",
]

TEXT_FIELD = "{text}"
DEFAULT_TEMPLATE = "Review: {text}\nSentiment:"
DEFAULT_ANSWER_FORMAT = " {label}"
PROMPT_FILE = "sparktune_prompt.json"
"""Written beside a trained instruction model's weights: its template and answers, so the
save_pretrained folder alone is enough to score it."""


@dataclass(frozen=True)
class PromptSpec:
    """The template and the answer of each class (in class-id order)."""

    template: str = DEFAULT_TEMPLATE
    answers: tuple[str, ...] = field(default_factory=tuple)
    labels: tuple[str, ...] = field(default_factory=tuple)
    """Class names in class-id order (what the served model answers)."""

    @classmethod
    def from_labels(cls, label_names, template: str = DEFAULT_TEMPLATE,
                    answer_format: str = DEFAULT_ANSWER_FORMAT) -> PromptSpec:
        names = tuple(str(n) for n in label_names)
        return cls(template, tuple(answer_format.replace("{label}", n) for n in names), names)

    def problems(self, key: str = "tokenize") -> list[str]:
        found = []
        if self.template.count(TEXT_FIELD) != 1:
            found.append(f"{key}.template: must contain {TEXT_FIELD} exactly once, found {self.template!r}")
        if len(self.answers) < 2:
            found.append(f"{key}.label_names: an instruction task needs at least two class names to answer with "
                         f"(e.g. [negative, positive]), found {list(self.labels)}")
        if any(not a.strip() for a in self.answers):
            found.append(f"{key}.answer_format: every answer must hold text, found {list(self.answers)}")
        if len(set(self.answers)) != len(self.answers):
            found.append(f"{key}.label_names: answers must differ, found {list(self.answers)}")
        return found

    @property
    def head(self) -> str:
        """The template before the text, without trailing spaces (they move to the text)."""
        return self.template.split(TEXT_FIELD)[0].rstrip(" ")

    @property
    def lead(self) -> str:
        before = self.template.split(TEXT_FIELD)[0]
        return before[len(before.rstrip(" ")):]

    @property
    def tail(self) -> str:
        return self.template.split(TEXT_FIELD)[1]

    def to_json(self) -> str:
        return json.dumps({"template": self.template, "answers": list(self.answers), "labels": list(self.labels)})

    @classmethod
    def from_json(cls, text: str) -> PromptSpec:
        data = json.loads(text)
        return cls(str(data["template"]), tuple(data["answers"]), tuple(data.get("labels") or ()))


def _ids(tokenizer, texts) -> list[list[int]]:
    if not texts:
        return []
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
    return [list(x) for x in encoded["input_ids"]]


class PromptEncoder:
    """Token ids of prompts and prompt/answer pairs for one tokenizer and length bound.

    ``max_length`` bounds the whole pair (prompt + longest answer + EOS); the text part of a
    prompt gets what the template and the answer leave.
    """

    def __init__(self, tokenizer, spec: PromptSpec, max_length: int):
        self.spec = spec
        head, tail = _ids(tokenizer, [spec.head, spec.tail]) if spec.head else ([], _ids(tokenizer, [spec.tail])[0])
        bos = getattr(tokenizer, "bos_token_id", None)
        if getattr(tokenizer, "add_bos_token", False) and bos is not None:
            head = [int(bos)] + head
        self.head, self.tail = head, tail
        self.answer_ids = _ids(tokenizer, spec.answers)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("the tokenizer has no EOS token, which ends every answer")
        self.eos = int(eos)
        self.max_length = int(max_length)
        self.max_prompt = self.max_length - max((len(a) for a in self.answer_ids), default=0) - 1
        self.text_budget = self.max_prompt - len(head) - len(tail)
        if self.text_budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room for the text: the template takes "
                             f"{len(head) + len(tail)} tokens and the longest answer "
                             f"{self.max_length - self.max_prompt} with EOS; raise max_length")
        self.tokenizer = tokenizer

    @property
    def answer_lengths(self) -> list[int]:
        """Tokens the loss covers for each class: its answer and the EOS after it."""
        return [len(a) + 1 for a in self.answer_ids]

    def prompts(self, texts) -> tuple[list[list[int]], list[bool]]:
        """(prompt ids, truncated) per text; the text is cut from its end to fit."""
        lead = self.spec.lead
        bodies = _ids(self.tokenizer, [lead + ("" if t is None else str(t)) for t in texts])
        out = [self.head + body[: self.text_budget] + self.tail for body in bodies]
        return out, [len(body) > self.text_budget for body in bodies]

    def pairs(self, texts, labels) -> tuple[list[list[int]], list[int], list[bool]]:
        """(prompt + answer + eos ids, prompt length, truncated) per labelled text (labels 0..k-1)."""
        prompts, truncated = self.prompts(texts)
        ids = [p + self.answer_ids[int(lab)] + [self.eos] for p, lab in zip(prompts, labels)]
        return ids, [len(p) for p in prompts], truncated


def prompt_lengths(lengths, class_labels, answer_lengths):
    """Prompt length of each pair row: its length less its class's answer (+ EOS) length."""
    import numpy as np

    table = np.asarray(answer_lengths, dtype=np.int64)
    return np.asarray(lengths, dtype=np.int64) - table[np.asarray(class_labels, dtype=np.int64)]


def answer_only_labels(ids, lengths, prompt_lens):
    """Causal-LM labels for a right-padded batch: the ids on answer positions
    ``[prompt_len, length)``, -100 on the prompt and the padding (the loss skips those)."""
    import numpy as np

    ids = np.asarray(ids)
    positions = np.arange(ids.shape[1])[None, :]
    keep = (positions >= np.asarray(prompt_lens)[:, None]) & (positions < np.asarray(lengths)[:, None])
    return np.where(keep, ids, -100)
