"""Steered generation: prompts + one intervention per row → completions, edited at every forward.

Rows of one batch may mix methods and scales: the edit is one vectorised function of per-row tensors
(:mod:`sieve.interventions`), applied inside an nnsight ``model.generate`` trace at the prefill and at
every decode step. No torch hook is registered.

Sampling is per row: each row draws from its own seeded generator (one uniform number per step), so a
row's completion does not depend on which batch it ran in, as far as the backend allows: batch
composition changes padding and so the floating-point sums of attention and matmuls; on CPU float32
greedy output was identical across batchings in our tests, but bf16 on GPU can flip near-ties.

Each row ends at its EOS (cut) or when its text ends with a stop string (kept): ``RowTracker``, a
stopping criterion, finds both on the device; HF's own EOS handling is off, so no row is padded.
Rows that have ended leave the batch while the others go on (``_DropEnded``, HF's decoding loop with
that one change: the KV cache, masks, sampler, tracker and Steerer keep the running rows only), and
generation ends once every row has ended (the trace's bounded loop is then cut short, which is
harmless: nothing follows it). An all-greedy batch adds no logits processor: HF's own argmax picks
the tokens.

Prompts are healed by default (:mod:`sieve.healing`): a prompt whose last token could merge with what
follows (a trailing ``"\\n"`` before indentation, a trailing space) is fed without that token, and the
first generated token must start with its text. Each row keeps its full token budget after the prompt.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.errors import SieveError
from sieve.healing import Heal, TokenHealer, heal_rows, strip_healed
from sieve.interventions import Row, Steerer, as_rows, resolve_prompt_gates
from sieve.models import (
    _last_logits_only,
    encode_prompts,
    hidden_size,
    num_layers,
    pad_id,
    pad_left,
    tokenize_prompts,
    underlying,
)

__all__ = [
    "Completion", "RowSampler", "RowTracker", "check_context", "check_prompts", "default_batch_size", "drops_ended",
    "generate", "kv_reusable", "rows_that_fit", "steered_logits",
]

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One generated row: the prompt, the new text and tokens, and what the detector did.

    ``finished``: the row ended before the token budget, at EOS (not in ``token_ids``) or at a stop
    string (in them). ``counts``: detector firings and edits on the prompt and on the kept tokens (and
    ``prompt_gate_opened``, 0 or 1, for a row whose intervention has a prompt gate).
    ``healed``: the prompt's last token's text when token healing backed it up (else ""): ``text``
    continues the prompt as written (without it), ``token_ids`` include the token that re-spelled it,
    and the detector counts it as generated.
    ``positions``: where (:meth:`sieve.interventions.Steerer.positions`, kept tokens only).
    """

    prompt: str
    text: str
    token_ids: list[int]
    finished: bool
    counts: dict[str, int] = field(default_factory=dict)
    healed: str = ""
    positions: dict[str, list[int]] = field(default_factory=dict)


class RowSampler:
    """A logits processor that picks each row's next token itself, from that row's own generator.

    temperature 0 is greedy. Otherwise: temperature, then top-p, then inverse-CDF sampling with one
    uniform draw from the row's generator per step. It returns the scores with the chosen token set to
    +inf, so HF's greedy step takes exactly that token. Only needed when some row samples: an all-greedy
    batch is left to HF's own argmax.

    Example:
        >>> s = RowSampler([0.0, 1.0], seeds=[0, 1])
        >>> scores = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 50.0]])
        >>> s(torch.zeros(2, 1, dtype=torch.long), scores).argmax(-1).tolist()
        [1, 2]
    """

    def __init__(self, temperatures: Sequence[float], seeds: Sequence[int], top_p: float = 1.0,
                 skip: Sequence[int] | None = None) -> None:
        if len(temperatures) != len(seeds):
            raise SieveError(f"RowSampler: {len(temperatures)} temperatures for {len(seeds)} seeds")
        self.t = torch.tensor([float(t) for t in temperatures])
        self.any_greedy = bool((self.t <= 0).any())  # else no argmax is needed
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        # ``skip[i]``: draws row i already made (a row continued after that many tokens): its generator
        # goes on exactly where the row's own generation would be.
        for g, k in zip(self.gens, skip or ()):
            for _ in range(int(k)):  # one scalar draw at a time, exactly as __call__ draws
                torch.rand((), generator=g)
        self.top_p = float(top_p)
        self._rows: Tensor | None = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        dev = scores.device
        if self._rows is None or self._rows.device != dev:  # once per generation: row index, temperatures
            self._rows = torch.arange(scores.shape[0], device=dev)
            self.t = self.t.to(dev)
        logits = scores.float()
        # Uniform draws on CPU from the per-row generators, then moved: keeps rows independent.
        u = torch.stack([torch.rand((), generator=g) for g in self.gens]).to(dev, non_blocking=True)
        t = self.t
        probs = torch.softmax(logits / t.clamp_min(1e-6)[:, None], dim=-1)
        if self.top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            keep = sp.cumsum(-1) - sp < self.top_p
            probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
        probs = probs / probs.sum(-1, keepdim=True)
        cdf = probs.cumsum(-1)
        # The first token whose CDF reaches x = u * total, x kept above 0: a draw of exactly 0 (torch.rand's
        # range includes it) took token 0 even where the mask, top-p or the healer had set its probability
        # to 0; now it takes the first token of non-zero probability. Every other draw picks as before.
        x = (u * cdf[:, -1]).clamp_min(torch.finfo(cdf.dtype).tiny)
        sampled = torch.searchsorted(cdf, x[:, None]).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
        choice = torch.where(t > 0, sampled, logits.argmax(-1)) if self.any_greedy else sampled
        # HF passes its own float copy of the logits: editing it in place is safe (B writes).
        scores[self._rows, choice] = float("inf")
        return scores

    def keep_rows(self, keep: Sequence[int]) -> None:
        """Go on with rows ``keep`` only (indices into the rows now held): rows that ended left the batch."""
        keep = keep.tolist() if isinstance(keep, Tensor) else [int(i) for i in keep]
        self.t = self.t[torch.tensor(keep, dtype=torch.long).to(self.t.device)]
        self.gens = [self.gens[i] for i in keep]
        self._rows = None


