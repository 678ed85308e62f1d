"""Decide whether Python code uses regular expressions (the ``re`` module), and where.

The study searched the text for ``re.match(`` and friends: that misses aliases and
``from re import ...`` and counts matches inside strings and comments. sieve parses the code:

- ``import re`` / ``import re as rx`` / ``from re import sub, compile as c`` are uses (the import
  itself), and bind names whose later use is also counted;
- ``re.<anything>`` on a name bound to the module (``re`` itself unless the code rebinds it) is a use;
  when it is called, the whole call, pattern arguments included, is the span;
- ``__import__("re")`` and ``importlib.import_module("re")`` are uses;
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

_TEXT_RULE = re.compile(
    r"\bimport\s+re\b(?!\w)|\bfrom\s+re\s+import\b|\bre\s*\.\s*[A-Za-z_]\w*"
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


def _node_span(node: ast.AST, offsets: list[int], code: str) -> tuple[int, int]:
    # ast col offsets are in UTF-8 bytes; convert per line to characters.
    def to_char(lineno: int, col: int) -> int:
        start = offsets[lineno - 1]
        line = code[start : offsets[lineno] if lineno < len(offsets) else len(code)]
        return start + len(line.encode("utf-8")[:col].decode("utf-8", errors="ignore"))

    return (
        to_char(node.lineno, node.col_offset),  # type: ignore[attr-defined]
        to_char(node.end_lineno, node.end_col_offset),  # type: ignore[attr-defined]
    )


def _is_import_of_re(node: ast.Call) -> bool:
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
    if name not in {"__import__", "import_module"} or not node.args:
        return False
    arg = node.args[0]
    return isinstance(arg, ast.Constant) and arg.value == "re"


def _ast_uses(tree: ast.AST, code: str) -> tuple[list[tuple[int, int]], list[str], set[str]]:
    offsets = _line_offsets(code)
    module_names: set[str] = {"re"}
    func_names: set[str] = set()
    rebound: set[str] = set()
    spans: list[tuple[int, int]] = []
    kinds: list[str] = []

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "re":
                    module_names.add(a.asname or "re")
                    spans.append(_node_span(node, offsets, code))
                    kinds.append("import")
                elif (a.asname or a.name) == "re":
                    rebound.add("re")
        elif isinstance(node, ast.ImportFrom):
            if node.module == "re" and node.level == 0:
                for a in node.names:
                    func_names.add(a.asname or a.name)
                spans.append(_node_span(node, offsets, code))
                kinds.append("import")
        elif isinstance(node, (ast.Name,)) and isinstance(node.ctx, ast.Store):
            rebound.add(node.id)
        elif isinstance(node, ast.arg):
            rebound.add(node.arg)

    # ``re`` is the module unless the code binds that name to something else and never imports it.
    imported_as_re = any(k == "import" for k in kinds) and "re" in module_names
    if "re" in rebound and not imported_as_re:
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
                spans.append(_node_span(node, offsets, code))
                kinds.append("call")
                called.add(id(f))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_names
            and id(node) not in called
        ):
            spans.append(_node_span(node, offsets, code))
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
