"""lm-evaluation-harness under sieve's interventions: every harness task, under any method and scale.

``SteeredLM`` is lm-eval's ``HFLM`` whose two model calls run inside nnsight traces with one
intervention on every row: ``_model_call`` (log-likelihoods: one ``model.trace`` per batch) and
``_model_generate`` (``generate_until``: one ``model.generate`` trace, edited at the prefill and at
every decode step). Gates work as in sieve's own generation: a ``token`` gate edits where the detector
fires, an ``input`` gate latches per row from its first firing token on. Padding and a leading BOS
never fire a gate: generation batches are left-padded and carry their attention mask; log-likelihood
batches are right-padded with token 0 and no mask, so the adapter takes each row's length from where
the harness pads (a right-padded position cannot change a real one's logits through causal attention
and the causal latch, but it would be counted as a firing).

It is registered as the harness model ``sieve``. lm-eval has no plugin hook for outside models, so
its own ``lm_eval`` command only sees ``sieve`` once this module is imported; ``python -m
sieve.evals.lmeval`` (console script ``sieve-lm-eval``) is the ``lm_eval`` command with it registered::

    sieve-lm-eval --model sieve --model_args recipe=recipes/regex.toml,method=conditional_per_input,scale=-20 \\
        --tasks mmlu --batch_size 16

and from Python::

    import lm_eval
    from sieve.evals.lmeval import SteeredLM
    lm = SteeredLM(model=w.model, intervention=iv, layer=w.layer, batch_size=8)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

Several cells (methods × scales) on the same tasks: :func:`run_harness_cells` does only the work the
gates cause. One unsteered harness run records, for every sequence the model scores or generates, the
outputs of the layers the cells read, and replays each cell's interventions over them; a request a
cell's gate never edits gets the unsteered answer (its log-likelihood, its generated text), and each
cell's own run goes to the model only with the requests its gate edits::

    outs, saved = run_harness_cells(w.model, [None, iv_a, iv_b], ["mmlu"], layer=w.layer)
    print(saved)  # requests × steered cells, and how many got the unsteered answer

Needs the ``lmeval`` extra (``pip install -e ".[lmeval]"`` in a clone).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sieve.errors import SieveError, printable
from sieve.evals.task_files import (
    TextEvaluated,
    check_hub_id,
    check_task_names,
    data_tasks,
    hub_datasets_checked,
    no_text_evaluation,
    sandboxed_templates,
)
from sieve.fork import ForkSummary, _always, _layers, first_edits
from sieve.generation import _Record
from sieve.interventions import Intervention, Row, Steerer, as_rows
from sieve.models import layer as layer_of
from sieve.models import underlying

try:
    import lm_eval.models.huggingface as _hf
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils_hf import stop_sequences_criteria
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise SieveError(
        "sieve.evals.lmeval needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13,<0.5' (or this package's "
        f"[lmeval] extra) ({e})"
    ) from e

__all__ = ["SteeredLM", "GateCounts", "harness_tasks", "run_harness", "run_harness_cells", "task_manager", "main"]


class GateCounts:
    """What the intervention did over the harness's forwards: rows (one per scored or generated
    sequence the model ran), real input tokens (a generation's prompt; its generated tokens are not
    in ``tokens``), tokens where the detector fired and tokens edited (inputs and generated tokens up
    to the row's stop: a stop string, or any EOS of the generation config), and rows with at least
    one edit.

    Example:
        >>> c = GateCounts(); c.rows, c.rows_edited
        (0, 0)
    """

    def __init__(self) -> None:
        self.rows = self.rows_fired = self.rows_edited = 0
        self.tokens = self.tokens_fired = self.tokens_edited = 0

    def add(self, steer: Steerer, real_tokens: Tensor) -> None:
        s = {k: v.cpu() for k, v in steer.stats.items()}
        fired = s["prompt_fired"] + s["gen_fired"]
        edited = s["prompt_edited"] + s["gen_edited"]
        self.rows += int(fired.shape[0])
        self.rows_fired += int((fired > 0).sum())
        self.rows_edited += int((edited > 0).sum())
        self.tokens += int(real_tokens.sum())
        self.tokens_fired += int(fired.sum())
        self.tokens_edited += int(edited.sum())

    def add_reused(self, fired: int, tokens: int) -> None:
        """One row that an intervention did not edit and whose answer was reused (:func:`run_harness_cells`):
        counted as the row's own forward would count it."""
        self.rows += 1
        self.rows_fired += int(fired > 0)
        self.tokens += int(tokens)
        self.tokens_fired += int(fired)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _value(v: Any) -> float | list[float]:
    """A per-document metric value: a number, or the pair a corpus-level aggregation combines."""
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)


def _key(tokens: Any) -> bytes:
    """A short key for a token sequence (a list or a 1-d tensor): the keys of a whole benchmark's
    sequences stay small."""
    a = np.asarray(tokens.cpu() if isinstance(tokens, Tensor) else tokens, dtype=np.int64)
    return hashlib.blake2b(a.tobytes(), digest_size=16).digest()


def _gen_key(context: str, gen_kwargs: Any) -> tuple[str, Any]:
    """A generation request's key: its context, and its generation kwargs as the harness's
    ``Collator`` groups them (so ``until: "\\n"`` and ``["\\n"]``, or ``temperature`` 0 and 0.0, are
    one group here as there, and the unsteered run batches requests as each cell's full run would)."""
    try:
        group = tuple((k, tuple(v) if isinstance(v, Iterable) else v) for k, v in sorted(gen_kwargs.items()))
        hash(group)
    except (TypeError, AttributeError):
        group = tuple(gen_kwargs)
    return context, group


