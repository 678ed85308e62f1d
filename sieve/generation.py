"""Steered generation: prompts + one intervention per row → completions, edited at every forward.

Rows of one batch may mix methods and scales: the edit is one vectorised function of per-row tensors
(:mod:`sieve.interventions`), applied inside an nnsight ``model.generate`` trace at the prefill and at
every decode step. No torch hook is registered.

Sampling is per row: each row draws from its own seeded generator (one uniform number per step), so a
row's completion does not depend on which batch it ran in, as far as the backend allows: batch
composition changes padding and so the floating-point sums of attention and matmuls; on CPU float32
greedy output was identical across batchings in our tests, but bf16 on GPU can flip near-ties.

Each row stops at its EOS: the sampler records it and emits a filler HF never reads as EOS (so HF
does not drop rows on its own), the row is cut there, and generation ends early once every row has
finished (the trace's bounded loop is then cut short, which is harmless: nothing follows it).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sieve.errors import SieveError
from sieve.interventions import Intervention, Steerer
from sieve.models import encode_prompts, layer, underlying

__all__ = ["Completion", "RowSampler", "generate", "steered_generate_batch"]

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """One generated row: the prompt, the new text and tokens, and what the detector did."""

    prompt: str
    text: str
    token_ids: list[int]
    finished: bool
    counts: dict[str, int] = field(default_factory=dict)


class RowSampler:
    """A logits processor that picks each row's next token itself, from that row's own generator.

    temperature 0 is greedy. Otherwise: temperature, then top-p, then inverse-CDF sampling with one
    uniform draw from the row's generator. It returns scores with only the chosen token finite, so HF's
    greedy step takes exactly that token.

    End of sequence is handled here, not by HF: when a row picks an EOS token, the step is recorded in
    ``finished_at`` and a filler token is emitted instead, so HF never drops rows on its own; the
    chosen tokens are kept in ``history``. Generation stops once every row has finished (see
    ``_AllRowsFinished``), and rows are cut at ``finished_at`` afterwards.
    """

    def __init__(
        self, temperatures: Sequence[float], seeds: Sequence[int], top_p: float, eos_token_ids: Sequence[int],
        filler_token_id: int,
    ) -> None:
        self.t = torch.tensor([float(t) for t in temperatures])
        self.any_sampled = bool((self.t > 0).any())  # all greedy: skip the sampling work
        self.gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.top_p = float(top_p)
        self.eos = torch.tensor(sorted(set(int(e) for e in eos_token_ids)), dtype=torch.long)
        self.filler = int(filler_token_id)
        self.finished: Tensor | None = None  # [B] step at which each row picked EOS, -1 while running
        self.history: list[Tensor] = []  # the token chosen at each step, [B] each
        self.step = 0

    def all_finished(self) -> bool:
        """Whether every row has picked EOS (one host sync, as HF's own stop check)."""
        return self.finished is not None and bool((self.finished >= 0).all())

    def tokens(self) -> Tensor:
        """``[B, steps]``: the tokens chosen so far (fillers after a row's EOS)."""
        return torch.stack(self.history, dim=1) if self.history else torch.zeros(len(self.gens), 0, dtype=torch.long)

    @property
    def finished_at(self) -> list[int | None]:
        """Per row, the step at which it picked EOS (None: it never did)."""
        if self.finished is None:
            return [None] * len(self.gens)
        return [None if f < 0 else int(f) for f in self.finished.tolist()]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        B = scores.shape[0]
        dev = scores.device
        logits = scores.float()
        choice = logits.argmax(-1)
        if self.any_sampled:
            # Uniform draws on CPU from the per-row generators, then moved: keeps rows independent.
            u = torch.stack([torch.rand((), generator=g) for g in self.gens]).to(dev, non_blocking=True)
            t = self.t.to(dev)
            probs = torch.softmax(logits / t.clamp_min(1e-6)[:, None], dim=-1)
            if self.top_p < 1.0:
                sp, si = probs.sort(dim=-1, descending=True)
                keep = sp.cumsum(-1) - sp < self.top_p
                probs = torch.zeros_like(probs).scatter(-1, si, sp * keep)
            probs = probs / probs.sum(-1, keepdim=True)
            cdf = probs.cumsum(-1)
            sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
            choice = torch.where(t > 0, sampled, choice)
        # End-of-sequence bookkeeping stays on the device: no host sync per step.
        if self.finished is None:
            self.finished = torch.full((B,), -1, dtype=torch.long, device=dev)
        is_eos = torch.isin(choice, self.eos.to(dev))
        self.finished = torch.where(is_eos & (self.finished < 0), self.step, self.finished)
        choice = torch.where(self.finished >= 0, torch.full_like(choice, self.filler), choice)
        self.history.append(choice)
        self.step += 1
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(B, device=dev), choice] = 0.0
        return out


class _AllRowsFinished:
    """A stopping criterion: stop generating once every row has picked EOS (rows are cut there anyway)."""

    def __init__(self, sampler: RowSampler) -> None:
        self.sampler = sampler

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        done = self.sampler.all_finished()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(model) -> list[int]:
    ids = []
    for src in (underlying(model).generation_config.eos_token_id, model.tokenizer.eos_token_id):
        if src is None:
            continue
        ids += list(src) if isinstance(src, (list, tuple)) else [src]
    return sorted(set(int(i) for i in ids))


def _filler(tok, eos: list[int]) -> int:
    pad = tok.pad_token_id
    if pad is not None and pad not in eos:
        return int(pad)
    return next(i for i in range(len(tok)) if i not in eos)


