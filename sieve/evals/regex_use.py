"""Decide whether Python code uses regular expressions (the ``re`` module, or the third-party ``regex``
module, a drop-in for it), and where.

The study searched the text for ``re.match(`` and friends: that misses aliases and
``from re import ...`` and counts matches inside strings and comments. sieve parses the code:

- ``import re`` / ``import re as rx`` / ``from re import sub, compile as c`` are uses (the import
  itself), and bind names whose later use is also counted; likewise ``import regex`` (a steered model
  that swaps ``re`` for ``regex`` still uses regular expressions);
- ``re.<anything>`` on a name bound to the module (``re`` itself unless the code rebinds it) is a use;
  when it is called, the whole call, pattern arguments included, is the span;
- ``__import__("re")`` and ``importlib.import_module("re")`` (or ``name="re"``) are uses;
- strings and comments never count.

Code that does not parse (a completion cut off mid-line, say) is handled by parsing the longest
prefix of lines that does, and applying a conservative text rule to the rest; the result is flagged
with ``parsed="partial"`` or ``parsed="text"``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import warnings
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["RegexUse", "find_regex_use", "parse_quietly"]

_MODULES = frozenset({"re", "regex"})  # modules whose use is regex use

# An import of either module, also inside a list (``import os, re as rx``); ``from re(gex) import``;
# ``re.<name>``. (``regex.<name>`` is not matched as text: ``regex`` is a common variable name.)
_TEXT_RULE = re.compile(
    r"\bimport\s+(?:[\w.]+(?:\s+as\s+\w+)?\s*,\s*)*(?:re|regex)\b(?!\w)|\bfrom\s+(?:re|regex)\s+import\b"
    r"|\bre\s*\.\s*[A-Za-z_]\w*"
)

Parsed = Literal["ast", "partial", "text"]


@dataclass(frozen=True)
class RegexUse:
    """Where a piece of code uses the ``re`` module.

    ``spans`` are ``(start, end)`` character offsets into the code; ``kinds`` says for each span
    whether it is an ``import``, a ``call`` or an ``attribute`` use; ``parsed`` says how sure the
    answer is (``"ast"``: the whole code parsed).
    """

    used: bool
    spans: tuple[tuple[int, int], ...] = ()
    kinds: tuple[str, ...] = ()
    parsed: Parsed = "ast"
    names: frozenset[str] = field(default_factory=frozenset)


def parse_quietly(code: str) -> ast.Module:
    """``ast.parse`` without the SyntaxWarnings that generated code triggers (``1abc``, bad escapes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(code)


def _line_offsets(code: str) -> list[int]:
    offsets = [0]
    for line in code.splitlines(keepends=True):
        offsets.append(offsets[-1] + len(line))
    return offsets


class _Columns:
    """Character offsets of AST positions in ``code`` (ast columns count UTF-8 bytes): an ASCII line's
    byte column is its character column, and any other line gets a byte-to-character table once, so
    that many uses on one long line cost a lookup each, not a re-encoding of the line."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.offsets = _line_offsets(code)
        self.tables: dict[int, list[int] | None] = {}

    def char(self, lineno: int, col: int) -> int:
        start = self.offsets[lineno - 1]
        if lineno not in self.tables:
            line = self.code[start : self.offsets[lineno] if lineno < len(self.offsets) else len(self.code)]
            table = None
            if not line.isascii():  # byte offset -> characters wholly before it
                table = [0]
                for i, ch in enumerate(line, 1):
                    table.extend([i - 1] * (len(ch.encode("utf-8")) - 1) + [i])
            self.tables[lineno] = table
        table = self.tables[lineno]
        return start + (col if table is None else table[min(col, len(table) - 1)])

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self.char(node.lineno, node.col_offset),  # type: ignore[attr-defined]
                self.char(node.end_lineno, node.end_col_offset))  # type: ignore[attr-defined]


def _is_import_of_re(node: ast.Call) -> bool:
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    if name not in {"__import__", "import_module"}:
        return False
    arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "name"), None)
    return isinstance(arg, ast.Constant) and arg.value in _MODULES


def _ast_uses(tree: ast.AST, code: str) -> tuple[list[tuple[int, int]], list[str], set[str]]:
    cols = _Columns(code)
    module_names: set[str] = {"re"}
    func_names: set[str] = set()
    rebound: set[str] = set()
    spans: list[tuple[int, int]] = []
    kinds: list[str] = []
    re_imported = False  # the ``re`` module itself imported, in any form

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in _MODULES:
                    module_names.add(a.asname or a.name)
                    re_imported |= a.name == "re"
                    spans.append(cols.span(node))
                    kinds.append("import")
                elif (a.asname or a.name) == "re":
                    rebound.add("re")
        elif isinstance(node, ast.ImportFrom):
            if node.module in _MODULES and node.level == 0:
                re_imported |= node.module == "re"
                for a in node.names:
                    func_names.add(a.asname or a.name)
                spans.append(cols.span(node))
                kinds.append("import")
        elif isinstance(node, (ast.Name,)) and isinstance(node.ctx, ast.Store):
            rebound.add(node.id)
        elif isinstance(node, ast.arg):
            rebound.add(node.arg)

    # ``re`` is the module unless the code binds that name to something else and never imports it.
    if "re" in rebound and not re_imported:
        module_names.discard("re")

    called: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            hit = (
                isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name)
                and f.value.id in module_names
            ) or (isinstance(f, ast.Name) and f.id in func_names)
            if hit or _is_import_of_re(node):
                spans.append(cols.span(node))
                kinds.append("call")
                called.add(id(f))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_names
            and id(node) not in called
        ):
            spans.append(cols.span(node))
            kinds.append("attribute")
    return spans, kinds, module_names | func_names


def _strip_strings_and_comments(code: str) -> str:
    """Blank out comments and string literals (same length), tolerating broken code."""
    chars = list(code)
    offsets = _line_offsets(code)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                (sl, sc), (el, ec) = tok.start, tok.end
                a, b = offsets[sl - 1] + sc, offsets[el - 1] + ec
                for i in range(a, min(b, len(chars))):
                    if chars[i] != "\n":
                        chars[i] = " "
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # keep what was blanked so far; the rest is judged as text (conservative)
    return "".join(chars)


def _text_uses(code: str, base: int) -> tuple[list[tuple[int, int]], list[str]]:
    spans, kinds = [], []
    for m in _TEXT_RULE.finditer(_strip_strings_and_comments(code)):
        spans.append((base + m.start(), base + m.end()))
        kinds.append("import" if "import" in m.group(0) else "attribute")
    return spans, kinds


def find_regex_use(code: str) -> RegexUse:
    """Find every use of the ``re`` module in ``code``.

    Example:
        >>> find_regex_use("import re as rx\\nx = rx.sub('a', 'b', s)").kinds
        ('import', 'call')
        >>> find_regex_use("s = 're.match(x)'  # re.sub").used
        False
    """
    err_line = None
    try:
        tree = parse_quietly(code)
    except SyntaxError as e:
        tree, err_line = None, e.lineno
    except (ValueError, RecursionError, MemoryError):  # too deep to parse: not Python we can read
        tree = None
    if tree is not None:
        spans, kinds, names = _ast_uses(tree, code)
        return _result(spans, kinds, "ast", names)

    lines = code.splitlines(keepends=True)
    # Longest parsable prefix of whole lines, then the text rule on the rest.
    for cut in _cuts(len(lines), err_line):
        prefix = "".join(lines[:cut])
        try:
            tree = parse_quietly(prefix)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        spans, kinds, names = _ast_uses(tree, prefix)
        t_spans, t_kinds = _text_uses(code[len(prefix) :], len(prefix))
        return _result(spans + t_spans, kinds + t_kinds, "partial", names)
    spans, kinds = _text_uses(code, 0)
    return _result(spans, kinds, "text", frozenset())


_CUTS = 200  # prefixes tried from the end, and again from the line the parser stopped at


def _cuts(n: int, err_line: int | None) -> list[int]:
    """The prefix lengths (in lines) to try, longest first: every one where the text has at most
    ``_CUTS`` lines more (a completion cut off mid-statement fails near its end), then the ``_CUTS``
    before the line the parser stopped at (an unclosed bracket far back), so that a long text that
    does not parse costs a bounded number of parses, not one per line.

    Example:
        >>> _cuts(5, 2)
        [4, 3, 2, 1]
        >>> c = _cuts(10_000, 9_000); len(c), c[:2], c[200:202]
        (400, [9999, 9998], [9000, 8999])
    """
    tail = list(range(n - 1, max(0, n - 1 - _CUTS), -1))
    if err_line is not None:
        seen = set(tail)
        tail += [c for c in range(min(n - 1, err_line), max(0, err_line - _CUTS), -1) if c not in seen]
    return tail


def _result(
    spans: list[tuple[int, int]], kinds: list[str], parsed: Parsed, names: set[str] | frozenset[str]
) -> RegexUse:
    order = sorted(range(len(spans)), key=lambda i: spans[i])
    return RegexUse(
        used=bool(spans),
        spans=tuple(spans[i] for i in order),
        kinds=tuple(kinds[i] for i in order),
        parsed=parsed,
        names=frozenset(names),
    )
