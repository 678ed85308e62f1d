"""Run untrusted generated code (and a prompt file's code under test) contained by the operating
system, never in sieve's own process.

The boundary is the OS, not the interpreter. In the default mode, ``"bwrap"``, each evaluation runs
under `bubblewrap <https://github.com/containers/bubblewrap>`_:

- new user, pid, network, ipc, uts and cgroup namespaces; a non-root uid inside; no capabilities;
  no further user namespaces; ``--die-with-parent`` and ``--new-session``;
- a filesystem of read-only binds of only what the interpreter needs (its executable, its standard
  library, its shared library and the system library folders), with its site-packages hidden; no
  home, no project tree, no ``/etc``, no ``/proc``; ``/dev`` minimal and read-only; a private,
  size-limited tmpfs as the working directory;
- inside, a harness process that never runs untrusted code forks one worker per test function. The
  worker closes every descriptor but its own report pipe, sets resource limits (address space, CPU
  seconds, file size, open files, no core dumps), makes itself non-dumpable and installs a seccomp
  filter that refuses process creation (``fork``/``vfork``/``clone`` without ``CLONE_THREAD``),
  ``execve``, ``ptrace``, other processes' memory, ``mount``/``unshare``/``setns``, io_uring,
  keyrings, ``perf_event_open``, ``bpf``, ``userfaultfd`` and non-Unix sockets. No fork means no
  fork bomb and no process left behind, whatever the uid; the pid namespace ends with the harness
  in any case;
- an audit hook in the worker is kept as defence in depth only;
- per-test outcomes reach sieve through a pipe that only the harness holds (the worker closed its
  copy before the untrusted code was imported): no nonce, no secret in the environment;
- sieve reads stdout, stderr and results with a hard byte cap and kills the whole sandbox (pid
  namespace teardown) at the wall-clock limit.

Before anything runs, :func:`screen` reads the generated module's syntax tree: redefining the function
under test, touching ``__main__``/the harness/frames, ``os._exit``, ``sys.exit`` at import, writing to
raw descriptors, dynamic code (``exec``/``eval``/``__import__``)... mark the evaluation
``"tampered"``: not passed, not run.

Where bubblewrap is missing, execution is refused (:class:`SandboxUnavailable`, with how to install it)
unless the caller names the weaker mode ``"process"`` (same harness, seccomp and limits, but no
filesystem or network isolation), which warns every time a process starts using it.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import functools
import itertools
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from sieve.errors import SieveError

__all__ = [
    "SandboxResult", "SandboxMode", "SandboxUnavailable", "SandboxWarning", "run_sandboxed", "screen",
    "check_sandbox", "collect_tests", "bwrap_available", "network_isolation_available", "INSTALL_HINT",
]

SandboxMode = Literal["bwrap", "process"]

INSTALL_HINT = (
    "install bubblewrap: `apt-get install -y bubblewrap` (Debian/Ubuntu), `dnf install bubblewrap` "
    "(Fedora), `pacman -S bubblewrap` (Arch); `bash scripts/setup.sh` does it where it runs as root "
    "with apt. Or choose the weaker mode explicitly with eval.sandbox = \"process\" in the recipe or "
    "eval.sandbox=process on the command line (generated code can then read and write what sieve can)"
)


class SandboxUnavailable(SieveError, RuntimeError):
    """The sandbox asked for cannot run here (bubblewrap missing or not permitted)."""


class SandboxWarning(UserWarning):
    """Generated code runs in the weaker ``"process"`` mode, without OS-level isolation."""


@dataclass(frozen=True)
class SandboxResult:
    """``ok`` when the code ran and every test function returned; otherwise ``status`` says why:
    ``error`` (a test raised, or no test), ``timeout``, ``killed`` (a limit or signal), ``no-result``
    (no outcome came back), ``tampered`` (the screen refused the code: not run)."""

    ok: bool
    status: str
    detail: str
    seconds: float
    output: str = ""  # the first bytes of the code's stdout, then its stderr (capped)


# --------------------------------------------------------------------------------------- the screen

# Names that reach the harness, the interpreter's internals, frames or raw channels. No honest
# generated test needs them; refused wherever they appear (names, attributes, imported names, and
# words inside string constants, since ``getattr(os, "_exit")`` is the same call).
_UNAMBIGUOUS = {
    "__main__", "_exit", "__builtins__", "__globals__", "__code__", "__closure__", "__subclasses__",
    "__import__", "__loader__", "__spec__", "__self__", "__dict__", "__bases__", "__base__", "__mro__",
    "__reduce__", "__reduce_ex__", "__getattribute__", "__setattr__", "__delattr__", "__getstate__",
    "__setstate__", "__init_subclass__", "__set_name__", "__class_getitem__", "__del__",
    "_getframe", "_current_frames", "f_back", "f_globals", "f_locals", "f_builtins", "f_code",
    "tb_frame", "gi_frame", "cr_frame", "ag_frame", "gi_code", "co_code", "settrace", "setprofile",
    "addaudithook", "fork_exec", "closerange", "register_at_fork", "attrgetter", "methodcaller",
    "SystemExit", "__annotations__", "__getattr__", "get_field", "get_type_hints",
    "ForwardRef", "_eval_type", "__wrapped__", "cr_code", "ag_code", "co_names", "co_consts", "CodeType",
    "FunctionType", "LambdaType", "convert_field", "format_field", "vformat",
}
# Attribute names refused on any object (not as words in strings: "modules" is an honest word): the
# module table (``typing.sys.modules``), and the dynamic builtins reached as attributes of the builtins
# module (``sys.modules['builtins'].getattr``), which would make any name computable.
_ATTRS_ANYWHERE = {"modules", "getattr", "setattr", "delattr", "vars", "globals", "locals", "exec", "eval",
                   "breakpoint", "getattr_static", "currentframe", "f_locals", "f_back",
                   "walk_stack", "walk_tb"}
# Builtins refused by name (a call or a reference): dynamic code and attribute access.
_BUILTINS = {"exec", "eval", "compile", "globals", "locals", "vars", "setattr", "delattr", "breakpoint",
             "exit", "quit", "__import__"}
# Attributes refused on the modules that own processes, exits and raw descriptors (``f.write`` on a
# file the test opened is fine; ``os.write`` is not).
_RAW_MODULES = {"os", "posix", "nt", "sys", "io", "_io", "signal", "_thread", "unittest", "shutil", "string"}
_RAW_ATTRS = {
    "exit", "abort", "kill", "killpg", "system", "popen", "fdopen", "dup", "dup2", "write", "writev",
    "pwrite", "pwritev", "sendfile", "splice", "copy_file_range", "fork", "forkpty", "execv", "execve",
    "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle",
    "posix_spawn", "posix_spawnp", "modules", "FileIO", "open_code", "mock", "close", "set_inheritable",
    "pidfd_open", "ptrace", "setns", "unshare", "Formatter",
}
_FORBIDDEN_MODULES = {
    "ctypes", "_ctypes", "gc", "inspect", "_posixsubprocess", "posix", "nt", "importlib", "builtins",
    "__main__", "atexit", "subprocess", "multiprocessing", "_multiprocessing", "concurrent",
    "pickle", "_pickle", "copyreg", "marshal", "shelve", "code", "codeop", "runpy", "pty", "socket",
    "_socket", "mmap", "faulthandler", "dis", "unittest.mock", "mock", "_thread", "pydoc", "pkgutil",
    "zipimport", "trace", "bdb", "pdb", "timeit", "doctest", "sysconfig", "site", "resource", "fcntl",
    "_operator", "ast", "cProfile", "profile", "_imp", "imp", "posixpath", "_io", "_string", "_signal",
}
# Modules that other modules carry as attributes (``dataclasses.inspect``): refused as attribute names.
_MODULE_ATTRS = {"inspect", "importlib", "ctypes", "_ctypes", "gc", "_posixsubprocess", "posix", "builtins",
                 "subprocess", "multiprocessing", "pickle", "_pickle", "marshal", "_imp", "runpy", "pty", "socket",
                 "_socket", "mmap", "faulthandler", "pydoc", "pkgutil", "atexit", "_thread", "copyreg", "_io"}
# string.Formatter's overridable lookups: a subclass defining them is handed the objects its fields name.
_FORMATTER_HOOKS = {"convert_field", "format_field", "vformat", "get_field", "get_value"}
# The prompt file's own code under test: only what would fake a result or reach the harness.
_SETUP_FORBIDDEN = {"__main__", "_exit", "_getframe", "_current_frames", "f_back", "f_globals",
                    "tb_frame", "gi_frame", "cr_frame", "settrace", "setprofile", "addaudithook",
                    "closerange", "fork_exec", "SystemExit", "f_locals", "currentframe", "getouterframes",
                    "getinnerframes", "walk_stack", "walk_tb"}
# (a prompt file's code under test that walks the stack up to the worker would reach the worker's own
# report and exit, and pass every test of every completion)
_SETUP_FORBIDDEN_MODULES = {"ctypes", "_ctypes", "gc", "__main__", "_posixsubprocess", "atexit", "inspect"}


def _parse(code: str) -> ast.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        return ast.parse(code)


def _bindings(setup: str) -> tuple[set[str], dict[str, str]]:
    """The top-level names the code under test binds, and which of them are plain module imports."""
    try:
        tree = _parse(setup)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set(), {}
    names: set[str] = set()
    modules: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                bound = a.asname or a.name.split(".")[0]
                names.add(bound)
                modules[bound] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            names.update(a.asname or a.name for a in node.names)
        else:
            names.update(s.id for s in ast.walk(node) if isinstance(s, ast.Name) and isinstance(s.ctx, ast.Store))
    return names, modules


def _words(s: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", s[:200_000]))


def screen(code: str, setup: str = "", *, generated: bool = True) -> str | None:
    """Why ``code`` may not run as honest tests of ``setup``; None when it may.

    Generated tests are refused (status ``"tampered"``) when they rebind or patch a name the code under
    test defines, import a module that reaches the interpreter's internals, processes or the harness
    (``ctypes``, ``gc``, ``inspect``, ``importlib``, ``subprocess``, ``pickle``, ``__main__``...), use
    dynamic code or attribute access (``exec``, ``eval``, ``setattr``, ``vars``, ``getattr`` with a
    computed name), exit (``sys.exit``, ``os._exit``, ``SystemExit``), write to raw descriptors
    (``os.write``), or name such an internal inside a string. ``generated=False`` screens a prompt
    file's code under test, which may do more: only exits, ``__main__``, frames and ``ctypes``.

    Example:
        >>> screen("def test_a():\\n    assert f(1) == 2\\n", "def f(x):\\n    return x + 1\\n") is None
        True
        >>> screen("def f(x):\\n    return 2\\ndef test_a():\\n    assert f(1) == 2\\n", "def f(x):\\n    return x + 1\\n")
        "line 1: redefines 'f', which the code under test defines"
        >>> screen("import os\\nos._exit(0)\\n")
        'line 2: uses os._exit'
    """
    try:
        return _screen(code, setup, generated)
    except (RecursionError, MemoryError):  # nesting deeper than the screen can follow is no honest test
        return "nested too deeply to screen"


# What an honest test may set on sys (and put back): the runtime snapshot allows these too.
_SYS_STREAMS = {"stdout", "stderr", "stdin", "argv"}


def _private(attr: str) -> bool:
    """A module's private name (``_cache``), not a dunder (``__version__``)."""
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _root(node: ast.AST) -> ast.AST:
    """The name an attribute or subscript chain starts from (``Rules`` in ``Rules.table["d"]``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node


def _call_name(call: ast.Call) -> str:
    """The name a call is made by: ``f`` in ``f(x)`` and in ``m.f(x)``; "" for anything else."""
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _computed_copy(call: ast.Call) -> bool:
    """``functools.update_wrapper``/``wraps`` told which attributes to copy by anything but string
    constants: a getattr and setattr with computed names (``assigned=(name,)``)."""
    name = _call_name(call)
    if name not in ("update_wrapper", "wraps"):
        return False
    given = call.args[2 if name == "update_wrapper" else 1:] + [k.value for k in call.keywords]
    return any(not (isinstance(v, (ast.Tuple, ast.List)) and all(
        isinstance(e, ast.Constant) and isinstance(e.value, str) for e in v.elts)) for v in given)


def _binding_counts(tree: ast.Module) -> dict[str, int]:
    """How often each name is bound anywhere in ``tree``, counting only a plain top-level import as
    a binding that keeps the name's meaning (any other binding, ``del`` or ``global`` counts twice)."""
    top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    count: dict[str, int] = {}

    def bound(names: list[str], weight: int = 2) -> None:
        for name in names:
            count[name] = count.get(name, 0) + weight

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound([a.asname or a.name.split(".")[0] for a in node.names], 1 if id(node) in top else 2)
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound([node.id])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound([node.name])
        elif isinstance(node, ast.arg):
            bound([node.arg])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound(node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound([node.name])
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound([node.rest])
    return count


def _screen(code: str, setup: str, generated: bool) -> str | None:
    try:
        tree = _parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return f"does not parse: {e.msg if isinstance(e, SyntaxError) else type(e).__name__}"
    protected, setup_modules = _bindings(setup) if generated else (set(), {})
    unambiguous = _UNAMBIGUOUS if generated else _SETUP_FORBIDDEN
    bad_modules = _FORBIDDEN_MODULES if generated else _SETUP_FORBIDDEN_MODULES
    aliases: dict[str, str] = {}  # local name -> the module (or module.attr) it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    # getattr is fine only when called with a constant name (which the string rule then screens)
    plain_getattr = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call) and len(n.args) >= 2
                     and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)}
    # an import named like a refused builtin (``from re import compile``) stands for it only where it is
    # the name's one binding, at the top of the module (not in a function never called)
    bindings = _binding_counts(tree)
    bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}

    def bad_module(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[: i + 1]) in bad_modules for i in range(len(parts)))

    def raw(module: str, attr: str) -> bool:
        return generated and module.split(".")[0] in _RAW_MODULES and attr in _RAW_ATTRS

    def rebinds(name: str, line: int) -> str:
        return f"line {line}: redefines {name!r}, which the code under test defines"

    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for a in node.names:
                bound = a.asname or a.name.split(".")[0]
                if bad_module(a.name):
                    return f"line {line}: imports {a.name!r}"
                if bound in protected and setup_modules.get(bound) != aliases.get(bound):
                    return rebinds(bound, line)
        elif isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                return f"line {line}: relative import"
            if bad_module(node.module):
                return f"line {line}: imports {node.module!r}"
            for a in node.names:
                if a.name == "*":
                    return f"line {line}: imports * from {node.module!r}"
                if a.name in unambiguous or raw(node.module, a.name) or bad_module(f"{node.module}.{a.name}") or (
                        generated and (a.name in _ATTRS_ANYWHERE or a.name in _MODULE_ATTRS)):
                    return f"line {line}: imports {a.name!r} from {node.module!r}"
                if (a.asname or a.name) in protected:
                    return rebinds(a.asname or a.name, line)
        elif isinstance(node, ast.Name):
            if node.id in unambiguous or generated and node.id in _BUILTINS and bindings.get(node.id) != 1:
                return f"line {line}: uses {node.id!r}"
            if generated and node.id == "getattr" and id(node) not in plain_getattr:
                return f"line {line}: getattr with a computed name"
            if node.id in protected and not isinstance(node.ctx, ast.Load):
                return rebinds(node.id, line)
        elif isinstance(node, ast.Attribute):
            base = aliases.get(node.value.id, node.value.id) if isinstance(node.value, ast.Name) else ""
            if node.attr in unambiguous or raw(base, node.attr) or generated and (
                    node.attr in _MODULE_ATTRS or node.attr in _ATTRS_ANYWHERE):
                return f"line {line}: uses {base + '.' if base else ''}{node.attr}"
            if generated and isinstance(node.value, ast.Name) and node.value.id in aliases and _private(node.attr):
                return f"line {line}: uses {base}.{node.attr}, a module's private state"  # re._cache
            root = _root(node) if not isinstance(node.ctx, ast.Load) else None  # a store: where its chain starts
            if isinstance(root, ast.Name) and (
                    root.id in protected or root.id in aliases) and not (base == "sys" and node.attr in _SYS_STREAMS):
                return f"line {line}: changes {root.id}.{node.attr}, which it imported or the code under test defines"
        elif isinstance(node, ast.Subscript):
            root, env = _root(node) if not isinstance(node.ctx, ast.Load) else None, node.value
            environ = (isinstance(env, ast.Attribute) and env.attr == "environ" and isinstance(env.value, ast.Name)
                       and aliases.get(env.value.id) == "os") or (
                isinstance(env, ast.Name) and aliases.get(env.id) == "os.environ")
            if isinstance(root, ast.Name) and not environ and (
                    root.id in protected or generated and root.id in aliases):
                return f"line {line}: changes {root.id}...[...], which it imported or the code under test defines"
        elif isinstance(node, ast.Call) and _computed_copy(node):
            return f"line {line}: copies attributes by computed names"
        elif isinstance(node, ast.Call) and generated:
            f = node.func
            if id(f) in plain_getattr:  # getattr(x, "name") is x.name: the same rules
                const, obj = node.args[1].value, node.args[0]
                base = aliases.get(obj.id, obj.id) if isinstance(obj, ast.Name) else ""
                if const in _MODULE_ATTRS or const in _ATTRS_ANYWHERE or raw(base, const) or const in _BUILTINS or (
                        isinstance(obj, ast.Name) and obj.id in aliases and _private(const)):
                    return f"line {line}: uses {base + '.' if base else ''}{const}"
            name = _call_name(node)
            if name == "open" and node.args and isinstance(node.args[0], ast.Constant) and isinstance(
                    node.args[0].value, int):
                return f"line {line}: opens a raw descriptor"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            if not isinstance(node, ast.Lambda) and node.name in protected:
                return rebinds(node.name, line)
            if generated and not isinstance(node, ast.Lambda) and node.name in _FORMATTER_HOOKS:
                return f"line {line}: defines {node.name!r} (a string.Formatter hook: attributes by computed names)"
            if not isinstance(node, ast.ClassDef):
                args = node.args
                for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, [args.vararg, args.kwarg])]:
                    if a.arg in protected:
                        return rebinds(a.arg, line)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            hit = sorted(set(node.names) & protected)
            if hit:
                return rebinds(hit[0], line)
        elif isinstance(node, ast.ExceptHandler) and node.name in protected:
            return rebinds(node.name, line)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)) and id(node) not in bare and \
                node.value != "__main__":  # a docstring is inert; so is the string of `__name__ == "__main__"`
            text = node.value.decode("latin-1") if isinstance(node.value, bytes) else node.value
            hit = sorted(_words(text) & unambiguous)
            if hit:
                return f"line {line}: names {hit[0]!r} in a string"
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name in protected:
            return rebinds(node.name, line)
    return None


