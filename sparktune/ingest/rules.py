"""Record rules shared by every reader and the validation: reasons, label names, what "blank" means."""

from __future__ import annotations

import re
import unicodedata
from enum import Enum

__all__ = [
    "BLANK_JAVA",
    "KNOWN_SPLITS",
    "LABEL_NAMES",
    "NOT_UTF8",
    "NOT_UTF8_REASON",
    "QUOTE_CHARS",
    "TRIM_JAVA",
    "UNLABELLED_SPLITS",
    "Reason",
    "is_blank",
]

LABEL_NAMES = {"neg": 0, "negative": 0, "pos": 1, "positive": 1, "unsup": -1, "unlabelled": -1, "unlabeled": -1}
UNLABELLED_SPLITS = ("unsupervised", "unsup", "unlabelled", "unlabeled")
KNOWN_SPLITS = ("train", "test", "validation", "valid", "dev", "eval") + UNLABELLED_SPLITS
# Java regex (Spark's regexp functions): White_Space, control, format and separator characters.
_BLANK_CLASS = r"[\s\p{Cc}\p{Cf}\p{Z}]"
BLANK_JAVA = r"(?U)^" + _BLANK_CLASS + r"*$"
TRIM_JAVA = r"(?U)^" + _BLANK_CLASS + r"+|" + _BLANK_CLASS + r"+$"
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
    """Python's reading of the blank rule (tests use it as an oracle; Spark uses ``BLANK_JAVA``)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)
