"""MMLU accuracy under an intervention, scored from the answer-letter logits in one forward per question.

Data: ``cais/mmlu`` through ``datasets`` (when the hub is reachable or cached), or a local parquet /
JSON / JSON-lines file in the same schema (``question``, ``subject``, ``choices`` [4], ``answer`` 0–3,
optional ``split`` with ``dev`` rows for few-shot examples).

Prompt (the harness's MMLU format): ``The following are multiple choice questions (with answers) about
{subject}.`` + shots + the question, lettered choices and ``Answer:``. For instruct models the text
is one user turn with the chat template and the answer turn pre-filled with ``Answer:``. The predicted
letter is the one whose token (with or without a leading space) has the highest logit at the last
position. Questions run batched; each row carries its intervention, as in generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sieve.errors import NotAvailableOffline, SieveError, first_line, printable
from sieve.generation import steered_logits
from sieve.models import chat_prompt

__all__ = ["Question", "load_mmlu", "load_questions", "format_question", "mmlu_accuracy", "mmlu_accuracy_cells",
           "letter_token_ids"]

LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str
    split: str = "test"


def _rows_to_questions(rows: list[dict[str, Any]], where: str) -> list[Question]:
    out = []
    if not isinstance(rows, list):
        raise SieveError(f"{where}: holds no list of questions (schema: question, subject, choices, answer)")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise SieveError(f"{where}: row {i} is not a question (schema: question, subject, choices, answer)")
        for k in ("question", "choices", "answer"):
            if k not in r:
                raise SieveError(f"{where}: row {i} has no {k!r} (schema: question, subject, choices, answer)")
        ans, choices = r["answer"], r["choices"]
        if isinstance(ans, str) and len(ans) == 1 and ans in LETTERS:
            ans = LETTERS.index(ans)
        if (not isinstance(choices, (list, tuple)) or len(choices) != 4 or isinstance(ans, bool)
                or not isinstance(ans, int) or not 0 <= ans < 4):
            raise SieveError(f"{where}: row {i} needs 4 choices and an answer in 0..3 or A..D, got "
                             f"{printable(repr(ans)[:20])}")
        choices = tuple(str(c) for c in choices)
        out.append(Question(str(r["question"]), choices, ans, str(r.get("subject", "")), str(r.get("split", "test"))))
    return out


def load_questions(path: str | Path, subjects: list[str] | None = None) -> list[Question]:
    """Questions from a local parquet, JSON (a list) or JSON-lines file in the cais/mmlu schema.

    Example:
        >>> qs = load_questions("recipes/data/mmlu_fixture.json")
        >>> len(qs) >= 20 and all(len(q.choices) == 4 for q in qs)
        True
    """
    path = Path(path)
    if not path.is_file():
        raise SieveError(f"MMLU file {path} " + ("is not a file" if path.exists() else "not found"))
    try:
        if path.suffix == ".parquet":
            import polars as pl

            rows = pl.read_parquet(path).to_dicts()
        elif path.suffix == ".json":
            rows = json.loads(path.read_text())
        else:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (ValueError, OSError, UnicodeDecodeError) as e:  # polars' errors are ValueErrors or OSErrors too
        raise SieveError(f"MMLU file {path} cannot be read ({type(e).__name__}: {first_line(e):.200})") from None
    qs = _rows_to_questions(rows, str(path))
    if subjects:
        qs = [q for q in qs if q.subject in subjects]
    return qs


def load_mmlu(recipe: Any) -> list[Question]:
    """The recipe's MMLU questions: its local file, or ``cais/mmlu`` (test split, plus dev for shots)."""
    ev = recipe.eval
    if ev.mmlu_data:
        qs = load_questions(recipe.resolve(ev.mmlu_data), ev.mmlu_subjects or None)
    else:
        try:
            from datasets import load_dataset
        except ImportError as e:  # pragma: no cover
            raise SieveError("datasets is needed to fetch cais/mmlu") from e
        from sieve.evals.task_files import check_hub_id

        check_hub_id("cais/mmlu", "MMLU (eval.mmlu_data empty: the hub's)")
        qs = []
        for subject in ev.mmlu_subjects or ["all"]:
            try:
                for split in ("test", "dev"):
                    ds = load_dataset("cais/mmlu", subject, split=split)
                    qs += _rows_to_questions([{**r, "split": split} for r in ds], f"cais/mmlu/{subject}")
            except (OSError, ConnectionError, ValueError) as e:
                raise NotAvailableOffline(
                    f"cais/mmlu ({subject}) is not on this machine and the hub cannot be reached; download it "
                    "where there is network (`datasets.load_dataset('cais/mmlu', SUBJECT)` then "
                    "`.to_parquet(...)`) and set eval.mmlu_data to that file"
                ) from e
    if ev.mmlu_limit:
        test = [q for q in qs if q.split != "dev"][: ev.mmlu_limit]
        qs = test + [q for q in qs if q.split == "dev"]
    return qs