def steered_generate_batch(
    model,
    prompts: list[str],
    interventions: list[Intervention | None],
    *,
    layer_index: int,
    max_new_tokens: int,
    temperatures: Sequence[float] | float = 0.0,
    seeds: Sequence[int] | int = 0,
    top_p: float = 1.0,
) -> list[Completion]:
    """One batch: every row its own prompt, intervention, temperature and seed.

    Example:
        >>> outs = steered_generate_batch(model, ["def f("], [None], layer_index=1, max_new_tokens=4)  # doctest: +SKIP
    """
    B = len(prompts)
    if len(interventions) != B:
        raise SieveError(f"{len(interventions)} interventions for {B} prompts: give one per row (None: unsteered)")
    temps = [float(temperatures)] * B if isinstance(temperatures, (int, float)) else list(temperatures)
    seed_list = [int(seeds) + i for i in range(B)] if isinstance(seeds, int) else list(seeds)
    tok = model.tokenizer
    hf = underlying(model)
    device = next(hf.parameters()).device
    enc = encode_prompts(tok, prompts)
    enc = {k: v.to(device) for k, v in enc.items()}
    steer = Steerer(interventions, enc, tok)
    eos = _eos_ids(model)
    sampler = RowSampler(temps, seed_list, top_p, eos, _filler(tok, eos))
    gc = copy.deepcopy(hf.generation_config)
    # HF must not end rows itself: RowSampler handles EOS and _AllRowsFinished stops the whole batch.
    # min_new_tokens is not used: it would forbid EOS and change what rows generate.
    gc.eos_token_id = None
    gc.pad_token_id = tok.pad_token_id
    gc.do_sample = False
    gc.max_new_tokens = max_new_tokens
    gc.min_new_tokens = None
    gc.max_length = None
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    target = layer(model, layer_index)
    from transformers import StoppingCriteriaList

    with torch.inference_mode(), warnings.catch_warnings():
        # When every row has finished early, generation stops before the bounded loop's last step;
        # nnsight then warns that the loop was cut short. Nothing follows the loop in the trace: the
        # tokens are read from the sampler, so the warning says nothing here.
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with model.generate(enc, generation_config=gc, logits_processor=[sampler],
                            stopping_criteria=StoppingCriteriaList([_AllRowsFinished(sampler)])) as tracer:
            for _ in tracer.iter[:max_new_tokens]:
                target.output = steer(target.output)
    counts = steer.counts()
    new = sampler.tokens().cpu()
    out = []
    ends = sampler.finished_at
    for i in range(B):
        row = new[i].tolist()
        end = ends[i]
        finished = end is not None
        if finished:
            row = row[:end]
        out.append(Completion(
            prompt=prompts[i],
            text=tok.decode(row, skip_special_tokens=True),
            token_ids=row,
            finished=finished,
            counts={k: v[i] for k, v in counts.items()},
        ))
    return out


def _default_batch(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


def generate(
    model,
    prompts: list[str],
    interventions: list[Intervention | None] | Intervention | None = None,
    *,
    layer_index: int,
    max_new_tokens: int = 64,
    temperature: float | Sequence[float] = 0.0,
    seeds: Sequence[int] | int = 0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[Completion]:
    """Generate for every prompt with its own intervention, in batches, edited at every step.

    ``interventions`` is one per prompt (None: unsteered), or one for all. ``seeds`` is one per prompt
    (or a base seed: row i gets base + i). ``batch_size=None`` picks a size for the device and halves it
    when CUDA runs out of memory. Rows are grouped by prompt length to limit padding; results come
    back in the input order.

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> outs = generate(w.model, ["def add(a, b):\\n"], layer_index=w.layer, max_new_tokens=8,
        ...                 progress=False)
        >>> len(outs[0].token_ids) <= 8
        True
    """
    n = len(prompts)
    if interventions is None or isinstance(interventions, Intervention):
        interventions = [interventions] * n
    if len(interventions) != n:
        raise SieveError(f"{len(interventions)} interventions for {n} prompts")
    temps = [float(temperature)] * n if isinstance(temperature, (int, float)) else list(temperature)
    seed_list = [int(seeds) + i for i in range(n)] if isinstance(seeds, int) else list(seeds)
    if len(temps) != n or len(seed_list) != n:
        raise SieveError(f"temperature and seeds need one value per prompt ({n})")
    device = next(underlying(model).parameters()).device
    bs = batch_size or _default_batch(device)
    # Group rows of similar length (characters: a cheap proxy, no second tokenisation) to limit padding.
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    results: list[Completion | None] = [None] * n
    bar = tqdm(total=n, desc="generate", unit="row", disable=not progress)
    i = 0
    while i < n:
        idx = order[i : i + bs]
        try:
            outs = steered_generate_batch(
                model, [prompts[j] for j in idx], [interventions[j] for j in idx],
                layer_index=layer_index, max_new_tokens=max_new_tokens,
                temperatures=[temps[j] for j in idx], seeds=[seed_list[j] for j in idx], top_p=top_p,
            )
        except torch.cuda.OutOfMemoryError:
            if bs == 1 or batch_size is not None:
                raise
            bs //= 2
            torch.cuda.empty_cache()
            log.warning("out of memory: batch size now %d", bs)
            continue
        for j, o in zip(idx, outs):
            results[j] = o
        bar.update(len(idx))
        i += len(idx)
    bar.close()
    return [r for r in results if r is not None]
