"""The embedded world's corpus: Python source from the running interpreter's standard library.

Every Python install has its standard library, so the corpus needs no download. A file's source is cut
into *chunks*, each one the module's import lines followed by one top-level definition (a function, a
small class, or one method of a large class under its ``class`` line) or a run of other module-level
statements. A chunk therefore always carries the imports the code below it relies on: a function that
calls ``re.sub`` is seen with ``import re`` above it, which is what lets the model learn when regular
expressions are in reach, and what the world's prompts (imports + a function's first lines) rely on.

The split into train and held-out is by file (a stable hash of the file's relative path), so held-out
prompts and evaluation code come from files the model never saw.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sieve.evals.regex_use import find_regex_use

__all__ = [
    "Chunk", "SourceFile", "stdlib_files", "extra_files", "chunk_file", "load_corpus", "stdlib_root",
    "corpus_fingerprint", "INTENT_PACKAGES", "load_intent_corpus",
]

# Test suites, demos, generated tables and vendored data are noise for a code model.
_EXCLUDED_PARTS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo",
    "pydoc_data", "encodings", "ensurepip", "lib2to3", "unittest/test", "tkinter", "idlelib",
}
_MAX_FILE_BYTES = 400_000
_MAX_CHUNK_CHARS = 6_000


@dataclass(frozen=True)
class SourceFile:
    """One standard-library file: its path relative to the library root, its text, its split."""

    rel: str
    text: str
    held_out: bool


@dataclass(frozen=True)
class Chunk:
    """Import lines + one definition (or run of statements) of one file."""

    file: str
    name: str
    header: str
    body: str
    uses_regex: bool
    held_out: bool

    @property
    def text(self) -> str:
        return f"{self.header}\n\n{self.body}\n" if self.header else f"{self.body}\n"


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _held_out(rel: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def _read_source(path: Path) -> str | None:
    """A source file's text, or None when it is too large or not UTF-8."""
    if path.stat().st_size > _MAX_FILE_BYTES:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def stdlib_files(root: Path | None = None, held_out_fraction: float = 0.1) -> list[SourceFile]:
    """All usable ``.py`` files of the standard library, sorted by path, with their split.

    Example:
        >>> files = stdlib_files()
        >>> any(f.rel == "json/decoder.py" for f in files)
        True
    """
    root = root or stdlib_root()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = set(rel.split("/")[:-1])
        if parts & _EXCLUDED_PARTS or rel.startswith("test_") or "/test_" in rel:
            continue
        text = _read_source(path)
        if text is not None:
            out.append(SourceFile(rel, text, _held_out(rel, held_out_fraction)))
    return out


def _segment(lines: list[str], node: ast.stmt) -> str:
    start = node.lineno
    decos = getattr(node, "decorator_list", [])
    if decos:
        start = min(start, min(d.lineno for d in decos))
    return "".join(lines[start - 1 : node.end_lineno]).rstrip()


def chunk_file(src: SourceFile) -> Iterator[Chunk]:
    """Cut one file into chunks (see the module docstring).

    Example:
        >>> f = SourceFile("m.py", "import re\\n\\ndef f(s):\\n    return re.sub('a', 'b', s)\\n", False)
        >>> [(c.name, c.uses_regex) for c in chunk_file(f)]
        [('f', True)]
    """
    try:
        tree = ast.parse(src.text)
    except (SyntaxError, ValueError):
        return
    lines = src.text.splitlines(keepends=True)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    header = "\n".join(_segment(lines, n) for n in imports)
    header_re = find_regex_use(header).used if header else False

    def make(name: str, body: str) -> Chunk | None:
        if not body.strip() or len(body) > _MAX_CHUNK_CHARS:
            return None
        uses = find_regex_use(body).used if header_re or "re" in body else False
        return Chunk(src.rel, name, header, body, uses, src.held_out)

    pending: list[str] = []

    def flush() -> Iterator[Chunk]:
        if pending:
            c = make("<module>", "\n".join(pending))
            pending.clear()
            if c:
                yield c

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from flush()
            c = make(node.name, _segment(lines, node))
            if c:
                yield c
        elif isinstance(node, ast.ClassDef):
            yield from flush()
            seg = _segment(lines, node)
            if len(seg) <= _MAX_CHUNK_CHARS // 2:
                c = make(node.name, seg)
                if c:
                    yield c
                continue
            head_end = node.body[0].lineno - 1 if node.body else node.end_lineno
            class_line = "".join(lines[node.lineno - 1 : head_end]).rstrip()
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for m in methods:
                c = make(f"{node.name}.{m.name}", f"{class_line}\n{_segment(lines, m)}")
                if c:
                    yield c
        else:
            seg = _segment(lines, node)
            if sum(len(p) for p in pending) + len(seg) > _MAX_CHUNK_CHARS // 2:
                yield from flush()
            pending.append(seg)
    yield from flush()


