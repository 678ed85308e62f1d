"""The embedded world's prompt sets, cut from held-out files (never seen in training).

- **regex-prone**: functions (or module-level code) that use ``re``, cut at the decision point, right
  before the first use (``m = `` | ``re.match(...)``); the prompt is the chunk's imports (``import re``
  among them) and the code before that point.
- **neutral**: functions from files that do not import ``re``, cut after the signature and docstring
  (the lexical study's set).
- **code**: held-out regex-free chunks, whole, for the general-ability loss.
- **intent** (:func:`intent_prompts`): a function's ``def`` line and docstring alone (under its
  ``class`` line for a method), cut before the body: no imports, no earlier use, not one ``re`` token.
  Labelled ``regex`` when the function's body uses ``re`` in the original file, ``neutral`` when it
  does not; neutral heads come from the same files as regex-prone ones, so both sets share a style.
  Whether the model reaches for ``re`` here depends on
  what the function is for, not on a token that names the module.

Each prompt keeps the rest of its function (``reference``) for evaluation, and prompts that would not
leave room to generate in the model's context are dropped.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from sieve.evals.regex_use import find_regex_use
from sieve.models import clip_to_tokens
from sieve.world.corpus import Chunk

__all__ = ["WorldPrompt", "clip_to_tokens", "regex_prone_prompts", "neutral_prompts", "regex_free_code", "save_prompts",
           "load_prompts", "intent_prompts", "intent_prompt_sets", "intent_pairs", "names_re"]


@dataclass(frozen=True)
class WorldPrompt:
    """A completion prompt from a held-out function; ``reference`` is what followed in the file."""

    id: str
    kind: str
    prompt: str
    reference: str


_WORD = re.compile(r"[A-Za-z_]+")


def _body_start(body: str) -> int | None:
    """Line index (0-based) of the first statement after the def line and docstring, or None."""
    try:
        tree = ast.parse(body)
    except SyntaxError:
        return None
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        cls = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
        fn = next((n for n in (cls.body if cls else []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))),
                  None)
    if fn is None or not fn.body:
        return None
    first = fn.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        if len(fn.body) < 2:
            return None
        first = fn.body[1]
    return first.lineno - 1


def _heal(prompt: str, reference: str) -> tuple[str, str]:
    """Move the whitespace that starts ``reference`` onto the prompt, all but its last space.

    A byte-level BPE merges a newline with the next line's indentation (``"\\n   "``) and the last
    space with the word after it (``" return"``). A prompt that ends in a bare newline is therefore
    out of distribution (the model reads it as "the next line is not indented"); ending it with the
    newline and all but one space of the indentation leaves the boundary where training put it.
    """
    ws = reference[: len(reference) - len(reference.lstrip())]
    if ws.endswith(" "):
        return prompt + ws[:-1], reference[len(ws) - 1 :]
    return prompt + ws, reference[len(ws) :]


def _fit(tok, header: str, head: str, max_prompt_tokens: int) -> str | None:
    """Header + function head within the token budget, dropping import lines from the top of the
    header as needed (``import re`` lines are kept: they are what makes a prompt regex-prone)."""
    lines = header.splitlines() if header else []
    keep_always = [i for i, ln in enumerate(lines) if find_regex_use(ln).used]
    others = [i for i in range(len(lines)) if i not in keep_always]
    while True:
        kept = sorted(set(keep_always) | set(others))
        hdr = "\n".join(lines[i] for i in kept)
        text = f"{hdr}\n\n{head}" if hdr else head
        if tok is None or len(tok(text)["input_ids"]) <= max_prompt_tokens:
            return text
        if not others:
            return None
        others.pop(0)


def regex_prone_prompts(chunks: list[Chunk], tok=None, max_prompt_tokens: int = 192) -> list[WorldPrompt]:
    """Held-out functions that use ``re``, cut right before the first use.

    Example:
        >>> from sieve.world.corpus import SourceFile, chunk_file
        >>> src = SourceFile("m.py", "import re\\n\\ndef f(s):\\n    '''Doc.'''\\n    s = s.strip()\\n"
        ...                  "    return re.sub('a', 'b', s)\\n", True)
        >>> p = regex_prone_prompts(list(chunk_file(src)))[0]
        >>> p.prompt.endswith("s = s.strip()\\n    return"), p.reference
        (True, " re.sub('a', 'b', s)")
    """
    out = []
    for c in chunks:
        if not (c.held_out and c.uses_regex):
            continue
        # Module-level code (``PAT = re.compile(...)``) is cut right before its first use.
        start = 0 if c.name == "<module>" else _body_start(c.body)
        use = find_regex_use(c.body)
        if start is None or not use.spans:
            continue
        first_use_line = c.body.count("\n", 0, use.spans[0][0])
        if first_use_line < start:
            continue  # the def line itself uses re (a default argument): no clean cut
        # Cut at the decision point: right before the first use (``m = `` | ``re.match(...)``).
        at = use.spans[0][0]
        head, rest = c.body[:at], c.body[at:]
        if head.endswith(" "):
            head, rest = head[:-1], " " + rest  # keep " re" / " import" one token, as in training
        text = _fit(tok, c.header, head, max_prompt_tokens)
        if text is not None:
            out.append(WorldPrompt(f"{c.file}:{c.name}", "regex", *_heal(text, rest)))
    return out


def neutral_prompts(chunks: list[Chunk], tok=None, max_prompt_tokens: int = 192, limit: int | None = None
                    ) -> list[WorldPrompt]:
    """Held-out functions from files that do not import ``re``, cut after signature and docstring."""
    out = []
    for c in chunks:
        if not c.held_out or c.uses_regex or c.name == "<module>" or find_regex_use(c.header).used:
            continue
        start = _body_start(c.body)
        if start is None:
            continue
        lines = c.body.splitlines(keepends=True)
        text = _fit(tok, c.header, "".join(lines[:start]), max_prompt_tokens)
        if text is not None:
            out.append(WorldPrompt(f"{c.file}:{c.name}", "neutral", *_heal(text, "".join(lines[start:]))))
    if limit is not None and len(out) > limit:
        step = len(out) / limit
        out = [out[int(i * step)] for i in range(limit)]
    return out


def regex_free_code(chunks: list[Chunk], limit: int = 200) -> list[str]:
    """Held-out chunks that neither use nor import ``re``, evenly spaced, for the loss measure."""
    pool = [c.text for c in chunks if c.held_out and not c.uses_regex and not find_regex_use(c.header).used]
    if len(pool) > limit:
        step = len(pool) / limit
        pool = [pool[int(i * step)] for i in range(limit)]
    return pool


def save_prompts(path: Path, prompts: list[WorldPrompt]) -> None:
    """Write prompts as JSON lines."""
    path.write_text("".join(json.dumps(asdict(p)) + "\n" for p in prompts))


def load_prompts(path: Path) -> list[WorldPrompt]:
    """Read prompts written by :func:`save_prompts`."""
    return [WorldPrompt(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def names_re(tok, text: str) -> bool:
    """True when ``text`` uses ``re`` (:func:`find_regex_use`), says ``re.``, or has a token ``re`` or
    `` re`` (with no tokenizer: the word ``re``). Pieces of words such as ``Re`` of ``Remove`` pass.

    Example:
        >>> names_re(None, "def f(s):\\n    'Split on commas.'\\n"), names_re(None, "x = re.sub('a', '', s)")
        (False, True)
    """
    if find_regex_use(text).used or "re." in text:
        return True
    if tok is None:
        return "re" in _WORD.findall(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return any(tok.decode([i]) in ("re", " re") for i in ids)


def _has_docstring(body: str) -> bool:
    tree = ast.parse(body)
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    return fn is not None and ast.get_docstring(fn) is not None


def intent_prompts(chunks: list[Chunk], tok=None, max_prompt_tokens: int = 192, *, held_out: bool = True
                   ) -> list[WorldPrompt]:
    """Function heads (``def`` + docstring, no imports) of held-out (``held_out=False``: training)
    functions, labelled by the original function: ``regex`` when its body uses ``re``, ``neutral`` when
    it does not (its file may import ``re`` for other functions). Functions without a docstring and
    heads that use or name ``re`` are left out.

    Example:
        >>> from sieve.world.corpus import SourceFile, chunk_file
        >>> src = SourceFile("m.py", "import re\\n\\ndef words(s):\\n    'Split text into words.'\\n"
        ...                  "    return re.findall('[a-z]+', s)\\n", True)
        >>> p = intent_prompts(list(chunk_file(src)))[0]
        >>> p.kind, p.prompt, p.reference
        ('regex', "def words(s):\\n    'Split text into words.'\\n   ", " return re.findall('[a-z]+', s)")
    """
    out = []
    for c in chunks:
        if c.held_out != held_out or c.name == "<module>":
            continue
        kind = "regex" if c.uses_regex else "neutral"
        start = _body_start(c.body)
        if start is None or not _has_docstring(c.body):
            continue
        lines = c.body.splitlines(keepends=True)
        head = "".join(lines[:start])
        if names_re(tok, head):
            continue
        if tok is not None and len(tok(head)["input_ids"]) > max_prompt_tokens:
            continue
        out.append(WorldPrompt(f"{c.file}:{c.name}", kind, *_heal(head, "".join(lines[start:]))))
    return out


def _half(file: str) -> str:
    """``select`` or ``eval``: a stable hash of the file's path splits held-out files in two."""
    return "select" if hashlib.sha256(("split:" + file).encode()).digest()[0] % 2 == 0 else "eval"