def format_question(q: Question, shots: list[Question] = (), with_answer: bool = False) -> str:
    """The harness's MMLU text for one question (and its few-shot examples).

    Example:
        >>> print(format_question(Question("2+2?", ("3", "4", "5", "6"), 1, "math")))
        The following are multiple choice questions (with answers) about math.
        <BLANKLINE>
        2+2?
        A. 3
        B. 4
        C. 5
        D. 6
        Answer:
    """
    subj = q.subject.replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subj}.\n\n"

    def one(x: Question, ans: bool) -> str:
        body = x.question.strip() + "\n" + "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(x.choices))
        return body + "Answer:" + (f" {LETTERS[x.answer]}\n\n" if ans else "")

    return head + "".join(one(s, True) for s in shots) + one(q, with_answer)


def letter_token_ids(tokenizer) -> list[list[int]]:
    """For each letter A–D, the single-token ids of ``"A"`` and ``" A"`` (whichever exist)."""
    out = []
    for L in LETTERS:
        ids = set()
        for variant in (L, f" {L}"):
            enc = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(enc[0])
        if not ids:
            raise SieveError(f"the tokenizer has no single token for the answer letter {L!r}")
        out.append(sorted(ids))
    return out


def _texts(tok, questions: list[Question], chat: bool, shots: int) -> tuple[list[str], list[Question]]:
    """The test questions' texts (with ``shots`` dev examples of their subject), and those questions."""
    test = [q for q in questions if q.split != "dev"]
    dev: dict[str, list[Question]] = {}
    for q in questions:
        if q.split == "dev":
            dev.setdefault(q.subject, []).append(q)
    texts = []
    for q in test:
        text = format_question(q, dev.get(q.subject, [])[:shots])
        if chat:
            body, _, _ = text.rpartition("Answer:")
            text = chat_prompt(tok, body.rstrip() + "\nAnswer with the letter only.", prefill="Answer:")
        texts.append(text)
    return texts, test


def _answers(letters: list[list[int]]):
    """A reducer from last-position logits ``[B, V]`` to each row's answer (0-3: the best letter)."""

    def answer(enc, last) -> list[int]:
        scores = torch.stack([last[:, ids].float().max(dim=-1).values for ids in letters], dim=-1)
        return scores.argmax(-1).cpu().tolist()

    return answer


@torch.inference_mode()
def mmlu_accuracy(
    model,
    questions: list[Question],
    intervention: Any,
    *,
    layer_index: int | None = None,
    chat: bool = False,
    shots: int = 0,
    batch_size: int = 16,
) -> list[bool]:
    """Whether each test question is answered right under the intervention (one forward each, batched;
    ``intervention`` is one Intervention, a list or tuple composed on every row, or None).

    Example:
        >>> correct = mmlu_accuracy(model, qs, None, layer_index=2)  # doctest: +SKIP
        >>> sum(correct) / len(correct)  # doctest: +SKIP
    """
    texts, test = _texts(model.tokenizer, questions, chat, shots)
    answer = _answers(letter_token_ids(model.tokenizer))
    out: list[bool] = []
    for i, enc, last in steered_logits(model, texts, intervention if not isinstance(intervention, (list, tuple))
                                       else [list(intervention)] * len(texts), layer_index=layer_index,
                                       batch_size=batch_size, last_only=True):
        out += [p == q.answer for p, q in zip(answer(enc, last), test[i : i + batch_size])]
    return out


def mmlu_accuracy_cells(
    model,
    questions: list[Question],
    cells: list[Any],
    *,
    layer_index: int | None = None,
    chat: bool = False,
    shots: int = 0,
    batch_size: int = 16,
) -> tuple[list[list[bool]], Any]:
    """:func:`mmlu_accuracy` for several cells (each an intervention, a list composed on every row, or
    None) at once, forked (:func:`sieve.fork.forked_forward`): one unsteered forward per batch, and a
    steered one only for the questions a cell's gate edits. Returns per cell the per-question
    correctness, and the :class:`~sieve.fork.ForkSummary` (questions reused).

    Example:
        >>> per_cell, saved = mmlu_accuracy_cells(model, qs, [None, iv], layer_index=2)  # doctest: +SKIP
        >>> saved.texts_reused  # doctest: +SKIP
    """
    from sieve.fork import forked_forward

    texts, test = _texts(model.tokenizer, questions, chat, shots)
    out, summary = forked_forward(model, texts, cells, _answers(letter_token_ids(model.tokenizer)),
                                  layer_index=layer_index, batch_size=batch_size, last_only=True)
    return [[p == q.answer for p, q in zip(preds, test)] for preds in out], summary