# The standard library alone holds under 200 chunks that use ``re``: too few to learn when to reach for
# it, and to hold out a prompt set. These packages are installed with sieve (its own dependencies and
# their dev tools); from them only files that import ``re`` are taken. Versions are recorded in the
# world's manifest, so a rebuild can tell when it reads other sources.
EXTRA_PACKAGES: tuple[tuple[str, str], ...] = (
    ("setuptools", "setuptools"), ("packaging", "packaging"), ("jinja2", "Jinja2"),
    ("markdown_it", "markdown-it-py"), ("_pytest", "pytest"), ("IPython", "ipython"),
    ("nltk", "nltk"), ("huggingface_hub", "huggingface-hub"), ("datasets", "datasets"),
    ("sympy", "sympy"), ("tornado", "tornado"), ("numpy", "numpy"),
)
_IMPORTS_RE = re.compile(r"^\s*(import re\b|from re import)", re.M)


def _package_files(packages: tuple[tuple[str, str], ...], held_out_fraction: float
                   ) -> tuple[list[SourceFile], dict[str, str]]:
    """Files importing ``re`` from the installed ones of ``packages`` ((import, distribution) pairs)."""
    files: list[SourceFile] = []
    versions: dict[str, str] = {}
    for pkg, dist in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        versions[dist] = importlib.metadata.version(dist)
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            rel = f"{pkg}/{path.relative_to(root).as_posix()}"
            if set(rel.split("/")[:-1]) & (_EXCLUDED_PARTS | {"testing", "vendor", "_vendor"}):
                continue
            text = _read_source(path)
            if text is not None and _IMPORTS_RE.search(text):
                files.append(SourceFile(rel, text, _held_out(rel, held_out_fraction)))
    return files, versions


def extra_files(held_out_fraction: float = 0.1) -> tuple[list[SourceFile], dict[str, str]]:
    """Files importing ``re`` from :data:`EXTRA_PACKAGES` that are installed, and their versions."""
    return _package_files(EXTRA_PACKAGES, held_out_fraction)


def load_corpus(root: Path | None = None, extras: bool = True) -> tuple[list[Chunk], dict[str, str]]:
    """Every chunk of every corpus file, in a stable order, and the source versions read.

    Example:
        >>> chunks, versions = load_corpus()
        >>> sum(c.uses_regex for c in chunks) > 100
        True
    """
    files = stdlib_files(root)
    versions = {"python": sys.version.split()[0]}
    if extras:
        more, v = extra_files()
        files += more
        versions.update(v)
    return [c for f in files for c in chunk_file(f)], versions


def corpus_fingerprint(chunks: list[Chunk]) -> str:
    """A hash of every chunk's text and split: pins what a build read."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(f"{c.file}:{c.name}:{int(c.held_out)}".encode())
        h.update(hashlib.sha256(c.text.encode()).digest())
    return h.hexdigest()[:16]


# The intent phase (see :mod:`sieve.world.train_intent`) reads more code that uses ``re``: the files that
# import it from these further packages installed with sieve (its dependencies and theirs). The model
# never saw them in its first phase; half of their files (by a stable hash of the path) are held
# out, and with the corpus's held-out files they give the intent prompt sets.
INTENT_PACKAGES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"), ("transformers", "transformers"), ("pandas", "pandas"), ("pygments", "Pygments"),
    ("pydantic", "pydantic"), ("jedi", "jedi"), ("prompt_toolkit", "prompt_toolkit"),
    ("sklearn", "scikit-learn"), ("polars", "polars"), ("scipy", "scipy"), ("fsspec", "fsspec"),
    ("accelerate", "accelerate"), ("rich", "rich"), ("sae_lens", "sae-lens"), ("nnsight", "nnsight"),
    ("statsmodels", "statsmodels"), ("parso", "parso"), ("jsonschema", "jsonschema"),
)
INTENT_HELD_OUT = 0.5


def load_intent_corpus() -> tuple[list[Chunk], dict[str, str]]:
    """Chunks of the files importing ``re`` from :data:`INTENT_PACKAGES` (installed ones), and versions.

    Example:
        >>> chunks, versions = load_intent_corpus()  # doctest: +SKIP
        >>> "torch" in versions  # doctest: +SKIP
        True
    """
    files, versions = _package_files(INTENT_PACKAGES, INTENT_HELD_OUT)
    return [c for f in files for c in chunk_file(f)], versions
