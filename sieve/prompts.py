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
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sieve.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Prompt", "PromptSets", "load_prompt_sets", "WORLD_PROMPTS_DIR"]

WORLD_PROMPTS_DIR = Path(__file__).parent / "world" / "data" / "prompts"


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
    regex: list[Prompt]
    neutral: list[Prompt]
    code: list[str]
    contrastive: tuple[list[str], list[str]]
    calibration: list[str]
    probe_texts: list[str] = field(default_factory=list)
    probe_generation_prompts: tuple[list[str], list[str]] = field(default_factory=lambda: ([], []))

    def probe_data(self, model: Any, recipe: Any) -> tuple[list[str], list[torch.Tensor]]:
        """Texts and per-token labels (``[T]`` bool over the text's tokens, BOS dropped) for the probe."""
        from sieve.evals.ability import char_spans_to_tokens
        from sieve.evals.regex_use import find_regex_use

        tok = model.tokenizer
        if recipe.probe.data == "spans":
            labels = [char_spans_to_tokens(tok, t, find_regex_use(t).spans)[1:] for t in self.probe_texts]
            return self.probe_texts, labels
        # The study's way: sample from the contrastive prompts, label generated tokens by polarity.
        from sieve.generation import generate

        pos, neg = self.probe_generation_prompts
        texts, labels = [], []
        for polarity, prompts in ((True, pos), (False, neg)):
            rows = [p for p in prompts for _ in range(recipe.probe.samples)]
            outs = generate(model, rows, None, layer_index=recipe.sae.layer,
                            max_new_tokens=recipe.probe.max_new_tokens, temperature=1.0,
                            seeds=[recipe.probe.seed * 100_003 + i for i in range(len(rows))], progress=False)
            for o in outs:
                text = o.text
                n = len(tok(text)["input_ids"]) - 1
                texts.append(text)
                labels.append(torch.full((max(n, 0),), polarity, dtype=torch.bool))
        return texts, labels


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
    regex = [Prompt(p["id"], p["prompt"], "regex", reference=p["reference"]) for p in _read_jsonl(d / "regex.jsonl")]
    neutral = [Prompt(p["id"], p["prompt"], "neutral", reference=p["reference"])
               for p in _read_jsonl(d / "neutral.jsonl")]
    code = [p["text"] for p in _read_jsonl(d / "code.jsonl")]
    pairs = _read_jsonl(d / "contrastive.jsonl")
    probe = [p["text"] for p in _read_jsonl(d / "probe.jsonl")]
    return PromptSets(
        regex=_limit(regex, r.prompts.regex_limit),
        neutral=_limit(neutral, r.prompts.neutral_limit),
        code=_limit(code, r.prompts.code_limit),
        contrastive=([p["positive"] for p in pairs], [p["negative"] for p in pairs]),
        calibration=[p.text for p in regex],
        probe_texts=probe,
        probe_generation_prompts=([p["positive"] for p in pairs], [p["negative"] for p in pairs]),
    )


def _task_sets(r: Any, tokenizer: Any) -> PromptSets:
    from sieve.models import chat_prompt

    path = r.resolve(r.prompts.source)
    if not path.exists():
        raise RecipeError(r.path or "<recipe>", "prompts.source", f"prompt file {path} not found")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(path, "-", f"is not valid TOML: {e}") from e
    for key in ("instruction", "prefill", "function", "neutral", "contrastive"):
        if key not in spec:
            raise RecipeError(path, key, "is required in a prompts file")
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
    """The recipe's prompt sets (see the module docstring)."""
    if recipe.prompts.source == "world":
        return _world_sets(recipe)
    return _task_sets(recipe, tokenizer)