class _Fork:
    """What the unsteered run of :func:`run_harness_cells` leaves for the cells' runs. ``marks``: per
    log-likelihood input row and the place its context ends, and per greedy generation request
    (context, kwargs group), the row's real tokens and each cell's tokens fired and edited on it
    (None: an ``always`` gate, edited everywhere, not replayed). ``answers``: the unsteered answers,
    per harness call and request, with the request's content to check them against."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.layers = tuple(sorted({L for c in self.replayable() for L in _layers(rows[c])}))
        self.marks: dict[Any, tuple[int, list[tuple[int, int] | None]]] = {}
        self.answers: dict[Any, Any] = {}
        self.summary = ForkSummary()

    def replayable(self) -> list[int]:
        """The cells whose gates a replay decides (the others edit from the first token, or not at all)."""
        return [c for c, r in enumerate(self.rows)
                if r and (not _always(r) or any("prompt_gate" in iv.meta for iv in r))]

    def note(self, keys: list[Any], tokens: list[int], steers: dict[int, Steerer]) -> None:
        """Each cell's detector firings and edits on rows ``keys`` (one per batch row) as its own run
        counts them, from ``steers`` (per replayable cell, replayed over the batch)."""
        counts = {c: s.counts() for c, s in steers.items()}
        for b, key in enumerate(keys):
            per_cell: list[tuple[int, int] | None] = []
            for c, r in enumerate(self.rows):
                if c in counts:
                    k = counts[c]
                    per_cell.append((k["prompt_fired"][b] + k["gen_fired"][b], k["prompt_edited"][b] + k["gen_edited"][b]))
                else:
                    per_cell.append((0, 0) if not r else None)
            self.marks[key] = (tokens[b], per_cell)

    def reusable(self, key: Any, cell: int) -> tuple[int, int] | None:
        """(tokens fired, real tokens) of a row that ``cell`` never edits; None where the cell's own run
        must compute it (the cell edits it, carries an ``always`` gate, or the row was not recorded)."""
        m = self.marks.get(key)
        if m is None or m[1][cell] is None or m[1][cell][1]:
            return None
        return m[1][cell][0], m[0]


@register_model("sieve")
class SteeredLM(HFLM):
    """lm-eval's ``HFLM`` with one sieve intervention on every row (None: unsteered, through the same
    traces).

    Built from a recipe (what ``--model_args recipe=…,method=…,scale=…`` does: the recipe's model,
    layer and detectors, then ``build(method, parts, scale)``) or from a loaded nnsight model, an
    intervention and its layer. Other keyword arguments go to ``HFLM`` (``batch_size``,
    ``max_length``, ``add_bos_token``, ...).

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> lm = SteeredLM(model=w.model, intervention=None, layer=w.layer, batch_size=4)
        >>> [round(ll, 3) for ll, _ in lm.loglikelihood_from_strings([("def f(x):\\n    return", " x")])]  # doctest: +SKIP
    """

    def __init__(
        self,
        recipe: str | Path | None = None,
        method: str = "unsteered",
        scale: float | str | None = None,
        *,
        model: Any = None,
        intervention: Intervention | None = None,
        layer: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "pretrained" in kwargs:
            raise SieveError("the sieve model takes its model from the recipe (recipe=FILE), not pretrained=")
        device = kwargs.pop("device", None)
        if _CLI.get("device") is False:  # lm_eval's own default ("cuda:0"), which the command line did not give
            device = None
        if recipe is not None:
            if model is not None:
                raise SieveError("give either recipe=FILE or model=, not both")
            model, intervention, layer = _from_recipe(recipe, method, scale, device)
        elif model is None:
            raise SieveError(
                "the sieve model needs a recipe: --model_args recipe=FILE,method=NAME,scale=VALUE "
                "(or, in Python, SteeredLM(model=..., intervention=..., layer=...))"
            )
        elif device is not None and not _same_device(device, on := next(underlying(model).parameters()).device):
            raise SieveError(f"device={device!r}, but the model given is on {on}: place the model there first")
        if layer is None:
            raise SieveError("SteeredLM needs layer= (the decoder layer the intervention edits)")
        self.steered_model = model
        self.intervention = intervention
        self.layer_index = int(layer)
        layer_of(model, self.layer_index)  # range check with a clear error
        self.gate_counts = GateCounts()
        self._row_lengths: list[list[int]] = []
        self._rows_ahead: deque[tuple[bytes, int]] = deque()  # while scoring: the rows still to come
        self._calls = 0  # harness calls so far (run_harness_cells: answers are kept per call and request)
        self._rescore_bs: int | None = None  # batch_size="auto": the size requests scored again use
        # run_harness_cells: the shared record, and this run's cell in it (None: the unsteered run)
        self._fork: _Fork | None = None
        self._fork_cell: int | None = None
        self._contexts: list[str] = []  # the context strings of the batch being encoded for generation
        self._gen_kwargs: Any = ()  # the generation kwargs group being generated (the unsteered run)
        kwargs.setdefault("batch_size", 8)
        super().__init__(pretrained=underlying(model), tokenizer=model.tokenizer, **kwargs)
        if self.backend != "causal":
            raise SieveError("sieve's lm-eval model runs decoder-only (causal) models only")

    # -- log-likelihoods ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        f, cell = self._fork, self._fork_cell
        if f is not None:
            self._calls += 1  # the harness calls in the same order in every cell's run
        if f is not None and cell is not None:
            return self._loglikelihood_forked(requests, disable_tqdm, override_bs)
        out = self._scored(requests, disable_tqdm, override_bs)
        if f is not None:  # the unsteered run of run_harness_cells: keep its answers, request by request
            for i, ((_, ctx, cont), ans) in enumerate(zip(requests, out)):
                f.answers[("ll", self._calls, i)] = (_key([*ctx, -1, *cont]), ans)
        return out

    @property
    def _grouped(self) -> bool:
        """Whether the harness scores requests with the same context and continuation but the last
        token in one row (``logits_cache``)."""
        return self.backend == "causal" and self.logits_cache

    def _row(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The row the harness scores a request in: context and continuation but the last token,
        left-truncated to the window (for a continuation the tokenizer merged into the context, the
        row of its group)."""
        return (ctx + cont[:-1])[-self.max_length:]

    def _request_contexts(self, requests) -> list[int]:
        """Per request, where the context ends in the row the harness scores it in: prompt gates decide
        on the context, never on the answer. Requests the harness scores in one row (``logits_cache``:
        the same context and continuation but the last token) take the shortest of their contexts. A
        rolling window (no request string: a perplexity's document) is all text, as in the held-out
        loss, where the gate reads the whole text."""
        own = []
        for req, ctx, cont in requests:
            n = len(self._row(ctx, cont))
            own.append(n if req is None else max(0, min(n, n - (len(cont) - 1))))
        if not self._grouped:
            return own
        groups = [_key([*ctx, *cont[:-1]]) for _, ctx, cont in requests]
        shortest: dict[bytes, int] = {}
        for g, n in zip(groups, own):
            shortest[g] = min(shortest.get(g, n), n)
        return [shortest[g] for g in groups]

    def _row_order(self, requests, contexts: list[int]) -> deque[tuple[bytes, int]]:
        """The rows the harness will feed the model, in its order (its own ``Collator``, built as
        ``HFLM._loglikelihood_tokens`` builds it), each as (row key, where its context ends)."""
        from lm_eval.models.utils import Collator

        where = {id(r): i for i, r in enumerate(requests)}
        order = Collator(list(requests), sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                         group_by="contexts" if self._grouped else None,
                         group_fn=lambda r: r[-2] + r[-1][:-1])
        rows: deque[tuple[bytes, int]] = deque()
        for chunk in order.get_batched(n=1):
            for r in chunk:
                i = where[id(r)]
                _, ctx, cont = requests[i]
                rows.append((_key(self._row(ctx, cont)), contexts[i]))
        return rows

    def _scored(self, requests, disable_tqdm: bool, override_bs: int | None):
        self._rows_ahead = self._row_order(requests, self._request_contexts(requests))
        with _recording_right_padding(self._row_lengths):
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._row_lengths.clear()
                self._rows_ahead.clear()

    def _gated_rows(self, rows: list[Any], inps: Tensor, contexts: list[int] | None) -> list[Any]:
        """``rows`` (one per batch row) with their prompt gates decided on each row's context (its first
        ``contexts[b]`` tokens), the text before the answer it scores (a prompt gate reading the answer
        would steer one choice and not the others); as given where no row has a prompt gate."""
        from sieve.interventions import resolve_prompt_gates
        from sieve.prompt_gates import prompt_gate_of

        bound = as_rows(rows, len(rows), self.layer_index)
        if contexts is None or not any(prompt_gate_of(iv) is not None for r in bound for iv in r):
            return rows
        texts = [self.tokenizer.decode(inps[b, :n].tolist(), skip_special_tokens=True) for b, n in enumerate(contexts)]
        return resolve_prompt_gates(bound, texts)[0]

    def _loglikelihood_forked(self, requests, disable_tqdm: bool, override_bs: int | None):
        """A cell's run in :func:`run_harness_cells`: requests whose input row the cell's gate never
        edits get the unsteered answer; the others are scored under the intervention. A request's input
        row is the harness's own (context and continuation but its last token, left-truncated to the
        context window); requests the harness scores in one row (``logits_cache``: the same context
        and continuation but the last token) are counted as one row, as the harness's own run counts."""
        f, cell = self._fork, self._fork_cell
        assert f is not None and cell is not None
        out: list[Any] = [None] * len(requests)
        todo: list[int] = []
        counted: set[bytes] = set()
        contexts = self._request_contexts(requests)
        for i, (req, ctx, cont) in enumerate(requests):
            # The row the harness scores the request in, with where its context ends (a prompt gate
            # decides on it).
            hit = f.reusable((_key(self._row(ctx, cont)), contexts[i]), cell)
            known = f.answers.get(("ll", self._calls, i)) if hit is not None else None
            if known is None or known[0] != _key([*ctx, -1, *cont]):
                todo.append(i)
                continue
            ans = known[1]
            out[i] = ans
            row = _key([*ctx, *cont[:-1]]) if self._grouped else _key([i])
            if row not in counted:
                counted.add(row)
                self.gate_counts.add_reused(*hit)
            if req is not None:
                self.cache_hook.add_partial("loglikelihood", req, ans)
        f.summary.texts += len(requests)
        f.summary.texts_reused += len(requests) - len(todo)
        if todo:
            if self.batch_size == "auto" and override_bs is None and len(todo) < len(requests):
                # The harness's batch-size schedule (auto:N) is made for the whole call; a few requests
                # left would divide by zero there. One size, found once, for what is scored again.
                if self._rescore_bs is None:
                    self._rescore_bs = int(self._detect_batch_size())
                override_bs = self._rescore_bs
            for i, ans in zip(todo, self._scored([requests[i] for i in todo], disable_tqdm, override_bs)):
                out[i] = ans
        return out

    def _model_call(self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        if attn_mask is not None or labels is not None:
            raise SieveError("sieve's lm-eval model runs decoder-only (causal) models only")
        B, T = inps.shape
        lens: list[int] | None = None  # the rows' real lengths; None: a batch-size probe of the harness
        if self._row_lengths:
            lengths = self._row_lengths.pop(0)
            if len(lengths) != B or max(lengths) != T:
                raise SieveError(
                    f"lm-eval padded a batch of {len(lengths)} rows up to {max(lengths)} tokens but called the "
                    f"model on {(B, T)}: this lm-eval version batches differently from what sieve expects"
                )
            real = torch.arange(T, device=inps.device)[None, :] < torch.tensor(lengths, device=inps.device)[:, None]
            lens = list(lengths)
        else:  # a forward of the harness's own (batch-size probing): every position is real
            real = torch.ones_like(inps, dtype=torch.bool)
        enc = {"input_ids": inps, "attention_mask": real.long()}
        ahead: list[tuple[bytes, int]] = []
        if lens is not None:  # the rows, in the order the harness feeds them, with their contexts
            keys = [_key(inps[b, : lens[b]]) for b in range(B)]
            ahead = [self._rows_ahead.popleft() for _ in range(min(B, len(self._rows_ahead)))]
            if [k for k, _ in ahead] != keys:
                raise SieveError("lm-eval fed the model rows in another order than its Collator gives them: this "
                                 "lm-eval version batches differently from what sieve expects")
        contexts = [c for _, c in ahead] if lens is not None else None
        steer = Steerer(self._gated_rows([self.intervention] * B, inps, contexts), enc, self.tokenizer,
                        layer=self.layer_index)
        record = _Record(self._fork.layers) if self._recording() and lens is not None else None
        with torch.no_grad(), self._autocast():
            with self.steered_model.trace({"input_ids": inps}):
                steer.forward(self.steered_model)
                if record is not None:
                    record.read(self.steered_model)
                logits = self.steered_model.output.logits.save()
        if lens is not None:  # the harness's batch-size probes (batch_size="auto") are not its requests
            self.gate_counts.add(steer, real)
        if record is not None and lens is not None:
            self._note(record, enc, ahead, lens, lambda rows: self._gated_rows(rows, inps, contexts))
        return logits

    def _recording(self) -> bool:
        """Whether this is the unsteered run of :func:`run_harness_cells` (it records for the cells)."""
        return self._fork is not None and self._fork_cell is None and bool(self._fork.layers)

    def _note(self, record: _Record, enc: dict[str, Tensor], keys: list[Any], tokens: list[int],
              gated: Any = None) -> None:
        """Replay every cell whose gate a replay decides over the recorded batch; note each row's counts.
        ``gated``: decides the rows' prompt gates as the cell's own run does (log-likelihood rows)."""
        f = self._fork
        assert f is not None
        at = list(range(enc["input_ids"].shape[0]))
        codes: dict = {}
        steers: dict[int, Steerer] = {}
        with torch.inference_mode():
            for c in f.replayable():
                rows = [f.rows[c]] * len(at)
                steers[c] = Steerer(gated(rows) if gated is not None else rows, enc, self.tokenizer)
                first_edits(steers[c], record, at, codes)
        f.note(keys, tokens, steers)

    # -- generation -----------------------------------------------------------------------------

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any):
        self._contexts = list(strings)
        return super().tok_batch_encode(strings, *args, **kwargs)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        f, cell = self._fork, self._fork_cell
        if f is None:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._calls += 1
        keys = [_gen_key(*r.args) for r in requests]
        exact = [repr((r.args[0], sorted(r.args[1].items()) if isinstance(r.args[1], dict) else r.args[1]))
                 for r in requests]  # the request as asked, checked before its answer is reused
        out: list[Any] = [None] * len(requests)
        if cell is None:
            # The unsteered run, one generation kwargs at a time (the harness batches them apart anyway),
            # so that each recorded row knows its request (context string, kwargs).
            by_kwargs: dict[str, list[int]] = {}
            for i, k in enumerate(keys):
                by_kwargs.setdefault(k[1], []).append(i)
            for kw, idx in by_kwargs.items():
                self._gen_kwargs = kw
                for i, text in zip(idx, super().generate_until([requests[i] for i in idx], disable_tqdm=disable_tqdm)):
                    out[i] = text
                    f.answers[("gen", self._calls, i)] = (exact[i], text)
            return out
        todo = []
        for i, k in enumerate(keys):
            hit = f.reusable(k, cell)
            known = f.answers.get(("gen", self._calls, i)) if hit is not None else None
            if known is None or known[0] != exact[i]:
                todo.append(i)
                continue
            out[i] = known[1]
            self.gate_counts.add_reused(*hit)
            self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        f.summary.texts += len(requests)
        f.summary.texts_reused += len(requests) - len(todo)
        if todo:
            for i, text in zip(todo, super().generate_until([requests[i] for i in todo], disable_tqdm=disable_tqdm)):
                out[i] = text
        return out

    def _model_generate(self, context: Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> Tensor:
        # The harness's own handling of temperature 0 (greedy), as in HFLM._model_generate.
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if (temp := generation_kwargs.get("temperature")) == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and temp == 0.0:
            generation_kwargs.pop("temperature", None)
        attention_mask = generation_kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        B, T = context.shape
        stops = stop_sequences_criteria(self.tokenizer, stop, T, B)
        last = _LastIds()
        from transformers import StoppingCriteriaList

        criteria = StoppingCriteriaList([*stops, last])
        enc = {"input_ids": context, "attention_mask": attention_mask}
        steer = Steerer([self.intervention] * B, enc, self.tokenizer, layer=self.layer_index)
        if not self._one_sequence_per_row(generation_kwargs):
            raise SieveError("sieve's lm-eval model generates one sequence per row: beam search (num_beams > 1) "
                             "and num_return_sequences > 1 are not supported; generate greedily or sampled")
        n_new = max(1, int(max_length) - T)

        eos_ids = torch.tensor(self._config_eos_ids(), dtype=torch.long)

        def running() -> Tensor:
            # Rows whose stop sequence has appeared are no longer counted (their text is cut there), nor
            # rows that made an EOS of the generation config (generate pads them from there on; the
            # harness's stop strings hold only the tokenizer's EOS).
            done = torch.tensor([any(c.done_tracker[i] for c in stops) for i in range(B)])
            if last.ids is not None and eos_ids.numel() and last.ids.shape[1] > T:
                done |= torch.isin(last.ids[:, T:].cpu(), eos_ids).any(1)
            return ~done

        # The unsteered run of run_harness_cells records greedy generations only (a sampled row that its
        # gate would edit draws again in the cell's own run, which would bias the reused rows), and only
        # where each text ends at its row's stop (elsewhere it depends on how long the batch runs).
        record = _Record(self._fork.layers) if self._recording() and self._greedy(generation_kwargs) \
            and self._text_ends_at_stop(stop) and len(self._contexts) == B else None
        with torch.no_grad(), self._autocast(), warnings.catch_warnings():
            # Rows that stop early end the bounded loop before its last step; nothing follows it.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self.steered_model.generate(enc, max_length=max_length, stopping_criteria=criteria,
                                             pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                             **generation_kwargs) as tracer:
                for step in tracer.iter[:n_new]:
                    # read once the layers ran: the trace body runs ahead of the stopping criteria
                    steer.forward(self.steered_model, counted=None if step == 0 else running)
                    if record is not None:
                        record.read(self.steered_model)
                        if step > 0:
                            record.keeps.append(running())
        self.gate_counts.add(steer, attention_mask.bool())
        if record is not None:
            self._note(record, enc, [(c, self._gen_kwargs) for c in self._contexts], attention_mask.sum(1).tolist())
        if last.ids is None:
            raise SieveError("generation produced no tokens")
        return last.ids

    def _text_ends_at_stop(self, stop: list[str]) -> bool:
        """Whether each generated text depends only on its row's tokens up to its stop, not on how long
        its batch goes on. The harness cuts the decoded text (special tokens skipped) at its stop
        strings, so a stop string holding (or held in) the text of a special token cuts nothing there,
        unless that token is an EOS of the generation config (``generate`` pads after it); the
        tokenizer's EOS must be one; and a think-end token keeps the text after its last occurrence
        among all tokens, those after the stop too."""
        if self.think_end_token is not None:
            return False
        eos_ids = self._config_eos_ids()
        if self.tokenizer.eos_token is not None and self.tokenizer.eos_token_id not in eos_ids:
            return False
        padded_after = {self.tokenizer.convert_ids_to_tokens(i) for i in eos_ids}
        specials = [t for t in self.tokenizer.all_special_tokens if t and t not in padded_after]
        return not any(sp in term or term in sp for term in stop if term for sp in specials)

    def _config_eos_ids(self) -> list[int]:
        """The EOS ids of the model's generation config (``generate`` pads a row after any of them)."""
        eos = underlying(self.steered_model).generation_config.eos_token_id
        return [int(i) for i in (eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])]

    def _one_sequence_per_row(self, generation_kwargs: dict[str, Any]) -> bool:
        """Whether ``generate`` will make one sequence per row (no beams, one returned sequence)."""
        cfg = underlying(self.steered_model).generation_config

        def setting(name: str) -> int:
            v = generation_kwargs.get(name)
            return int((v if v is not None else getattr(cfg, name, 1)) or 1)

        return setting("num_beams") == 1 and setting("num_return_sequences") == 1

    def _greedy(self, generation_kwargs: dict[str, Any]) -> bool:
        """Whether ``generate`` will decode greedily, one sequence per row (no sampling, no beams)."""
        sample = generation_kwargs.get("do_sample")
        if sample is None:
            sample = getattr(underlying(self.steered_model).generation_config, "do_sample", False)
        return not sample and self._one_sequence_per_row(generation_kwargs)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)


