"""Remove credentials from text before sparktune writes or prints it.

Redaction by key name alone misses secrets that ride inside values: a tracking URI
``https://user:password@host``, a SAS URL ``...?sv=...&sig=...``, a connection string
``...;AccountKey=...``, or a bare token pasted where a path was expected. ``redact`` finds
those inside any string; ``redact_mapping`` also hides every value stored under a
secret-looking key (``token``, ``password``, ``secret``, ``api_key``, ``credential``, ...;
``tokenizer`` is not one).

The same rules exist as Spark SQL expressions (``redact_column``) so that per-row values
written to a table (e.g. ``source_file``) are redacted in the executors. Each rule is a
regular expression that Python's ``re`` and Java's ``java.util.regex`` read the same way:
no named groups, single-character look-behinds only, and replacements refer only to group 1.
Every rule runs in linear time on long text (a 1 MB record is redacted in well under a second).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["REDACTED", "install_log_redaction", "is_secret_key", "redact", "redact_column", "redact_mapping"]

REDACTED = "***"


@dataclass(frozen=True)
class _Rule:
    pattern: str  # Python and Java regex syntax alike
    keep_prefix: bool  # keep group 1 (e.g. "sig=") and replace the rest of the match


# Order matters only for readability: every rule runs on the output of the previous one.
_RULES: tuple[_Rule, ...] = (
    # PEM private keys, whole block.
    _Rule(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----", False),
    # URL userinfo: scheme://user:password@host -> scheme://***@host. Without a ':' the
    # userinfo is still hidden except for Azure's wasb(s)/abfs(s), where it is a container name.
    _Rule(r"((?<![A-Za-z0-9+.-])(?i:[a-z][a-z0-9+.-]{0,31})://)[^/@\s:?#]*:[^@\s?#]*(?=@)", True),
    _Rule(r"((?i:(?:https?|ftps?|sftp|ssh|git|s3a?|gs|postgres(?:ql)?|mysql|mongodb(?:\+srv)?|redis|amqps?))://)"
          r"[^/@\s:?#]+(?=@)", True),
    # Query-string credentials: ?sig=..., &token=..., X-Amz-Signature=..., SAS sig=, key=.
    _Rule(r"([?&;](?i:sig|signature|token|access_token|id_token|refresh_token|auth|key|apikey|api_key|api-key|"
          r"code|password|pwd|secret|client_secret|x-amz-signature|x-amz-credential|x-amz-security-token|"
          r"x-goog-signature|x-goog-credential|awsaccesskeyid)=)[^&\s#'\"]+", True),
    # Connection strings: AccountKey=...;SharedAccessSignature=...;Password=...
    _Rule(r"((?i:accountkey|sharedaccesskey|sharedaccesssignature|password|pwd|secretkey|clientsecret)=)[^;\s'\"]+",
          True),
    # key = value / key: value / "key": "value" for secret-looking names (not tokenizer, not n_tokens).
    # Names start where a name starts (the look-behind) and their prefix is bounded: otherwise a
    # long run of name characters (a 1 MB "xxxx..." review) is tried from every position, in
    # quadratic time. The scheme rule above is bounded the same way.
    _Rule(r"((?<![A-Za-z0-9_.-])(?i:[a-z0-9_.-]{0,200}(?:token|password|passwd|secret|api[_-]?key|apikey|access[_-]?key|account[_-]?key|"
          r"private[_-]?key|credentials?))[\"']?\s*[=:]\s*[\"']?)(?!\*\*\*)[^\s\"',;&}]+", True),
    _Rule(r"((?i:bearer|basic)\s+)[A-Za-z0-9._~+/-]{8,}=*", True),
    # Known token shapes, wherever they appear.
    _Rule(r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{16,}", False),  # OpenAI / Anthropic
    _Rule(r"dapi[0-9a-zA-Z]{20,}(?:-[0-9]+)?", False),  # Databricks personal access token
    _Rule(r"(?:AKIA|ASIA)[0-9A-Z]{16}", False),  # AWS access key id
    _Rule(r"hf_[A-Za-z0-9]{20,}", False),  # Hugging Face
    _Rule(r"gh[pousr]_[A-Za-z0-9]{20,}", False),  # GitHub
    _Rule(r"xox[abprs]-[A-Za-z0-9-]{10,}", False),  # Slack
    _Rule(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", False),  # JWT
)

_COMPILED = tuple((re.compile(rule.pattern), rule.keep_prefix) for rule in _RULES)
_SECRET_KEY = re.compile(
    r"(token(?!iz)|password|passwd|secret|api[_-]?key|apikey|credential|private[_-]?key|access[_-]?key|"
    r"account[_-]?key|connection[_-]?string|sas)",
    re.IGNORECASE,
)
# Plural counters such as n_tokens / max_tokens are numbers, not secrets.
_NOT_SECRET_KEY = re.compile(r"(^|[_.-])(n|num|max|min|total|mean|median|p\d+)?_?tokens$", re.IGNORECASE)


def redact(text):
    """``text`` with every credential found in it replaced by ``***``; non-strings pass through."""
    if not isinstance(text, str) or not text:
        return text
    for pattern, keep_prefix in _COMPILED:
        text = pattern.sub((lambda m: m.group(1) + REDACTED) if keep_prefix else (lambda m: REDACTED), text)
    return text


def is_secret_key(key) -> bool:
    """True for names such as ``hf_token``, ``DB_PASSWORD``, ``api_key``; false for ``tokenizer``."""
    name = str(key)
    return bool(_SECRET_KEY.search(name)) and not _NOT_SECRET_KEY.search(name)


def redact_mapping(mapping):
    """A copy of ``mapping`` (nested dicts/lists too) with secret-keyed values hidden and all values redacted."""
    if isinstance(mapping, Mapping):
        return {
            key: (REDACTED if is_secret_key(key) and value not in (None, "") else redact_mapping(value))
            for key, value in mapping.items()
        }
    if isinstance(mapping, list | tuple):
        return type(mapping)(redact_mapping(v) for v in mapping)
    return redact(mapping)


def redact_column(column):
    """The same rules as a Spark Column expression (runs in the executors, no Python UDF)."""
    from pyspark.sql import functions as F

    for rule in _RULES:
        replacement = "$1" + REDACTED if rule.keep_prefix else REDACTED
        # Java's replacement syntax: a literal '$' or '\' would need escaping; "***" has neither.
        column = F.regexp_replace(column, rule.pattern, replacement)
    return column


def install_log_redaction() -> None:
    """Redact every Python log record of this process (sparktune's, MLflow's, transformers') as it is made.

    A record factory, not a handler filter: it covers records of every logger and handler,
    including ones configured later. Installed once; the message is formatted and redacted
    eagerly (a record's arguments could otherwise carry a credential past it).
    """
    import logging

    current = logging.getLogRecordFactory()
    if getattr(current, "_sparktune_redacts", False):
        return

    def factory(*args, **kwargs):
        record = current(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it itself when it formats it
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record

    factory._sparktune_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