def collect_tests(code: str) -> list[str]:
    """The test functions a module defines at top level (``def test...``), in order.

    Example:
        >>> collect_tests("def helper():\\n    pass\\ndef test_b():\\n    pass\\ndef test_a():\\n    pass\\n")
        ['test_b', 'test_a']
    """
    try:
        tree = _parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    return list(dict.fromkeys(n.name for n in _module_level(tree.body)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")))


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements that run in the module's own scope: the top level and the bodies of its ``if``,
    ``try`` and ``with`` blocks (a test defined under ``if HAVE_HYPOTHESIS:`` is the module's too)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _module_level(node.body + node.orelse)
        elif isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            yield from _module_level(node.body + [s for h in node.handlers for s in h.body] + node.orelse
                                     + node.finalbody)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from _module_level(node.body)


def _under_main_guard(tree: ast.AST) -> set[int]:
    """The ids of the nodes in the body of an ``if __name__ ...:`` (which never runs here), in one walk:
    a walk per guard costs the square of the nesting depth."""
    guarded: set[int] = set()
    todo: list[tuple[ast.AST, bool]] = [(tree, False)]
    while todo:
        node, inside = todo.pop()
        if inside:
            guarded.add(id(node))
        main = (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")
        for name, value in ast.iter_fields(node):
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    todo.append((child, inside or (main and name == "body")))
    return guarded


def unrun_tests(code: str) -> str | None:
    """Why tests in ``code`` would not run as written here, so that no outcome of theirs can be counted
    (None when every test is a module-level function): test classes nothing in the module runs
    (pytest's ``class Test…`` or a ``unittest.TestCase``), ``unittest.main()`` (it finds no tests in the harness's module and
    returns), and ``assert (x, "message")``, which is always true.

    Example:
        >>> unrun_tests("class TestParse:\\n    def test_a(self):\\n        assert False\\n")
        "line 1: test class 'TestParse' (its tests are not run: write them as module-level test functions)"
        >>> unrun_tests("def test_a():\\n    assert (1 == 2, 'no')\\n")
        'line 2: assert on a tuple is always true'
    """
    try:
        tree = _parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    guarded = _under_main_guard(tree)
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ClassDef) and node.name not in used:  # a class the module runs itself is fine
            bases = {b.attr if isinstance(b, ast.Attribute) else getattr(b, "id", "") for b in node.bases}
            has_tests = any(isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)) and b.name.startswith("test")
                            for b in node.body)
            if "TestCase" in bases or "IsolatedAsyncioTestCase" in bases or (node.name.startswith("Test") and has_tests):
                return (f"line {line}: test class {node.name!r} (its tests are not run: write them as module-level "
                        "test functions)")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "main" and isinstance(f.value, ast.Name) and \
                    f.value.id == "unittest":
                return f"line {line}: unittest.main() finds no tests here (write module-level test functions)"
        elif isinstance(node, ast.Assert) and isinstance(node.test, ast.Tuple) and node.test.elts:
            return f"line {line}: assert on a tuple is always true"
    return None
# -------------------------------------------------------------------------------------- the harness

# Runs inside the sandbox as ``python -I -S -B -c HARNESS``; reads its job (JSON) from stdin. The
# harness process never runs untrusted code: it forks one worker per test and forwards the worker's
# outcome on the result descriptor, which the worker closes before it imports anything untrusted.
_HARNESS = r'''
import json, os, sys

def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.restype = ctypes.c_int
    return ctypes, libc

def _nodump():
    ctypes, libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE: no ptrace, no /proc/<pid>/fd of us
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")

def _die_with_parent(parent):
    """Be killed when the parent process ends (sieve for the harness, the harness for a worker): in
    ``process`` mode nothing else would stop them once sieve is killed. ``parent``: its pid, known
    before this process started (0: not known, as inside bwrap's pid namespace, where
    --die-with-parent and the namespace do this)."""
    ctypes, libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(1, 9, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG, SIGKILL
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if parent and os.getppid() != parent:  # the parent ended before the call
        os._exit(70)

def _seccomp():
    """Refuse process creation, exec, ptrace, other processes' memory, mounts, namespaces and
    non-Unix sockets for this process and its threads, whatever the uid; and memory no limit counts:
    shared memory, memfds, extended attributes (kernel memory a tmpfs does not bound by its size), record
    locks, pages pinned in pipes (vmsplice, pipe growth), and file watches and POSIX message queues
    (budgets shared with every process of the user)."""
    ctypes, libc = _libc()
    machine = os.uname().machine
    if machine == "x86_64":
        arch, x32 = 0xC000003E, True
        nr = dict(clone=56, fork=57, vfork=58, execve=59, execveat=322, clone3=435, ptrace=101,
                  process_vm_readv=310, process_vm_writev=311, unshare=272, setns=308, mount=165,
                  socket=41, pidfd_getfd=438, open_by_handle_at=304, open_tree=428, move_mount=429,
                  fsopen=430, fsmount=432, mount_setattr=442, kcmp=312, process_madvise=440,
                  io_uring_setup=425, io_uring_enter=426, io_uring_register=427, keyctl=250, add_key=248,
                  request_key=249, perf_event_open=298, bpf=321, userfaultfd=323, memfd_create=319,
                  memfd_secret=447, shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66,
                  semtimedop=220, msgget=68, msgsnd=69, msgrcv=70, msgctl=71, setxattr=188, lsetxattr=189,
                  fsetxattr=190, setxattrat=463, inotify_init=253, inotify_init1=294, fanotify_init=300,
                  fcntl=72, vmsplice=278, mq_open=240, mq_unlink=241, mq_timedsend=242, mq_timedreceive=243,
                  mq_notify=244, mq_getsetattr=245)
    elif machine == "aarch64":
        arch, x32 = 0xC00000B7, False
        nr = dict(clone=220, execve=221, execveat=281, clone3=435, ptrace=117, process_vm_readv=270,
                  process_vm_writev=271, unshare=97, setns=268, mount=40, socket=198, pidfd_getfd=438,
                  open_by_handle_at=265, open_tree=428, move_mount=429, fsopen=430, fsmount=432,
                  mount_setattr=442, kcmp=272, process_madvise=440, io_uring_setup=425, io_uring_enter=426,
                  io_uring_register=427, keyctl=219, add_key=217, request_key=218, perf_event_open=241,
                  bpf=280, userfaultfd=282, memfd_create=279, memfd_secret=447, msgget=186, msgctl=187,
                  msgrcv=188, msgsnd=189, semget=190, semctl=191, semtimedop=192, semop=193, shmget=194,
                  shmctl=195, shmat=196, shmdt=197, setxattr=5, lsetxattr=6, fsetxattr=7, setxattrat=463,
                  inotify_init1=26, fanotify_init=262, fcntl=25, vmsplice=75, mq_open=180, mq_unlink=181,
                  mq_timedsend=182, mq_timedreceive=183, mq_notify=184, mq_getsetattr=185)
    else:
        raise OSError("no seccomp filter for machine " + machine)
    ALLOW, KILL, EPERM, ENOSYS, EACCES = 0x7FFF0000, 0x80000000, 0x50001, 0x50026, 0x5000D
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, KILL), (LD, 0, 0, 0)]
    if x32:
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]
    prog += [(JEQ, 0, 4, nr["clone"]), (LD, 0, 0, 16), (JSET, 0, 1, 0x10000), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    prog += [(JEQ, 0, 4, nr["socket"]), (LD, 0, 0, 16), (JEQ, 0, 1, 1), (RET, 0, 0, ALLOW), (RET, 0, 0, EACCES)]
    prog += [(JEQ, 0, 1, nr["clone3"]), (RET, 0, 0, ENOSYS)]
    # fcntl's record locks (F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW) and pipe growth (F_SETPIPE_SZ):
    # kernel memory no limit counts
    prog += [(JEQ, 0, 8, nr["fcntl"]), (LD, 0, 0, 24), (JEQ, 5, 0, 6), (JEQ, 4, 0, 7), (JEQ, 3, 0, 37),
             (JEQ, 2, 0, 38), (JEQ, 1, 0, 1031), (RET, 0, 0, ALLOW), (RET, 0, 0, EPERM)]
    for name, n in nr.items():
        if name not in ("clone", "socket", "clone3", "fcntl"):
            prog += [(JEQ, 0, 1, n), (RET, 0, 0, EPERM)]
    prog.append((RET, 0, 0, ALLOW))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    table = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    fprog = Prog(len(prog), table)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")

def _limits(job):
    import resource
    cpu, mem, fsize = job["cpu_s"], job["memory_mb"] << 20, job["file_mb"] << 20
    for res, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
                     (resource.RLIMIT_FSIZE, (fsize, fsize)), (resource.RLIMIT_NOFILE, (64, 64)),
                     (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_SIGPENDING, (64, 64))):
        # queued signals count against the host user's budget (a user namespace passes them up)
        resource.setrlimit(res, val)

def _audit_hook(root, stdlib, stdlib_dir):
    """Defence in depth only: the OS is the boundary."""
    block = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork", "os.forkpty",
             "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "ctypes.dlopen",
             "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.kill", "os.killpg", "pty.spawn",
             "sys.settrace", "sys.setprofile", "signal.pthread_kill", "sys._current_frames", "gc.get_objects",
             "gc.get_referrers", "gc.get_referents", "os.pidfd_open", "code.__new__", "function.__new__"})
    modules = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing",
                         "_multiprocessing", "pty", "gc", "runpy", "faulthandler", "_socket", "socket", "posix",
                         "nt", "_imp", "_io"})
    paths = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod", "os.chown",
             "os.symlink", "os.link", "os.truncate", "os.utime", "os.mkfifo", "os.mknod", "shutil.move",
             "shutil.copyfile", "os.listdir", "os.scandir")
    # the events whose last one or two arguments are directory descriptors (-1: none): paths relative to them
    # are not the paths the hook sees
    dir_fds1 = frozenset({"os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.chown", "os.symlink", "os.utime",
                          "os.mkfifo", "os.mknod"})
    dir_fds2 = frozenset({"os.rename", "os.link"})
    realpath, fsdecode, startswith, getframe = os.path.realpath, os.fsdecode, str.startswith, sys._getframe
    generators = frozenset(os.path.join(stdlib_dir, f) for f in ("collections/__init__.py", "dataclasses.py"))
    type_, isinstance_, str_add, bytes_add, str_, bytes_ = type, isinstance, str.__add__, bytes.__add__, str, bytes
    int_, int_add, bool_ = int, int.__add__, bool

    def exact(p):
        """A str, bytes or int argument as an exact one: a subclass's own methods (startswith, __ne__)
        must not run inside the hook."""
        t = type_(p)
        if t is str_ or t is bytes_:
            return p
        if isinstance_(p, str_):
            return str_add("", p)
        if isinstance_(p, bytes_):
            return bytes_add(b"", p)
        if isinstance_(p, int_) and t is not bool_:
            return int_add(0, p)
        return p
    O_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(p):
        try:
            p = realpath(fsdecode(exact(p)))
        except Exception:
            return False
        return p == root or startswith(p, root + "/")

    def hook(event, args):
        args = tuple(exact(a) for a in args)
        if event in block:
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "import" and (len(args) > 1 and isinstance(args[1], (str, bytes)) and inside(args[1]) or len(
                args) > 2 and isinstance(args[2], list) and any(isinstance(p, (str, bytes)) and inside(p)
                                                                for p in list(args[2]))):
            # a .so, a .pyc, a zip of them: an import from the work folder, or while sys.path names it
            raise PermissionError("sandbox: importing code the test wrote is not allowed")
        if event in ("marshal.loads", "marshal.load") and (getframe(1).f_code.co_name, getframe(1).f_code.co_filename) \
                != ("_compile_bytecode", "<frozen importlib._bootstrap_external>"):
            raise PermissionError("sandbox: code from bytes is not allowed")  # but the import system's own
        if event == "import" and args and str(args[0]).split(".")[0] in modules:
            raise PermissionError("sandbox: importing " + str(args[0]) + " is not allowed")
        if event == "compile" and not startswith(str(args[1]) if len(args) > 1 else "", stdlib):
            caller = getframe(1).f_code.co_filename  # only namedtuple's and dataclasses' own code
            if caller not in generators:
                raise PermissionError("sandbox: compiling code at run time is not allowed")
        if event == "open" and args:
            path = args[0]
            if isinstance(path, int):
                if path > 2:
                    raise PermissionError("sandbox: opening a raw descriptor is not allowed")
                return
            mode = args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 else 0
            writing = isinstance(mode, str) and any(c in mode for c in "wax+")
            writing = writing or isinstance(flags, int) and bool(flags & O_WRITE)
            name = fsdecode(path) if isinstance(path, (str, bytes)) else ""
            if startswith(name, "/proc") or startswith(name, "/dev/fd") or startswith(name, "/sys"):
                raise PermissionError("sandbox: " + name + " is not allowed")
            if writing and not inside(path):
                raise PermissionError("sandbox: writing outside the sandbox directory")
            if not writing and name.endswith(".pyc") and inside(path):  # bytecode the test wrote: past the screen
                raise PermissionError("sandbox: importing code the test wrote is not allowed")
        if (event in dir_fds1 or event in dir_fds2) and any(
                type_(a) is int and a != -1 and not _fd_inside(a, root) for a in args[-2 if event in dir_fds2 else -1:]):
            raise PermissionError("sandbox: " + event + " relative to a directory outside the work folder")
        if event in paths:
            for p in args[:2]:
                if isinstance(p, (str, bytes, os.PathLike)) and not inside(p) and event not in ("os.listdir", "os.scandir"):
                    raise PermissionError("sandbox: " + event + " outside the sandbox directory")
                if event in ("os.listdir", "os.scandir") and isinstance(p, (str, bytes)) and startswith(fsdecode(p), "/proc"):
                    raise PermissionError("sandbox: listing /proc is not allowed")

    sys.addaudithook(hook)

def _describe(e):
    try:
        import traceback
        where = [f"line {fr.lineno} of {fr.filename[1:-1]}" for fr in traceback.extract_tb(e.__traceback__)
                 if fr.filename in ("<generated>", "<under_test>")]
        text = type(e).__name__ + ": " + str(e)
        return (text + (" (" + where[-1] + ")" if where else ""))[:2000]
    except BaseException:
        return "an exception that could not be described"

_STUBBED = ("_exit", "write", "writev", "pwrite", "pwritev", "sendfile", "splice", "copy_file_range", "dup",
            "dup2", "fdopen", "closerange")

def _stub(name):
    def refused(*args, **kwargs):
        raise PermissionError(1, "sandbox: os." + name + " is not available to tests")
    return refused

def _fd_inside(fd, root):
    """Whether directory descriptor ``fd`` is the work folder or inside it (where there is no /proc to
    tell, as inside bwrap, nothing outside the work folder is writable anyway)."""
    try:
        p = os.readlink("/proc/self/fd/" + str(int(fd)))
    except (OSError, ValueError, TypeError):
        return True
    return p == root or p.startswith(root + "/")

def _no_dir_fd(real_open, root):
    """os.open relative to a directory descriptor only inside the work folder (its audit event names
    the path, not the directory it is relative to). shutil.rmtree and tempfile use it there."""
    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and not _fd_inside(dir_fd, root):
            raise PermissionError(1, "sandbox: os.open relative to a directory outside the work folder")
        return real_open(path, flags, mode, dir_fd=dir_fd)
    return open_

def _frameless(real_signal):
    """signal.signal whose handlers get no frame (a handler is handed the interrupted frame: the test's,
    and from it the worker's). An alarm timeout never needs it."""
    def signal_(signum, handler):
        if callable(handler):
            def frameless(sig, frame, handler=handler):
                return handler(sig, None)
            return real_signal(signum, frameless)
        return real_signal(signum, handler)
    return signal_

def _fresh_builtins_refused(create_builtin):
    """A second copy of an already loaded builtin module (posix, with its real _exit and write) is not
    for tests; builtin modules not loaded yet still load."""
    loaded = frozenset(sys.modules) | {"posix", "_io", "_imp", "sys", "builtins", "_thread", "_signal"}

    def guarded(spec, getattr_=getattr, type_=type, str_=str, modules=sys.modules):
        name = getattr_(spec, "name", None)
        if type_(name) is not str_ or name in loaded or name in modules:  # a str subclass could lie
            raise ImportError("sandbox: a second copy of " + str(spec.name) + " is not available to tests")
        return create_builtin(spec)
    return guarded

# Names the standard library rebinds by itself while honest code runs (captured output, warning
# bookkeeping, tempfile's lazily chosen folder): not watched.
_SELF_REBOUND = {"sys": {"stdout", "stderr", "stdin", "argv", "displayhook", "excepthook", "last_type", "last_value",
                         "last_traceback", "last_exc", "ps1", "ps2", "unraisablehook", "breakpointhook"},
                 "builtins": {"_"}, "warnings": {"_filters_version", "filters", "defaultaction", "_onceregistry",
                 "onceregistry"}, "tempfile": {"tempdir", "_name_sequence"}}

# What importing a standard module may rename in another (``importlib`` renames its frozen bootstrap):
# descriptions, not behaviour.
_METADATA = {"__name__", "__qualname__", "__module__", "__doc__", "__package__", "__file__", "__cached__",
             "__loader__", "__spec__"}

def _watcher(setup_ns):
    """A snapshot function of everything the code under test can reach by name: its own globals, the
    builtins, every loaded module's globals (and sys.modules itself), the Python classes of those
    modules and of the code under test (their attributes), and its functions' code, defaults and
    closures. Two snapshots compare by identity; a test that patches any of it (through an alias, a
    module fetched from sys.modules, a builtin shadowed at the top of its file...) has changed the code
    under test. Everything the snapshot uses is bound here, before untrusted code runs."""
    import builtins
    modules = sys.modules
    items, values, type_, isinstance_, list_, dict_, getattr_ = dict.items, dict.values, type, isinstance, list, dict, getattr
    mappingproxy, function, module = type(type.__dict__), type(_watcher), type(sys)
    set_, frozenset_, bytearray_ = set, frozenset, bytearray
    str_, tuple_, len_, id_, all_, zip_, bytes_, enumerate_ = str, tuple, len, id, all, zip, bytes, enumerate
    scalars = {str, bytes, int, float, complex, bool, frozenset}
    MUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE unset: a class whose attributes can be set

    def fn_state(f):
        cells = getattr_(f, "__closure__", None) or ()
        out = [getattr_(f, "__code__", None), getattr_(f, "__defaults__", None), getattr_(f, "__kwdefaults__", None)]
        for c in cells:
            try:
                out.append(c.cell_contents)
            except ValueError:
                out.append(None)
        for d in (out[1] or ()):
            if isinstance_(d, (list_, dict_, set_, bytearray_)):
                out.append(contents(d))
        return out

    def contents(v):
        if isinstance_(v, dict_):
            return list_(items(v))
        if isinstance_(v, (set_, bytearray_)):
            return frozenset_(v) if isinstance_(v, set_) else bytes_(v)
        return list_(v)

    def snapshot():
        snap = {}
        seen_classes = {}
        mods = list_(items(modules))
        snap["sys.modules"] = dict_(mods)
        for mname, mod in mods:
            if not isinstance_(mod, module):
                continue
            md = getattr_(mod, "__dict__", None)
            if not isinstance_(md, dict_):
                continue
            skip = _SELF_REBOUND.get(mname, ())
            snap["module " + mname] = {k: v for k, v in list_(items(md)) if k not in skip and k not in _METADATA}
            for k, v in list_(items(md)):
                if isinstance_(v, type_) and not (v.__flags__ & MUTABLE) and id_(v) not in seen_classes:
                    seen_classes[id_(v)] = v
        for k, v in list_(items(setup_ns)):
            if isinstance_(v, type_):
                seen_classes[id_(v)] = v
        snap["the code under test"] = dict_(items(setup_ns))
        for k, v in list_(items(setup_ns)):
            if isinstance_(v, function):
                snap["function " + k] = dict_(enumerate_(fn_state(v)))
            elif isinstance_(v, (list_, dict_, set_, bytearray_)):
                snap["value " + k] = {0: contents(v)}
            elif not isinstance_(v, (type_, module)) and type_(v) not in scalars:
                od = getattr_(v, "__dict__", None)  # an object the code under test made: its attributes
                if isinstance_(od, dict_):
                    snap["object " + k] = dict_(items(od))
                    for kk, vv in list_(items(od)):
                        if isinstance_(vv, (list_, dict_, set_, bytearray_)):
                            snap["value " + k + "." + str_(kk)] = {0: contents(vv)}
        for c in list_(values(seen_classes)):
            try:
                cd = dict_(c.__dict__) if isinstance_(c.__dict__, mappingproxy) else {}
                cd = {k: v for k, v in items(cd) if k not in _METADATA}
            except Exception:
                continue
            cname = str_(getattr_(c, "__module__", "?")) + "." + str_(getattr_(c, "__qualname__", "?"))
            if "class " + cname in snap:  # two classes of one name (a class made by a function)
                cname += "#" + str_(id_(c))
            snap["class " + cname] = cd
            if getattr_(c, "__module__", None) == "__sieve_setup__":
                for k, v in list_(items(cd)):
                    if isinstance_(v, function):
                        snap["function " + cname + "." + str_(k)] = dict_(enumerate_(fn_state(v)))
                    elif isinstance_(v, (list_, dict_, set_, bytearray_)):  # its data (Rules.table)
                        snap["value " + cname + "." + str_(k)] = {0: contents(v)}
        return snap

    def same(a, b):
        if isinstance_(a, list_) and isinstance_(b, list_):
            return len_(a) == len_(b) and all_(same(x, y) for x, y in zip_(a, b))
        if isinstance_(a, tuple_) and isinstance_(b, tuple_) and len_(a) == 2 and len_(b) == 2:
            return a[0] is b[0] and a[1] is b[1]
        if type_(a) in scalars and type_(a) is type_(b):  # an equal string or number made anew
            return a is b or a == b or (a != a and b != b)  # NaN
        return a is b

    def diff(before, after):
        """Where ``after`` differs from ``before``: names changed or removed (names added to modules are
        allowed: imports add submodules)."""
        out = []
        for label, old in items(before):
            new = after.get(label, {})
            strict = label in ("the code under test",) or label.startswith(("function ", "value ", "class ", "object "))
            for k, v in items(old):
                if k not in new or not same(v, new[k]):
                    out.append(label + ": " + str_(k))
            if strict:
                out += [label + ": " + str_(k) + " (added)" for k in new if k not in old]
            if len_(out) > 5:
                break
        return out

    return snapshot, diff

def _worker(job, name, report, result_fd):
    # The report is one byte-string written once, after the test: b"P" (passed), b"F"/b"T"/b"S" and a
    # detail (failed, tampered, sandbox failure). Nothing the test can patch (json, str methods of
    # modules) is used to make it; the functions used are bound here, before any untrusted code runs.
    write, exit_, encode, fstat = os.write, os._exit, str.encode, os.fstat
    try:
        os.close(result_fd)
        if report != 3:
            os.dup2(report, 3)
            os.close(report)
        os.closerange(4, 1 << 16)
        _die_with_parent(job["harness"])
        _limits(job)
        if job["seccomp"]:
            _seccomp()
        for mod in [m for m in sys.modules if m == "_ctypes" or m == "ctypes" or m.startswith("ctypes.")]:
            del sys.modules[mod]
        setup_code = compile(job["setup"], "<under_test>", "exec")
        test_code = compile(job["code"], "<generated>", "exec")
        # the code objects of the module's own top-level ``def name``: what may run as the test
        own_codes = [c for c in test_code.co_consts if type(c) is type(test_code) and c.co_name == name]
        type_, function_, getattr_, isinstance_ = type, type(_worker), getattr, isinstance
        from types import AsyncGeneratorType, CoroutineType, GeneratorType
        import traceback  # noqa: F401 (for _describe, before the audit hook: an import may be refused then)
        deferred = (GeneratorType, AsyncGeneratorType, CoroutineType)
        out, err = sys.stdout, sys.stderr
        import _imp
        import posix
        for mod in (os, posix):  # defence in depth: the raw exits and writes are not the test's to call
            for attr in _STUBBED:
                if hasattr(mod, attr):
                    setattr(mod, attr, _stub(attr))
            mod.open = _no_dir_fd(posix.open, os.path.realpath(os.getcwd()))
        import _signal
        import signal
        signal.signal = _signal.signal = _frameless(_signal.signal)
        _imp.create_builtin = _fresh_builtins_refused(_imp.create_builtin)
        st = fstat(3)
        report_id = (st.st_dev, st.st_ino)
    except BaseException as e:
        write(3, b"S" + encode(repr(e)[:2000], "utf-8", "replace"))
        exit_(0)
    msg = b"F"
    try:
        # The code under test keeps its own globals; the tests see its names in theirs, so a name a
        # test binds at its top (``def len(x): ...``) never reaches the code under test.
        setup_ns = {"__name__": "__sieve_setup__"}
        exec(setup_code, setup_ns)
        ns = {k: v for k, v in setup_ns.items() if k != "__builtins__"}
        ns["__name__"] = "__sieve_test__"
        originals = {k: ns[k] for k in job["protected"] if k in ns}
        codes = {k: getattr(v, "__code__", None) for k, v in originals.items()}
        snapshot, diff = _watcher(setup_ns)
        if job["audit"]:  # after the code under test (a prompt file may import what tests may not)
            _audit_hook(os.path.realpath(os.getcwd()), job["stdlib"], job["stdlib_dir"])
        before = snapshot()
        exec(test_code, ns)
        fn = ns.get(name)
        if fn is None:  # defined under a module-level if that did not hold: not a test of this module
            msg = b"A"
        else:
            if not callable(fn):
                raise NameError("test function " + repr(name) + " is not callable")
            if not (type_(fn) is function_ and getattr_(fn, "__code__", None) in own_codes):
                # rebound after its def (test_x = print), or wrapped by a decorator that may swallow failures
                raise TypeError("test function " + repr(name) + " is not the function its def defines "
                                "(decorated or rebound): not run")
            ret = fn()
            changed = [k for k, v in originals.items()
                       if ns.get(k) is not v or getattr(v, "__code__", None) is not codes[k]]
            changed += diff(before, snapshot())
            if changed:
                msg = b"T" + encode("changed " + ", ".join(changed[:6]), "utf-8", "replace")
            elif ret is not None and isinstance_(ret, deferred):
                msg = b"Fgenerator and async test functions are not run (their body never ran)"
            elif ret is False or (type_(ret).__name__ == "bool_" and not ret):  # return ok instead of assert ok
                msg = b"Fthe test returned False"
            else:
                msg = b"P"
    except BaseException as e:
        msg = b"F" + encode(_describe(e), "utf-8", "replace")
    for stream in (out, err):
        try:
            stream.flush()
        except BaseException:
            pass
    try:  # the report goes to the harness's pipe, not one the test put in its place (dup2)
        st = fstat(3)
        if (st.st_dev, st.st_ino) != report_id:
            exit_(3)
    except BaseException:
        exit_(3)
    write(3, msg)
    exit_(0)

def _outcome(name, data, status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = {9: "SIGKILL (a limit)", 24: "SIGXCPU (CPU time limit)", 25: "SIGXFSZ (file size limit)",
               31: "SIGSYS (forbidden system call)", 11: "SIGSEGV"}.get(sig, "signal " + str(sig))
        return {"test": name, "outcome": "killed", "detail": why}
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    kind = {b"P": "pass", b"F": "fail", b"T": "tampered", b"S": "sandbox", b"A": "absent"}.get(data[:1])
    if kind is None or kind in ("pass", "absent") and len(data) != 1:
        why = "the test process exited (" + str(code) + ") without a well-formed outcome"
        return {"test": name, "outcome": "no-result", "detail": why}
    if code != 0:
        return {"test": name, "outcome": "no-result", "detail": "the test process exited with " + str(code)}
    return {"test": name, "outcome": kind, "detail": data[1:2001].decode("utf-8", "replace")}

def _files():
    """Inodes in use on the sandbox's work folder (its own tmpfs: files, folders, links)."""
    st = os.statvfs(".")
    return st.f_files - st.f_ffree

def _await(pid, r, files_over=None):
    """The worker's report and exit status; stop reading once the worker is gone (a descendant that
    still holds the pipe must not keep us waiting). ``files_over``: kill the worker once the work folder
    holds more inodes than this (a tmpfs bounds its bytes, not its inodes, each of which is kernel
    memory); the third value says whether that happened."""
    import select
    got, status, eof, over = b"", None, False, False
    os.set_blocking(r, False)
    while status is None:
        if files_over is not None and not over and _files() > files_over:
            over = True
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        if eof or len(got) > 65536:  # nothing more to read (a closed pipe, a flood): wait, still counting files
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            else:
                select.select([], [], [], 0.05)
            continue
        select.select([r], [], [], 0.05)
        while len(got) <= 65536:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            got += chunk
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
    while len(got) <= 65536:
        try:
            chunk = os.read(r, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        got += chunk
    return got[:65536], status, over

def _main():
    _die_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    data = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        data += chunk
    job = json.loads(data.decode())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    result_fd = job["result_fd"]
    _nodump()

    def emit(obj):
        buf = (json.dumps(obj) + "\n").encode()
        while buf:
            buf = buf[os.write(result_fd, buf):]

    files_over = _files() + job["max_files"] if job["pidns"] else None
    job["harness"] = os.getpid()
    for name in job["tests"]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                _worker(job, name, w, result_fd)
            finally:
                os._exit(70)
        os.close(w)
        got, status, over = _await(pid, r, files_over)
        os.close(r)
        if job["pidns"] and os.getpid() <= 2:
            try:  # in our own pid namespace: whatever the test left behind goes with it
                os.kill(-1, 9)
            except OSError:
                pass
        out = _outcome(name, got[:65536], status)
        if over:
            out = {"test": name, "outcome": "killed", "detail": "more than " + str(job["max_files"]) +
                   " files and folders in the sandbox folder (a limit)"}
        emit(out)
    emit({"done": True})

_main()
'''

# ------------------------------------------------------------------------------------ the launchers

_QUERY = (
    "import json, sys, sysconfig, os\n"
    "v = sysconfig.get_config_vars()\n"
    "lib = os.path.join(v.get('LIBDIR') or '', v.get('INSTSONAME') or '') if v.get('Py_ENABLE_SHARED') else ''\n"
    "print(json.dumps({'exe': os.path.realpath(sys.executable), 'path': [p for p in sys.path if p],\n"
    "  'stdlib': sysconfig.get_path('stdlib'), 'site': [sysconfig.get_path('purelib'), sysconfig.get_path('platlib')],\n"
    "  'libpython': lib}))\n"
)
_SYSTEM_LIB_DIRS = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/lib", "/lib64", "/lib32", "/libx32")
_WORK = "/sandbox"
_OUTPUT_KEEP = 16 << 10  # bytes of stdout/stderr kept for the detail
_OUTPUT_LIMIT = 8 << 20  # more than this (stdout + stderr) kills the evaluation
_RESULT_LIMIT = 4 << 20
_MAX_FILES = 10_000  # inodes the tests may add to the work folder (bwrap mode), each kernel memory
_MAX_CODE = 1 << 17  # characters of code (tests and code under test) an evaluation reads: about 32k tokens,
# where a 1 MiB module cost sieve's own process 16 s of CPU and 860 MB in its parses and walks
_MAX_TASKS = 256  # processes and threads of one evaluation, where a pids cgroup can hold them


@dataclass(frozen=True)
class _Interpreter:
    exe: str
    path: tuple[str, ...]
    stdlib: str
    site: tuple[str, ...]
    libpython: str


@functools.lru_cache(maxsize=8)
def _interpreter(python: str | None) -> _Interpreter:
    """The interpreter the sandbox runs: the base interpreter of this one (not a venv's wrapper: only
    the standard library is needed) unless another is named."""
    exe = python or getattr(sys, "_base_executable", None) or sys.executable
    exe = os.path.realpath(exe)
    out = subprocess.run([exe, "-I", "-S", "-c", _QUERY], capture_output=True, timeout=30, env={"LANG": "C.UTF-8"})
    if out.returncode != 0:
        raise SandboxUnavailable(f"the sandbox interpreter {exe} does not start: {out.stderr.decode()[-500:]}")
    info = json.loads(out.stdout)
    return _Interpreter(info["exe"], tuple(info["path"]), info["stdlib"], tuple(p for p in info["site"] if p),
                        info["libpython"] if info["libpython"] and os.path.exists(info["libpython"]) else "")


def bwrap_available() -> bool:
    """Whether the ``bwrap`` binary is on ``PATH`` (see :func:`check_sandbox` for whether it works)."""
    return shutil.which("bwrap") is not None


def network_isolation_available() -> bool:
    """Whether ``unshare -rni`` works here (used by the weaker ``"process"`` mode only)."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rni", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _bwrap_command(interp: _Interpreter, work_mb: int) -> list[str]:
    cmd = [shutil.which("bwrap") or "bwrap",
           "--unshare-all", "--unshare-user", "--disable-userns", "--uid", "1000", "--gid", "1000",
           "--cap-drop", "ALL", "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
           "--setenv", "LANG", "C.UTF-8", "--setenv", "HOME", _WORK, "--setenv", "TMPDIR", _WORK,
           "--setenv", "PATH", "/nonexistent"]
    for d in _SYSTEM_LIB_DIRS:  # the C library and what the interpreter's extension modules link
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    binds = [interp.exe, *(p for p in interp.path if os.path.exists(p))]
    if interp.libpython:
        binds.append(os.path.realpath(interp.libpython))
    for p in binds:
        cmd += ["--ro-bind", p, p]
    bound = [*_SYSTEM_LIB_DIRS, *binds]
    hidden = {*interp.site, "/usr/lib/python3/dist-packages"}
    for p in sorted(hidden):
        if os.path.isdir(p) and any(p == b or p.startswith(b.rstrip("/") + "/") for b in bound):
            cmd += ["--size", "4096", "--tmpfs", p, "--remount-ro", p]
    cmd += ["--dev", "/dev", "--remount-ro", "/dev",
            "--size", str(work_mb << 20), "--tmpfs", _WORK, "--remount-ro", "/", "--chdir", _WORK]
    return cmd


@functools.lru_cache(maxsize=8)
def _probe(mode: str, python: str | None) -> str | None:
    """Run one trivial test through the whole path; the reason it fails, or None."""
    try:
        r = _run("def test_probe():\n    assert sum(range(4)) == 6\n", "", ["test_probe"], 20.0, 256, 1,
                 python, mode, screen_code=True, audit_hook=True, seccomp=True)
    except OSError as e:
        return str(e)
    return None if r.ok else f"{r.status}: {r.detail}"


def check_sandbox(mode: SandboxMode = "bwrap", python: str | None = None) -> None:
    """Raise :class:`SandboxUnavailable` (saying how to fix it) unless ``mode`` can run generated code
    here; ``"process"`` also warns (:class:`SandboxWarning`) that it is the weaker mode.

    Example:
        >>> check_sandbox("bwrap")  # bubblewrap installed and permitted
    """
    if mode not in ("bwrap", "process"):
        raise SandboxUnavailable(f"unknown sandbox mode {mode!r}; allowed: 'bwrap', 'process'")
    if mode == "bwrap" and not bwrap_available():
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed, so generated code is not run; {INSTALL_HINT}")
    if mode == "process":
        _warn_process()
    why = _probe(mode, python)
    if why and "could not join the evaluation's cgroup" in why:
        raise SandboxUnavailable(
            f"the sandbox could not be put into the cgroup sieve made for it ({why.strip()[-200:]}): sieve makes "
            "one per evaluation, under its own cgroup, to bound its tasks and memory, and does not run the "
            "sandbox outside it. Run sieve where it may move its own child processes between its cgroups "
            "(as root, or in a cgroup delegated to its user), or where it may make none")
    if why and mode == "bwrap":
        raise SandboxUnavailable(
            f"bubblewrap is installed but the sandbox does not work here ({why}). It needs user namespaces: "
            "allow them (sysctl user.max_user_namespaces > 0; kernel.unprivileged_userns_clone=1 or an "
            "AppArmor profile for bwrap where unprivileged; in a container, a seccomp profile that allows "
            "clone/unshare with CLONE_NEWUSER), or choose the weaker mode explicitly with eval.sandbox = "
            "\"process\" (generated code can then read and write what sieve can)")
    if why:
        raise SandboxUnavailable(f"the {mode!r} sandbox does not work here: {why}")


def _warn_process() -> None:
    warnings.warn("sandbox mode 'process': generated code runs WITHOUT OS-level isolation (it can read and write "
                  "what this process can, and reach the network where unshare is missing); use the default "
                  "'bwrap' mode for shared recipes", SandboxWarning, stacklevel=3)


def run_sandboxed(
    code: str,
    *,
    setup: str = "",
    call: list[str] | None = None,
    timeout_s: float = 3.0,
    memory_mb: int = 512,
    file_mb: int = 8,
    python: str | None = None,
    mode: SandboxMode = "bwrap",
) -> SandboxResult:
    """Run ``setup`` (the function under test) then ``code`` (the generated tests) in the sandbox and call
    the test functions (``call``, or every top-level ``def test*``), each in its own process.

    ``timeout_s`` bounds the whole evaluation (wall clock); ``memory_mb`` (address space),
    ``file_mb`` (largest file) and CPU seconds bound each test process; where sieve can make cgroups,
    the evaluation holds at most 256 tasks and ``memory_mb`` + its work folder + 64 MiB of memory,
    kernel memory included. ``mode="bwrap"`` (default)
    refuses with :class:`SandboxUnavailable` where bubblewrap is missing; ``"process"`` is the
    weaker, explicitly chosen mode.

    Example:
        >>> run_sandboxed("def test_one():\\n    assert 1 + 1 == 2\\n").ok
        True
        >>> run_sandboxed("import os\\ndef test_x():\\n    os.system('true')\\n").status
        'tampered'
    """
    if not (0 < timeout_s < 1e6) or not (0 < memory_mb < 1 << 30) or not (0 < file_mb < 1 << 30):
        raise ValueError(f"timeout_s, memory_mb and file_mb must be > 0 and finite, got {timeout_s}, {memory_mb}, {file_mb}")
    check_sandbox(mode, python)
    return _run(code, setup, call, timeout_s, memory_mb, file_mb, python, mode)


def _run(code: str, setup: str, call: list[str] | None, timeout_s: float, memory_mb: int, file_mb: int,
         python: str | None, mode: str, *, screen_code: bool = True, audit_hook: bool = True,
         seccomp: bool = True) -> SandboxResult:
    """The evaluation itself. The keyword switches turn single layers off, for the tests that show
    the OS layers hold on their own."""
    t0 = time.monotonic()
    if len(code) + len(setup) > _MAX_CODE:  # each parse in sieve's own process grows with it
        return SandboxResult(False, "error", f"the code is {len(code) + len(setup):,} characters, more than "
                             f"{_MAX_CODE:,}: not evaluated", time.monotonic() - t0)
    unparsable = None
    try:
        _parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        unparsable = f"does not parse: {e.msg if isinstance(e, SyntaxError) else type(e).__name__}"
    if unparsable:
        return SandboxResult(False, "error", unparsable, time.monotonic() - t0)
    if screen_code:
        why = screen(code, setup) or (screen(setup, generated=False) if setup else None)
        if why:
            return SandboxResult(False, "tampered", why, time.monotonic() - t0)
    unrun = None if call else unrun_tests(code)
    if unrun:
        return SandboxResult(False, "error", unrun, time.monotonic() - t0)
    names = list(call) if call else collect_tests(code)
    if not names:
        return SandboxResult(False, "error", "no test function found", time.monotonic() - t0)
    interp = _interpreter(python)
    protected = sorted(_bindings(setup)[0])
    job = {"setup": setup, "code": code, "tests": names, "protected": protected, "cpu_s": max(1, int(timeout_s) + 1),
           "memory_mb": int(memory_mb), "file_mb": int(file_mb), "stdlib": os.path.dirname(interp.stdlib.rstrip("/")),
           "stdlib_dir": interp.stdlib,
           "seccomp": seccomp, "audit": audit_hook, "pidns": mode == "bwrap", "max_files": _MAX_FILES}
    tmp, lock = None, -1
    work_mb = max(16, 4 * int(file_mb))
    if mode == "bwrap":
        cmd = _bwrap_command(interp, work_mb)
        cwd, env = "/", {"LANG": "C.UTF-8"}
    else:
        _sweep_stale_work_dirs()
        tmp = tempfile.mkdtemp(prefix=f"sieve-sandbox-{os.getpid()}-")
        lock = _lock_dir(tmp)
        cmd = []
        if _net_available():
            cmd = [shutil.which("unshare") or "unshare", "-rni"]  # own network and System V IPC namespaces
        cwd, env = tmp, {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
    # the harness's parent: sieve in process mode (unshare execs it in place); unknown inside bwrap's pid namespace
    cmd += [interp.exe, "-I", "-S", "-B", "-c", _HARNESS, str(os.getpid()) if mode != "bwrap" else "0"]
    # the memory of the harness, a test process and the work folder, with room for the interpreter: this
    # counts what the address-space limit does not (page tables, other kernel memory)
    cgroups = _eval_cgroups((int(memory_mb) + work_mb + _MEMORY_ROOM_MB) << 20)
    if cgroups:  # the first process joins the cgroups, then becomes the sandbox (exec: the same pid)
        # (fails closed: a sandbox outside its cgroups does not run)
        cmd = ["/bin/sh", "-c", 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ 2>/dev/null > "$1" || { echo '
               '"sieve: could not join the evaluation\'s cgroup $1" >&2; exit 125; }; shift; n=$((n - 1)); done; '
               'exec "$@"', "sh", str(len(cgroups)), *(os.path.join(c, "cgroup.procs") for c in cgroups), *cmd]
    r_fd, w_fd = os.pipe()
    try:
        job["result_fd"] = w_fd
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(w_fd,), start_new_session=True)
        os.close(w_fd)
        w_fd = -1
        outcome = _collect(proc, r_fd, json.dumps(job).encode(), t0 + timeout_s)
    finally:
        if w_fd >= 0:
            os.close(w_fd)
        os.close(r_fd)
        if tmp:
            _remove_tree(tmp)
            os.close(lock)
        for c in cgroups:
            _remove_cgroup(c)
    return _verdict(names, *outcome, time.monotonic() - t0)


_CGROUPS = itertools.count()


_MEMORY_ROOM_MB = 64  # the harness's interpreter and bubblewrap, beside a test's memory_mb and the work folder


def _eval_cgroups(memory_bytes: int) -> list[str]:
    """New cgroups, beside none other, that hold one evaluation's processes: its tasks to ``_MAX_TASKS``
    (each thread takes a pid of the host's table) and, where the memory controller is there, its memory
    to ``memory_bytes``, kernel memory included (page tables of pages mapped far apart held 514 MiB
    outside a 300 MB address-space limit). Made under this process's own cgroups: in the ``pids`` and
    ``memory`` hierarchies (cgroup v1) or the unified one (v2: one cgroup with whichever of the two
    controllers this process's cgroup enables for its children; memory, a domain controller, only
    where that cgroup holds no process, in practice the root), where this user may write there. Empty
    where it may not (then threads and kernel memory are bounded by the address-space limit only)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    tasks, memory = [], []
    for line in lines:
        hid, ctrls, path = (line.split(":", 2) + ["", ""])[:3]
        if "pids" in ctrls.split(","):
            tasks.append(os.path.join("/sys/fs/cgroup/pids", path.lstrip("/")))
        if "memory" in ctrls.split(","):
            memory.append(os.path.join("/sys/fs/cgroup/memory", path.lstrip("/")))
        elif hid == "0" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            tasks.append(os.path.join("/sys/fs/cgroup", path.lstrip("/")))
    # v1: one cgroup per hierarchy; v2: one for both, with whichever controllers its parent enables
    settings = {"pids.max": str(_MAX_TASKS), "memory.max": str(memory_bytes)}
    return [d for d in (_new_cgroup(tasks, settings), _new_cgroup(memory, {"memory.limit_in_bytes": str(memory_bytes)}))
            if d is not None]


def _new_cgroup(parents: list[str], settings: dict[str, str]) -> str | None:
    """A new cgroup under the first of ``parents`` where one can be made and given those of ``settings``
    its controllers offer (at least one)."""
    for parent in parents:
        _sweep_cgroups(parent)
        d = _cgroup_dir(parent)
        if d is None:
            continue
        try:
            offered = [name for name in settings if os.path.exists(os.path.join(d, name))]
            for name in offered:
                with open(os.path.join(d, name), "w") as f:
                    f.write(settings[name])
            if offered:
                return d
        except OSError:
            pass
        _remove_cgroup(d)
    return None


def _cgroup_dir(parent: str) -> str | None:
    """A new cgroup folder under ``parent``, named by this process and a count (a name a dead sieve of the
    same pid left, and the sweep could not remove, is stepped over), or None where none can be made."""
    for _ in range(8):
        d = os.path.join(parent, f"sieve-sandbox-{os.getpid()}-{next(_CGROUPS)}")
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        except OSError:
            return None
        _MINE.add(d)
        return d
    return None


def _sweep_cgroups(parent: str) -> None:
    """Remove the empty cgroups left under ``parent``: this process's earlier ones that were still being
    emptied when their evaluation ended, and a killed sieve's (its pid gone). A cgroup that still holds a
    process cannot be removed."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith("sieve-sandbox-")]
    except OSError:
        return
    for name in names:
        pid, d = name.split("-")[2], os.path.join(parent, name)
        if pid == str(os.getpid()):
            # this process's own only where its evaluation has ended (another thread's may be made and not
            # yet joined); a name of this pid it never made is a dead predecessor's (a pid used again)
            if d in _LEFT or d not in _MINE:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
                    _LEFT.discard(d)
                    _MINE.discard(d)
            continue
        try:
            if pid.isdigit():
                os.kill(int(pid), 0)
                continue  # another live sieve's
        except ProcessLookupError:
            pass
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _remove_cgroup(d: str) -> None:
    """Remove an evaluation's cgroup once its processes are gone: a torn-down namespace takes a moment,
    waited for briefly; a cgroup still busy then is removed by the next evaluation's sweep or at exit."""
    for _ in range(10):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError:
            time.sleep(0.002)
            continue
        _MINE.discard(d)
        return
    _LEFT.add(d)


_LEFT: set[str] = set()
_MINE: set[str] = set()  # the cgroups this process has made and not removed


@atexit.register
def _remove_left_cgroups() -> None:
    for d in list(_LEFT):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _remove_tree(d: str) -> None:
    """Remove a work folder, however deep a test nested it (``shutil.rmtree`` recurses in Python)."""
    try:
        shutil.rmtree(d)
    except Exception:  # RecursionError on a deep tree, or anything else: the system's rm, no recursion limit
        rm = shutil.which("rm")
        if rm:
            subprocess.run([rm, "-rf", "--", d], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120, check=False)


def _lock_dir(d: str) -> int:
    """An exclusive lock on work folder ``d``, held by its evaluation (the descriptor; closing it frees it)."""
    import fcntl

    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _sweep_stale_work_dirs(min_age_s: float = 60.0) -> None:
    """Remove ``process`` mode's work folders left by a sieve that was killed mid-evaluation: this
    user's, older than ``min_age_s``, and not locked (an evaluation holds its folder's lock, seen from
    any pid namespace sharing the folder)."""
    import fcntl

    base = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(base) if n.startswith("sieve-sandbox-")]
    except OSError:
        return
    for name in names:
        d = os.path.join(base, name)
        try:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or time.time() - st.st_mtime < min_age_s:
                continue
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use: BlockingIOError
            _remove_tree(d)
        except OSError:
            pass
        finally:
            os.close(fd)


_NET: bool | None = None


def _net_available() -> bool:
    global _NET
    if _NET is None:
        _NET = network_isolation_available()
    return _NET


def _collect(proc: subprocess.Popen, result_fd: int, job: bytes, deadline: float) -> tuple[bytes, str, str, int | None]:
    """Feed the job, read results/stdout/stderr with byte caps until the harness is done or the deadline
    passes; kill the sandbox (its whole pid namespace) on a deadline or an output flood."""
    assert proc.stdin and proc.stdout and proc.stderr
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(result_fd, selectors.EVENT_READ, "result")
    kept = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray()}
    total_output, pending, why = 0, memoryview(job), ""
    try:
        while len(sel.get_map()) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(min(left, 0.5)):
                name = key.data
                if name == "stdin":
                    try:
                        n = os.write(key.fd, pending[:65536])
                    except (BrokenPipeError, BlockingIOError):
                        n = len(pending) if not isinstance(sys.exc_info()[1], BlockingIOError) else 0
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                if name == "result":
                    if len(kept["result"]) + len(chunk) > _RESULT_LIMIT:
                        why = "result flood"
                        break
                    kept["result"] += chunk
                else:
                    total_output += len(chunk)
                    room = _OUTPUT_KEEP - len(kept[name])
                    if room > 0:
                        kept[name] += chunk[:room]
                    if total_output > _OUTPUT_LIMIT:
                        why = f"output limit ({_OUTPUT_LIMIT >> 20} MiB of stdout/stderr)"
                        break
            if why:
                break
    finally:
        sel.close()
        if why:
            _kill(proc)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f and not f.closed:
                f.close()
    output = (bytes(kept["stdout"]) + b"\n" + bytes(kept["stderr"])).decode(errors="replace")
    return bytes(kept["result"]), output, why, proc.returncode


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap's pid-1 child dies with it: the namespace goes
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _verdict(names: list[str], result: bytes, output: str, why: str, code: int | None, seconds: float) -> SandboxResult:
    """``ok`` only when the harness reported ``pass`` for exactly the expected tests, in order, and
    finished."""
    outcomes: dict[str, dict] = {}
    done = False
    for line in result.decode(errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(msg, dict):
            continue
        if msg.get("done") is True:
            done = True
        elif msg.get("test") in names and msg.get("test") not in outcomes:
            outcomes[msg["test"]] = msg
    if why == "timeout":
        return SandboxResult(False, "timeout", f"wall-clock limit reached after {len(outcomes)} of {len(names)} tests",
                             seconds, output)
    if why:
        return SandboxResult(False, "killed", why, seconds, output)
    status_of = {"fail": "error", "killed": "killed", "no-result": "no-result", "tampered": "tampered",
                 "sandbox": "no-result"}
    for n in names:
        o = outcomes.get(n)
        if o is None:
            return SandboxResult(False, "no-result", f"no outcome for {n} (exit {code}): {output[-1000:]}", seconds,
                                 output)
        if o.get("outcome") == "absent":  # under a module-level if that did not hold
            continue
        if o.get("outcome") != "pass":
            detail = f"{n}: {o.get('detail', '')}"
            if o.get("outcome") == "sandbox":
                detail = f"sandbox setup failed in {n}: {o.get('detail', '')}"
            return SandboxResult(False, status_of.get(o.get("outcome"), "no-result"), detail, seconds, output)
    if not done or code != 0:
        return SandboxResult(False, "no-result", f"the harness did not finish (exit {code})", seconds, output)
    ran = [n for n in names if outcomes[n].get("outcome") == "pass"]
    if not ran:
        return SandboxResult(False, "error", "no test function defined (each sits under a module-level if that did "
                             "not hold)", seconds, output)
    return SandboxResult(True, "ok", "ran " + ", ".join(ran), seconds, output)
