"""lm-evaluation-harness task files from a shared recipe, read as data.

A harness task folder is code as much as data. Given as ``include_path``, the harness imports the
Python file next to a ``!function utils.fn`` tag, loads a metric it does not register through HF
``evaluate`` (which runs a script), builds ``class`` and ``custom_dataset`` objects, passes
``generation_kwargs`` to ``generate`` (``custom_generate`` and ``trust_remote_code`` import code),
lets a group override the harness's own tasks (their ``metadata`` reaches builtin code that loads a
tokenizer with ``trust_remote_code``; ``unsafe_code: false`` lifts the gate on a task that executes
the model's output), follows ``include`` anywhere (behind a YAML merge key too), and renders every
``doc_to_*`` template with a plain Jinja environment, from which a template reaches Python's
internals (``{{ cycler.__init__.__globals__.os }}``). A list of what to refuse cannot keep up with
that.

So sieve never hands a shared folder to the harness. :func:`data_tasks` reads each task YAML itself,
as data (PyYAML's safe loader: no tag is built; merge keys resolved; ``include`` only to files in
the folder), keeps only the task keys and values of an allowlist (:data:`TASK_KEYS`: text templates,
dataset files in the recipe's folder, the harness's registered metrics, filters and samplers,
greedy or sampled generation lengths and stops...), and returns plain task configs that the harness
builds as inline tasks. Anything else is refused before the model loads, naming the file, line and
key (:func:`check_task_folder`); ``--trust-task-code`` on the command line hands the folder to the
harness as it is. :func:`sandboxed_templates` renders the harness's templates in Jinja's sandbox (no
attribute starting with ``_``, no unsafe callables) for every task sieve runs, trusted or not.
"""

from __future__ import annotations

import copy
import re
import tempfile  # noqa: F401 - the doctests use it
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sieve.errors import SieveError, first_line
from sieve.files import read_regular

__all__ = ["TaskCode", "TASK_KEYS", "data_tasks", "task_code", "check_task_folder", "check_task_names",
           "check_hub_id", "hub_datasets_checked", "no_text_evaluation", "TextEvaluated", "sandboxed_templates"]

# The YAML tags a data file may carry: PyYAML's safe schema (what ``yaml.safe_load`` constructs).
_DATA_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in
                       ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "merge"))
# datasets' builders that read plain data files (a hub id is data too: datasets >= 4 runs no script)
_DATA_BUILDERS = frozenset(("json", "csv", "parquet", "text", "arrow"))

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _builders() -> frozenset[str]:
    """datasets' builders by name: those ``load_dataset`` takes, and those its code holds (``sql``...)."""
    names = {"sql", "spark", "generator", "cache", "pandas", "webdataset", "iceberg", "lance"}
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        names |= set(_PACKAGED_DATASETS_MODULES)
    except ImportError:  # pragma: no cover - datasets renamed it
        pass
    return frozenset(names)


_STR, _INT, _NUM, _BOOL = "text", "an integer", "a number", "true or false"
_STRS = "text or a list of texts"
# Every key a shared task may set, and what its value must be. Templates are text (rendered in the
# sandbox); names are looked up in the harness's registries; nothing names Python.
TASK_KEYS: dict[str, Any] = {
    "task": _STR, "task_alias": _STR, "tag": _STRS, "dataset_path": "dataset", "dataset_name": _STR,
    "dataset_kwargs": {"data_files": "files", "field": _STR, "sep": _STR, "delimiter": _STR},
    "training_split": _STR, "validation_split": _STR, "test_split": _STR, "fewshot_split": _STR,
    "doc_to_text": _STR, "doc_to_target": "template", "doc_to_choice": "choices", "description": _STR,
    "target_delimiter": _STR, "fewshot_delimiter": _STR, "gen_prefix": _STR, "num_fewshot": _INT,
    "fewshot_config": {"sampler": "sampler", "split": _STR, "fewshot_indices": "integers", "samples": "documents",
                       "doc_to_text": _STR, "doc_to_target": "template", "doc_to_choice": "choices",
                       "gen_prefix": _STR, "fewshot_delimiter": _STR, "target_delimiter": _STR},
    "metric_list": "metrics", "output_type": "output type",
    "generation_kwargs": {"until": _STRS, "max_gen_toks": _INT, "do_sample": _BOOL, "temperature": _NUM,
                          "top_p": _NUM, "top_k": _INT, "min_p": _NUM, "repetition_penalty": _NUM},
    "repeats": _INT, "filter_list": "filters", "should_decontaminate": _BOOL,
    "doc_to_decontamination_query": _STR, "metadata": "scalars", "unsafe_code": "false",
}
_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
_METRIC_KEYS = {"metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation",
                "regexes_to_ignore", "ignore_numbers"}


