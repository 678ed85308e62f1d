"""Prompt gates: a gate decided from the prompt's text before the model runs, such as the lexical
baseline of the regex study (steer only where the task's words say "regex").

A :class:`PromptGate` opens for a row when the prompt text contains one of its words (whole words,
case-insensitive; identifiers are split at ``_`` and camelCase, so ``parse_header`` and
``extractEmails`` count) or one of its phrases. A method with a prompt gate edits every real token of
the rows whose gate opened (as an ``input`` latch that fired on the first token: the decision reads the
whole prompt) and leaves the other rows unsteered.

:data:`REGEX_WORDS` is the lexical baseline's list, fixed a priori from the words a task that invites a
regular expression is usually described with, not tuned on any result: *regex*, *regexp*, *regular
expression*, *pattern*, *match*, *parse*, *extract* and their inflections. ``re`` itself is not in it
(the intent study's prompts contain no ``re``; a gate on ``import re`` is the lexical contrast the
feature is compared with, not a baseline for intent).

Every caller sees the same decision: :func:`sieve.generation.generate` resolves prompt gates on the
prompt text as given; a :class:`~sieve.interventions.Steerer` built with a prompt encoding resolves any
left on the decoded prompt (``steered_logprobs``, MMLU, lm-eval generation); the lm-eval adapter's
log-likelihoods decide them on the context each answer is scored after, never on the answer (a
rolling perplexity window, which has no prompt, on its whole text).

Example:
    >>> LEXICAL_REGEX.match("def parse_header(line):\\n    # Split a header line.\\n")
    'parse'
    >>> LEXICAL_REGEX.match("def mean(xs):\\n    return sum(xs) / len(xs)\\n") is None
    True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PromptGate", "REGEX_WORDS", "REGEX_PHRASES", "LEXICAL_REGEX", "open_prompt_gates", "prompt_gate_of"]

REGEX_WORDS: tuple[str, ...] = (
    "regex", "regexes", "regexp", "regexps",
    "pattern", "patterns",
    "match", "matches", "matched", "matching",
    "parse", "parses", "parsed", "parser", "parsers", "parsing",
    "extract", "extracts", "extracted", "extracting", "extraction", "extractor",
)
REGEX_PHRASES: tuple[tuple[str, ...], ...] = (("regular", "expression"), ("regular", "expressions"))

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")  # words, identifiers split at _ and camelCase


@dataclass(frozen=True)
class PromptGate:
    """Opens for a prompt whose text contains one of ``words`` or ``phrases`` (whole words, any case).

    Example:
        >>> g = PromptGate("colour", words=("colour", "color"))
        >>> g.opens("def set_color(rgb):"), g.opens("def recolour(x):")
        (True, False)
    """

    name: str
    words: tuple[str, ...] = ()
    phrases: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "words", tuple(w.lower() for w in self.words))
        object.__setattr__(self, "phrases", tuple(tuple(w.lower() for w in p) for p in self.phrases))

    def match(self, text: str) -> str | None:
        """The first word or phrase of the gate found in ``text`` (None: the gate stays closed)."""
        toks = [t.lower() for t in _WORD.findall(text)]
        vocab = set(self.words)
        for i, t in enumerate(toks):
            if t in vocab:
                return t
            for p in self.phrases:
                if tuple(toks[i : i + len(p)]) == p:
                    return " ".join(p)
        return None

    def opens(self, text: str) -> bool:
        return self.match(text) is not None


LEXICAL_REGEX = PromptGate("lexical-regex", words=REGEX_WORDS, phrases=REGEX_PHRASES)


def prompt_gate_of(intervention: Any) -> PromptGate | None:
    """The prompt gate an intervention carries (in its ``meta``), if any."""
    if intervention is None:
        return None
    gate = intervention.meta.get("prompt_gate") if isinstance(intervention.meta, dict) else None
    return gate if isinstance(gate, PromptGate) else None


def open_prompt_gates(interventions: Sequence[Any], texts: Sequence[str],
                      memo: dict[int, Any] | None = None) -> tuple[list[Any], list[bool | None]]:
    """Resolve prompt gates row by row: a row whose gate opens keeps its intervention (without the gate,
    so it is not decided again), a row whose gate stays closed gets None (unsteered). Also returns, per
    row, whether its gate opened (None: no prompt gate).

    Example:
        >>> import torch
        >>> from sieve.interventions import Edit, Intervention
        >>> iv = Intervention("always", Edit("add", torch.ones(2), -1.0), meta={"prompt_gate": LEXICAL_REGEX})
        >>> ivs, opened = open_prompt_gates([iv, iv, None], ["def match_all(s):", "def mean(xs):", "x"])
        >>> [v is not None for v in ivs], opened
        ([True, False, False], [True, False, None])
    """
    if len(interventions) != len(texts):
        raise ValueError(f"{len(interventions)} interventions for {len(texts)} prompts")
    out: list[Any] = []
    opened: list[bool | None] = []
    # One opened intervention per gated one (``memo`` carries them across calls): rows that share an
    # intervention still share one, and so their prefill (sieve.generation).
    resolved: dict[int, Any] = memo if memo is not None else {}
    for iv, text in zip(interventions, texts):
        gate = prompt_gate_of(iv)
        if gate is None:
            out.append(iv)
            opened.append(None)
            continue
        ok = gate.opens(text)
        if ok and id(iv) not in resolved:
            meta = {k: v for k, v in iv.meta.items() if k != "prompt_gate"}
            resolved[id(iv)] = dataclasses.replace(iv, meta={**meta, "prompt_gate_opened": gate.name})
        out.append(resolved[id(iv)] if ok else None)
        opened.append(ok)
    return out, opened
