"""Per-completion evaluations: code extraction, syntax, regex use, and task success in the sandbox."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

from sieve.evals.regex_use import find_regex_use, parse_quietly
from sieve.evals.sandbox import SandboxMode, run_sandboxed

__all__ = [
    "extract_code", "syntax_ok", "valid_prefix", "complete_function", "cut_function", "CodeEval", "evaluate_code",
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
    except (SyntaxError, ValueError):
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
        except (SyntaxError, ValueError, OverflowError):
            return False
    return True


def complete_function(prompt: str, completion: str, drop_partial: bool = True) -> str:
    """The function a completion finishes: from the prompt's last ``def``/``class`` line, through the
    completion up to the first line that leaves that block, dedented. Without a ``def`` in the prompt
    (module-level code), the prompt after its imports and the whole completion. When the completion
    stops mid-line inside the function (the token budget ran out), that unfinished last line is
    dropped (``drop_partial``), so syntax is judged on what the model finished.

    Example:
        >>> complete_function("import os\\n\\n    def f(x):\\n", "        return x\\n\\n    def g():\\n")
        'def f(x):\\n    return x\\n'
    """
    return cut_function(prompt, completion, drop_partial)[0]


def cut_function(prompt: str, completion: str, drop_partial: bool = True) -> tuple[str, bool]:
    """:func:`complete_function`'s code, and whether the block ended inside the completion (False when
    the completion stopped first)."""
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