@dataclass(frozen=True)
class TaskCode:
    """One thing in a task file a shared folder may not do: the file, its line (1-based) and what."""

    file: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.what}"


def _registry(kind: str) -> set[str] | None:
    try:
        import lm_eval.api.metrics
        import lm_eval.filters  # noqa: F401
        from lm_eval.api import registry
        from lm_eval.api.samplers import SAMPLER_REGISTRY
    except ImportError:  # pragma: no cover - only without the extra
        return None
    if kind == "sampler":
        return set(SAMPLER_REGISTRY)
    reg = {"metric": registry.metric_registry, "filter": registry.filter_registry,
           "aggregation": registry.aggregation_registry}[kind]
    names = set(reg.keys()) if hasattr(reg, "keys") else set(reg)
    return names - {"custom"}  # the custom filter calls a function named by the file


_MAX_NESTING = 32
_TOO_DEEP = f"a template with brackets nested at most {_MAX_NESTING} deep"


def _template_problem(text: str) -> str | None:
    """What is wrong with a Jinja template as data: reading an attribute or item named with a leading
    underscore (the way out of a template to Python's internals; early notice only: the sandbox is
    what refuses it), or nesting too deep for Jinja's parser (which fails with a RecursionError)."""
    if "{{" not in text and "{%" not in text:
        return None
    depth = deepest = 0
    for ch in text:  # brackets nested past any template's need cost Jinja ~14 frames a level, to parse and render
        depth += (ch in "([{") - (ch in ")]}")
        deepest = max(deepest, depth)
    if deepest > _MAX_NESTING:
        return _TOO_DEEP
    from jinja2 import Environment, nodes
    from jinja2.exceptions import TemplateSyntaxError

    try:
        tree = Environment().parse(text)
    except TemplateSyntaxError:
        return None  # the harness reports it when it renders
    except (RecursionError, MemoryError):
        return _TOO_DEEP
    for n in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = n.attr if isinstance(n, nodes.Getattr) else getattr(n.arg, "value", None)
        if isinstance(name, str) and name.startswith("_"):
            return "a template that reads no '_'-named attribute (Python's internals)"
    return None


def _loader() -> type:
    # the loader the harness parses with (libyaml's where PyYAML has it)
    return yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader


def _tags(node: yaml.Node, file: Path, found: list[TaskCode]) -> None:
    """Every node whose tag is not plain data (``!function``, ``!!python/...``, on values and keys), and
    every node reached a second time: a YAML alias (``*name``) repeats a node, and aliases of aliases
    grow a 461-byte file into billions of values (walked, or expanded later by whatever reads them)."""
    seen: set[int] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            found.append(TaskCode(file, n.start_mark.line + 1, "repeats a node through a YAML alias (*name): "
                                                               "shared task files write their values out"))
            return
        seen.add(id(n))
        if n.tag not in _DATA_TAGS:
            value = n.value if isinstance(n, yaml.ScalarNode) else "…"
            found.append(TaskCode(file, n.start_mark.line + 1, f"YAML tag {n.tag} {value!s:.60} (the harness "
                                                               "imports or builds Python objects from tags)"))
        if isinstance(n, yaml.SequenceNode):
            todo.extend(reversed(n.value))
        elif isinstance(n, yaml.MappingNode):
            todo.extend(x for k, v in reversed(n.value) for x in (v, k))


