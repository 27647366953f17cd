"""Record rules shared by every reader and the validation: reasons, label names, what "blank" means."""

from __future__ import annotations

import functools
import re
import unicodedata
from enum import Enum

__all__ = [
    "KNOWN_SPLITS",
    "LABEL_NAMES",
    "NOT_UTF8",
    "NOT_UTF8_REASON",
    "QUOTE_CHARS",
    "UNLABELLED_SPLITS",
    "Reason",
    "blank_java",
    "is_blank",
    "trim_java",
]

LABEL_NAMES = {"neg": 0, "negative": 0, "pos": 1, "positive": 1, "unsup": -1, "unlabelled": -1, "unlabeled": -1}
UNLABELLED_SPLITS = ("unsupervised", "unsup", "unlabelled", "unlabeled")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval") + UNLABELLED_SPLITS
_BLANK_CATEGORIES = ("Cc", "Cf", "Zs", "Zl", "Zp")
# Longest piece of a bad value quoted back in a reason.
QUOTE_CHARS = 100
NOT_UTF8 = re.compile(r"[\udc80-\udcff]")  # bytes decoded with surrogateescape
NOT_UTF8_REASON = ("not valid UTF-8: the record holds bytes that are not UTF-8 (a Latin-1 or binary file?); "
                   "re-save the source as UTF-8")


class Reason(str, Enum):
    """Why a record was quarantined: the ``reason`` column starts with one of these."""

    UNPARSEABLE = "unparseable record"
    BLANK_RECORD = "empty record (blank line)"
    BAD_FILE_NAME = "file name is not <id>_<rating>.txt"
    MISSING_SPLIT = "missing split"
    SPLIT_WRONG_TYPE = "split has the wrong type"
    TEXT_WRONG_TYPE = "text has the wrong type"
    MISSING_TEXT = "missing text"
    EMPTY_TEXT = "empty text (blank or whitespace only)"
    LABEL_WRONG_TYPE = "label has the wrong type"
    MISSING_LABEL = "missing label"
    LABEL_OUT_OF_RANGE = "label out of range"
    DUPLICATE = "exact duplicate"
    NOT_UTF8 = "not valid UTF-8"
    REPEATED_KEY = "repeated key"


def is_blank(text: str) -> bool:
    """Python's reading of the blank rule (tests use it as an oracle; Spark uses ``blank_java()``)."""
    return all(c.isspace() or unicodedata.category(c) in _BLANK_CATEGORIES for c in text)


@functools.cache
def _blank_class() -> str:
    """A Java regex class of exactly the characters ``is_blank`` calls blank: white space, control,
    format and separator characters, listed as code point ranges.

    Not ``[\\s\\p{Cc}\\p{Cf}\\p{Z}]``: that reads the JVM's own Unicode tables, which lag Python's
    (Java 17 has Unicode 13, Python 3.11 Unicode 14, where U+0890 and U+0891 became format
    characters), so the same text was blank to one and not the other. Built once (~0.1 s)."""
    blank = [c for c in range(0x110000) if is_blank(chr(c))]
    ranges: list[list[int]] = []
    for c in blank:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return "[" + "".join(f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else "") for a, b in ranges) + "]"


def blank_java() -> str:
    """Java regex (Spark's ``rlike``): the whole value is blank (``is_blank``)."""
    return "^" + _blank_class() + "*$"


def trim_java() -> str:
    """Java regex (Spark's ``regexp_replace``): blank characters at either end."""
    return "^" + _blank_class() + "+|" + _blank_class() + "+$"
