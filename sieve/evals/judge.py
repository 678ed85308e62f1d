"""An optional LLM judge of generated tests (off by default): is the test sensible for the task?

Two back-ends, both judging many tests at once (:meth:`judge_many`):

- ``openai``: any OpenAI-compatible chat endpoint through the ``openai`` client (the ``judge`` extra:
  ``pip install openai``), configured by environment variables ``SIEVE_JUDGE_BASE_URL`` (default
  ``https://api.openai.com/v1``), ``SIEVE_JUDGE_API_KEY`` (or ``OPENAI_API_KEY``), ``SIEVE_JUDGE_MODEL``
  (default ``gpt-4o-mini``, as the study used) and ``SIEVE_JUDGE_CONCURRENCY`` (requests in flight,
  default 8). The client retries rate limits (429), timeouts and server errors with exponential backoff,
  honouring ``Retry-After`` (``SIEVE_JUDGE_MAX_RETRIES``, default 6);
- ``hf``: a local Hugging Face chat model (``eval.judge_model``), greedy, in batches.

The judge is asked for JSON with ``follows_prompt`` (bool), ``sensible`` (bool) and ``explanation``.
An answer that is not such JSON gives ``None`` verdicts; a request that still fails after the retries
gives a verdict with ``failed=True``, never an exception, so a flaky judge loses no finished work —
and :func:`judge_rows` does not store failed verdicts, so the next run (resume) asks again.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from sieve.errors import SieveError

__all__ = ["Verdict", "Judge", "judge_prompt", "parse_verdict", "OpenAIJudge", "HFJudge", "make_judge",
           "judge_rows", "attach_verdicts", "judge_rates"]

log = logging.getLogger("sieve.judge")

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
    """One judgement. ``failed``: the judge could not be asked (after its retries); ask again later."""

    follows_prompt: bool | None
    sensible: bool | None
    explanation: str
    failed: bool = False


class Judge(Protocol):
    """What a judge does: one verdict per (function under test, generated test)."""

    def judge_many(self, items: Sequence[tuple[str, str]], *, progress: bool = False) -> list[Verdict]: ...


def judge_prompt(function: str, test: str) -> str:
    """The judging prompt for one generated test."""
    return _TEMPLATE.format(function=function.strip(), test=test.strip())


def parse_verdict(text: str) -> Verdict:
    """The first JSON object in ``text`` as a verdict; ``None`` fields when it is missing or malformed.

    Example:
        >>> parse_verdict('Sure. {"follows_prompt": true, "sensible": false, "explanation": "no asserts"}')
        Verdict(follows_prompt=True, sensible=False, explanation='no asserts', failed=False)
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


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise SieveError(f"{name}={raw!r} must be a whole number") from None
    if value < 0 or (name.endswith("CONCURRENCY") and value < 1):
        raise SieveError(f"{name}={raw!r} is out of range")
    return value


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint, through the ``openai`` client:
    its retries (429, 408, 409, 5xx, connection errors; exponential backoff, ``Retry-After`` honoured)
    and at most ``concurrency`` requests in flight.

    Example:
        >>> judge = OpenAIJudge(base_url="http://127.0.0.1:8000/v1", model="my-judge")  # doctest: +SKIP
        >>> judge.judge_many([("def f(x): ...", "def test_f(): ...")])  # doctest: +SKIP
        [Verdict(follows_prompt=True, sensible=True, explanation='...', failed=False)]
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0, max_retries: int | None = None, concurrency: int | None = None) -> None:
        try:
            import openai
        except ImportError:
            raise SieveError("eval.judge = 'openai' needs the openai client: pip install openai "
                             "(or the package's [judge] extra)") from None
        self.base_url = (base_url or os.environ.get("SIEVE_JUDGE_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        key = api_key or os.environ.get("SIEVE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY", "")
        if not key and "api.openai.com" in self.base_url:
            raise SieveError("eval.judge = 'openai' needs an API key: set SIEVE_JUDGE_API_KEY or OPENAI_API_KEY "
                             "(or SIEVE_JUDGE_BASE_URL for a local OpenAI-compatible server)")
        self.model = model or os.environ.get("SIEVE_JUDGE_MODEL") or "gpt-4o-mini"
        self.concurrency = concurrency or _env_int("SIEVE_JUDGE_CONCURRENCY", 8)
        retries = max_retries if max_retries is not None else _env_int("SIEVE_JUDGE_MAX_RETRIES", 6)
        # A local server needs no key; the client insists on a non-empty one.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key or "none", timeout=timeout_s,
                                    max_retries=retries)
        self._errors = (openai.APIError,)

    def __call__(self, function: str, test: str) -> Verdict:
        try:
            resp = self.client.chat.completions.create(
                model=self.model, temperature=0,
                messages=[{"role": "user", "content": judge_prompt(function, test)}],
            )
            return parse_verdict(resp.choices[0].message.content or "")
        except self._errors as e:
            return Verdict(None, None, f"judge unavailable: {e.__class__.__name__}: {e}"[:500], failed=True)
        except (IndexError, AttributeError) as e:
            return Verdict(None, None, f"judge answered without a message: {e}"[:500], failed=True)

    def judge_many(self, items: Sequence[tuple[str, str]], *, progress: bool = False) -> list[Verdict]:
        """One verdict per item, in order, at most ``concurrency`` requests in flight."""
        from tqdm.std import tqdm

        out: list[Verdict] = []
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool, \
                tqdm(total=len(items), desc="judge", unit="test", disable=not progress) as bar:
            for v in pool.map(lambda it: self(*it), items):
                out.append(v)
                bar.update(1)
        return out


class HFJudge:
    """A judge run locally: a chat model from the hub or a local directory, greedy, in batches.

    Example:
        >>> judge = HFJudge("Qwen/Qwen2.5-1.5B-Instruct", batch_size=16)  # doctest: +SKIP
        >>> judge.judge_many([("def f(x): ...", "def test_f(): ...")])[0].failed  # doctest: +SKIP
        False
    """

    def __init__(self, source: Any, max_new_tokens: int = 160, batch_size: int | None = None, *,
                 lazy: bool = False) -> None:
        from sieve.models import _resolve_config, load_model

        self.source = source
        self.revision: str | None = None  # the hub commit to load, where a run recorded one
        self._model = None
        if isinstance(source, (str, os.PathLike)):
            if lazy:  # loaded at its first use; a missing folder or an uncached hub id fails now
                _resolve_config(source, None)
            else:
                self._model = load_model(source)
        else:
            self._model = source
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @property
    def model(self) -> Any:
        """The judge's model (loaded here, the first time, where the judge was made ``lazy``)."""
        if self._model is None:
            from sieve.models import load_model

            self._model = load_model(self.source, revision=self.revision)
        return self._model

    def __call__(self, function: str, test: str) -> Verdict:
        return self.judge_many([(function, test)])[0]

    def judge_many(self, items: Sequence[tuple[str, str]], *, progress: bool = False) -> list[Verdict]:
        """One verdict per item, in order: all prompts through one batched, greedy ``generate``."""
        from sieve.generation import generate
        from sieve.models import chat_prompt

        if not items:
            return []
        prompts = [chat_prompt(self.model.tokenizer, judge_prompt(f, t)) for f, t in items]
        outs = generate(self.model, prompts, None, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size, progress=progress)
        return [parse_verdict(o.text) for o in outs]


def make_judge(kind: str, model: str = "", *, lazy: bool = False) -> Judge | None:
    """The judge for ``eval.judge`` (``off`` gives None); configuration errors surface here, before any
    generation. ``lazy``: a local judge model is loaded at its first use, not here.

    Example:
        >>> make_judge("off") is None
        True
    """
    if kind == "off":
        return None
    if kind == "openai":
        return OpenAIJudge(model=model or None)
    if kind == "hf":
        if not model:
            raise SieveError("eval.judge = 'hf' needs eval.judge_model (a hub id or local directory)")
        return HFJudge(model, lazy=lazy)
    raise SieveError(f"unknown judge {kind!r}; allowed: off, openai, hf")


def judge_rows(judge: Judge, rows: Sequence[dict[str, Any]], store: Any, *, progress: bool = False,
               chunk: int = 64) -> tuple[int, int]:
    """Judge the generated tests in ``rows`` not yet judged in ``store``; store the verdicts that came.

    ``rows`` carry ``key``, ``function`` (the code under test) and ``code`` (the generated test).
    Answers are appended per chunk (a crash loses at most one chunk); failed verdicts are not stored,
    so a later call — the next run of the same recipe — asks again. Returns (judged now, failed now).

    Example:
        >>> judge_rows(make_judge("openai"), rows, ResultStore(out / "judge"))  # doctest: +SKIP
        (240, 0)
    """
    from tqdm.std import tqdm

    done = store.done_keys()
    todo = [r for r in rows if r["key"] not in done]
    judged = failed = 0
    with tqdm(total=len(todo), desc="judge", unit="test", disable=not progress or not todo) as bar:
        for i in range(0, len(todo), chunk):
            part = todo[i: i + chunk]
            verdicts = judge.judge_many([(r["function"], r["code"]) for r in part])
            keep = [{"key": r["key"], "judge_follows": v.follows_prompt, "judge_sensible": v.sensible,
                     "judge_explanation": v.explanation} for r, v in zip(part, verdicts) if not v.failed]
            store.append(keep)
            judged += len(keep)
            failed += len(part) - len(keep)
            bar.update(len(part))
    if failed:
        log.warning("judge: %d of %d tests could not be judged (the endpoint kept failing); run the same "
                    "command again to retry them", failed, len(todo))
    return judged, failed


def attach_verdicts(gen: Any, verdicts: Any) -> Any:
    """``gen`` (the generation table) with the judge's stored verdicts (``judge_follows``,
    ``judge_sensible``, ``judge_explanation``) joined by row key; rows not judged (yet) get nulls.

    Example:
        >>> import polars as pl
        >>> gen = pl.DataFrame({"key": ["a", "b"], "judge_follows": [None, None]})
        >>> v = pl.DataFrame({"key": ["b"], "judge_follows": [True], "judge_sensible": [False],
        ...                   "judge_explanation": ["ok"]})
        >>> attach_verdicts(gen, v)["judge_follows"].to_list()
        [None, True]
    """
    import polars as pl

    if verdicts is None or not verdicts.height:
        return gen
    cols = ["judge_follows", "judge_sensible", "judge_explanation"]
    return gen.drop([c for c in cols if c in gen.columns]).join(
        verdicts.select(["key", *[c for c in cols if c in verdicts.columns]]), on="key", how="left"
    ).with_columns([pl.col(c).cast(pl.Boolean) for c in ("judge_follows", "judge_sensible")])


def judge_rates(gen: Any) -> Any:
    """Per (method, scale) on the regex-prone set: how many tests were judged, and the shares judged to
    follow the prompt and to be sensible, with Wilson 95% intervals (over the judged tests). None when
    nothing was judged.

    Example:
        >>> import polars as pl
        >>> gen = pl.DataFrame({"set": ["regex"] * 3, "method": ["m"] * 3, "scale": [1.0] * 3,
        ...                     "judge_follows": [True, False, None], "judge_sensible": [True, True, None]})
        >>> judge_rates(gen).select("judged", "judge_follows_rate").row(0)
        (2, 0.5)
    """
    import polars as pl

    from sieve.evals.metrics import wilson

    if "judge_follows" not in gen.columns or gen["judge_follows"].drop_nulls().len() == 0:
        return None
    rows = []
    for (method, scale), grp in gen.filter(pl.col("set") == "regex").group_by(["method", "scale"], maintain_order=True):
        row: dict[str, Any] = {"method": method, "scale": scale}
        for col in ("judge_follows", "judge_sensible"):
            vals = [bool(v) for v in grp[col].to_list() if v is not None]
            k, n = sum(vals), len(vals)
            lo, hi = wilson(k, n)
            row.update({f"{col}_rate": k / n if n else None, f"{col}_lo": lo if n else None,
                        f"{col}_hi": hi if n else None})
            row["judged"] = n if col == "judge_follows" else row["judged"]
        rows.append(row)
    return pl.DataFrame(rows)