class _LastIds:
    """A stopping criterion that never stops: it keeps the latest ``input_ids`` (prompt + generated),
    which is what ``generate`` returns, read without code after the trace's bounded loop."""

    def __init__(self) -> None:
        self.ids: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs: Any) -> Tensor:
        self.ids = input_ids
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@contextmanager
def _recording_right_padding(lengths: list[list[int]]):
    """While the harness scores log-likelihoods, note each batch's row lengths where it right-pads them.

    ``HFLM._loglikelihood_tokens`` pads with token 0 and passes no mask to ``_model_call``, so the real
    length of a row is known only at ``pad_and_concat``; the batches reach ``_model_call`` in the same
    order (checked there by shape).
    """
    original = _hf.pad_and_concat

    def recording(max_length: int, tensors: list[Tensor], padding_side: str = "right") -> Tensor:
        if padding_side == "right":
            lengths.append([int(t.shape[0]) for t in tensors])
        return original(max_length, tensors, padding_side=padding_side)

    _hf.pad_and_concat = recording
    try:
        yield
    finally:
        _hf.pad_and_concat = original


def _from_recipe(recipe: str | Path, method: str, scale: float | str | None, device: str | None = None):
    import json

    from sieve.errors import RecipeError
    from sieve.recipe import load_recipe
    from sieve.setting import load_setting
    from sieve.sweep import Cell

    # --device (lm_eval's option) places the recipe's model: it overrides [model] device
    r = load_recipe(recipe, [f"model.device={json.dumps(str(device))}"] if device is not None else None)
    try:  # the recipe's own [methods.NAME] first, then the registry; a clear error before the model loads
        spec = r.method(method) if method != "unsteered" else None
    except RecipeError as e:
        raise SieveError(f"method={method!r} (--model_args): {str(e).split('] ', 1)[-1]}") from None
    if scale is None and spec is not None:
        scales = r.scales_for(method)
        if len(scales) != 1:  # an add edit at scale 0 would silently be the unsteered model
            raise SieveError(f"method={method!r} needs scale=VALUE in --model_args (the recipe sweeps it at "
                             f"{scales})")
        scale = scales[0]
    try:
        value = float(scale if scale is not None else 0.0)
    except ValueError:
        raise SieveError(f"scale={scale!r} (--model_args) is not a number") from None
    cell = Cell(method, value)
    needs_probe = cell.steered and spec is not None and spec.detector == "probe"
    setting = load_setting(r, progress=False, with_probe=needs_probe)
    return setting.model, cell.intervention(setting.parts, r), setting.layer


@lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """lm-eval's ``TaskManager`` for these task folders, built once per process (it indexes every task
    YAML it can see).

    Example:
        >>> task_manager("tests/no-such-folder", include_defaults=False).all_tasks  # doctest: +SKIP
        []
    """
    return _task_manager(str(Path(include_path).resolve()) if include_path else None, bool(include_defaults))


def harness_tasks(tasks: Sequence[str], include_path: str | Path | None = None, include_defaults: bool | None = None,
                  *, allow_code: bool = True, data_root: str | Path | None = None) -> tuple[Any, list[Any]]:
    """The ``TaskManager`` that runs ``tasks``, and the task specs to give it.

    With ``allow_code`` (your own folder) the harness reads ``include_path`` itself, as its
    ``--include_path`` does, and indexes its own tasks only where the folder lacks one of them
    (``include_defaults=None``). With ``allow_code=False`` (a folder someone else wrote) the harness
    never sees the folder: :func:`sieve.evals.task_files.data_tasks` reads it as data (before
    anything loads; local data files must lie inside ``data_root``, default the folder's parent) and
    each of its tasks is given as a plain config; every other name must be one of the harness's own.
    Cheap after the first call: recipes call it before any model loads.

    Example:
        >>> tm, specs = harness_tasks(["world_mc"], "tasks/", allow_code=False)  # doctest: +SKIP
        >>> specs[0]["task"]  # doctest: +SKIP
        'world_mc'
    """
    if allow_code or not include_path:
        if include_defaults is None:
            local = task_manager(include_path, False) if include_path else None
            include_defaults = local is None or not set(tasks) <= set(local.all_tasks)
        tm = task_manager(include_path, include_defaults)
        if not allow_code:
            check_task_names(tasks, tm.all_tasks)
            _builtin_checks(tm, tasks)
        return tm, list(tasks)
    folder = Path(include_path)
    mine = data_tasks(folder, data_root if data_root is not None else folder.resolve().parent)
    others = [t for t in tasks if t not in mine]
    tm = task_manager(None, bool(others) if include_defaults is None else include_defaults)
    check_task_names(others, [*tm.all_tasks, *mine])
    _builtin_checks(tm, others)
    return tm, [mine.get(t, t) for t in tasks]


