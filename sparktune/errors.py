"""User-facing errors: what was expected, what was found, what to do.

``user_error`` is the one place that turns the Spark, Delta, OS and MLflow failures a user can
cause (a full disk, a folder they may not write, a damaged Delta log, a SQL expression that
fails on their data, an unreachable tracking server) into a ``SparktuneError`` with a message
instead of a Python traceback and a Java stack. The CLI calls it for every exception a stage
raises; what it does not recognise stays an internal error.
"""

from __future__ import annotations

import errno
import re

__all__ = ["SparktuneError", "ConfigError", "bounded", "user_error"]

# How much of a found value or a foreign error message a message quotes.
MAX_QUOTED_CHARS = 300
MAX_QUOTED_DEPTH = 3
MAX_QUOTED_ITEMS = 10


class SparktuneError(Exception):
    """An error caused by user input or environment, reported without a traceback by the CLI."""


class ConfigError(SparktuneError):
    """One or more configuration problems, collected and raised together."""

    def __init__(self, problems, source=None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} configuration problem(s){where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def bounded(value, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr``-like text of ``value`` for a message: at most ``limit`` characters, nesting cut at a
    few levels and a few items, never expanding a structure built of aliases (a YAML bomb)."""

    def walk(item, depth: int, budget: list) -> str:
        if budget[0] <= 0:
            return "..."
        if isinstance(item, dict):
            if depth >= MAX_QUOTED_DEPTH:
                return "{...}"
            parts = []
            for i, (k, v) in enumerate(item.items()):
                if i >= MAX_QUOTED_ITEMS or budget[0] <= 0:
                    parts.append("...")
                    break
                parts.append(f"{walk(k, depth + 1, budget)}: {walk(v, depth + 1, budget)}")
            return "{" + ", ".join(parts) + "}"
        if isinstance(item, list | tuple):
            if depth >= MAX_QUOTED_DEPTH:
                return "[...]"
            parts = []
            for i, v in enumerate(item):
                if i >= MAX_QUOTED_ITEMS or budget[0] <= 0:
                    parts.append("...")
                    break
                parts.append(walk(v, depth + 1, budget))
            return "[" + ", ".join(parts) + "]"
        text = repr(item) if isinstance(item, str) else str(item)
        text = text[: max(budget[0], 0) + 3]
        budget[0] -= len(text)
        return text

    from sparktune.redact import redact

    text = redact(walk(value, 0, [limit]))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Mapping what users cause to messages.

_DELTA_LOG_FILE = re.compile(r"(\S*_delta_log/\d+\.(?:json|checkpoint[^\s:]*))")
_PATH_IN_MESSAGE = re.compile(r"((?:file:)?/[^\s:'\"]+)")
_UNREACHABLE = ("Max retries exceeded", "Failed to establish a new connection", "Connection refused",
                "NameResolutionError", "ConnectTimeoutError", "Read timed out", "ConnectionError")


def _condition(exc) -> str:
    get = getattr(exc, "getCondition", None) or getattr(exc, "getErrorClass", None)
    try:
        return str(get() or "") if get else ""
    except Exception:  # a captured exception whose JVM side is gone
        return ""


def _sqlstate(exc) -> str:
    get = getattr(exc, "getSqlState", None)
    try:
        return str(get() or "") if get else ""
    except Exception:
        return ""


def _first_line(text: str) -> str:
    from sparktune.redact import redact

    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return redact(line)[:MAX_QUOTED_CHARS]


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def user_error(exc: BaseException) -> SparktuneError | None:
    """A SparktuneError saying what happened and what to do, for failures a user causes; else None."""
    if isinstance(exc, SparktuneError):
        return exc
    from sparktune.redact import redact

    text = "\n".join(f"{type(e).__name__}: {e}" for e in _chain(exc))
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in text:
            return SparktuneError(
                "the disk is full (No space left on device) while writing"
                + (f" {redact(str(e.filename))!r}" if isinstance(e, OSError) and e.filename else "")
                + ": nothing of this step was committed (Delta commits are all or nothing). Free space on that "
                "volume, or point the output (or SPARKTUNE_HOME / spark.local.dir for Spark's scratch files) at a "
                "volume with room, then run again")
        if isinstance(e, OSError) and e.errno == errno.EROFS or "Read-only file system" in text:
            return SparktuneError(
                "the file system is read-only" + (f" at {redact(str(e.filename))!r}" if isinstance(e, OSError)
                                                  and e.filename else "")
                + ": nothing of this step was committed. Write to a folder on a writable volume")
        if isinstance(e, PermissionError) or "Permission denied" in text or "AccessDeniedException" in text:
            where = e.filename if isinstance(e, OSError) and e.filename else None
            if where is None:
                line = next((ln for ln in text.splitlines() if "Permission denied" in ln or "AccessDenied" in ln), "")
                found = _PATH_IN_MESSAGE.search(line)
                where = found.group(1) if found else None
            return SparktuneError(
                "permission denied" + (f" on {redact(str(where))!r}" if where else "") + ": this user may not write "
                "(or read) there. Choose a folder you may write, or fix its permissions, then run again")
    if "_delta_log" in text and any(marker in text for marker in (
            "JsonParseException", "JsonEOFException", "Unexpected end-of-input", "Unexpected character",
            "DELTA_LOG_FILE", "Failed to parse", "MismatchedInputException", "DELTA_INVALID_COMMIT",
            "json_parse", "DELTA_STATE_RECOVER_ERROR", "DELTA_VERSIONS_NOT_CONTIGUOUS",
            "ChecksumException", "MALFORMED_RECORD_IN_PARSING")):
        found = _DELTA_LOG_FILE.search(text)
        log_file = redact(found.group(1)) if found else "a commit file under _delta_log"
        return SparktuneError(
            f"the Delta table's log is damaged: {log_file} is not a complete Delta commit (truncated or edited "
            "JSON, or it no longer matches its .crc checksum). Nothing was read from or written to the table. "
            "Restore that file from a backup or copy; if it is the newest commit of a write that was cut off, "
            "moving it away (and its .crc) returns the table to the previous version")
    condition = _condition(exc)
    state = _sqlstate(exc)
    if state.startswith("22") or type(exc).__name__ in ("ArithmeticException", "NumberFormatException",
                                                        "DateTimeException"):
        return SparktuneError(
            f"the query failed on a value in the data ({condition or type(exc).__name__}): {_first_line(str(exc))}. "
            "Guard the expression (try_divide, try_cast, NULLIF, CASE WHEN) or filter the rows that cause it")
    if any(marker in text for marker in _UNREACHABLE) and ("mlflow" in text.lower() or "http" in text.lower()):
        return SparktuneError(
            f"a server is unreachable: {_first_line(text)}. Check the address (--tracking-uri, "
            "MLFLOW_TRACKING_URI) and that the server runs")
    return None
