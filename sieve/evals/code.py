"""Per-completion evaluations: code extraction, syntax, regex use, and task success in the sandbox."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from sieve.evals.regex_use import find_regex_use, parse_quietly
from sieve.evals.sandbox import SandboxMode, run_sandboxed

__all__ = [
    "extract_code", "syntax_ok", "valid_prefix", "cut_function", "CodeEval", "evaluate_code",
    "Validity", "VALIDITY_KINDS", "function_validity", "answer_validity",
]

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(response: str, prefilled_fence: bool = True) -> str | None:
    """The first fenced Python block of a response; with ``prefilled_fence`` the response continues an
    opening fence that was part of the prompt, so the code runs to the first closing fence.

    Example:
        >>> extract_code("def test():\\n    pass\\n```\\nMore text")
        'def test():\\n    pass\\n'
        >>> extract_code("Sure!\\n```python\\nx = 1\\n```", prefilled_fence=False)
        'x = 1\\n'
    """
    if prefilled_fence:
        return response.split("```", 1)[0]
    m = _FENCE.search(response)
    return m.group(1) if m else None


def syntax_ok(code: str) -> bool:
    """Whether ``code`` parses.

    Example:
        >>> syntax_ok("def f(:"), syntax_ok("x = 1")
        (False, True)
    """
    try:
        parse_quietly(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # nested too deep for Python itself
        return False
    return True


def valid_prefix(code: str) -> bool:
    """Whether ``code`` is valid Python so far: complete, or incomplete only because it stops early
    (an open block, bracket or string), not because of an error.

    Example:
        >>> valid_prefix("def f(x):\\n    if x:"), valid_prefix("def f(x):\\n    y = (1,"), valid_prefix("def f(:")
        (True, True, False)
    """
    import codeop
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            codeop.compile_command(code, "<completion>", "exec")
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
            return False
    return True


def cut_function(prompt: str, completion: str, drop_partial: bool = True) -> tuple[str, bool]:
    """The function a completion finishes, and whether its block ended inside the completion (False
    when the completion stopped first).

    The code runs from the prompt's last ``def``/``class`` line, through the completion up to the first
    line that leaves that block, dedented. Without a ``def`` in the prompt (module-level code), it is the
    prompt after its imports and the whole completion. When the completion stops mid-line inside the
    function (the token budget ran out), that unfinished last line is dropped (``drop_partial``), so
    syntax is judged on what the model finished.

    Example:
        >>> cut_function("import os\\n\\n    def f(x):\\n", "        return x\\n\\n    def g():\\n")
        ('def f(x):\\n    return x\\n', True)
    """
    lines = prompt.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.lstrip().startswith(("def ", "async def ", "class "))]
    if not starts:
        body = [ln for ln in lines if not ln.startswith(("import ", "from "))]
        return textwrap.dedent("".join(body).lstrip("\n") + completion), False
    i = starts[-1]
    base = len(lines[i]) - len(lines[i].lstrip())
    out = []
    ended = False
    for j, ln in enumerate(completion.splitlines(keepends=True)):
        continuing = j == 0 and not prompt.endswith("\n")
        if ln.strip() and not continuing and len(ln) - len(ln.lstrip()) <= base:
            ended = True
            break
        out.append(ln)
    if drop_partial and not ended and out and not out[-1].endswith("\n") and len(out) > 1:
        out = out[:-1]  # the token budget ran out mid-line: judge the lines that were finished
    return textwrap.dedent("".join(lines[i:]) + "".join(out)).rstrip() + "\n", ended


VALIDITY_KINDS: tuple[str, ...] = ("complete", "prefix", "invalid", "empty")


@dataclass(frozen=True)
class Validity:
    """How a completion stands as code. ``kind``:

    - ``complete``: the code ended inside the completion (the function was left, the fence closed, or
      the model stopped at EOS or a stop string) and it parses;
    - ``prefix``: the token budget ran out inside the code, and what is there is valid so far;
    - ``invalid``: a syntax error (complete or not);
    - ``empty``: nothing was written (blank text, or no line added to the function). Never valid.

    ``code`` is what the regex and syntax checks read ("" when empty).
    """

    kind: str
    code: str

    @property
    def valid(self) -> bool:
        """Complete and parsing, or a valid prefix at the token budget."""
        return self.kind in ("complete", "prefix")

    @property
    def empty(self) -> bool:
        return self.kind == "empty"


def _budget_kind(code: str) -> str:
    return "prefix" if syntax_ok(code) or valid_prefix(code) else "invalid"


def function_validity(prompt: str, completion: str, finished: bool) -> Validity:
    """Validity of a completion that continues a function start (a base model writing code).

    ``finished``: the completion ended by itself (EOS or a stop string), not at the token budget; then
    its last line is whole and kept.

    Example:
        >>> p = "def f(x):\\n    # Double x.\\n"
        >>> [function_validity(p, c, f).kind for c, f in [("", True), ("    return 2 * x\\n", True),
        ...                                                ("    y = (x,", False), ("    return x +* 2\\n", True)]]
        ['empty', 'complete', 'prefix', 'invalid']
    """
    code, ended = cut_function(prompt, completion, drop_partial=not finished)
    if not completion.strip() or code.strip() == cut_function(prompt, "")[0].strip():
        return Validity("empty", "")
    if ended or finished:
        return Validity("complete" if syntax_ok(code) else "invalid", code)
    return Validity(_budget_kind(code), code)


def answer_validity(response: str, finished: bool, prefilled_fence: bool = True) -> Validity:
    """Validity of an instruct model's answer: the code of its (first) fenced block.

    Example:
        >>> [answer_validity(r, f).kind for r, f in [("```", True), ("x = 1\\n```", True), ("def f(:\\n", False)]]
        ['empty', 'complete', 'invalid']
    """
    code = extract_code(response, prefilled_fence=prefilled_fence)
    if code is None or not code.strip():
        return Validity("empty", "")
    closed = "```" in response if prefilled_fence else bool(re.search(r"```[^\n]*\n.*?```", response, re.S))
    if closed or finished:
        return Validity("complete" if syntax_ok(code) else "invalid", code)
    lines = code.splitlines(keepends=True)
    if len(lines) > 1 and not lines[-1].endswith("\n"):
        code = "".join(lines[:-1])  # the budget ran out mid-line: judge the finished lines
    return Validity(_budget_kind(code), code)


@dataclass(frozen=True)
class CodeEval:
    """What one completion did: code found, regex used (and how sure), valid syntax, task success."""

    has_code: bool
    regex: bool
    regex_parsed: str
    syntax: bool
    executed: bool | None
    exec_status: str


def evaluate_code(
    code: str | None,
    *,
    setup: str = "",
    execute: bool = False,
    call: list[str] | None = None,
    timeout_s: float = 3.0,
    memory_mb: int = 512,
    sandbox: SandboxMode = "bwrap",
) -> CodeEval:
    """Evaluate one piece of generated code; execution (if asked) happens only in the sandbox
    (:func:`~sieve.evals.sandbox.run_sandboxed`, mode ``sandbox``), with ``setup`` (the code under
    test) run there too. ``exec_status`` is the sandbox's status (``ok``, ``error``, ``timeout``,
    ``killed``, ``no-result``, ``tampered``), or ``syntax``/``no-code``/``not-run``.

    Example:
        >>> e = evaluate_code("import re\\ndef test_x():\\n    assert re.match('a', 'a')\\n", execute=True)
        >>> (e.regex, e.syntax, e.executed)
        (True, True, True)
    """
    if code is None or not code.strip():
        return CodeEval(False, False, "none", False, False if execute else None, "no-code")
    use = find_regex_use(code)
    ok = syntax_ok(code)
    executed, status = None, "not-run"
    if execute:
        if ok:
            r = run_sandboxed(code, setup=setup, call=call, timeout_s=timeout_s, memory_mb=memory_mb, mode=sandbox)
            executed, status = r.ok, r.status
        else:
            executed, status = False, "syntax"
    return CodeEval(True, use.used, use.parsed, ok, executed, status)