def _builtin_checks(tm: Any, names: Sequence[str]) -> None:
    """Before any model loads, for the harness's own tasks a recipe names: no hub dataset shadowed by
    a folder in the working directory, and no grader that evaluates the model's answer as Python
    (its task family's code calls sympy's ``parse_expr``/``sympify``; :func:`no_text_evaluation`
    refuses it at run time too)."""
    paths, files = _task_sources(tm, names)
    for path in sorted(paths):
        check_hub_id(path, "lm-eval dataset_path")
    for folder in sorted({f.parent for f in files}):
        for code in sorted(folder.glob("*.py")):
            text = code.read_text(encoding="utf-8", errors="replace")
            if "parse_expr" in text or "sympify(" in text:
                raise SieveError(f"lm-eval tasks {sorted(set(names))}: the harness's tasks in {folder.name}/ grade "
                                 f"answers with sympy's text parser ({code.name}), which evaluates the model's output "
                                 "as Python in this process; sieve runs model output only in its sandbox, so these "
                                 "tasks are not run here")


def _task_sources(tm: Any, names: Sequence[str]) -> tuple[set[str], set[Path]]:
    """The ``dataset_path`` of every task the harness's own ``names`` expand to (groups, tags), and
    their YAML files, from its index (read without building a task)."""
    index = getattr(tm, "_index", {})
    seen: set[str] = set()
    paths: set[str] = set()
    files: set[Path] = set()
    todo = [n for n in names if isinstance(n, str)]
    while todo:
        name = todo.pop()
        if name in seen or name not in index:
            continue
        seen.add(name)
        entry = index[name]
        if entry.yaml_path is not None:
            files.add(Path(entry.yaml_path).resolve())
        cfg = entry.cfg or {}
        if isinstance(cfg.get("dataset_path"), str):
            paths.add(cfg["dataset_path"])
        members = cfg.get("task") if isinstance(cfg.get("task"), list) else []
        todo += [m if isinstance(m, str) else m.get("task", m.get("group")) for m in members if isinstance(m, (str, dict))]
        todo += sorted(entry.tags or ()) if getattr(entry.kind, "name", "") == "TAG" else []
    return paths, files


