"""Prompt sets of the regex study: regex-prone prompts, a neutral set, code for the loss measure,
contrastive pairs for CAA, and probe training data.

Two sources:

- ``source = "world"``: the embedded world's sets, shipped as JSON lines in ``sieve/world/data/prompts``
  (cut from held-out files when the world was built, so they do not move with the Python version).
- a prompts TOML file (``recipes/prompts/regex_task.toml``): the study's task for instruct models —
  write pytest-style fuzz tests for a given function (chat template, answer pre-filled with a Python
  fence) — over functions we wrote, plus neutral coding tasks and contrastive prompts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sieve.errors import RecipeError, SieveError
from sieve.recipe import parse_toml, read_text
from sieve.world import DATA_DIR

__all__ = [
    "Prompt", "PromptSets", "load_prompt_sets", "WORLD_PROMPTS_DIR", "PromptFileError", "load_prompt_file",
    "user_prompt_files",
]


class PromptFileError(SieveError):
    """A user's prompt file is wrong: the message names the file and (where there is one) the line."""

    def __init__(self, path: object, line: int | None, message: str) -> None:
        self.path, self.line = path, line
        super().__init__(f"{path}{f':{line}' if line else ''}: {message}")

WORLD_PROMPTS_DIR = DATA_DIR / "prompts"


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``setup`` is the code under test (run before the generated tests in the sandbox);
    ``style`` is ``completion`` (base model continues code) or ``instruct`` (answer in a fence)."""

    id: str
    text: str
    kind: str
    style: str = "completion"
    setup: str = ""
    reference: str = ""


@dataclass
class PromptSets:
    """A recipe's prompts: regex-prone and neutral generation sets, code for the loss measure,
    contrastive pairs (CAA), calibration texts (the CAA threshold), and probe training texts/prompts."""

    regex: list[Prompt]
    neutral: list[Prompt]
    code: list[str]
    contrastive: tuple[list[str], list[str]]
    calibration: list[str]
    probe_texts: list[str] = field(default_factory=list)
    probe_generation_prompts: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _limit(items: list, n: int) -> list:
    if n <= 0 or len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def _world_sets(r: Any) -> PromptSets:
    d = WORLD_PROMPTS_DIR
    if not d.exists():
        raise RecipeError(r.path or "<recipe>", "prompts.source",
                          f"the world's prompt files are missing ({d}); rebuild the world")
    # intent: function heads without a `re` token; lexical: imports (`import re`) kept, cut before the use.
    intent = r.prompts.world_set == "intent"
    names = (("intent_regex", "intent_neutral", "intent_contrastive") if intent
             else ("regex", "neutral", "contrastive"))
    missing = [n for n in names if not (d / f"{n}.jsonl").exists()]
    if missing:
        raise RecipeError(r.path or "<recipe>", "prompts.world_set",
                          f"the world has no {missing[0]}.jsonl in {d}; rebuild the world")
    regex = [Prompt(p["id"], p["prompt"], "regex", reference=p["reference"]) for p in _read_jsonl(d / f"{names[0]}.jsonl")]
    neutral = [Prompt(p["id"], p["prompt"], "neutral", reference=p["reference"])
               for p in _read_jsonl(d / f"{names[1]}.jsonl")]
    code = [p["text"] for p in _read_jsonl(d / "code.jsonl")]
    pairs = _read_jsonl(d / f"{names[2]}.jsonl")
    probe = [p["text"] for p in _read_jsonl(d / "probe.jsonl")]
    for name, items in ((names[0], regex), (names[1], neutral), ("code", code), (names[2], pairs), ("probe", probe)):
        if not items:
            raise RecipeError(d / f"{name}.jsonl", "-", "has no prompts; rebuild the world")
    # The CAA threshold is calibrated on prompts of the study's shape; for the intent study on the
    # held-out half the world build chose its feature on, never on the evaluation prompts.
    calibration = ([p["prompt"] for p in _read_jsonl(d / "intent_select.jsonl") if p["kind"] == "regex"]
                   if intent else [p.text for p in regex])
    return PromptSets(
        regex=_limit(regex, r.prompts.regex_limit),
        neutral=_limit(neutral, r.prompts.neutral_limit),
        code=_limit(code, r.prompts.code_limit),
        contrastive=([p["positive"] for p in pairs], [p["negative"] for p in pairs]),
        calibration=calibration,
        probe_texts=probe,
        probe_generation_prompts=([p["positive"] for p in pairs], [p["negative"] for p in pairs]),
    )


def _task_sets(r: Any, tokenizer: Any) -> PromptSets:
    from sieve.models import chat_prompt

    path = r.resolve(r.prompts.source)
    if not path.is_file():
        raise RecipeError(r.path or "<recipe>", "prompts.source",
                          f"prompt file {path} " + ("is not a file" if path.exists() else "not found"))
    spec = parse_toml(read_text(path), path)
    for key in ("instruction", "prefill", "function", "neutral", "contrastive"):
        if key not in spec:
            raise RecipeError(path, key, "is required in a prompts file")
    for key in ("function", "neutral"):
        if not isinstance(spec[key], list) or not spec[key]:
            raise RecipeError(path, key, f"is empty: a prompts file needs at least one [[{key}]] table")
    system = r.prompts.system or spec.get("system", "")
    doc = spec.get("documentation", "")

    def chat(user: str, prefill: str = spec["prefill"]) -> str:
        if r.model.chat:
            return chat_prompt(tokenizer, user, system=system or None, prefill=prefill)
        return f"{system}\n\n{user}\n\n{prefill}" if system else f"{user}\n\n{prefill}"

    regex, calib = [], []
    for i, f in enumerate(spec["function"]):
        for key in ("name", "code"):
            if key not in f:
                raise RecipeError(path, f"function[{i}].{key}", "is required")
        user = spec["instruction"].replace("{code}", f["code"]).replace("{documentation}", doc)
        regex.append(Prompt(f["name"], chat(user), "regex", style="instruct", setup=f["code"]))
        calib.append(regex[-1].text)
    neutral = []
    for i, n in enumerate(spec["neutral"]):
        if "id" not in n or "task" not in n:
            raise RecipeError(path, f"neutral[{i}]", "needs 'id' and 'task'")
        neutral.append(Prompt(n["id"], chat(n["task"]), "neutral", style="instruct", setup=n.get("setup", "")))
    c = spec["contrastive"]
    for key in ("base", "positive_suffix"):
        if not isinstance(c, dict) or key not in c:
            raise RecipeError(path, f"contrastive.{key}", "is required in a prompts file")
    pos = [chat(c["base"] + c["positive_suffix"] + "\n\n```python\n" + f["code"] + "```", prefill="")
           for f in spec["function"]]
    neg = [chat(c["base"] + c.get("negative_suffix", "") + "\n\n```python\n" + f["code"] + "```", prefill="")
           for f in spec["function"]]
    code = [f["code"] for f in spec["function"]] + [n.get("setup", "") for n in spec["neutral"] if n.get("setup")]
    return PromptSets(
        regex=_limit(regex, r.prompts.regex_limit),
        neutral=_limit(neutral, r.prompts.neutral_limit),
        code=[t for t in code if t.strip()],
        contrastive=(pos, neg),
        calibration=calib,
        probe_texts=[f["code"] for f in spec["function"]],
        probe_generation_prompts=(pos, neg),
    )


def load_prompt_sets(recipe: Any, tokenizer: Any) -> PromptSets:
    """The recipe's prompt sets (see the module docstring); ``prompts.regex_file`` and
    ``prompts.neutral_file`` replace the regex-prone and neutral sets with the user's own prompts."""
    user = user_prompt_files(recipe)  # before any model work: a bad file fails at once
    sets = _world_sets(recipe) if recipe.prompts.source == "world" else _task_sets(recipe, tokenizer)
    if "regex" in user:
        sets.regex = user["regex"]
    if "neutral" in user:
        sets.neutral = user["neutral"]
    return sets


