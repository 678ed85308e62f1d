"""Do only the work a gate causes: gated rows are forked from the unsteered trajectory.

Rows of a sweep share seeds by (prompt, sample), and each row samples from its own generator, one
uniform draw per step (:class:`~sieve.generation.RowSampler`). A row whose interventions have edited
nothing yet computes exactly what the unsteered row computes: the same activations, logits, draws and
tokens. :func:`generate_forked` gives the completions :func:`~sieve.generation.generate` gives, doing
only that work:

1. every (prompt, temperature, seed) that has a gated or unsteered row is generated once, unsteered
   (greedy rows of a prompt share one, whatever their seeds: a seed moves no greedy token),
   keeping the outputs of the layers its gated rows read and edit, at every forward (a group with no
   unsteered row first reads its prompt alone, and its rows that edit there skip to 5);
2. each gated row's interventions are replayed over those outputs (a
   :class:`~sieve.interventions.Steerer` fed the recorded layer outputs, forward by forward, counting
   what the row's own generation counts);
3. a row that edits nothing on the forwards that make its completion (the prompt, and every kept
   token whose forward produces a kept token or the EOS) *is* the unsteered row: its tokens, text
   and end, with the replay's detector counts; nothing is generated for it;
4. a row that first edits at the forward reading generated token ``j`` continues from the prompt and
   the unsteered tokens ``0..j``: the intervention active, its generator past the ``j + 1`` draws
   already made, ``j + 1`` tokens less budget. With ``share_prefill`` (the default) it reads its prefix
   (all but token ``j``) from the trajectory: the keys and values the trajectory's batch kept, and the
   recorded layer outputs replayed into its Steerer. Only on a CPU (elsewhere the kept keys and values
   would cost device memory, and a prefill is cheap), and where sieve builds the cache and every layer
   keeps all positions; otherwise (a GPU, sliding-window layers, a cache named in the generation
   config, ``kv_cache="hf"`` with no prefill shared, ``share_prefill=False``) the prefix is fed again
   as one prefill;
5. a row that edits in the prompt, or carries an ``always`` gate (it edits from the first token),
   is generated in full: these gain nothing.

Why the replay finds the first edit exactly. An edit whose gate is closed adds exactly zero (the
coefficient of a direction edit is zeroed before the product; a latent edit's ``f' − f`` is multiplied
by the gate), so before the first edit every layer of the row's steered generation outputs what the
unsteered one did. Let ``p`` be the first position where the steered generation edits, at its lowest
layer ``L`` there: the gate deciding it was read at or before ``L``, from outputs that are still
unsteered at ``p`` and before, so the replay (fed the unsteered outputs) edits at ``p`` too; and the
replay cannot edit before ``p``, where its inputs equal the steered generation's. Latches carry only
what earlier positions decided. Edits the replay finds after ``p`` are off the row's path and unused.
An edit that changes nothing (a scale of 0) still counts as an edit: the row is forked, still exact.

:func:`forked_forward` does the same for teacher-forced evaluations (held-out loss, any per-text
score): one unsteered forward, each cell replayed over it, a steered forward only where a cell edits.

Float noise. The replay reads the decode steps' own outputs, so a reused row is bitwise the row the
steered generation would make (in its own batch: see :mod:`sieve.generation` on batch composition),
and so is a forked row's prefix read from its trajectory. A prefix fed again in one prefill (instead
of one decode step per token) can change the last bits of float sums; a sampled near-tie can then
differ from a full generation, as a different batch composition can.

Example:
    >>> from sieve.interventions import Detector, Edit, Intervention
    >>> from sieve.world import load_world
    >>> w = load_world()
    >>> wv, b = w.feature.linear()
    >>> iv = Intervention("token", Edit("add", w.feature.direction, -10.0), Detector(wv, b), w.threshold,
    ...                   layers=w.layer)
    >>> outs, summary = generate_forked(w.model, ["def f(s):\\n"] * 2, [None, iv], max_new_tokens=8,
    ...                                 progress=False)
    >>> summary.rows, summary.unsteered + summary.reused + summary.forked + summary.full
    (2, 2)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.std import tqdm

from sieve.generation import Completion, _on_cpu, _prepare, _Prepared, _Record, _run_batches
from sieve.interventions import Always, Row, Steerer
from sieve.models import _last_logits_only

__all__ = ["ForkSummary", "generate_forked", "first_edits", "forked_forward"]

log = logging.getLogger(__name__)

# Gated rows replayed at once over one recorded batch (each takes its trajectory's outputs).
_REPLAY_ROWS = 256


@dataclass
class ForkSummary:
    """The work :func:`generate_forked` saved, by row and by token.

    ``unsteered``: rows without interventions (each is a trajectory); ``reused``: gated rows whose gate
    never edited on their trajectory, or whose prompt gate stayed shut (nothing generated); ``forked``:
    gated rows continued from the first edit; ``full``: rows generated in full, ``full_prompt`` of them
    because they edit in the prompt and ``full_always`` under an ``always`` gate (or an open prompt
    gate: both edit from the first token). ``trajectories``: unsteered generations run
    (``extra_trajectories`` of them for gated rows only). ``tokens``: tokens generated;
    ``tokens_full``: the tokens of all completions (what generating every row in full makes).
    ``texts`` / ``texts_reused``: teacher-forced texts under steered cells (:func:`forked_forward`;
    harness requests in :func:`sieve.evals.lmeval.run_harness_cells`), and those a cell never edited,
    whose unsteered result was reused.

    Example:
        >>> s = ForkSummary(rows=4, reused=2, forked=1, full=1, full_always=1, tokens=30, tokens_full=60)
        >>> s.saved
        0.5
    """

    rows: int = 0
    unsteered: int = 0
    reused: int = 0
    forked: int = 0
    full: int = 0
    full_prompt: int = 0
    full_always: int = 0
    trajectories: int = 0
    extra_trajectories: int = 0
    tokens: int = 0
    tokens_full: int = 0
    texts: int = 0
    texts_reused: int = 0

    @property
    def saved(self) -> float:
        """The share of the completions' tokens that were not generated."""
        return 1.0 - self.tokens / self.tokens_full if self.tokens_full else 0.0

    def add(self, other: ForkSummary) -> ForkSummary:
        """Add ``other``'s counts to this summary (in place); returns it."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"saved": round(self.saved, 4)}

    def __str__(self) -> str:
        return (f"{self.rows} rows: {self.unsteered} unsteered, {self.reused} reused (gate never edited), "
                f"{self.forked} forked at their first edit, {self.full} in full ({self.full_prompt} edit in the "
                f"prompt, {self.full_always} always-gated: no gain); {self.trajectories} unsteered trajectories "
                f"({self.extra_trajectories} for gated rows only); {self.tokens} of {self.tokens_full} tokens "
                f"generated ({100 * self.saved:.1f}% saved)")


def _always(row: Row) -> bool:
    return any(isinstance(iv.condition, Always) for iv in row)


def _layers(row: Row) -> set[int]:
    return {L for iv in row for L in (*iv.layers, iv.reads_at)}  # type: ignore[misc]


def first_edits(steer: Steerer, record: _Record, at: Sequence[int], codes: dict | None = None,
                start: int = 0) -> None:
    """Replay ``steer``'s rows over the unsteered layer outputs in ``record``: row ``i`` reads batch
    row ``at[i]`` of every recorded forward, counted as that row's generation counted it. Afterwards
    ``steer.counts()`` and ``steer.positions()`` say where the rows would have fired and edited (exact
    up to and including each row's first edit). ``codes``: one dict shared by the Steerers replaying
    the same record, so each recorded tensor is SAE-encoded once. ``start``: the first recorded forward
    to replay (1: the prompt was replayed already, :func:`_prompt_replayed`)."""
    steer.replay_codes = codes
    # Rows that left their batch early have zero outputs recorded afterwards (_Record.widen): a detector
    # may fire on them, but record.keeps leaves those forwards uncounted, so no count or mark moves.
    idx = torch.tensor(list(at), dtype=torch.long)
    n_forwards = len(record.outputs[steer.layers[0]]) if steer.layers else 0
    for k in range(start, n_forwards):
        counted = None if k == 0 else record.keeps[k - 1][idx.to(record.keeps[k - 1].device)]
        steer.replay({L: record.outputs[L][k] for L in steer.layers}, idx, counted)


def _prefix_of(record: _Record, t: int, prompt_len: int, c: int, layers: set[int]):
    """A forked row's prefix from its trajectory (batch row ``t`` of ``record``): the prompt's
    ``prompt_len`` tokens and the first ``c - 1`` generated ones (the last fed token, where the row
    first edits, is read by its own generation): per cache layer their keys and values, and per layer
    in ``layers`` the recorded outputs ``[prompt_len + c - 1, D]``."""
    n = prompt_len + c - 1
    width = record.encoding["input_ids"].shape[1]
    kv = [(k[:, :n], v[:, :n]) for k, v in record.kv[t]]  # views: one copy per trajectory row, however many fork
    hs = {L: torch.cat([record.outputs[L][0][t, width - prompt_len :],
                        *[record.outputs[L][k][t] for k in range(1, c)]], 0) for L in layers}
    return kv, hs


def _prompt_replayed(model, rows: list[Row], record: _Record, at: Sequence[int]) -> Steerer:
    """A Steerer for ``rows`` (row ``i`` reading recorded batch row ``at[i]``) that has replayed the
    recorded prompt forward. Rows with the same interventions reading recorded rows whose prompt ids
    and recorded prompt outputs are equal bit for bit (a prompt's samples: one shared prefill) replay it
    once; each row then goes on from its own copy of that state (:meth:`Steerer.take`). The same
    numbers as replaying every row: equal inputs, row by row the same computation."""
    enc = record.encoding
    layers = sorted(record.outputs)
    rep: dict[int, int] = {}  # recorded row -> the first recorded row with the same prompt and outputs
    firsts: list[int] = []
    for t in dict.fromkeys(at):
        for f in firsts:
            if all(torch.equal(enc[k][t], enc[k][f]) for k in enc) and \
                    all(torch.equal(record.outputs[L][0][t], record.outputs[L][0][f]) for L in layers):
                rep[t] = f
                break
        else:
            rep[t] = t
            firsts.append(t)
    keys = [(rep[t], tuple(id(iv) for iv in row)) for row, t in zip(rows, at)]
    slot: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        slot.setdefault(k, i)
    distinct = list(slot.values())
    src = torch.tensor([at[i] for i in distinct])
    one = Steerer([rows[i] for i in distinct], {k: v[src] for k, v in enc.items()}, model.tokenizer,
                  split_prompt=True)
    # the distinct recorded rows once (each SAE-encoded once), each distinct row reading its own
    reps = torch.tensor(firsts)
    of_rep = {f: n for n, f in enumerate(firsts)}
    one.replay({L: record.outputs[L][0][reps.to(record.outputs[L][0].device)] for L in one.layers},
               torch.tensor([of_rep[rep[at[i]]] for i in distinct]))
    place = {i: n for n, i in enumerate(distinct)}
    return one.take([place[slot[k]] for k in keys], _encoding_rows(record, at))


def _encoding_rows(record: _Record, at: Sequence[int]) -> dict[str, torch.Tensor]:
    idx = torch.tensor(list(at), dtype=torch.long)
    return {k: v[idx] for k, v in record.encoding.items()}


def generate_forked(
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
) -> tuple[list[Completion], ForkSummary]:
    """:func:`~sieve.generation.generate` (same arguments, same completions; with ``cascade``, on by
    default on a CPU, a forked row and its full twin differ by float noise: the forked row attends over
    its kept keys whole, the full one in two parts), doing only the work the gates cause: rows that
    share a prompt, temperature and seed (any seed where greedy) share their unsteered trajectory until
    their interventions first edit (module docstring). Returns the completions in input order and a
    :class:`ForkSummary` of the work saved.

    Example:
        >>> from sieve.interventions import Detector, Edit, Intervention
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> wv, b = w.feature.linear()
        >>> ivs = [None] + [Intervention("input", Edit("add", w.feature.direction, s), Detector(wv, b), w.threshold,
        ...                              layers=w.layer) for s in (-5.0, -10.0)]
        >>> outs, summary = generate_forked(w.model, ["import re\\n\\ndef f(s):\\n"] * 3, ivs, max_new_tokens=8,
        ...                                 temperature=0.8, seeds=[7, 7, 7], progress=False)
        >>> len(outs), summary.trajectories
        (3, 1)
    """
    prep = _prepare(model, prompts, interventions, layer_index=layer_index, max_new_tokens=max_new_tokens, top_p=top_p,
                    temperature=temperature, seeds=seeds, stop=stop, token_healing=token_healing)
    n = len(prep.prompts)
    summary = ForkSummary(rows=n)
    if n == 0:
        return [], summary
    bar = tqdm(total=n, desc="generate (forked)", unit="row", disable=not progress)

    def done(k: int) -> None:
        bar.update(k)
        if on_batch is not None:
            on_batch(k)

    # Rows that share a trajectory: same prompt text (so the same ids and heal), temperature and seed; a
    # greedy row's tokens do not depend on its seed (every row draws one uniform per step; argmax decides).
    groups: dict[tuple[str, float, int | None], list[int]] = {}
    full: list[int] = []
    for j in range(n):
        if _always(prep.rows[j]):
            full.append(j)
            summary.full_always += 1
        else:
            groups.setdefault((prep.prompts[j], prep.temps[j], prep.seeds[j] if prep.temps[j] > 0 else None),
                              []).append(j)
    results: dict[int, Completion] = {}
    fed: dict[int, list[int]] = {}
    continued: dict[int, int] = {}
    # A group with no unsteered row would have a trajectory made for it alone: read its prompt first (one
    # unsteered forward per prompt) and send the rows that edit in the prompt to full generation at once;
    # a group left without rows needs no trajectory. (The trajectory's own replay decides the rest.)
    lone = [j for members in groups.values() if all(prep.rows[k] for k in members) for j in members]
    if lone:
        for j in _prompt_edits(model, prep, lone, batch_size):
            fed[j] = prep.ids[j]
        groups = {k: kept for k, v in groups.items() if (kept := [j for j in v if j not in fed])}
    rep = {members[0]: members for members in groups.values()}  # a trajectory is made in its first row's place

    def record_layers(batch: list[int]) -> tuple[int, ...]:
        return tuple(sorted({L for r in batch for j in rep[r] for L in _layers(prep.rows[j])}))

    def on_outs(batch: list[int], record: _Record | None, outs: list[Completion]) -> None:
        before = len(results)
        for r, traj in zip(batch, outs):
            plain = [j for j in rep[r] if not prep.rows[j]]
            summary.extra_trajectories += not plain
            summary.tokens += len(traj.token_ids)
            for j in plain:  # unsteered, or a prompt gate that stayed shut (reused)
                results[j] = _as_row(traj, prep.gates_opened[j])
                if prep.gates_opened[j] is False:
                    summary.reused += 1
                else:
                    summary.unsteered += 1
        gated = [(j, t) for t, r in enumerate(batch) for j in rep[r] if prep.rows[j]]
        if gated:
            if record is None:  # pragma: no cover - record_layers names a layer for every gated row
                raise RuntimeError("a batch with gated rows was not recorded")
            codes: dict = {}  # SAE codes of the recorded outputs, shared by the replays of this batch
            for s in range(0, len(gated), _REPLAY_ROWS):
                _decide(model, prep, gated[s : s + _REPLAY_ROWS], record, outs, results, fed, continued, summary,
                        codes)
            if record.kv:  # forked rows: their prefix's keys, values and layer outputs, from the trajectory
                for j, t in gated:
                    if continued.get(j) and t in record.kv:
                        reuse[j] = _prefix_of(record, t, len(prep.ids[j]), continued[j], _layers(prep.rows[j]))
                record.kv.clear()
        done(len(results) - before)

    # 1. the trajectories, unsteered (in a gated row's place where a group has no unsteered row), the
    # layers their gated rows use recorded (and, with share_prefill, the keys and values: a forked row
    # reads its prefix from them); each batch's gated rows are replayed and decided at once
    reuse: dict[int, Any] = {}
    # Kept keys and values cost device memory (for an 8B model, megabytes per token of a row): kept on a
    # CPU, where a prefix read again costs as much as dozens of decode steps; a GPU reads it again.
    trajectories = _run_batches(model, prep, list(rep), max_new_tokens=max_new_tokens, top_p=top_p,
                                batch_size=batch_size, rows={r: () for r in rep}, record_layers=record_layers,
                                on_outs=on_outs, share_prefill=share_prefill,
                                kv_cache=kv_cache, drop_ended=drop_ended, keep_kv=share_prefill and _on_cpu(model),
                                cascade=cascade)
    summary.trajectories = len(trajectories)
    # 2. the rest, forked or in full, batched together by fed length
    rest = full + list(fed)
    summary.full_prompt = sum(1 for j in fed if not continued.get(j))
    summary.full = summary.full_always + summary.full_prompt
    summary.forked = sum(1 for j in fed if continued.get(j))
    if rest:
        outs = _run_batches(model, prep, rest, max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size,
                            fed={j: f for j, f in fed.items() if continued.get(j)}, continued=continued,
                            on_batch=done, share_prefill=share_prefill, kv_cache=kv_cache,
                            drop_ended=drop_ended, reuse=reuse, cascade=cascade)
        for j, o in outs.items():
            results[j] = o
            summary.tokens += len(o.token_ids) - continued.get(j, 0)
    bar.close()
    summary.tokens_full = sum(len(c.token_ids) for c in results.values())
    log.debug("forked generation: %s", summary)
    return [results[j] for j in range(n)], summary


def _prompt_edits(model, prep: _Prepared, idx: list[int], batch_size: int | None) -> set[int]:
    """The rows of ``idx`` whose interventions edit in their prompt: one unsteered forward per distinct
    prompt (batched by length), each row's interventions replayed over its layer outputs."""
    from sieve.generation import default_batch_size
    from sieve.models import pad_id, pad_left, underlying

    tok = model.tokenizer
    by_prompt: dict[str, list[int]] = {}
    for j in idx:
        by_prompt.setdefault(prep.prompts[j], []).append(j)
    texts = sorted(by_prompt, key=lambda p: len(prep.ids[by_prompt[p][0]]))
    bs = batch_size or default_batch_size(model)
    device = next(underlying(model).parameters()).device
    edited: set[int] = set()
    for i in range(0, len(texts), bs):
        chunk = texts[i : i + bs]
        enc = {k: v.to(device) for k, v in pad_left([prep.ids[by_prompt[p][0]] for p in chunk], pad_id(tok)).items()}
        pairs = [(t, j) for t, p in enumerate(chunk) for j in by_prompt[p]]
        record = _Record(tuple(sorted({L for _, j in pairs for L in _layers(prep.rows[j])})))
        with torch.inference_mode():
            with model.trace(enc, **_last_logits_only(model)):
                record.read(model)
            for s in range(0, len(pairs), _REPLAY_ROWS):
                part = pairs[s : s + _REPLAY_ROWS]
                at = torch.tensor([t for t, _ in part])
                steer = Steerer([prep.rows[j] for _, j in part], {k: v[at.to(device)] for k, v in enc.items()}, tok)
                steer.replay({L: record.outputs[L][0] for L in steer.layers}, at)
                edited.update(j for (_, j), e in zip(part, steer.counts()["prompt_edited"]) if e)
    return edited


def _as_row(traj: Completion, opened: bool | None, counts: dict[str, int] | None = None,
            positions: dict[str, list[int]] | None = None) -> Completion:
    """The trajectory as a row of its own: its tokens and end, the row's counts (zero for an unsteered
    row) and prompt gate."""
    base = {k: 0 for k in traj.counts if k != "prompt_gate_opened"}
    pos = positions if positions is not None else {k: [] for k in traj.positions}
    return dataclasses.replace(
        traj, token_ids=list(traj.token_ids),
        counts=(counts if counts is not None else base) | ({} if opened is None else {"prompt_gate_opened": int(opened)}),
        positions={k: [p for p in v if k.startswith("prompt") or p < len(traj.token_ids)] for k, v in pos.items()},
    )


def _decide(model, prep: _Prepared, gated: list[tuple[int, int]], record: _Record, outs: list[Completion],
            results: dict[int, Completion], fed: dict[int, list[int]], continued: dict[int, int],
            summary: ForkSummary, codes: dict | None = None) -> None:
    """Replay ``gated`` rows (row index, place in the recorded batch) and decide each: reused, forked
    at its first edit, or generated in full (edits in the prompt)."""
    at = [t for _, t in gated]
    with torch.inference_mode():
        steer = _prompt_replayed(model, [prep.rows[j] for j, _ in gated], record, at)
        first_edits(steer, record, at, codes, start=1)
    counts, where = steer.counts(), steer.positions()
    for i, (j, t) in enumerate(gated):
        traj = outs[t]
        if counts["prompt_edited"][i]:
            fed[j] = prep.ids[j]
        elif where["gen_edited"][i]:
            first = where["gen_edited"][i][0]
            fed[j] = list(prep.ids[j]) + list(traj.token_ids[: first + 1])
            continued[j] = first + 1
        else:
            results[j] = _as_row(traj, prep.gates_opened[j], {k: v[i] for k, v in counts.items()},
                                 {k: list(v[i]) for k, v in where.items()})
            summary.reused += 1


def forked_forward(
    model,
    texts: Sequence[str],
    cells: Sequence[Any],
    reduce: Callable[[dict[str, torch.Tensor], torch.Tensor], list[Any]],
    *,
    layer_index: int | None = None,
    batch_size: int = 16,
    last_only: bool = False,
    progress: bool = False,
) -> tuple[list[list[Any]], ForkSummary]:
    """Teacher-forced forwards of ``texts`` under each of ``cells`` (each an intervention for every text,
    a list composed on every text, or None), doing only the work the gates cause: one unsteered forward
    per batch, each cell's interventions replayed over its layer outputs, and a steered forward only for
    the texts where a cell edits (rows of all cells batched together). ``reduce(encoding, logits)`` turns
    a batch's logits (``[B, T, V]``, or ``[B, V]`` with ``last_only``) into one result per row; a text a
    cell never edits gets the unsteered result, exactly (same batch, same forward). Returns per cell the
    per-text results, and a summary (``texts``: text × cell pairs, ``texts_reused``: those reused).

    Example:
        >>> from sieve.interventions import Detector, Edit, Intervention
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> wv, b = w.feature.linear()
        >>> iv = Intervention("token", Edit("add", w.feature.direction, -10.0), Detector(wv, b), w.threshold,
        ...                   layers=w.layer)
        >>> out, summary = forked_forward(w.model, ["def f(x):\\n    return x\\n"], [None, iv],
        ...                               lambda enc, logits: list(logits.argmax(-1)), last_only=True)
        >>> len(out), len(out[0]), summary.texts
        (2, 1, 1)
    """
    from sieve.generation import check_layers, check_prompts, steered_logits
    from sieve.interventions import as_rows
    from sieve.models import encode_prompts, hidden_size, underlying

    texts = check_prompts(texts)
    n = len(texts)
    width = hidden_size(model)
    rows = []
    for c in cells:
        r = as_rows([list(c) if isinstance(c, (list, tuple)) else c], 1, layer_index, width=width)[0]
        check_layers(model, [r])
        rows.append(r)
    summary = ForkSummary()
    out: list[list[Any]] = [[None] * n for _ in cells]
    layers = tuple(sorted({L for r in rows for L in _layers(r)}))
    todo: list[tuple[int, int]] = []  # (cell, text) pairs that a cell edits
    device = next(underlying(model).parameters()).device
    for i in tqdm(range(0, n, batch_size), desc="forward (forked)", disable=not progress):
        enc = {k: v.to(device) for k, v in encode_prompts(model.tokenizer, texts[i : i + batch_size]).items()}
        B = enc["input_ids"].shape[0]
        record = _Record(layers)
        with torch.inference_mode():
            with model.trace(enc, **(_last_logits_only(model) if last_only else {})):
                record.read(model)
                logits = (model.output.logits[:, -1] if last_only else model.output.logits).save()
            base = reduce(enc, logits)
            for c, r in enumerate(rows):
                if not r:
                    out[c][i : i + B] = base
                    continue
                if not _always(r) or any("prompt_gate" in iv.meta for iv in r):
                    steer = Steerer([r] * B, enc, model.tokenizer)
                    steer.replay({L: record.outputs[L][0] for L in steer.layers}, torch.arange(B))
                    edited = steer.counts()["prompt_edited"]
                else:
                    edited = [1] * B
                summary.texts += B
                for b in range(B):
                    if edited[b]:
                        todo.append((c, i + b))
                    else:
                        out[c][i + b] = base[b]
                        summary.texts_reused += 1
    # The edited (cell, text) pairs, rows of all cells batched together, longest texts first.
    todo.sort(key=lambda ct: -len(texts[ct[1]]))
    steered = [rows[c] for c, _ in todo]
    for i, enc, logits in steered_logits(model, [texts[t] for _, t in todo], [list(r) for r in steered],
                                         batch_size=batch_size, last_only=last_only):
        for (c, t), res in zip(todo[i : i + batch_size], reduce(enc, logits)):
            out[c][t] = res
    return out, summary