class RowTracker:
    """A stopping criterion that tracks where each row ends, on the device, and stops the batch once every
    row has ended.

    A row ends at its first EOS token (the EOS is cut) or once its text ends with one of ``stop``
    (the token completing the stop string is kept; matching is HF's ``StopStringCriteria``), but not
    at a healed row's first token where that token only re-spells the prompt's tail (``respell[i]``:
    the ids whose text is exactly the text healing backed up): the stop string then lies in the
    prompt as written, not in the completion. HF's own
    EOS handling is switched off, so no row is padded; a row that has ended keeps generating until the
    batch is done or it leaves the batch (:meth:`keep_rows`, :class:`_DropEnded`), and its extra tokens
    are cut afterwards.

    Example:
        >>> tr = RowTracker(prompt_len=1, eos_token_ids=[0])
        >>> tr(torch.tensor([[5, 0], [5, 7]]), None).tolist()
        [False, False]
        >>> tr(torch.tensor([[5, 0, 3], [5, 7, 0]]), None).tolist()
        [True, True]
        >>> tr.ends.tolist(), tr.tokens().tolist()
        ([0, 1], [[0, 3], [7, 0]])
    """

    def __init__(self, prompt_len: int, eos_token_ids: Sequence[int], stop=None,
                 budgets: Sequence[int] | None = None, respell: Sequence[Sequence[int]] | None = None) -> None:
        self.prompt_len = int(prompt_len)
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long)
        self.stop = stop  # a StopStringCriteria, or None
        # [B, K] ids (-1: none) a healed row's first token may be that only re-spell its prompt's tail
        width = max((len(r) for r in respell or ()), default=0)
        self.respell = None if stop is None or not width else torch.tensor(
            [[int(i) for i in r] + [-1] * (width - len(r)) for r in respell], dtype=torch.long)
        # Per-row token budgets (rows of one batch may differ: a healed row gets one more); None: no cut.
        self.budgets = None if budgets is None else torch.tensor([int(b) for b in budgets], dtype=torch.long)
        self.ends: Tensor | None = None  # [B] generated tokens to keep; -1 while the row runs
        self.ids: Tensor | None = None  # the latest input_ids of the rows present, prompt included
        # Once rows have left the batch (:meth:`keep_rows`): the rows still in it (indices into the
        # batch's rows), and the ids each row that left had then.
        self.present: Tensor | None = None
        self.left: dict[int, Tensor] = {}
        self.running: Tensor | None = None  # [rows present] bool: not ended and budget left, as of the last call
        self.at_eos: Tensor | None = None  # [B] bool: the row ended at its EOS (else at a stop string, or runs)

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        step = input_ids.shape[1] - self.prompt_len - 1
        if self.ends is None:
            self.ends = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            self.at_eos = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self.eos = self.eos.to(input_ids.device)
            if self.budgets is not None:
                self.budgets = self.budgets.to(input_ids.device)
        p = self.present
        ends = self.ends if p is None else self.ends[p]
        budgets = self.budgets if p is None or self.budgets is None else self.budgets[p]
        is_eos = torch.isin(input_ids[:, -1], self.eos)
        if self.stop is None:
            ended = is_eos
        else:
            at_stop = self.stop(input_ids, scores)
            if step == 0 and self.respell is not None and p is None:  # the prompt's own tail, re-spelled
                self.respell = self.respell.to(input_ids.device)
                at_stop = at_stop & ~(input_ids[:, -1:] == self.respell).any(-1)
            ended = is_eos | at_stop
        if budgets is not None:
            ended = ended & (step < budgets)  # past its budget a row's tokens are not its own
        at = torch.where(is_eos, step, step + 1)
        new = ended & (ends < 0)
        ends = torch.where(new, at, ends)
        at_eos = (self.at_eos if p is None else self.at_eos[p]) | (new & is_eos)
        if p is None:
            self.ends, self.at_eos = ends, at_eos
        else:
            self.ends[p], self.at_eos[p] = ends, at_eos
        self.ids = input_ids
        done = ends >= 0
        if budgets is not None:
            done = done | (step + 1 >= budgets)
        self.running = ~done
        # Every row is told "done" once all have ended; no host sync here (HF's own stop check has one).
        return done.all().expand(input_ids.shape[0])

    def keep_rows(self, keep: Tensor) -> None:
        """Go on with rows ``keep`` only (indices into the rows present now, each once): the others
        (ended) leave the batch, their tokens so far kept for :meth:`tokens`."""
        if self.ids is None:
            raise SieveError("RowTracker.keep_rows: nothing was generated")
        keep = keep.to(self.ids.device)
        present = self.present if self.present is not None else torch.arange(self.ids.shape[0], device=self.ids.device)
        gone = torch.ones(present.numel(), dtype=torch.bool, device=present.device)
        gone[keep] = False
        for local in gone.nonzero().flatten().tolist():
            self.left[int(present[local])] = self.ids[local]
        self.present = present[keep]
        self.ids = self.ids[keep]
        if self.running is not None:
            self.running = self.running[keep]

    def keeps(self, position: int, present: bool = False) -> Tensor | None:
        """``[B]`` bool: whether the forward that reads generated token ``position`` is part of each row's
        run: it predicts a token of the row's completion or its EOS (not what follows a stop string),
        and (with per-row budgets) the row has budget left for that token. None before the first token.
        A row's count never depends on whether its batch ran on past its end. ``present``: only the
        rows still in the batch (:meth:`keep_rows`)."""
        if self.ends is None:
            return None
        keep = (self.ends < 0) | (self.ends > position + (~self.at_eos).long())
        keep = keep if self.budgets is None else keep & (position + 1 < self.budgets)
        return keep[self.present] if present and self.present is not None else keep

    def tokens(self) -> Tensor:
        """``[B, steps]``: every generated token, including those after a row's end while it was in the
        batch (a row that left has zeros after its last one)."""
        if self.ids is None:
            raise SieveError("RowTracker: nothing was generated")
        if self.present is None:
            return self.ids[:, self.prompt_len :]
        full = self.ids.new_zeros(self.ends.shape[0], self.ids.shape[1])  # type: ignore[union-attr]
        full[self.present] = self.ids
        for row, ids in self.left.items():
            full[row, : ids.shape[0]] = ids
        return full[:, self.prompt_len :]

    def completions(self) -> list[tuple[list[int], bool]]:
        """Per row: the kept tokens, and whether the row ended (EOS or stop string) before the budget."""
        ends = self.ends.tolist() if self.ends is not None else []
        budgets = self.budgets.tolist() if self.budgets is not None else [None] * len(ends)
        out = []
        for row, end, budget in zip(self.tokens().cpu().tolist(), ends, budgets):
            row = row[:budget] if budget is not None else row
            out.append((row[:end] if end >= 0 else row, end >= 0))
        return out


def _eos_ids(model) -> list[int]:
    ids = []
    for src in (underlying(model).generation_config.eos_token_id, model.tokenizer.eos_token_id):
        if src is None:
            continue
        ids += list(src) if isinstance(src, (list, tuple)) else [src]
    return sorted(set(int(i) for i in ids))


def _stop_criterion(tok, stop: Sequence[str] | str):
    if isinstance(stop, str):
        stop = [stop]
    if not stop:
        return None
    if any(not isinstance(s, str) or not s for s in stop):
        raise SieveError(f"stop strings must be non-empty strings, got {list(stop)!r}")
    from transformers import StopStringCriteria

    # Built once per tokenizer and strings: construction reads the whole vocabulary (256k entries on
    # Gemma), and the criterion is stateless, so every batch can share it.
    per_tok = _STOP_CRITERIA.setdefault(tok, {})
    key = tuple(stop)
    if key not in per_tok:
        per_tok[key] = StopStringCriteria(tok, list(stop))
    return per_tok[key]


_STOP_CRITERIA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_context(model, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """Raise a :class:`SieveError` naming the first prompt whose tokens plus ``max_new_tokens`` exceed a
    model with learned positions (GPT-2: ``n_positions``), which would otherwise fail deep inside the
    model mid-batch. Rotary models (Llama, Gemma, Qwen) have no hard limit and are not checked.

    Example:
        >>> from sieve.world import load_world
        >>> try:
        ...     check_context(load_world().model, [200, 250], 48)
        ... except SieveError as e:
        ...     print(str(e).split(" (")[0])
        prompt 1 has 250 tokens; with max_new_tokens=48 it needs 298 positions, but the model has 256
    """
    limit = getattr(underlying(model).config, "n_positions", None)
    if not isinstance(limit, int):
        return
    for i, n in enumerate(prompt_lengths):
        if n + max_new_tokens > limit:
            raise SieveError(
                f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{n + max_new_tokens} positions, but the model has {limit} (learned positions). Shorten the "
                "prompt (sieve.models.clip_to_tokens) or lower max_new_tokens."
            )


@dataclass
class _Record:
    """The unsteered outputs of some layers at every forward of one generation batch, and what else a
    replay of interventions over them needs (:mod:`sieve.fork`): the prompt encoding, and per decode
    forward the rows whose token it reads is counted (:meth:`RowTracker.keeps`)."""

    layers: tuple[int, ...]
    outputs: dict[int, list[Tensor]] = field(default_factory=dict)  # per layer: [B,T,D], then [B,1,D] per step
    encoding: dict[str, Tensor] = field(default_factory=dict)
    keeps: list[Tensor] = field(default_factory=list)  # per decode forward k >= 1: [B] bool
    # With keep_kv: per batch row, per cache layer, the keys and values of the row's positions (padding
    # left out), as far as the row ran; a forked row reuses its prefix (:func:`_reused_prefix`).
    keep_kv: bool = False
    kv: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)

    present: list[Tensor | None] = field(default_factory=list)  # per forward: the batch rows it held (None: all)

    def read(self, model, present: Callable[[], Tensor | None] | None = None) -> None:
        """Inside a trace, at one forward: keep every recorded layer's output (in layer order).
        ``present()``, read once the outputs exist: the batch rows this forward holds, when rows that
        ended have left the batch (:class:`_DropEnded`); :meth:`widen` puts them in place afterwards."""
        from sieve.models import layer as layer_of

        for L in self.layers:
            out = layer_of(model, L).output
            h = out[0] if isinstance(out, tuple) else out
            self.outputs.setdefault(L, []).append(h.detach().clone())
        self.present.append(present() if present is not None else None)

    def widen(self, rows: int) -> None:
        """Every forward's outputs as ``[rows, T, D]``: a forward that held fewer rows (the others had
        ended) gets zeros for the rows it did not hold (never counted: :meth:`RowTracker.keeps`)."""
        for k, p in enumerate(self.present):
            if p is None:
                continue
            for outs in self.outputs.values():
                h = outs[k]
                full = h.new_zeros(rows, *h.shape[1:])
                full[p.to(h.device)] = h
                outs[k] = full
            self.present[k] = None