def _names(tasks: Sequence[Any]) -> list[str]:
    return [t["task"] if isinstance(t, dict) else str(t) for t in tasks]


def _evaluate(lm: SteeredLM, tasks: Sequence[Any], tm: Any, limit: int | float | None, num_fewshot: int | None,
              shared: bool = False):
    """``lm_eval.simple_evaluate`` with its templates sandboxed; a task that cannot be built (its data
    missing, a key it does not know) is one error naming the tasks."""
    import lm_eval

    load = tm.load

    def loading(*args: Any, **kwargs: Any):
        try:
            return load(*args, **kwargs)
        except SieveError:
            raise
        except (OSError, KeyError, ValueError, TypeError, ImportError, AttributeError) as e:
            hint = (f" (the harness reads relative data_files from the working directory, {Path.cwd()})"
                    if isinstance(e, FileNotFoundError) and not all(isinstance(t, dict) for t in tasks) else "")
            raise SieveError(f"lm-eval tasks {_names(tasks)}: {type(e).__name__}: {e}{hint}") from e

    from jinja2.exceptions import SecurityError, TemplateError

    tm.load = loading
    try:
        with sandboxed_templates(), no_text_evaluation(), hub_datasets_checked() if shared else contextlib.nullcontext():
            return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                           num_fewshot=num_fewshot, log_samples=True, verbosity="WARNING")
    except TextEvaluated as e:
        raise SieveError(f"lm-eval tasks {_names(tasks)}: a task's grader evaluates text as Python ({e}); sieve never "
                         "runs the model's output outside the sandbox, so this task is not run here") from None
    except TemplateError as e:
        what = "was refused by" if isinstance(e, SecurityError) else "failed in"
        raise SieveError(f"lm-eval tasks {_names(tasks)}: a task's template {what} Jinja's sandbox "
                         f"({type(e).__name__}: {e})") from e
    finally:
        del tm.load


