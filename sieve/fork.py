"""Do only the work a gate causes: gated rows are forked from the unsteered trajectory.

Rows of a sweep share seeds by (prompt, sample), and each row samples from its own generator, one
uniform draw per step (:class:`~sieve.generation.RowSampler`). A row whose interventions have edited
nothing yet computes exactly what the unsteered row computes: the same activations, logits, draws and
tokens. :func:`generate_forked` gives the completions :func:`~sieve.generation.generate` gives, doing
only that work:

1. every (prompt, temperature, seed) that has a gated or unsteered row is generated once, unsteered,
   keeping the outputs of the layers its gated rows read and edit, at every forward;
2. each gated row's interventions are replayed over those outputs (a
   :class:`~sieve.interventions.Steerer` fed the recorded layer outputs, forward by forward, counting
   what the row's own generation counts);
3. a row that edits nothing on the forwards that make its completion (the prompt, and every kept
   token whose forward produces a kept token or the EOS) *is* the unsteered row: its tokens, text
   and end, with the replay's detector counts; nothing is generated for it;
4. a row that first edits at the forward reading generated token ``j`` continues from the prompt and
   the unsteered tokens ``0..j``: the intervention active, its generator past the ``j + 1`` draws
   already made, ``j + 1`` tokens less budget (the prefix is fed again as one prefill);
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

Float noise. The replay reads the decode steps' own outputs, so a reused row is bitwise the row the
steered generation would make (in its own batch: see :mod:`sieve.generation` on batch composition). A
forked row re-reads its prefix in one prefill instead of one decode step per token, which can change
the last bits of float sums; a sampled near-tie can then differ from a full generation, as a different
batch composition can.

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

from sieve.generation import Completion, _prepare, _Prepared, _Record, _run_batches
from sieve.interventions import Always, Row, Steerer

__all__ = ["ForkSummary", "generate_forked", "first_edits"]

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


def first_edits(steer: Steerer, record: _Record, at: Sequence[int]) -> None:
    """Replay ``steer``'s rows over the unsteered layer outputs in ``record``: row ``i`` reads batch
    row ``at[i]`` of every recorded forward, counted as that row's generation counted it. Afterwards
    ``steer.counts()`` and ``steer.positions()`` say where the rows would have fired and edited (exact
    up to and including each row's first edit)."""
    idx = torch.tensor(list(at), dtype=torch.long)
    n_forwards = len(record.outputs[steer.layers[0]]) if steer.layers else 0
    for k in range(n_forwards):
        counted = None if k == 0 else record.keeps[k - 1][idx.to(record.keeps[k - 1].device)]
        steer.replay({L: record.outputs[L][k] for L in steer.layers}, idx, counted)


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
) -> tuple[list[Completion], ForkSummary]:
    """:func:`~sieve.generation.generate` (same arguments, same completions), doing only the work the
    gates cause: rows that share a prompt, temperature and seed share their unsteered trajectory until
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
    prep = _prepare(model, prompts, interventions, layer_index=layer_index, max_new_tokens=max_new_tokens,
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

    # Rows that share a trajectory: same prompt text (so the same ids and heal), temperature and seed.
    groups: dict[tuple[str, float, int], list[int]] = {}
    full: list[int] = []
    for j in range(n):
        if _always(prep.rows[j]):
            full.append(j)
            summary.full_always += 1
        else:
            groups.setdefault((prep.prompts[j], prep.temps[j], prep.seeds[j]), []).append(j)
    rep = {members[0]: members for members in groups.values()}  # a trajectory is made in its first row's place
    results: dict[int, Completion] = {}
    fed: dict[int, list[int]] = {}
    continued: dict[int, int] = {}

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
            for s in range(0, len(gated), _REPLAY_ROWS):
                _decide(model, prep, gated[s : s + _REPLAY_ROWS], record, outs, results, fed, continued, summary)
        done(len(results) - before)

    # 1. the trajectories, unsteered (in a gated row's place where a group has no unsteered row), the
    # layers their gated rows use recorded; each batch's gated rows are replayed and decided at once
    trajectories = _run_batches(model, prep, list(rep), max_new_tokens=max_new_tokens, top_p=top_p,
                                batch_size=batch_size, rows={r: () for r in rep}, record_layers=record_layers,
                                on_outs=on_outs)
    summary.trajectories = len(trajectories)
    # 2. the rest, forked or in full, batched together by fed length
    rest = full + list(fed)
    summary.full_prompt = sum(1 for j in fed if not continued.get(j))
    summary.full = summary.full_always + summary.full_prompt
    summary.forked = sum(1 for j in fed if continued.get(j))
    if rest:
        outs = _run_batches(model, prep, rest, max_new_tokens=max_new_tokens, top_p=top_p, batch_size=batch_size,
                            fed={j: f for j, f in fed.items() if continued.get(j)}, continued=continued,
                            on_batch=done)
        for j, o in outs.items():
            results[j] = o
            summary.tokens += len(o.token_ids) - continued.get(j, 0)
    bar.close()
    summary.tokens_full = sum(len(c.token_ids) for c in results.values())
    log.debug("forked generation: %s", summary)
    return [results[j] for j in range(n)], summary


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
            summary: ForkSummary) -> None:
    """Replay ``gated`` rows (row index, place in the recorded batch) and decide each: reused, forked
    at its first edit, or generated in full (edits in the prompt)."""
    at = [t for _, t in gated]
    steer = Steerer([prep.rows[j] for j, _ in gated], _encoding_rows(record, at), model.tokenizer)
    with torch.inference_mode():
        first_edits(steer, record, at)
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