def _select_rows(cache: Any, index: Tensor) -> None:
    """Rows ``index`` of every layer of ``cache`` (a subset, or repeats), each layer's index on that
    layer's own device (a model split over several GPUs); a layer not yet filled is left alone."""
    for layer in getattr(cache, "layers", None) or [cache]:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, Tensor):
            layer.batch_select_indices(index.to(keys.device))


def _fill_holes(running: Tensor) -> Tensor:
    """The rows to keep, ``running`` ones, in an order that moves the fewest: the first ``r`` places keep
    their rows where those run, and the running rows past them fill the other places.

    Example:
        >>> _fill_holes(torch.tensor([True, False, True, False, True, True])).tolist()
        [0, 4, 2, 5]
    """
    r = int(running.sum())
    keep = torch.arange(running.numel(), device=running.device)[:r].clone()
    holes = (~running[:r]).nonzero().flatten()
    tail = running[r:].nonzero().flatten() + r
    keep[holes] = tail
    return keep


class _DropEnded:
    """HF ``generate``'s decoding loop (``custom_generate``: HF prepares the inputs, cache, logits
    processors and stopping criteria, then calls it) that lets rows which have ended leave the batch.

    HF keeps every row of a batch until the last one ends; on a device whose time grows with the rows
    (a CPU), the steps of rows that have ended are waste (a quarter of the row-steps on the default
    run's rows). After each step, once the rows that have ended times the steps still to come reach
    ``min_gain`` times the rows held, the rows still running go on alone: the KV cache, the attention
    mask and position ids, the input ids, and every member (:class:`RowTracker`, :class:`RowSampler`,
    :class:`~sieve.healing.TokenHealer`, :class:`~sieve.interventions.Steerer`) keep only them, the
    rows from the end filling the places of those that left (only they are copied). With learned
    positions (``limit``, GPT-2's ``n_positions``), a row that has ended also leaves before its next
    position would pass the model's last (rows of any budget can then share a batch: ``lengths`` are
    the rows' fed tokens). Each row computes what it computed in the whole batch (the same matmuls
    row by row; on CPU float32 bit for bit in sieve's tests).

    Example (inside sieve: ``model.generate(..., custom_generate=_DropEnded(tracker, [steer, ...]))``):
        >>> _DropEnded(RowTracker(3, [0]), [], min_gain=2.0).min_gain
        2.0
    """

    # Model inputs that carry one row per batch row; any other per-row tensor input switches dropping off.
    _PER_ROW = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids")
    # HF logits processors that read each row's ids alone (no per-batch state): a model's generation
    # config may add them. Any other processor without keep_rows switches dropping off.
    _ROWWISE = ("RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "NoBadWordsLogitsProcessor",
                "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "SuppressTokensLogitsProcessor",
                "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor",
                "ForcedEOSTokenLogitsProcessor", "InfNanRemoveLogitsProcessor", "LogitNormalization")

    def __init__(self, tracker: RowTracker, members: Sequence[Any], steps: int | None = None,
                 min_gain: float = 1.0, lengths: Sequence[int] | None = None, limit: int | None = None) -> None:
        self.tracker = tracker
        self.members = list(members)
        self.steps = steps
        self.min_gain = float(min_gain)
        self.lengths = None if lengths is None else torch.tensor([int(x) for x in lengths], dtype=torch.long)
        self.limit = limit
        self.left = 0  # times rows left the batch
        self.forced = 0  # of them, because a row that had ended would have run past the model's positions
        self.row_steps = 0  # forwards x rows held, prefill included
        # Called with the cache and the places (in the rows held) of rows about to leave, before the KV
        # cache forgets them (a trajectory whose rows' keys and values are kept).
        self.on_leave: Callable[[Any, Tensor], None] | None = None

    def __call__(self, model, input_ids: Tensor, logits_processor, stopping_criteria, generation_config,
                 **model_kwargs) -> Tensor:
        hf = model
        n0 = input_ids.shape[0]
        prompt = self.tracker.prompt_len
        steps = self.steps if self.steps is not None else generation_config.max_new_tokens
        outputs = hf._prefill(input_ids, generation_config, model_kwargs, is_first_iteration=True)
        droppable = all(k in self._PER_ROW or not (isinstance(v, Tensor) and v.dim() and v.shape[0] == n0)
                        for k, v in model_kwargs.items() if k != "past_key_values") \
            and all(p.dim() == 2 for k in self._PER_ROW if isinstance(p := model_kwargs.get(k), Tensor)) \
            and all(hasattr(p, "keep_rows") or type(p).__name__ in self._ROWWISE for p in logits_processor) \
            and hasattr(model_kwargs.get("past_key_values"), "batch_select_indices")
        decode = getattr(hf, "_optimize_model_for_decode", None)  # HF's decode-time switches (MoE kernels)
        with decode() if decode is not None else contextlib.nullcontext():
            return self._loop(hf, input_ids, logits_processor, stopping_criteria, model_kwargs, outputs,
                              steps, prompt, droppable)

    def _loop(self, hf, input_ids, logits_processor, stopping_criteria, model_kwargs, outputs, steps, prompt,
              droppable) -> Tensor:
        first = True
        while True:
            if not first:
                inputs = hf.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
                outputs = hf(**inputs, return_dict=True)
            first = False
            self.row_steps += input_ids.shape[0]
            model_kwargs = hf._update_model_kwargs_for_generation(outputs, model_kwargs)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
            del outputs
            scores = logits_processor(input_ids, logits)
            input_ids = torch.cat([input_ids, scores.argmax(-1)[:, None]], dim=-1)
            if bool(stopping_criteria(input_ids, scores).all()):
                return input_ids
            running = self.tracker.running
            if running is None:
                continue
            n = input_ids.shape[0]
            made = input_ids.shape[1] - prompt  # tokens generated so far
            must = False
            if self.limit is not None and self.lengths is not None:
                lengths = self.lengths.to(running.device)
                lengths = lengths if self.tracker.present is None else lengths[self.tracker.present]
                # the next forward reads position length + made - 1: it must stay below the limit
                must = bool((~running & (lengths + made > self.limit)).any())
            if not droppable:
                if must:
                    raise SieveError("rows that ended would run past the model's positions, and this model's "
                                     "inputs cannot be narrowed to the rows still running; pass drop_ended=False")
                continue
            kept = int(running.sum())
            if not must and (n - kept) * (steps - made) < self.min_gain * n:
                continue
            self.forced += must
            keep = _fill_holes(running)
            cache = model_kwargs["past_key_values"]
            if self.on_leave is not None:
                self.on_leave(cache, (~running).nonzero().flatten())
            _select_rows(cache, keep)
            for k in self._PER_ROW:
                v = model_kwargs.get(k)
                if isinstance(v, Tensor):
                    model_kwargs[k] = v[keep.to(v.device)]
            input_ids = input_ids[keep.to(input_ids.device)]
            self.tracker.keep_rows(keep)
            for m in self.members:
                m.keep_rows(keep)
            self.left += 1


