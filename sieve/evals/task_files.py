"""lm-evaluation-harness task files from a shared recipe, read as data.

A harness task folder is code as much as data: a YAML ``!function utils.fn`` tag imports the Python
file next to it, a metric the harness does not register is loaded through HF ``evaluate`` (which runs
a script from a local folder or the hub), ``class`` and ``custom_dataset`` name Python objects,
``unsafe_code`` tasks execute the model's output, ``trust_remote_code`` lets ``datasets`` run a
loading script, ``use_prompt`` reads a prompt file with PyYAML's ``FullLoader``, and the harness renders
every ``doc_to_*`` template with a plain Jinja environment, from which a template reaches Python's
internals (``{{ cycler.__init__.__globals__.os }}``).

So a recipe file's ``eval.lmeval_include`` is scanned before anything loads: :func:`task_code` lists
every such construct with its file and line (following ``include:`` chains out of the folder; the
harness's own installed tasks are trusted), and :func:`check_task_folder` refuses the folder unless
the command line trusts it (``--trust-task-code``). And :func:`sandboxed_templates` renders the
harness's templates in Jinja's sandbox (no attribute starting with ``_``, no unsafe callables) for
every task sieve runs, trusted or not.
"""

from __future__ import annotations

import tempfile  # noqa: F401 - the doctests use it
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sieve.errors import SieveError

__all__ = ["TaskCode", "task_code", "check_task_folder", "check_task_names", "sandboxed_templates"]

# The YAML tags a data file may carry: PyYAML's safe schema (what ``yaml.safe_load`` constructs).
_DATA_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                       ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "binary", "merge",
                        "omap", "pairs", "set"))
# Keys whose presence makes the harness import or run Python named by the file.
_CODE_KEYS = {
    "class": "names a Python task class",
    "custom_dataset": "names a Python function that builds the dataset",
}
# Keys that are harmless unless true.
_CODE_FLAGS = {
    "unsafe_code": "marks a task that executes the model's output on this machine",
    "trust_remote_code": "lets datasets run a loading script",
    "hf_evaluate": "loads the metric through HF evaluate, which runs a script",
}
# use_prompt categories the harness keeps in its own registry (anything else reads a file or promptsource)
_PROMPT_REGISTRY = ("qa-basic",)
# datasets' builders that read plain data files; its other packaged builders run SQL (sqlite can write
# files), Spark, generators, caches and table formats: not from a shared folder. A hub id or a folder
# of data files is read as data (datasets >= 4 runs no loading script; trust_remote_code is refused).
_DATA_BUILDERS = frozenset(("json", "csv", "parquet", "text", "arrow"))
# load_dataset arguments that write elsewhere (cache_dir, save_infos) or hand it credentials or file
# systems of the file's choosing
_DATASET_KWARGS_REFUSED = frozenset(("cache_dir", "save_infos", "storage_options", "download_config", "token",
                                     "use_auth_token"))


@dataclass(frozen=True)
class TaskCode:
    """One construct in a task file that would run Python: the file, its line (1-based) and what."""

    file: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def _installed_tasks() -> Path | None:
    """The harness's own task folder (its installed code: trusted like the package itself)."""
    try:
        import lm_eval.tasks
    except ImportError:  # pragma: no cover - only without the extra
        return None
    return Path(lm_eval.tasks.__file__).resolve().parent


def _registered_metrics() -> set[str] | None:
    try:
        import lm_eval.api.metrics  # noqa: F401 - fills the registry
        from lm_eval.api.registry import metric_registry
    except ImportError:  # pragma: no cover - only without the extra
        return None
    return set(metric_registry.keys()) if hasattr(metric_registry, "keys") else set(metric_registry)


_BUILDERS_IN_CODE = frozenset(("sql", "spark", "generator", "cache", "pandas", "webdataset", "iceberg", "lance"))


