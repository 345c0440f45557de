"""Exceptions raised for bad input; the CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class DeriveError(ValueError):
    """Base class: a problem with what the user asked for, reported in one line."""


class ParseError(DeriveError):
    """An expression was refused by the safe parser.

    ``column`` is 1-based and points at the offending token.
    """

    def __init__(self, message: str, text: str = "", column: int | None = None, where: str = ""):
        self.text = text
        self.column = column
        self.where = where
        loc = f" at column {column}" if column is not None else ""
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{message}{loc}")


class RuleError(DeriveError):
    """A rule file is malformed or names something unknown."""


class UnknownActivation(DeriveError):
    """The activation is neither a shipped rule nor a parsable expression."""