def _generate_batch(
    model,
    prompts: list[str],
    rows: list[Row],
    token_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperatures: list[float],
    seeds: list[int],
    top_p: float,
    stop: Any,
    heals: list[Heal | None],
    gates_opened: list[bool | None],
    continued: list[int] | None = None,
    record: _Record | None = None,
    share_prefill: bool = True,
    kv_cache: str = "grow",
    drop_ended: bool = True,
    reuse: list[tuple[list[tuple[Tensor, Tensor]], dict[int, Tensor]]] | None = None,
    cascade: bool = False,
) -> list[Completion]:
    """One batch, everything already checked, listed and healed by :func:`generate`: every row its own
    prompt (tokenized, as fed), interventions, temperature, seed and heal.

    ``continued[i] = c > 0``: row i's last ``c`` ids are tokens the row already generated (a row forked
    from its unsteered trajectory, :mod:`sieve.fork`): it gets ``c`` tokens less budget, its sampler
    skips the ``c`` draws already made, its heal (done by the first of them) is not applied again, the
    completion's tokens start with them, and the prefill's counts and positions on them are counted as
    generated tokens 0..c-1. ``record``: keep the layers' outputs at every forward (unsteered rows only).
    ``share_prefill``: rows with the same ids and interventions read their prompt once (:func:`_shared_prefix`).
    ``kv_cache``: ``"grow"`` (:func:`sieve.kvcache.growing_cache`) or ``"hf"`` (HF's own).
    ``drop_ended``: rows that have ended leave the batch (:class:`_DropEnded`). ``reuse``: per row
    (every row continued), its prefix's keys and values and recorded layer outputs
    (:func:`_reused_prefix`); ``record.keep_kv``: keep each row's keys and values for that.
    ``cascade``: a shared prefill's prefixes are read once per prefix at every step
    (:func:`sieve.kvcache.cascade_attention`; ``grow`` only)."""
    tok = model.tokenizer
    hf = underlying(model)
    device = next(hf.parameters()).device
    cont = continued or [0] * len(rows)
    healing = any(h is not None and c == 0 for h, c in zip(heals, cont))
    # A healed row re-spells its prompt's last token first: it gets one step more, so every row keeps
    # max_new_tokens after the prompt as written.
    budgets = [max_new_tokens + (h is not None) - c for h, c in zip(heals, cont)]
    per_row = healing or any(cont)
    steps = max(budgets) if per_row else max_new_tokens
    enc = pad_left(token_ids, pad_id(tok))
    enc = {k: v.to(device) for k, v in enc.items()}
    if record is not None and any(rows):
        raise SieveError("recording layer outputs is for unsteered batches only")
    width = enc["input_ids"].shape[1]
    if kv_cache not in ("grow", "hf"):
        raise SieveError(f"kv_cache must be 'grow' or 'hf', got {kv_cache!r}")
    grow = kv_cache == "grow"
    # A cache the model's generation config asks for (static, offloaded, quantized: a user's choice) is
    # left to HF: then nothing is shared and the cache is HF's. "hybrid" (Gemma-2's hub default) HF
    # itself now replaces by its dynamic cache with sliding-window layers, which is what sieve builds.
    own = getattr(hf.generation_config, "cache_implementation", None) in (None, "hybrid")
    if reuse is not None and own and kv_reusable(model):
        shared = _reused_prefix(model, enc, rows, token_ids, reuse, steps + 1, grow)
    else:
        shared = _shared_prefix(model, enc, rows, token_ids, record, steps + 1, grow, cascade) \
            if share_prefill and own else None
    steer = Steerer(rows, enc, tok) if shared is None else shared[1]
    cache = shared[0] if shared is not None else _new_cache(model, steps + 1, True) if grow and own else None
    extra: dict[str, Any] = {} if cache is None else {"past_key_values": cache}
    tracker = RowTracker(width, _eos_ids(model), stop, budgets=budgets if per_row else None,
                         respell=[h.exact if h is not None and c == 0 else () for h, c in zip(heals, cont)])
    processors: list[Any] = [TokenHealer([h if c == 0 else None for h, c in zip(heals, cont)], width)] \
        if healing else []
    # Greedy rows are left to HF's own argmax: a sampler only when some row samples.
    if any(t > 0 for t in temperatures):
        processors.append(RowSampler(temperatures, seeds, top_p, skip=cont))
    gc = copy.deepcopy(hf.generation_config)
    # HF must not end rows itself: RowTracker finds each row's end and stops the batch once all have.
    # min_new_tokens is not used: it would forbid EOS and change what rows generate.
    gc.eos_token_id = None
    gc.pad_token_id = pad_id(tok)
    gc.do_sample = False
    gc.max_new_tokens = steps
    gc.min_new_tokens = None
    gc.max_length = None
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    if cache is not None:  # HF refuses a cache passed beside a cache_implementation ("hybrid" here)
        gc.cache_implementation = None
    dropper = None
    if drop_ended and len(rows) > 1 and drops_ended(model, True):
        limit = getattr(hf.config, "n_positions", None)
        dropper = _DropEnded(tracker, [steer, *processors], steps=steps, lengths=[len(t) for t in token_ids],
                             limit=limit if isinstance(limit, int) else None)
        extra["custom_generate"] = dropper
    keep_kv = record is not None and record.keep_kv and cache is not None and kv_reusable(model)
    if keep_kv and dropper is not None:
        def on_leave(c: Any, places: Tensor) -> None:
            rows_held = tracker.present if tracker.present is not None else torch.arange(len(rows))
            _keep_kv(record, c, places, rows_held.cpu(), [width - len(t) for t in token_ids])

        dropper.on_leave = on_leave
    from transformers import StoppingCriteriaList

    with torch.inference_mode(), warnings.catch_warnings():
        # When every row has ended early, generation stops before the bounded loop's last step; nnsight
        # then warns that the loop was cut short. Nothing follows the loop in the trace: the tokens are
        # read from the tracker, so the warning says nothing here.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        cascading: Any = contextlib.nullcontext()
        if cascade and cache is not None:
            from sieve.kvcache import CascadeLayer, cascade_cache

            if any(isinstance(layer, CascadeLayer) for layer in cache.layers):
                cascading = cascade_cache(model, cache)
        with cascading, model.generate(enc, generation_config=gc, logits_processor=processors,
                                       stopping_criteria=StoppingCriteriaList([tracker]), **extra) as tracer:
            for step in tracer.iter[:steps]:
                if record is not None:
                    record.read(model, present=lambda: tracker.present)
                # Decode step k reads generated token k-1: count firings only while it is kept. Read
                # once the layers ran: the trace body runs ahead of HF's stopping check (and of rows
                # leaving the batch).
                steer.forward(model, counted=None if step == 0 else (lambda k=step: tracker.keeps(k - 1, present=True)))
    if record is not None:
        if keep_kv:  # the rows still held at the end
            held = tracker.present.cpu() if tracker.present is not None else torch.arange(len(rows))
            _keep_kv(record, cache, torch.arange(held.numel()), held, [width - len(t) for t in token_ids])
        record.widen(len(rows))
        if shared is not None:  # the prompt's first forward: the shared prefix's outputs, then its last position
            for L, prefix in shared[2].items():
                record.outputs[L][0] = torch.cat([prefix, record.outputs[L][0]], 1)
        record.encoding = {k: v.cpu() for k, v in enc.items()}
        n_forwards = len(next(iter(record.outputs.values()), []))
        record.keeps = [tracker.keeps(k - 1) for k in range(1, n_forwards)]  # type: ignore[misc]
    counts, where = steer.counts(), steer.positions()
    marks = steer.prefill_marks() if any(cont) and steer.layers else None
    out = []
    for i, (row, finished) in enumerate(tracker.completions()):
        c = cont[i]
        cnt = {k: v[i] for k, v in counts.items()}
        pos = {k: list(v[i]) for k, v in where.items()}
        if c:
            row = list(token_ids[i][len(token_ids[i]) - c :]) + row
            _split_prefill(cnt, pos, c, len(token_ids[i]) - c, None if marks is None else
                           (marks[0][i, width - c :], marks[1][i, width - c :]))
        out.append(Completion(
            prompt=prompts[i],
            text=strip_healed(tok, row, heals[i]),
            token_ids=row,
            finished=finished,
            counts=cnt | ({} if gates_opened[i] is None else {"prompt_gate_opened": int(gates_opened[i])}),
            healed=heals[i].text if heals[i] is not None else "",
            positions={k: [j for j in v if k.startswith("prompt") or j < len(row)] for k, v in pos.items()},
        ))
    return out