def _packaged_builders() -> frozenset[str]:
    """datasets' builders by name: those ``load_dataset`` takes, and those its code holds (``sql``...)."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:  # pragma: no cover - datasets renamed it
        return _BUILDERS_IN_CODE
    return frozenset(_PACKAGED_DATASETS_MODULES) | _BUILDERS_IN_CODE


def _truthy(node: yaml.Node) -> bool:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value).strip().lower() not in ("", "false", "no", "off", "0", "null", "~")
    return True


def _template_reaches_internals(text: str) -> bool:
    """Whether a Jinja template reads an attribute or item named with a leading underscore (the way
    out of a template to Python's internals). Early notice only: the sandbox is what refuses it."""
    if "{{" not in text and "{%" not in text:
        return False
    from jinja2 import Environment, nodes
    from jinja2.exceptions import TemplateSyntaxError

    try:
        tree = Environment().parse(text)
    except TemplateSyntaxError:
        return False  # the harness reports it when it renders
    for n in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = n.attr if isinstance(n, nodes.Getattr) else getattr(n.arg, "value", None)
        if isinstance(name, str) and name.startswith("_"):
            return True
    return False


def _scan_node(node: yaml.Node, file: Path, found: list[TaskCode], metrics: set[str] | None,
               includes: list[tuple[str, int]], top: bool) -> None:
    line = node.start_mark.line + 1
    if node.tag not in _DATA_TAGS:
        value = node.value if isinstance(node, yaml.ScalarNode) else "…"
        found.append(TaskCode(file, line, f"YAML tag {node.tag} {value!s:.60} (the harness imports or builds "
                                          "Python objects from tags)"))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _scan_node(item, file, found, metrics, includes, False)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag not in _DATA_TAGS:
            _scan_node(key, file, found, metrics, includes, False)  # a tagged or complex key is built too
        k = str(key.value) if isinstance(key, yaml.ScalarNode) else ""
        kline = key.start_mark.line + 1
        if k == "dataset_path" and isinstance(value, yaml.ScalarNode) and str(value.value) in _packaged_builders() \
                and str(value.value) not in _DATA_BUILDERS:
            found.append(TaskCode(file, kline, f"'dataset_path: {value.value}': a shared task reads its data with "
                                  f"{sorted(_DATA_BUILDERS)}, a hub id or a folder of data files (datasets' other "
                                  "builders run SQL, Spark, generators or other readers)"))
        elif k == "dataset_kwargs" and isinstance(value, yaml.MappingNode):
            for dk, _ in value.value:
                if isinstance(dk, yaml.ScalarNode) and str(dk.value) in _DATASET_KWARGS_REFUSED:
                    found.append(TaskCode(file, dk.start_mark.line + 1, f"'dataset_kwargs.{dk.value}' makes datasets "
                                          "write elsewhere or use credentials or file systems the file chooses"))
        if k in _CODE_KEYS:
            found.append(TaskCode(file, kline, f"'{k}' {_CODE_KEYS[k]}"))
        elif k in _CODE_FLAGS and _truthy(value):
            found.append(TaskCode(file, kline, f"'{k}: {getattr(value, 'value', '…')}' {_CODE_FLAGS[k]}"))
        elif k == "metric" and isinstance(value, yaml.ScalarNode) and value.tag == "tag:yaml.org,2002:str" \
                and metrics is not None and value.value not in metrics:
            found.append(TaskCode(file, kline, f"metric {value.value!r} is not one the harness registers: it would "
                                               "be loaded through HF evaluate, which runs a script"))
        elif k == "use_prompt" and isinstance(value, yaml.ScalarNode) \
                and str(value.value).split(":")[0] not in _PROMPT_REGISTRY:
            found.append(TaskCode(file, kline, f"'use_prompt: {value.value}' reads prompts from a file (with "
                                               "PyYAML's FullLoader) or from promptsource"))
        elif isinstance(value, yaml.ScalarNode) and _template_reaches_internals(str(value.value)):
            found.append(TaskCode(file, value.start_mark.line + 1, f"the template of '{k}' reads an attribute "
                                  "starting with '_' (Python's internals; Jinja's sandbox refuses it)"))
        elif k == "include" and top:
            items = value.value if isinstance(value, yaml.SequenceNode) else [value]
            includes += [(str(i.value), i.start_mark.line + 1) for i in items if isinstance(i, yaml.ScalarNode)]
        _scan_node(value, file, found, metrics, includes, False)


def _scan_file(path: Path, found: list[TaskCode], metrics: set[str] | None, seen: set[Path],
               trusted: Path | None) -> None:
    path = path.resolve()
    if path in seen or (trusted is not None and path.is_relative_to(trusted)):
        return
    seen.add(path)
    try:
        # the loader the harness parses with (libyaml's where PyYAML has it), so both read the same nodes
        loader = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader
        docs = list(yaml.compose_all(path.read_bytes(), Loader=loader))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        # the harness skips a file it cannot parse; one that it can, sieve must be able to read too
        found.append(TaskCode(path, getattr(getattr(e, "problem_mark", None), "line", -1) + 1,
                              f"cannot be read as YAML data ({type(e).__name__}: {str(e).splitlines()[0]:.80})"))
        return
    for doc in docs:
        if doc is None:
            continue
        includes: list[tuple[str, int]] = []
        _scan_node(doc, path, found, metrics, includes, True)
        for inc, line in includes:
            target = Path(inc) if Path(inc).is_absolute() else path.parent / inc
            if target.is_file():
                _scan_file(target, found, metrics, seen, trusted)
            else:
                found.append(TaskCode(path, line, f"include {inc!r}: no such file"))


def task_code(folder: str | Path) -> list[TaskCode]:
    """Every construct in a harness task folder's YAML files (``*.yaml`` and ``*.yml``, in sub-folders
    too, and the files they ``include``) that would make the harness run Python: custom tags
    (``!function``), ``class``, ``custom_dataset``, true ``unsafe_code`` / ``trust_remote_code`` /
    ``hf_evaluate``, metric names the harness does not register, ``use_prompt`` files, datasets
    builders other than the plain file readers (``sql``, ``spark``, ``generator``...), ``dataset_kwargs``
    that write elsewhere or pass credentials (``cache_dir``, ``storage_options``...), and templates
    that read ``_``-named attributes (which :func:`sandboxed_templates` refuses anyway). Reads the
    files as YAML nodes only (no tag is constructed); files under the harness's installed task folder
    are trusted and not listed.

    Example:
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "t.yaml").write_text("task: t\\nprocess_docs: !function utils.go\\n")
        >>> [(c.line, c.what.split(" (")[0]) for c in task_code(d)]
        [(2, 'YAML tag !function utils.go')]
    """
    folder = Path(folder)
    found: list[TaskCode] = []
    metrics = _registered_metrics()
    seen: set[Path] = set()
    trusted = _installed_tasks()
    files = sorted(p for pattern in ("*.yaml", "*.yml") for p in folder.rglob(pattern))
    for f in files:
        if f.is_file():
            _scan_file(f, found, metrics, seen, trusted)
    return found


def check_task_folder(folder: str | Path, key: str = "eval.lmeval_include") -> None:
    """Refuse a task folder whose files would run Python (:func:`task_code`), naming the first place
    and how many more; a command-line flag (``--trust-task-code``) is the way to run them.

    Example:
        >>> check_task_folder(tempfile.mkdtemp())  # a folder of data only passes
    """
    found = task_code(folder)
    if not found:
        return
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise SieveError(f"{key}: {found[0]}{more}. A recipe's harness tasks are read as data; if you trust the "
                     "code in this folder, run with --trust-task-code")


def check_task_names(tasks: Sequence[str], known: Sequence[str], key: str = "eval.lmeval_tasks") -> None:
    """Each task is a name the harness indexed (from its own tasks or the task folder), not a path to a
    YAML file elsewhere (the harness loads a path with its functions resolved).

    Example:
        >>> check_task_names(["mmlu"], ["mmlu", "hellaswag"])
        >>> check_task_names(["/tmp/x.yaml"], ["mmlu"])
        Traceback (most recent call last):
        ...
        sieve.errors.SieveError: eval.lmeval_tasks: '/tmp/x.yaml' is not a task the harness knows ...
    """
    have = set(known)
    for t in tasks:
        if t not in have:
            import difflib

            close = difflib.get_close_matches(t, sorted(have), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise SieveError(f"{key}: {t!r} is not a task the harness knows (neither its own nor in "
                             f"eval.lmeval_include){hint}")


@contextmanager
def sandboxed_templates() -> Iterator[None]:
    """Within the block, the harness renders its ``doc_to_*`` templates in Jinja's
    ``SandboxedEnvironment`` (same settings and filters as its own environment), so a template can
    format a document but not reach Python's internals. Re-entrant.

    Example:
        >>> from lm_eval import utils
        >>> with sandboxed_templates():
        ...     utils.apply_template("{{ q|upper }}", {"q": "why"})
        'WHY'
    """
    from jinja2.sandbox import SandboxedEnvironment
    from lm_eval import utils

    original = utils.env
    if isinstance(original, SandboxedEnvironment):
        yield
        return
    env: Any = SandboxedEnvironment(loader=original.loader, undefined=original.undefined,
                                    keep_trailing_newline=original.keep_trailing_newline)
    env.filters.update(original.filters)
    utils.env = env
    try:
        yield
    finally:
        utils.env = original
