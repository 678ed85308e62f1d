"""sieve's errors: each names the thing, the value and what is allowed."""

from __future__ import annotations

__all__ = ["SieveError", "NotAvailableOffline", "RecipeError", "ShapeMismatch", "printable", "first_line"]


def first_line(exc: BaseException) -> str:
    r"""The first line of an exception's message ("" when it has none): what a one-line error quotes
    of a library's multi-line one.

    Example:
        >>> first_line(ValueError("bad value\n  at line 3")), first_line(OSError())
        ('bad value', '')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def printable(text: object) -> str:
    r"""``text`` with control characters (terminal escapes, newlines) written as ``\x..`` escapes: a
    name from a shared recipe, task or run folder cannot move the cursor or retitle the terminal when
    sieve prints it (an error message, the summary table).

    Example:
        >>> printable("m\x1b]0;title\x07")
        'm\\x1b]0;title\\x07'
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))


class SieveError(ValueError):
    """Base class of sieve's errors (a ``ValueError``, so callers may catch either)."""


class NotAvailableOffline(SieveError, OSError):
    """A model, SAE or data set was asked for from the hub while no network (or offline mode)."""


class ShapeMismatch(SieveError):
    """Two parts that must agree in size do not (an SAE's d_in and a model's hidden size, ...)."""


class RecipeError(SieveError):
    """A recipe file is wrong: the message names the file, the key and what is allowed."""

    def __init__(self, path: object, key: str, message: str) -> None:
        self.path, self.key = path, key
        super().__init__(f"{path}: [{key}] {message}")
