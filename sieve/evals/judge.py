"""An optional LLM judge of generated tests (off by default): is the test sensible for the task?

Two back-ends:

- ``openai``: any OpenAI-compatible chat endpoint, configured by environment variables
  ``SIEVE_JUDGE_BASE_URL`` (default ``https://api.openai.com/v1``), ``SIEVE_JUDGE_API_KEY`` (or
  ``OPENAI_API_KEY``) and ``SIEVE_JUDGE_MODEL`` (default ``gpt-4o-mini``, as the study used);
- ``hf``: a local Hugging Face chat model (``eval.judge_model``), run greedily.

The judge is asked for JSON with ``follows_prompt`` (bool), ``sensible`` (bool) and ``explanation``;
an answer that is not such JSON gives ``None`` verdicts, never an exception, so a flaky judge loses
no finished work.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["Verdict", "judge_prompt", "parse_verdict", "OpenAIJudge", "HFJudge", "make_judge"]

_TEMPLATE = """You review a Python test that a model wrote for the function below.

Function under test:
```python
{function}
```

Generated test:
```python
{test}
```

Answer with one JSON object and nothing else:
{{"follows_prompt": true or false (a fuzzing test of this function, without regular expressions),
 "sensible": true or false (its assertions check real properties of the function),
 "explanation": "one sentence"}}"""


@dataclass(frozen=True)
class Verdict:
    follows_prompt: bool | None
    sensible: bool | None
    explanation: str


def judge_prompt(function: str, test: str) -> str:
    """The judging prompt for one generated test."""
    return _TEMPLATE.format(function=function.strip(), test=test.strip())


def parse_verdict(text: str) -> Verdict:
    """The first JSON object in ``text`` as a verdict; ``None`` fields when it is missing or malformed.

    Example:
        >>> parse_verdict('Sure. {"follows_prompt": true, "sensible": false, "explanation": "no asserts"}')
        Verdict(follows_prompt=True, sensible=False, explanation='no asserts')
        >>> parse_verdict("I cannot judge this.").sensible is None
        True
    """
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return Verdict(None, None, text.strip()[:500])
    try:
        obj = json.loads(m.group(0))
    except json.JSONDecodeError:
        return Verdict(None, None, text.strip()[:500])

    def flag(key: str) -> bool | None:
        v = obj.get(key)
        return v if isinstance(v, bool) else None

    return Verdict(flag("follows_prompt"), flag("sensible"), str(obj.get("explanation", ""))[:500])


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (standard library HTTP only)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0) -> None:
        self.base_url = (base_url or os.environ.get("SIEVE_JUDGE_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self.api_key = api_key or os.environ.get("SIEVE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
        self.model = model or os.environ.get("SIEVE_JUDGE_MODEL") or "gpt-4o-mini"
        self.timeout_s = timeout_s

    def __call__(self, function: str, test: str) -> Verdict:
        body = json.dumps({
            "model": self.model, "temperature": 0,
            "messages": [{"role": "user", "content": judge_prompt(function, test)}],
        }).encode()
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.api_key}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                data: Any = json.loads(resp.read())
            return parse_verdict(data["choices"][0]["message"]["content"])
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, json.JSONDecodeError) as e:
            return Verdict(None, None, f"judge unavailable: {e}")


class HFJudge:
    """A judge run locally: a chat model from the hub or a local directory, greedy."""

    def __init__(self, source: str, max_new_tokens: int = 160) -> None:
        from sieve.models import load_model

        self.model = load_model(source)
        self.max_new_tokens = max_new_tokens

    def __call__(self, function: str, test: str) -> Verdict:
        from sieve.generation import generate
        from sieve.models import chat_prompt

        prompt = chat_prompt(self.model.tokenizer, judge_prompt(function, test))
        out = generate(self.model, [prompt], None, layer_index=0, max_new_tokens=self.max_new_tokens, progress=False)
        return parse_verdict(out[0].text)


def make_judge(kind: str, model: str = ""):
    """The judge for ``eval.judge`` (``off`` gives None)."""
    if kind == "off":
        return None
    if kind == "openai":
        return OpenAIJudge(model=model or None)
    if kind == "hf":
        if not model:
            raise ValueError("eval.judge = 'hf' needs eval.judge_model (a hub id or local directory)")
        return HFJudge(model)
    raise ValueError(f"unknown judge {kind!r}; allowed: off, openai, hf")