_SEPARATOR = re.compile(r"^# ?---+(.*)$")


def load_prompt_file(path: str | Path, kind: str) -> list[Prompt]:
    """Read plain completion prompts (the model continues each text as written).

    - ``.jsonl``: one JSON object per line with a non-empty string ``prompt``; optional ``id`` (string)
      and ``reference`` (a known completion, kept for reading). Blank lines are skipped.
    - ``.py``: blocks separated by lines starting with ``# ---`` (text after the dashes names the block,
      e.g. ``# --- find_emails``). A block is its lines exactly as written, less empty lines at its start
      and end, so it ends with its last line's newline (generation heals the token boundary). The file
      is read as text, never imported or run.

    Ids default to ``<file name>:<line>``. Errors name the file and the line.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "p.py"
        >>> _ = f.write_text("def f(s):\\n    # find dates\\n# --- g\\ndef g(xs):\\n")
        >>> [(p.id, p.text) for p in load_prompt_file(f, "regex")]
        [('p.py:1', 'def f(s):\\n    # find dates\\n'), ('g', 'def g(xs):\\n')]
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(path, None, "file not found" if not path.exists() else "is not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as e:
        raise PromptFileError(path, None, f"is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".jsonl":
        prompts = _jsonl_prompts(path, text, kind)
    elif path.suffix == ".py":
        prompts = _block_prompts(path, text, kind)
    else:
        raise PromptFileError(path, None, f"unknown prompt file type {path.suffix!r}; use .jsonl (a 'prompt' field "
                                          "per line) or .py (blocks separated by '# ---' lines)")
    if not prompts:
        raise PromptFileError(path, None, "has no prompts")
    seen: dict[str, int] = {}
    for p, line in prompts:
        if p.id in seen:
            raise PromptFileError(path, line, f"id {p.id!r} is used twice (first on line {seen[p.id]})")
        seen[p.id] = line
    return [p for p, _ in prompts]


def _jsonl_prompts(path: Path, text: str, kind: str) -> list[tuple[Prompt, int]]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(path, n, f"is not valid JSON ({e.msg}, column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # an integer past the digit limit; nesting too deep
            raise PromptFileError(path, n, f"is not JSON sieve reads ({type(e).__name__}: {str(e)[:100]})") from None
        if not isinstance(obj, dict):
            raise PromptFileError(path, n, f"must be a JSON object with a 'prompt' field, got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(path, n, "needs a 'prompt' field holding a non-empty string")
        pid = obj.get("id", f"{path.name}:{n}")
        if not isinstance(pid, str) or not pid:
            raise PromptFileError(path, n, f"'id' must be a non-empty string, got {pid!r}")
        ref = obj.get("reference", "")
        if not isinstance(ref, str):
            raise PromptFileError(path, n, f"'reference' must be a string, got {type(ref).__name__}")
        out.append((Prompt(pid, prompt, kind, reference=ref), n))
    return out


def _block_prompts(path: Path, text: str, kind: str) -> list[tuple[Prompt, int]]:
    out = []
    lines = text.splitlines(keepends=True)
    start, name, block = 1, "", []

    def flush() -> None:
        body = list(block)
        first = start
        while body and not body[0].strip("\r\n"):
            body.pop(0)
            first += 1
        while body and not body[-1].strip("\r\n"):
            body.pop()
        if not body:
            if name:
                raise PromptFileError(path, start - 1, f"block {name!r} is empty")
            return
        if not "".join(body).strip():
            raise PromptFileError(path, first, "block holds only whitespace")
        out.append((Prompt(name or f"{path.name}:{first}", "".join(body), kind), first))

    for n, line in enumerate(lines, start=1):
        m = _SEPARATOR.match(line.rstrip("\r\n"))
        if m:
            flush()
            start, name, block = n + 1, m.group(1).strip(), []
        else:
            block.append(line)
    flush()
    return out


def user_prompt_files(recipe: Any) -> dict[str, list[Prompt]]:
    """The user's prompt files named by the recipe (``prompts.regex_file``, ``prompts.neutral_file``),
    read and checked; relative paths resolve against the recipe file's folder."""
    out = {}
    for kind, value in (("regex", recipe.prompts.regex_file), ("neutral", recipe.prompts.neutral_file)):
        if value:
            out[kind] = load_prompt_file(recipe.resolve(value), kind)
    return out