def run_harness(
    lm: SteeredLM,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    metric: str | Mapping[str, str] = "acc",
    allow_code: bool = True,
    data_root: str | Path | None = None,
) -> dict[str, Any]:
    """Run harness tasks on ``lm`` and return, per task, its aggregate metrics, the per-document
    values of ``metric`` (for intervals; one name for every task, or one per task) and the model's
    per-document responses (log-likelihoods or generated texts, after the task's filters), with the
    gate counts of the run. A metric the harness aggregates from per-document pairs (a perplexity's
    log-likelihood and word count) gives the pairs as lists.

    ``include_path``: a folder of task YAMLs of your own. ``include_defaults``: whether the harness's
    built-in tasks are indexed too (about 20 s, once per process); None: only when a task is not found
    in ``include_path``. ``allow_code=False`` reads ``include_path`` as data (:func:`harness_tasks`:
    for a folder someone else wrote; its data files inside ``data_root``) and takes task names, not
    paths. Templates are always rendered in Jinja's sandbox.

    Example:
        >>> out = run_harness(lm, ["world_mc"], include_path="tasks/")  # doctest: +SKIP
        >>> out["tasks"]["world_mc"]["values"][:3], out["gate"]["rows_edited"]  # doctest: +SKIP
    """
    tm, specs = harness_tasks(tasks, include_path, include_defaults, allow_code=allow_code, data_root=data_root)
    before = lm.gate_counts.as_dict()
    res = _evaluate(lm, specs, tm, limit, num_fewshot, shared=not allow_code)
    tasks_out: dict[str, Any] = {}
    for task, samples in (res.get("samples") or {}).items():
        m = metric if isinstance(metric, str) else metric.get(task)
        if m is None:
            raise SieveError(f"run_harness: metric names no per-document metric for task {task!r}")
        values = [_value(s[m]) for s in samples if m in s]
        if not values:
            have = sorted(samples[0].get("metrics") or (k for k in samples[0] if isinstance(samples[0][k], (int, float))
                                                          and k != "doc_id")) if samples else []
            raise SieveError(f"lm-eval task {task!r} has no per-document metric {m!r}; it has {have}")
        agg = {k.split(",")[0]: v for k, v in res["results"].get(task, {}).items()
               if isinstance(v, (int, float)) and not k.startswith("alias")}
        tasks_out[task] = {"values": values, "metrics": agg,
                           "responses": [s.get("filtered_resps", s.get("resps")) for s in samples if m in s]}
    after = lm.gate_counts.as_dict()
    return {"tasks": tasks_out, "gate": {k: after[k] - before[k] for k in after}}