def _lines(node: yaml.Node | None) -> dict[str, int]:
    """Top-level key -> line, for naming where a key is."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


_MAX_BYTES = 1 << 20  # a task file's size (the harness's own are under 64 KB): each is parsed twice, in memory


class _Reader:
    """Reads a folder's task files as data, collecting what is refused."""

    def __init__(self, folder: Path, root: Path) -> None:
        self.folder, self.root = folder.resolve(), root.resolve()
        self.found: list[TaskCode] = []
        self.registries = {k: _registry(k) for k in ("metric", "filter", "aggregation", "sampler")}
        self.loaded: dict[Path, tuple[dict[str, Any] | None, dict[str, int]]] = {}  # each file read once

    def refuse(self, file: Path, line: int, what: str) -> None:
        self.found.append(TaskCode(file, line, what))

    def load(self, path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """A file's config with its includes merged in (theirs first, its own keys win, as the harness
        does), and its keys' lines."""
        path = path.resolve()
        if path in seen:
            self.refuse(path, 1, "include cycle")
            return None, {}
        if path not in self.loaded:  # includes stay in the folder: reads are bounded by its files
            self.loaded[path] = self._load(path, seen)
        cfg, lines = self.loaded[path]
        return (None if cfg is None else copy.deepcopy(cfg)), dict(lines)  # tasks sharing an include share nothing

    def _load(self, path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any] | None, dict[str, int]]:
        try:
            raw = read_regular(path, _MAX_BYTES)
        except (OSError, ValueError) as e:  # a FIFO or device, a link to what never ends, too large
            self.refuse(path, 1, f"cannot be read: {first_line(e):.120}")
            return None, {}
        try:
            nodes = list(yaml.compose_all(raw, Loader=_loader()))
        except (yaml.YAMLError, RecursionError) as e:  # (PyYAML without libyaml recurses on nesting)
            mark = getattr(e, "problem_mark", None)
            self.refuse(path, (mark.line + 1) if mark else 1,
                        f"cannot be read as YAML ({type(e).__name__}: {first_line(e):.80})")
            return None, {}
        if len(nodes) != 1:
            self.refuse(path, 1, f"holds {len(nodes)} YAML documents; a task file holds one")
            return None, {}
        before = len(self.found)
        _tags(nodes[0], path, self.found)
        if len(self.found) > before:
            return None, {}
        cfg = yaml.load(raw, Loader=_loader())
        lines = _lines(nodes[0])
        if not isinstance(cfg, dict):
            self.refuse(path, 1, "is not a mapping of task keys")
            return None, {}
        includes = cfg.pop("include", None)
        merged: dict[str, Any] = {}
        for inc in includes if isinstance(includes, list) else [] if includes is None else [includes]:
            line = lines.get("include", 1)
            if not isinstance(inc, str):
                self.refuse(path, line, f"include {inc!r} is not a file name")
                continue
            target = (path.parent / inc).resolve()
            if not target.is_relative_to(self.folder):
                self.refuse(path, line, f"include {inc!r} resolves to {target}, outside the task folder "
                                        f"{self.folder}")
                continue
            if not target.is_file():
                self.refuse(path, line, f"include {inc!r}: no such file")
                continue
            inc_cfg, inc_lines = self.load(target, (*seen, path))
            if inc_cfg is not None:
                inc_cfg.pop("task_list", None)
                merged.update(inc_cfg)
                lines = {**inc_lines, **lines}
        merged.update(cfg)
        return merged, lines

    def check(self, path: Path, cfg: dict[str, Any], lines: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            line = lines.get(str(key), 1)
            rule = TASK_KEYS.get(key)
            if rule is None:
                self.refuse(path, line, f"'{key}' is not a key a shared task may set (its keys: text templates, "
                                        "dataset files, registered metrics and filters: sieve.evals.task_files."
                                        "TASK_KEYS); run with --trust-task-code if you trust this folder's code")
                continue
            ok = self.value(path, line, key, rule, value)
            if ok is not None:
                out[key] = ok
        return out

    def value(self, path: Path, line: int, key: str, rule: Any, v: Any) -> Any:
        def bad(what: str) -> None:
            self.refuse(path, line, f"'{key}' must be {what}, got {v!r:.60}")

        if isinstance(rule, dict):
            if not isinstance(v, dict):
                return bad("a mapping")
            res = {}
            for k, sub in v.items():
                if k not in rule:
                    self.refuse(path, line, f"'{key}.{k}' is not a key a shared task may set (allowed: "
                                            f"{sorted(rule)})")
                    continue
                r = self.value(path, line, f"{key}.{k}", rule[k], sub)
                if r is not None:
                    res[k] = r
            return res
        if rule == _STR or rule == "template":
            if rule == "template" and (isinstance(v, int) and not isinstance(v, bool)
                                       or isinstance(v, list) and all(isinstance(x, (int, str)) for x in v)):
                return v  # a target index, or several targets
            if not isinstance(v, str):
                return bad(_STR)
            if (problem := _template_problem(v)) is not None:
                return bad(problem)
            return v
        if rule == _STRS:
            if isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                return v
            return bad(_STRS)
        if rule == _INT:
            return v if isinstance(v, int) and not isinstance(v, bool) else bad(_INT)
        if rule == _NUM:
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else bad(_NUM)
        if rule == _BOOL:
            return v if isinstance(v, bool) else bad(_BOOL)
        if rule == "false":
            return v if v is False else bad("false (a task that executes the model's output is not read from a "
                                            "shared folder)")
        if rule == "integers":
            return v if isinstance(v, list) and all(isinstance(x, int) for x in v) else bad("a list of integers")
        if rule == "scalars":
            ok = isinstance(v, dict) and all(isinstance(x, (str, int, float, bool)) or x is None for x in v.values())
            return v if ok else bad("a mapping of plain values")
        if rule == "documents":
            ok = isinstance(v, list) and all(isinstance(d, dict) for d in v)
            return v if ok else bad("a list of documents (mappings)")
        if rule == "choices":
            if isinstance(v, str):
                return self.value(path, line, key, _STR, v)
            if isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
                return v
            if isinstance(v, dict) and all(isinstance(x, (str, int, float)) for x in v.values()):
                return v
            return bad("a template, or a list or mapping of choices")
        if rule == "output type":
            return v if v in _OUTPUT_TYPES else bad(f"one of {list(_OUTPUT_TYPES)}")
        if rule == "sampler":
            reg = self.registries["sampler"]
            return v if isinstance(v, str) and (reg is None or v in reg) else bad(f"a sampler of {sorted(reg or [])}")
        if rule == "dataset":
            if not isinstance(v, str):
                return bad(_STR)
            if v in _DATA_BUILDERS:
                return v
            # datasets opens a local folder before the hub, relative to the working directory
            local = any((base / v).exists() for base in (path.parent, Path.cwd(), self.root))
            if v in _builders() or local or not _HUB_ID.fullmatch(v):
                return bad(f"one of the file readers {sorted(_DATA_BUILDERS)} or a hub id (datasets' other "
                           "builders, which run SQL, Spark or generators, and local folders are not read from a "
                           "shared folder)")
            return v
        if rule == "files":
            return self.paths(path, line, key, v)
        if rule == "metrics":
            return self.entries(path, line, key, v, "metric", _METRIC_KEYS)
        if rule == "filters":
            if not isinstance(v, list):
                return bad("a list of named filter pipelines")
            res = []
            for i, pipe in enumerate(v):
                if not isinstance(pipe, dict) or set(pipe) - {"name", "filter"} or not isinstance(pipe.get("name"), str):
                    self.refuse(path, line, f"'{key}[{i}]' must be {{name, filter}}, got {pipe!r:.60}")
                    continue
                steps = self.entries(path, line, f"{key}[{i}].filter", pipe.get("filter", []), "function", None)
                if steps is not None:
                    res.append({"name": pipe["name"], "filter": steps})
            return res
        raise AssertionError(rule)  # pragma: no cover

    def entries(self, path: Path, line: int, key: str, v: Any, name_key: str, keys: set[str] | None) -> Any:
        """A list of registry entries (metrics, filter steps): registered names, plain arguments."""
        kind = "metric" if name_key == "metric" else "filter"
        reg = self.registries[kind]
        if not isinstance(v, list) or not all(isinstance(e, dict) for e in v):
            self.refuse(path, line, f"'{key}' must be a list of mappings")
            return None
        res = []
        for i, e in enumerate(v):
            name = e.get(name_key)
            if not isinstance(name, str) or (reg is not None and name not in reg):
                self.refuse(path, line, f"'{key}[{i}].{name_key}' {name!r:.60} is not one the harness registers "
                                        f"({sorted(reg or [])}): an unknown metric is loaded through HF evaluate, "
                                        "which runs a script")
                continue
            extra = set(e) - (keys if keys is not None else set(e))
            agg = e.get("aggregation")
            if extra:
                self.refuse(path, line, f"'{key}[{i}]' sets {sorted(extra)}: not arguments a shared task may pass")
            elif agg is not None and not (isinstance(agg, str) and agg in (self.registries["aggregation"] or {agg})):
                self.refuse(path, line, f"'{key}[{i}].aggregation' {agg!r:.60} is not one the harness registers")
            elif any(not _plain(x) for k, x in e.items() if k != name_key):
                self.refuse(path, line, f"'{key}[{i}]' passes something other than plain values")
            else:
                res.append(e)
        return res

    def paths(self, path: Path, line: int, key: str, v: Any) -> Any:
        """Local data files, relative to the task file's folder, inside the recipe's folder."""
        if isinstance(v, dict):
            return {k: self.paths(path, line, f"{key}.{k}", x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.paths(path, line, key, x) for x in v]
        if not isinstance(v, str):
            self.refuse(path, line, f"'{key}' must be a file name, got {v!r:.60}")
            return v
        if "://" in v or any(c in v for c in "*?[]{}"):
            self.refuse(path, line, f"'{key}' {v!r}: a shared task names its local data files one by one (no "
                                    "URL, no pattern: a pattern is matched, and links followed, after this check)")
            return v
        p = (path.parent / Path(v).expanduser()).resolve()
        if not p.is_relative_to(self.root):
            self.refuse(path, line, f"'{key}' {v!r} resolves to {p}, outside the recipe's folder {self.root}")
        elif not p.is_file():
            self.refuse(path, line, f"'{key}' {v!r}: no such file ({p}; relative to the task file's folder)")
        return str(p)


def _plain(x: Any) -> bool:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return True
    if isinstance(x, list):
        return all(_plain(y) for y in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(y) for k, y in x.items())
    return False


def _read(folder: str | Path, root: str | Path | None) -> tuple[dict[str, dict[str, Any]], list[TaskCode]]:
    folder = Path(folder)
    reader = _Reader(folder, Path(root) if root is not None else folder)
    tasks: dict[str, dict[str, Any]] = {}
    for f in sorted(p for pattern in ("*.yaml", "*.yml") for p in folder.rglob(pattern)):
        if not f.is_file():
            continue
        cfg, lines = reader.load(f)
        if cfg is None:
            continue
        if "group" in cfg or "task_list" in cfg or "class" in cfg:
            what = "a group" if "group" in cfg else "a task list" if "task_list" in cfg else "a Python task class"
            reader.refuse(f.resolve(), lines.get("group", lines.get("task_list", lines.get("class", 1))),
                          f"{what} is not read from a shared folder (it can override the harness's own tasks): "
                          "list the tasks in eval.lmeval_tasks")
            continue
        if "task" not in cfg:
            continue  # a file other tasks include
        checked = reader.check(f.resolve(), cfg, lines)
        name = checked.get("task")
        if isinstance(name, str):
            if name in tasks:
                reader.refuse(f.resolve(), lines.get("task", 1), f"task {name!r} is defined twice")
            tasks[name] = checked
    return tasks, reader.found


def data_tasks(folder: str | Path, root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The tasks of a shared task folder as plain configs for the harness (task name -> config), read
    as data: every ``*.yaml`` / ``*.yml`` (sub-folders too), ``include`` merged from files in the
    folder, every key and value checked against :data:`TASK_KEYS`, local data files resolved against
    the task file's folder and required inside ``root`` (the recipe's folder; default: ``folder``).
    Raises :class:`~sieve.errors.SieveError` naming the first thing refused (:func:`task_code`
    lists them all).

    Example:
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "docs.json").write_text('[{"q": "x"}]')
        >>> _ = (d / "t.yaml").write_text("task: t\\ndataset_path: json\\ndataset_kwargs:\\n  data_files: docs.json\\n"
        ...                               "output_type: multiple_choice\\ndoc_to_text: '{{q}}'\\n")
        >>> cfg = data_tasks(d)["t"]
        >>> cfg["dataset_kwargs"]["data_files"] == str((d / "docs.json").resolve())
        True
    """
    tasks, found = _read(folder, root)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise SieveError(f"eval.lmeval_include: {found[0]}{more}. A recipe's harness tasks are read as data; if you "
                         "trust the code in this folder, run with --trust-task-code")
    return tasks


def task_code(folder: str | Path, root: str | Path | None = None) -> list[TaskCode]:
    """Everything in a task folder that :func:`data_tasks` refuses, each with its file and line.

    Example:
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "t.yaml").write_text("task: t\\nprocess_docs: !function utils.go\\n")
        >>> [(c.line, c.what.split(" (")[0]) for c in task_code(d)]
        [(2, 'YAML tag !function utils.go')]
    """
    return _read(folder, root)[1]


def check_task_folder(folder: str | Path, root: str | Path | None = None) -> None:
    """Refuse a task folder that is more than data (:func:`data_tasks`), naming the first place and how
    many more; a command-line flag (``--trust-task-code``) is the way to run its code.

    Example:
        >>> check_task_folder(tempfile.mkdtemp())  # a folder of data only passes
    """
    data_tasks(folder, root)


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


def check_hub_id(dataset: str, what: str = "dataset") -> None:
    """Refuse a hub dataset id that names a folder relative to the working directory: ``datasets``
    opens a local folder ``./org/name`` before the hub, and that folder's README can point its data
    files anywhere, so a shared folder you run from would replace ``cais/mmlu`` or a harness task's
    data with its own (or another file of yours).

    Example:
        >>> check_hub_id("cais/mmlu")  # no such folder here: the hub's (or its cache's)
    """
    if dataset in _builders() or Path(dataset).is_absolute() or not _HUB_ID.fullmatch(dataset):
        return
    if Path(dataset).exists():
        raise SieveError(f"{what} {dataset!r}: a folder {Path(dataset).resolve()} in the working directory would be "
                         "read instead of the hub's dataset (datasets opens local folders first); run from "
                         "another folder")


@contextmanager
def hub_datasets_checked() -> Iterator[None]:
    """Within the block, ``datasets.load_dataset`` refuses a hub id that a folder in the working
    directory shadows (:func:`check_hub_id`), for the harness's own tasks as for a shared folder's.

    Example:
        >>> with hub_datasets_checked():
        ...     pass
    """
    import datasets

    original = datasets.load_dataset

    def load_dataset(path: str, *args: Any, **kwargs: Any) -> Any:
        check_hub_id(str(path), "lm-eval dataset_path")
        return original(path, *args, **kwargs)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original


class TextEvaluated(BaseException):
    """Raised where a harness task's grader asked sympy to evaluate text as Python (``parse_expr``,
    ``sympify`` of a string: ``eval``): a ``BaseException``, so that graders which catch every
    ``Exception`` and score the answer wrong cannot hide it."""


@contextmanager
def no_text_evaluation() -> Iterator[None]:
    """Within the block, sympy refuses to evaluate text as Python (:class:`TextEvaluated`). Several of
    the harness's own math graders (``minerva_math``'s relatives in ``score``, ``leaderboard_math``'s
    checks) parse the model's answer with ``parse_expr``, which ``eval``s it in sieve's process: the
    model's output would run outside the sandbox.

    Example:
        >>> with no_text_evaluation():
        ...     pass
    """
    try:
        from sympy.parsing import sympy_parser
    except ImportError:  # pragma: no cover - no sympy, no parse_expr
        yield
        return
    original = sympy_parser.eval_expr

    def eval_expr(code: str, local_dict: Any, global_dict: Any) -> Any:
        raise TextEvaluated(f"sympy was asked to evaluate {str(code)[:80]!r} as Python")

    sympy_parser.eval_expr = eval_expr
    try:
        yield
    finally:
        sympy_parser.eval_expr = original


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