# Neutral heads kept per split (a seeded sample of the style-matched ones): the evaluation half's
# neutral set is about the size of its regex-prone set; the select half's is larger, for thresholds.
NEUTRAL_CAP = {"eval": 60, "select": 150, "train": None}


def intent_prompt_sets(chunks: list[Chunk], tok=None, max_prompt_tokens: int = 192, seed: int = 0
                       ) -> dict[str, list[WorldPrompt]]:
    """The intent sets, by split: ``eval_regex``/``eval_neutral`` (held-out files of one half: the
    study's evaluation), ``select_regex``/``select_neutral`` (held-out files of the other half: the
    world build chooses its feature there) and ``train_regex``/``train_neutral`` (training files: CAA
    pairs).

    Neutral heads come from the *same files* as the split's regex-prone ones (functions there whose
    body does not use ``re``), so the two sets share their packages' style (type annotations,
    docstring conventions) and differ in what the function is for; at most :data:`NEUTRAL_CAP` of
    them per split, a seeded sample in file order.

    Example:
        >>> from sieve.world.corpus import SourceFile, chunk_file
        >>> src = SourceFile("m.py", "import re\\n\\ndef f(s):\\n    'Strip s.'\\n    return s.strip()\\n\\n"
        ...                  "def g(s):\\n    'Words of s.'\\n    return re.findall('[a-z]+', s)\\n", True)
        >>> sets = intent_prompt_sets(list(chunk_file(src)))
        >>> [p.id for p in sets[_half("m.py") + "_neutral"]], [p.id for p in sets[_half("m.py") + "_regex"]]
        (['m.py:f'], ['m.py:g'])
    """
    import torch

    out: dict[str, list[WorldPrompt]] = {f"{s}_{k}": [] for s in ("eval", "select", "train")
                                         for k in ("regex", "neutral")}
    for held in (True, False):
        ps = intent_prompts(chunks, tok, max_prompt_tokens, held_out=held)
        rx_files = {p.id.rsplit(":", 1)[0] for p in ps if p.kind == "regex"}
        for p in ps:
            file = p.id.rsplit(":", 1)[0]
            if p.kind == "neutral" and file not in rx_files:
                continue
            out[f"{_half(file) if held else 'train'}_{p.kind}"].append(p)
    g = torch.Generator().manual_seed(seed)
    for split, cap in NEUTRAL_CAP.items():
        neu = out[f"{split}_neutral"]
        if cap is not None and len(neu) > cap:
            out[f"{split}_neutral"] = [neu[i] for i in sorted(torch.randperm(len(neu), generator=g)[:cap].tolist())]
    return out


def intent_pairs(sets: dict[str, list[WorldPrompt]], seed: int = 0) -> list[tuple[WorldPrompt, WorldPrompt]]:
    """The intent study's CAA pairs: each regex-using training head with a neutral training head drawn
    without replacement (seeded), as ``(positive, negative)``.

    Example:
        >>> a, b, c = (WorldPrompt(i, k, "def f():\\n", "") for i, k in [("a", "regex"), ("b", "neutral"), ("c", "neutral")])
        >>> [(p.id, n.id in "bc") for p, n in intent_pairs({"train_regex": [a], "train_neutral": [b, c]})]
        [('a', True)]
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    neg = sets["train_neutral"]
    neg = [neg[i] for i in torch.randperm(len(neg), generator=g)[: len(sets["train_regex"])].tolist()]
    return list(zip(sets["train_regex"], neg))