def _row_key(ids: Sequence[int], row: Row) -> tuple:
    """Rows with equal keys compute the same prefill: the same token ids, the same intervention objects."""
    return tuple(ids), tuple(id(iv) for iv in row)


def _new_cache(model, extra: int, grow: bool):
    """An empty KV cache for ``model``: :func:`sieve.kvcache.growing_cache` (room for ``extra`` more
    positions) or HF's own :class:`~transformers.DynamicCache`; None where it cannot be built ahead."""
    from sieve.kvcache import growing_cache

    if grow:
        return growing_cache(model, extra)
    from transformers import DynamicCache

    try:
        return DynamicCache(config=underlying(model).config)
    except Exception:  # pragma: no cover
        return None


def _shared_prefix(model, enc: dict[str, Tensor], rows: list[Row], token_ids: list[list[int]],
                   record: _Record | None, extra: int, grow: bool,
                   cascade: bool = False) -> tuple[Any, Steerer, dict[int, Tensor]] | None:
    """Read each distinct prompt prefix of a batch once. Rows with the same ids and the same interventions
    (the samples of one prompt in a sweep, under one cell) compute the same prefill: the prompt's
    positions but the last are run once per distinct row, under a :class:`Steerer` of those rows, into
    a KV cache; the cache and the Steerer's state (latches, counts, prompt marks) are then copied to
    every row sharing them, and generation starts from the cache, reading the prompt's last position
    for every row. Returns (cache, the batch's Steerer, per recorded layer the prefix outputs ``[B,
    W-1, D]``), or None where nothing is shared (every row distinct, a one-token prompt, or a model
    whose cache is not a :class:`~transformers.DynamicCache`). ``grow``: the cache is
    :func:`sieve.kvcache.growing_cache` (room for ``extra`` more positions), else HF's own. ``cascade``
    (with ``grow``): the prefixes are not copied to every row but kept once
    (:class:`sieve.kvcache.CascadeLayer`), and generation reads them once per prefix for all its rows
    (:func:`sieve.kvcache.cascade_attention`, under :func:`sieve.kvcache.cascade_cache`).

    The result is the same computation split in two; floating-point sums over a smaller batch and a
    shorter sequence can differ in their last bits, as a different batch composition's do (and, with
    ``cascade``, the attention's sums, merged from a prefix part and a row part)."""
    width = enc["input_ids"].shape[1]
    if width < 2:
        return None
    keys = [_row_key(ids, row) for ids, row in zip(token_ids, rows)]
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    if len(first) == len(keys):
        return None
    hf = underlying(model)
    cache = _new_cache(model, extra, grow)
    if cache is None:
        return None
    uniq = list(first.values())
    slot = {k: n for n, k in enumerate(first)}
    index = [slot[k] for k in keys]
    u = torch.tensor(uniq, device=enc["input_ids"].device)
    enc_u = {k: v[u] for k, v in enc.items()}
    mask = enc_u["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers left-padded rows
    steer_u = Steerer([rows[i] for i in uniq], enc_u, model.tokenizer, split_prompt=True)
    prefix = _Record(record.layers) if record is not None else None
    kw: dict[str, Any] = {"past_key_values": cache, "use_cache": True}
    if "position_ids" in inspect.signature(hf.forward).parameters:
        kw["position_ids"] = positions[:, :-1]
    kw |= _last_logits_only(model)  # the prefix fills the cache: its logits are never read
    with torch.inference_mode():
        with model.trace({"input_ids": enc_u["input_ids"][:, :-1], "attention_mask": mask[:, :-1]}, **kw):
            if prefix is not None:
                prefix.read(model)
            steer_u.forward(model)
    if cache.get_seq_length() != width - 1:  # pragma: no cover - the model did not fill the cache
        return None
    idx = torch.tensor(index)
    if cascade and grow:
        from sieve.kvcache import to_cascade

        to_cascade(cache, idx, extra)
    else:
        _select_rows(cache, idx)
    outputs = {L: v[0][idx.to(v[0].device)] for L, v in prefix.outputs.items()} if prefix is not None else {}
    return cache, steer_u.take(index, enc), outputs


_CACHE_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cache_kinds(model) -> tuple[bool, bool, bool]:
    """(whether rows can leave a batch, whether a forked row can reuse its trajectory's keys and values,
    whether the cache has layers a cascade can share) for ``model`` as its generation config stands: rows
    can leave where sieve builds the cache (no static, offloaded or quantized cache named in the
    generation config) and every layer is a dynamic one (full or sliding-window) and HF's decoding loop
    can be replaced; keys and values can be reused where every layer also keeps all positions (no
    sliding window); a cascade needs a full-attention layer sieve grows (:class:`~sieve.kvcache.GrowingLayer`)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    from sieve.kvcache import GrowingLayer

    hf = underlying(model)
    impl = getattr(hf.generation_config, "cache_implementation", None)
    per_model = _CACHE_KINDS.setdefault(hf, {})
    if impl not in per_model:
        cache = _new_cache(model, 1, True) if impl in (None, "hybrid") else None
        kinds = [type(layer) for layer in cache.layers] if cache is not None else []
        per_model[impl] = (bool(kinds) and hasattr(hf, "_prefill")
                           and all(k in (DynamicLayer, GrowingLayer, DynamicSlidingWindowLayer) for k in kinds),
                           bool(kinds) and all(k in (DynamicLayer, GrowingLayer) for k in kinds),
                           GrowingLayer in kinds)
    return per_model[impl]


def kv_reusable(model) -> bool:
    """Whether a forked row can reuse its trajectory's keys and values: sieve builds the model's cache
    and every layer of it keeps all positions (no sliding window, no recurrent state).

    Example:
        >>> from sieve.world import load_world
        >>> kv_reusable(load_world().model)
        True
    """
    return _cache_kinds(model)[1]


def drops_ended(model, drop_ended: bool | None) -> bool:
    """Whether rows that have ended leave their batch (:class:`_DropEnded`) for ``model``: ``None`` (the
    default) means where the model runs on a CPU, whose step time grows with the rows; on a GPU HF's
    own decoding loop is kept (its decode-time kernels and compilation) unless ``True`` asks for it.
    Never where the cache cannot narrow its rows (:func:`_cache_kinds`).

    Example:
        >>> from sieve.world import load_world
        >>> drops_ended(load_world().model, None), drops_ended(load_world().model, False)
        (True, False)
    """
    return _auto(model, drop_ended) and _cache_kinds(model)[0]


def cascades(model, cascade: bool | None) -> bool:
    """Whether a shared prefill's prompt prefixes are read once per prefix at every decode step
    (:func:`sieve.kvcache.cascade_attention`) for ``model``: ``None`` (the default) means where the
    model runs on a CPU, where a decode step's attention reads every row's keys and values from memory
    and the samples of one prompt read the same prompt keys; ``True`` asks for it on any device. Never
    where the model's attention is not SDPA or soft-caps its logits, or its cache is not sieve's
    (:func:`sieve.kvcache.cascades`). Rows move by float noise: the attention's sums run in another order.

    Example:
        >>> from sieve.world import load_world
        >>> cascades(load_world().model, None), cascades(load_world().model, False)
        (True, False)
    """
    if not (_auto(model, cascade) and _cache_kinds(model)[2]):
        return False
    from sieve.kvcache import cascades as attention_cascades

    return attention_cascades(model)


def _auto(model, switch: bool | None) -> bool:
    """A saving's switch: ``None`` (its default) is on where ``model`` runs on a CPU."""
    return _on_cpu(model) if switch is None else bool(switch)


def _on_cpu(model) -> bool:
    """Whether ``model`` runs on a CPU: where the savings that cost device memory or a host sync per
    step, or are only measured there, are on by default (rows leaving their batch, forked rows reading
    kept keys and values, cascade attention)."""
    return next(underlying(model).parameters()).device.type == "cpu"


def _keep_kv(record: _Record, cache: Any, places: Tensor, rows: Tensor, pads: list[int]) -> None:
    """Copy the keys and values of the rows held at ``places`` (batch rows ``rows[places]``) into
    ``record.kv``: their positions after the left padding, as far as the cache is filled."""
    from sieve.kvcache import CascadeLayer

    for p in places.tolist():
        r = int(rows[p])
        record.kv[r] = [layer.row_kv(p, pads[r]) if isinstance(layer, CascadeLayer)
                        else (layer.keys[p, :, pads[r]:].clone(), layer.values[p, :, pads[r]:].clone())
                        for layer in cache.layers]


def _reused_prefix(model, enc: dict[str, Tensor], rows: list[Row], token_ids: list[list[int]],
                   reuse: list[tuple[list[tuple[Tensor, Tensor]], dict[int, Tensor]]], extra: int,
                   grow: bool) -> tuple[Any, Steerer, dict[int, Tensor]] | None:
    """Forked rows read their prefix (the prompt and the unsteered tokens before the fork, all but the
    last fed token) from their trajectory instead of running it again: its keys and values go into a
    new KV cache (right-aligned in the batch's left-padded layout, zeros under the padding, which the
    mask hides), and the Steerer reads the trajectory's recorded layer outputs for those positions (a
    replay: the detectors' firings, latches and counts; before the fork nothing is edited). The same
    numbers the steered generation computes for those positions, bit for bit (they were the unsteered
    generation's own); generation then reads each row's last fed token over the cache."""
    width = enc["input_ids"].shape[1]
    if width < 2:
        return None
    cache = _new_cache(model, extra, grow)
    if cache is None:
        return None
    B = len(rows)
    m = width - 1
    for n_layer, layer in enumerate(cache.layers):
        k0, v0 = reuse[0][0][n_layer]
        keys = k0.new_zeros(B, k0.shape[0], m, k0.shape[-1])
        values = v0.new_zeros(B, v0.shape[0], m, v0.shape[-1])
        for i, (kv, _) in enumerate(reuse):
            n = len(token_ids[i]) - 1  # the row's prefix positions
            k, v = kv[n_layer]
            if k.shape[1] < n:  # pragma: no cover - the trajectory did not run that far
                return None
            keys[i, :, m - n :] = k[:, :n].to(keys.device)
            values[i, :, m - n :] = v[:, :n].to(values.device)
        layer.update(keys, values)
    steer = Steerer(rows, enc, model.tokenizer, split_prompt=True)
    if steer.layers:
        outs = {}
        for L in steer.layers:
            h0 = next(h[L] for _, h in reuse if L in h)
            out = h0.new_zeros(B, m, h0.shape[-1])
            for i, (_, hs) in enumerate(reuse):
                n = len(token_ids[i]) - 1
                if L in hs:
                    out[i, m - n :] = hs[L][:n].to(out.device)
            outs[L] = out
        with torch.inference_mode():
            steer.replay(outs, torch.arange(B))
    return cache, steer, {}


def _split_prefill(counts: dict[str, int], positions: dict[str, list[int]], c: int, prompt_len: int,
                   marks: tuple[Tensor, Tensor] | None) -> None:
    """A continued row's prefill read its prompt and then its first ``c`` generated tokens: move what
    fired and was edited on those to the generated side (positions 0..c-1), and shift the decode
    steps' positions by ``c``."""
    fired_at = [p - prompt_len for p in positions.get("prompt_fired", []) if p >= prompt_len]
    positions["prompt_fired"] = [p for p in positions.get("prompt_fired", []) if p < prompt_len]
    edited_at = [] if marks is None else marks[1].nonzero().flatten().tolist()
    positions["gen_fired"] = fired_at + [p + c for p in positions.get("gen_fired", [])]
    positions["gen_edited"] = edited_at + [p + c for p in positions.get("gen_edited", [])]
    if counts:
        counts["prompt_fired"] -= len(fired_at)
        counts["gen_fired"] += len(fired_at)
        counts["prompt_edited"] -= len(edited_at)
        counts["gen_edited"] += len(edited_at)


def check_prompts(prompts: Any) -> list[str]:
    """The prompts as a list of strings, or a :class:`SieveError` saying what is wrong (a lone ``str``
    would otherwise be read as one prompt per character).

    Example:
        >>> check_prompts("def f(")
        Traceback (most recent call last):
        ...
        sieve.errors.SieveError: prompts must be a list of strings, got one str ('def f('); wrap it in a list
    """
    if isinstance(prompts, str):
        short = prompts if len(prompts) <= 40 else prompts[:37] + "..."
        raise SieveError(f"prompts must be a list of strings, got one str ({short!r}); wrap it in a list")
    try:
        out = list(prompts)
    except TypeError as e:
        raise SieveError(f"prompts must be a list of strings, got {type(prompts).__name__}") from e
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise SieveError(f"prompt {i} is a {type(p).__name__}, not a str")
    return out


def check_layers(model, rows: list[Row], where: str = "row {i}") -> None:
    """Every layer an intervention reads or edits exists in ``model`` (a clear range error otherwise,
    starting with ``where``, formatted with the row index ``i``)."""
    n = num_layers(model)
    for i, row in enumerate(rows):
        for iv in row:
            for L in {*iv.layers, iv.reads_at}:  # type: ignore[misc]
                if L >= n:
                    raise SieveError(f"{where.format(i=i)}: {iv!r} uses layer {L}, but the model has {n} decoder "
                                     f"layers (0..{n - 1})")


def per_row(value: Any, n: int, what: str, cast) -> list:
    """One value for all ``n`` rows (a scalar) or one per row, checked."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [cast(value)] * n
    out = [cast(v) for v in value]
    if len(out) != n:
        raise SieveError(f"{what} needs one value per prompt ({n}), got {len(out)}")
    return out


def default_batch_size(model_or_device: Any, positions: int | None = None) -> int:
    """Rows per generation batch when none is given: 32 on a CPU; on CUDA, given a loaded model and
    ``positions`` (the longest prompt plus the tokens to generate), as many rows as fit in half the
    memory free on the fullest of the model's GPUs (:func:`rows_that_fit`; memory torch holds
    unused counts as free), in multiples of 16 above 16, else 128; halved when memory runs out either
    way. On CUDA the batches, and so a bf16 row's last bits, can then depend on what else holds the GPU.

    On the 2-core CPU, with the embedded world's prompts (tens to 190 tokens, sampled, rows ending at
    EOS), 32 rows gave 2,959 kept tokens/s, 64 gave 2,829 and 128 gave 2,578: a CPU's throughput does
    not grow with the batch, while padding and rows that have ended cost more in bigger ones. On an
    H200 (gemma-2-2b's config, bf16, 420 rows of 32 tokens, one machine) one batch of 420 took 2.54 s
    and batches of 128 took 4.74 s: a GPU's step grows far more slowly than its rows.

    Example:
        >>> default_batch_size("cpu"), default_batch_size("cuda")  # or a loaded model
        (32, 128)
    """
    if isinstance(model_or_device, (str, torch.device)):
        device = torch.device(model_or_device)
        model = None
    else:
        model = model_or_device
        device = next(underlying(model).parameters()).device
    if device.type != "cuda":
        return 32
    if model is None or positions is None:
        return 128
    hf = underlying(model)
    placed = (getattr(hf, "hf_device_map", None) or {}).values()  # accelerate's map: GPU indices, "cpu", "disk"
    devices = {torch.device("cuda", d) if isinstance(d, int) else torch.device(d) for d in placed
               if d not in ("cpu", "disk")}
    devices = {d for d in devices if d.type == "cuda"} or {device}
    free = min(_cuda_free(d) for d in devices)
    dtype = getattr(hf, "dtype", None)
    size = dtype.itemsize if isinstance(dtype, torch.dtype) else next(hf.parameters()).element_size()
    rows = rows_that_fit(hf.config, positions, size, free // 2)
    if rows is None:
        return 128
    return rows if rows <= 16 else rows // 16 * 16


def _cuda_free(device: torch.device) -> int:
    """Bytes free on a CUDA device, counting what torch's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def rows_that_fit(config: Any, positions: int, dtype_bytes: int, budget_bytes: int,
                  lo: int = 1, hi: int = 1024) -> int | None:
    """How many generation rows of ``positions`` positions fit in ``budget_bytes``, between ``lo`` and
    ``hi``: per row, the KV cache of every layer (sliding-window layers counted in full) plus one
    layer's prefill activations (hidden states, the MLP's two widest tensors, float32 attention scores
    as eager attention keeps them) and float32 logits of the last position. Meant as an upper bound on
    what a row needs (gemma-2-2b's config, bf16, 206 positions: 35.0 MiB estimated per row; on an H200
    the benchmark's 420 rows of up to 206 positions peaked at 32.4 MiB a row above the model), so the
    batch it gives is rarely halved. None where the config does not say its shape.

    Example:
        >>> from transformers import LlamaConfig
        >>> c = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        ...                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
        >>> rows_that_fit(c, 600, 2, 30 * 2**30)   # Llama-3.1-8B, 600 positions, 30 GiB: 180 MB a row
        179
    """
    try:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several text configs (some multimodal models): no single shape to read
        return None
    get = lambda *names: next((getattr(c, n) for n in names if isinstance(getattr(c, n, None), int)), None)  # noqa: E731
    layers, hidden = get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd")
    heads = get("num_attention_heads", "n_head")
    if not (layers and hidden and heads):
        return None
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // heads
    inter = get("intermediate_size", "n_inner") or 4 * hidden
    vocab = get("vocab_size") or 0
    kv = layers * 2 * kv_heads * head_dim * positions * dtype_bytes
    prefill = positions * (4 * hidden + 2 * inter) * dtype_bytes + heads * positions * positions * 4
    per_row = kv + prefill + 2 * vocab * 4
    return max(lo, min(hi, budget_bytes // per_row))


@dataclass
class _Prepared:
    """Everything :func:`generate` checks and lists once, before any batch: per row its prompt,
    interventions (prompt gates decided), temperature, seed, token ids as fed and heal."""

    prompts: list[str]
    rows: list[Row]
    gates_opened: list[bool | None]
    temps: list[float]
    seeds: list[int]
    stop: Any
    ids: list[list[int]]
    heals: list[Heal | None]


def _prepare(model, prompts: Any, interventions: Any, *, layer_index: int | None, max_new_tokens: int,
             temperature: float | Sequence[float], seeds: Sequence[int] | int, stop: Sequence[str],
             token_healing: bool, top_p: float = 1.0) -> _Prepared:
    prompts = check_prompts(prompts)
    n = len(prompts)
    if max_new_tokens < 1:
        raise SieveError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    # Every list is made and every check run once, here, before any batch: rows (layers bound, widths
    # checked), temperatures, seeds, stop strings, and the tokens of every prompt (over-long rows are
    # refused before any batch runs, rows of similar length share a batch, each batch takes its ids).
    rows = as_rows(interventions, n, layer_index, width=hidden_size(model))
    check_layers(model, rows)
    # Prompt gates (the lexical baseline) read the prompt as written, before healing touches its tokens.
    rows, gates_opened = resolve_prompt_gates(rows, prompts)
    temps = per_row(temperature, n, "temperature", float)
    bad = [t for t in temps if not math.isfinite(t) or t < 0]
    if bad:
        raise SieveError(f"temperature must be a finite number >= 0 (0: greedy), got {bad[0]}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):  # NaN fails too
        raise SieveError(f"top_p must be in (0, 1] (1: no nucleus cut), got {top_p!r}")
    seed_list = [int(seeds) + i for i in range(n)] if isinstance(seeds, int) else per_row(seeds, n, "seeds", int)
    stop_criterion = _stop_criterion(model.tokenizer, stop)
    if n == 0:
        return _Prepared([], [], [], [], [], stop_criterion, [], [])
    ids = tokenize_prompts(model.tokenizer, prompts)
    check_context(model, [len(r) for r in ids], max_new_tokens)
    heals: list[Heal | None] = [None] * n
    if token_healing:
        ids, heals = heal_rows(model.tokenizer, ids)
    return _Prepared(prompts, rows, gates_opened, temps, seed_list, stop_criterion, ids, heals)


def _run_batches(
    model,
    prep: _Prepared,
    idx: Sequence[int],
    *,
    max_new_tokens: int,
    top_p: float,
    batch_size: int | None,
    fed: dict[int, list[int]] | None = None,
    continued: dict[int, int] | None = None,
    rows: dict[int, Row] | None = None,
    record_layers: Callable[[list[int]], tuple[int, ...]] | None = None,
    on_outs: Callable[[list[int], _Record | None, list[Completion]], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    share_prefill: bool = True,
    kv_cache: str = "grow",
    drop_ended: bool | None = None,
    keep_kv: bool = False,
    reuse: dict[int, tuple[list[tuple[Tensor, Tensor]], dict[int, Tensor]]] | None = None,
    cascade: bool | None = None,
) -> dict[int, Completion]:
    """Generate rows ``idx`` of ``prep`` in batches of similar fed length (``fed`` overrides a row's
    ids, ``continued`` says how many of them it already generated, ``rows`` its interventions);
    ``batch_size=None`` takes :func:`default_batch_size` and halves it when CUDA runs out of memory.
    ``record_layers(batch)`` names layers whose outputs to record for a batch; ``on_outs(batch, record,
    completions)`` gets them (record None where none was asked for) once the batch is done; ``keep_kv``:
    the record keeps each row's keys and values too. ``reuse``: rows whose prefix is read from their
    trajectory (:func:`_reused_prefix`), batched apart from the others. ``cascade``: :func:`cascades`."""
    fed = fed or {}
    reuse = reuse or {}
    continued = continued or {}
    rows = rows or {}

    def length(j: int) -> int:
        return len(fed.get(j, prep.ids[j]))

    def budget(j: int) -> int:
        return max_new_tokens + (prep.heals[j] is not None) - continued.get(j, 0)

    # Rows of similar length share a batch; continued rows first by budget left (a batch runs until its
    # longest row ends, so a short continuation beside a full row would save nothing).
    # With share_prefill, rows that can share their prefill (same ids, same interventions) next to each
    # other, in the order such a group first appears (never by memory address: the same call gives the
    # same batches in any process).
    first: dict[tuple, int] = {}
    if share_prefill:
        for j in idx:
            first.setdefault(_row_key(fed.get(j, prep.ids[j]), rows.get(j, prep.rows[j])), j)

    def same(j: int) -> tuple:
        if not share_prefill:
            return (length(j),)
        return length(j), first[_row_key(fed.get(j, prep.ids[j]), rows.get(j, prep.rows[j]))]

    # With drop_ended, rows leave their batch when they end (at their budget at the latest), so rows of
    # any budget share batches by length alone.
    drop_ended = drops_ended(model, drop_ended)
    cascade = share_prefill and kv_cache == "grow" and cascades(model, cascade)
    order = sorted(idx, key=(lambda j: (j in reuse, -budget(j), *same(j))) if continued and not drop_ended
                   else lambda j: (j in reuse, *same(j)))
    # Without drop_ended, a batch runs every row for its largest budget: with learned positions (GPT-2),
    # a long continued row beside a row with more budget left would run past the model's positions, so
    # such a row starts the next batch (each row alone fits: check_context). With it, a row that has
    # ended leaves before its positions run out (_DropEnded).
    limit = getattr(underlying(model).config, "n_positions", None) if not drop_ended else None
    bs = batch_size or default_batch_size(model, max((length(j) for j in idx), default=0) + max_new_tokens + 1)
    results: dict[int, Completion] = {}
    i = 0
    while i < len(order):
        batch = order[i : i + bs]
        if batch[0] not in reuse and batch[-1] in reuse:  # rows reading their prefix from a trajectory: apart
            batch = [j for j in batch if j not in reuse]
        if isinstance(limit, int):
            k = 1
            while k < len(batch) and max(map(length, batch[: k + 1])) + max(map(budget, batch[: k + 1])) <= limit:
                k += 1
            batch = batch[:k]
        layers = record_layers(batch) if record_layers is not None else ()
        record = _Record(tuple(layers), keep_kv=keep_kv) if layers else None
        try:
            outs = _generate_batch(
                model, [prep.prompts[j] for j in batch], [rows.get(j, prep.rows[j]) for j in batch],
                [fed.get(j, prep.ids[j]) for j in batch],
                max_new_tokens=max_new_tokens, temperatures=[prep.temps[j] for j in batch],
                seeds=[prep.seeds[j] for j in batch], top_p=top_p, stop=prep.stop,
                heals=[prep.heals[j] for j in batch], gates_opened=[prep.gates_opened[j] for j in batch],
                continued=[continued.get(j, 0) for j in batch] if continued else None, record=record,
                share_prefill=share_prefill, kv_cache=kv_cache, drop_ended=drop_ended,
                reuse=[reuse[j] for j in batch] if batch[0] in reuse else None, cascade=cascade,
            )
        except torch.cuda.OutOfMemoryError:
            if bs == 1 or batch_size is not None:
                raise
            bs //= 2
            torch.cuda.empty_cache()
            log.warning("out of memory: batch size now %d", bs)
            continue
        results.update(zip(batch, outs))
        if on_outs is not None:
            on_outs(batch, record, outs)
        if on_batch is not None:
            on_batch(len(batch))
        i += len(batch)
    return results


def generate(
    model,
    prompts: list[str],
    interventions: Any = None,
    *,
    layer_index: int | None = None,
    max_new_tokens: int = 64,
    temperature: float | Sequence[float] = 0.0,
    seeds: Sequence[int] | int = 0,
    top_p: float = 1.0,
    stop: Sequence[str] = (),
    batch_size: int | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    token_healing: bool = True,
    share_prefill: bool = True,
    kv_cache: str = "grow",
    drop_ended: bool | None = None,
    cascade: bool | None = None,
) -> list[Completion]:
    """Generate for every prompt with its own interventions, in batches, edited at every step.

    ``interventions`` is one per prompt (an :class:`~sieve.interventions.Intervention`, a list of them
    composed on that row, or None: unsteered), or one for all. Each intervention carries its layers;
    ``layer_index`` binds those that carry none. ``seeds`` is one per prompt
    (or a base seed: row i gets base + i). A row ends at EOS or at the token whose text completes one of
    ``stop`` (kept in the text, with whatever else that token carries: a token ``"\\n\\n   "`` ends a
    row at ``"\\n\\n"`` with its spaces; e.g. ``["```"]`` ends a fenced code block). ``batch_size=None`` takes
    :func:`default_batch_size` and halves it when CUDA runs out of memory. Rows are grouped by prompt
    length to limit padding; results come back in the input order. ``on_batch(n)`` is called after each
    batch with its number of rows (e.g. a caller's own progress bar's ``update``).

    ``token_healing`` (on by default): a prompt ending where the tokenizer would merge with the next
    text (``"\\n"`` before indentation, a trailing space, half a word) is fed without its last token,
    and the first generated token must start with that token's text (:mod:`sieve.healing`); the
    completion's ``text`` continues the prompt as written, ``healed`` says what was re-spelled.
    ``False`` feeds the prompts' tokens as they are.

    ``share_prefill`` (on by default): rows of a batch with the same prompt and the same interventions
    (the samples of one prompt) read the prompt once: its positions but the last run once into a KV
    cache, which every such row then starts from. The same completions up to float noise: the prompt's
    last position is computed over the cache rather than inside one prefill, which moves its logits in
    the last bits (up to 6e-6 on the world's prompts), so a sampled near-tie can flip, as in another batch
    composition. ``False`` runs every row's prefill by itself.
    ``kv_cache``: ``"grow"`` (default) writes each step's keys and values into room kept ahead
    (:mod:`sieve.kvcache`; the same keys and values, the same completions); ``"hf"`` is HF's own
    cache, which copies itself at every step. A cache the model's generation config names (static,
    offloaded, quantized) is left to HF, and then no prefill is shared.
    ``drop_ended``: rows that have ended leave their batch while the others go on (:class:`_DropEnded`;
    ``None``, the default, where the model runs on a CPU: :func:`drops_ended`). The same completions:
    each row computes what it computed in the full batch (bit for bit on CPU float32 in sieve's tests; a
    smaller batch may take other GPU kernels, which can flip a bf16 near-tie as another batch
    composition can). ``False``: every row runs until its batch's last row ends.
    ``cascade``: with a shared prefill, the rows sharing a prompt read its keys once at every decode
    step, stacked against the prompt's keys (:func:`sieve.kvcache.cascade_attention`), instead of each
    row reading its own copy (``None``, the default, where the model runs on a CPU: :func:`cascades`).
    The same completions up to float noise: each row's attention is summed in two parts, merged.

    :func:`sieve.fork.generate_forked` gives the same completions doing only the work gates cause.

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> outs = generate(w.model, ["def add(a, b):\\n"], max_new_tokens=8, progress=False)
        >>> outs[0].healed, len(outs[0].token_ids) <= 8 + 1  # "\\n" re-spelled, then 8 tokens at most
        ('\\n', True)
    """
    prep = _prepare(model, prompts, interventions, layer_index=layer_index, max_new_tokens=max_new_tokens, top_p=top_p,
                    temperature=temperature, seeds=seeds, stop=stop, token_healing=token_healing)
    n = len(prep.prompts)
    if n == 0:
        return []
    bar = tqdm(total=n, desc="generate", unit="row", disable=not progress)

    def done(k: int) -> None:
        bar.update(k)
        if on_batch is not None:
            on_batch(k)

    results = _run_batches(model, prep, range(n), max_new_tokens=max_new_tokens, top_p=top_p,
                           batch_size=batch_size, on_batch=done, share_prefill=share_prefill, kv_cache=kv_cache,
                           drop_ended=drop_ended, cascade=cascade)
    bar.close()
    return [results[j] for j in range(n)]


def steered_logits(
    model,
    texts: Sequence[str],
    interventions: Any = None,
    *,
    layer_index: int | None = None,
    batch_size: int = 16,
    last_only: bool = False,
    progress: bool = False,
):
    """The one teacher-forced steered forward: yields ``(start, encoding, logits)`` per batch of
    ``texts`` (left-padded, BOS added as generation adds it), each row under its interventions, edited
    exactly as in :func:`generate`. ``last_only`` keeps only the last position's logits ``[B, V]``.

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> [tuple(x.shape) for _, _, x in steered_logits(w.model, ["def f(", "x ="], last_only=True)]
        [(2, 4096)]
    """
    texts = check_prompts(texts)
    rows = as_rows(interventions, len(texts), layer_index, width=hidden_size(model))
    check_layers(model, rows)
    device = next(underlying(model).parameters()).device
    for i in tqdm(range(0, len(texts), batch_size), desc="steered forward", disable=not progress):
        enc = {k: v.to(device) for k, v in encode_prompts(model.tokenizer, texts[i : i + batch_size]).items()}
        steer = Steerer(rows[i : i + batch_size], enc, model.tokenizer)
        with torch.inference_mode():
            with model.trace(enc, **(_last_logits_only(model) if last_only else {})):
                steer.forward(model)
                logits = (model.output.logits[:, -1] if last_only else model.output.logits).save()
        yield i, enc, logits