def run_harness_cells(
    model: Any,
    cells: Sequence[Intervention | Sequence[Intervention] | None],
    tasks: Sequence[str],
    *,
    layer: int,
    fork: bool = True,
    batch_size: int = 8,
    include_path: str | Path | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    metric: str | Mapping[str, str] = "acc",
    allow_code: bool = True,
    data_root: str | Path | None = None,
    **lm_kwargs: Any,
) -> tuple[list[dict[str, Any]], ForkSummary]:
    """Harness tasks under each of ``cells`` (an intervention, a list composed, or None: unsteered),
    doing only the work the gates cause. Returns per cell what :func:`run_harness` returns, and the
    work saved (``texts``: the requests the steered cells' runs received, a rolling document counting
    once per window; ``texts_reused``: those answered with the unsteered answer).

    With ``fork`` (the default), one unsteered harness run comes first (it is the unsteered cell's
    run, if there is one): it records, at every forward, the outputs of the layers the cells read and
    edit, and replays each cell's interventions over them (as :func:`sieve.fork.forked_forward`
    does). Then each steered cell runs the same tasks: a log-likelihood request whose input row (the
    row the harness scores it in) the cell never edits gets the unsteered answer, and so does a greedy
    generation never edited on the forwards that make its text (the prompt and every token up to its
    stop); only the other requests go to the model, under the intervention. Before its first edit a
    steered row computes what the unsteered row computes, and the unsteered run batches requests as
    each cell's full run does, so the decisions are those of the full run and a reused answer is the
    one the full run gives. Requests run again sit in other batches: their
    answers, float metrics (perplexities) and gate counts move by float noise. Not reused: sampled
    generations (a gated row drawn again would bias the reused ones), and generations whose text does
    not end at the row's stop (a think-end token, a stop string holding or held in the text of a
    special token that is not an EOS of the generation config, a tokenizer EOS the generation config
    does not know: there the text runs on while its batch does);
    cells under an ``always`` gate gain nothing. ``fork=False`` runs every cell in full. Other keyword
    arguments go to :class:`SteeredLM` (with ``batch_size="auto:N"``, requests scored again use one
    detected size). Generation makes one sequence per row: beam search is refused. ``allow_code`` and
    ``data_root``: as in :func:`run_harness`.

    Example:
        >>> outs, saved = run_harness_cells(w.model, [None, iv], ["world_mc"], layer=w.layer,
        ...                                 include_path="tasks/")  # doctest: +SKIP
        >>> outs[1]["tasks"]["world_mc"]["values"][:3], saved.texts_reused  # doctest: +SKIP
    """
    from sieve.models import hidden_size

    rows = [as_rows([list(c) if isinstance(c, (list, tuple)) else c], 1, layer, width=hidden_size(model))[0]
            for c in cells]
    kw = dict(include_path=include_path, include_defaults=include_defaults, limit=limit, num_fewshot=num_fewshot,
              metric=metric, allow_code=allow_code, data_root=data_root)

    def lm(row: Row) -> SteeredLM:
        return SteeredLM(model=model, intervention=list(row) or None, layer=layer, batch_size=batch_size, **lm_kwargs)

    if not fork:
        return [run_harness(lm(r), tasks, **kw) for r in rows], ForkSummary()
    f = _Fork(rows)
    base_lm = lm(())
    base_lm._fork = f
    base = run_harness(base_lm, tasks, **kw)
    outs = []
    for c, r in enumerate(rows):
        if not r:
            outs.append(base)
            continue
        cell_lm = lm(r)
        cell_lm._fork, cell_lm._fork_cell = f, c
        outs.append(run_harness(cell_lm, tasks, **kw))
    return outs, f.summary


# Whether lm_eval's command line (or its --config YAML) gave a device (set by :func:`main`): lm_eval
# passes its own default ("cuda:0") on as if it were the user's.
_CLI: dict[str, bool] = {}


def _same_device(asked: str, on: torch.device) -> bool:
    """Whether a model on ``on`` is where ``asked`` names ("cuda" is any CUDA device)."""
    a = torch.device(asked)
    return a.type == on.type and (a.index is None or on.index is None or a.index == on.index)


def _sieve_defaults(real_from_cli: Any) -> Any:
    """lm_eval's ``EvaluatorConfig.from_cli``, then, for ``--model sieve``: a batch of 8 where neither
    the command line nor the YAML gave one (lm_eval's default is 1), and whether a device was given."""
    def from_cli(cls: Any, namespace: Any) -> Any:
        used = getattr(namespace, "config", None)
        yaml = cls.load_yaml_config(used) if used else {}
        cfg = real_from_cli(cls, namespace)
        if cfg.model == "sieve":
            if not hasattr(namespace, "batch_size") and "batch_size" not in yaml:  # its default is SUPPRESS
                cfg.batch_size = 8
            _CLI["device"] = getattr(namespace, "device", None) is not None or "device" in yaml
        return cfg
    return classmethod(from_cli)


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line with the ``sieve`` model registered (this module is imported).

    For ``--model sieve``: without a batch size (``--batch_size``, or the ``--config`` YAML's) it
    batches 8 rows (lm_eval's own default is 1); a device given (``--device`` or the YAML's) places
    the recipe's model over its ``[model] device``, and lm_eval's default device is not used. Other
    models and subcommands (``ls``, ``validate``) are lm_eval's as they are."""
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.config.evaluate_config import EvaluatorConfig

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    real = EvaluatorConfig.__dict__["from_cli"]
    EvaluatorConfig.from_cli = _sieve_defaults(real.__func__)
    try:
        cli_evaluate()
    except SieveError as e:  # a mistake in --model_args (recipe, method, scale): one line, as recipes print
        if os.environ.get("SIEVE_DEBUG"):
            raise
        print(f"error: {printable(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _CLI.clear()
        EvaluatorConfig.from_cli = real


if __name__ == "__main__":
    main()
