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

Needs the ``lmeval`` extra (``pip install -e ".[lmeval]"`` in a clone).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sieve.errors import SieveError
from sieve.interventions import Intervention, Steerer
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

__all__ = ["SteeredLM", "GateCounts", "run_harness", "task_manager", "main"]


class GateCounts:
    """What the intervention did over the harness's forwards: rows (one per scored or generated
    sequence the model ran), real tokens, tokens where the detector fired and tokens edited, and rows
    with at least one edit.

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

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


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
        scale: float = 0.0,
        *,
        model: Any = None,
        intervention: Intervention | None = None,
        layer: int | None = None,
        **kwargs: Any,
    ) -> None:
        if "pretrained" in kwargs:
            raise SieveError("the sieve model takes its model from the recipe (recipe=FILE), not pretrained=")
        if recipe is not None:
            if model is not None:
                raise SieveError("give either recipe=FILE or model=, not both")
            model, intervention, layer = _from_recipe(recipe, method, float(scale))
        elif model is None:
            raise SieveError(
                "the sieve model needs a recipe: --model_args recipe=FILE,method=NAME,scale=VALUE "
                "(or, in Python, SteeredLM(model=..., intervention=..., layer=...))"
            )
        if layer is None:
            raise SieveError("SteeredLM needs layer= (the decoder layer the intervention edits)")
        self.steered_model = model
        self.intervention = intervention
        self.layer_index = int(layer)
        layer_of(model, self.layer_index)  # range check with a clear error
        self.gate_counts = GateCounts()
        self._row_lengths: list[list[int]] = []
        kwargs.pop("device", None)  # the model is already placed
        kwargs.setdefault("batch_size", 8)
        super().__init__(pretrained=underlying(model), tokenizer=model.tokenizer, **kwargs)
        if self.backend != "causal":
            raise SieveError("sieve's lm-eval model runs decoder-only (causal) models only")

    # -- log-likelihoods ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        with _recording_right_padding(self._row_lengths):
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._row_lengths.clear()

    def _model_call(self, inps: Tensor, attn_mask: Tensor | None = None, labels: Tensor | None = None) -> Tensor:
        if attn_mask is not None or labels is not None:
            raise SieveError("sieve's lm-eval model runs decoder-only (causal) models only")
        B, T = inps.shape
        if self._row_lengths:
            lengths = self._row_lengths.pop(0)
            if len(lengths) != B or max(lengths) != T:
                raise SieveError(
                    f"lm-eval padded a batch of {len(lengths)} rows up to {max(lengths)} tokens but called the "
                    f"model on {(B, T)}: this lm-eval version batches differently from what sieve expects"
                )
            real = torch.arange(T, device=inps.device)[None, :] < torch.tensor(lengths, device=inps.device)[:, None]
        else:  # a forward of the harness's own (batch-size probing): every position is real
            real = torch.ones_like(inps, dtype=torch.bool)
        steer = Steerer([self.intervention] * B, {"input_ids": inps, "attention_mask": real.long()}, self.tokenizer,
                        layer=self.layer_index)
        with torch.no_grad(), self._autocast():
            with self.steered_model.trace({"input_ids": inps}):
                steer.forward(self.steered_model)
                logits = self.steered_model.output.logits.save()
        self.gate_counts.add(steer, real)
        return logits

    # -- generation -----------------------------------------------------------------------------

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
        n_new = max(1, int(max_length) - T)

        def running() -> Tensor:
            # Rows whose stop sequence has appeared are no longer counted (their text is cut there).
            done = [any(c.done_tracker[i] for c in stops) for i in range(B)]
            return torch.tensor([not d for d in done])

        with torch.no_grad(), self._autocast(), warnings.catch_warnings():
            # Rows that stop early end the bounded loop before its last step; nothing follows it.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            with self.steered_model.generate(enc, max_length=max_length, stopping_criteria=criteria,
                                             pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
                                             **generation_kwargs) as tracer:
                for step in tracer.iter[:n_new]:
                    # read once the layers ran: the trace body runs ahead of the stopping criteria
                    steer.forward(self.steered_model, counted=None if step == 0 else running)
        self.gate_counts.add(steer, attention_mask.bool())
        if last.ids is None:
            raise SieveError("generation produced no tokens")
        return last.ids

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


def _from_recipe(recipe: str | Path, method: str, scale: float):
    from sieve.recipe import load_recipe
    from sieve.setting import load_setting
    from sieve.sweep import Cell

    r = load_recipe(recipe)
    cell = Cell(method, float(scale))
    # the recipe's own [methods.NAME] first, then the registry; a clear error before the model loads
    needs_probe = cell.steered and r.method(method).detector == "probe"
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


def run_harness(
    lm: SteeredLM,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    metric: str = "acc",
) -> dict[str, Any]:
    """Run harness tasks on ``lm`` and return, per task, its aggregate metrics and the per-document
    values of ``metric`` (for intervals), with the gate counts of the run.

    ``include_path``: a folder of task YAMLs of your own. ``include_defaults``: whether the harness's
    built-in tasks are indexed too (about 20 s, once per process); None: only when a task is not found
    in ``include_path``.

    Example:
        >>> out = run_harness(lm, ["world_mc"], include_path="tasks/")  # doctest: +SKIP
        >>> out["tasks"]["world_mc"]["values"][:3], out["gate"]["rows_edited"]  # doctest: +SKIP
    """
    import lm_eval

    if include_defaults is None:
        local = task_manager(include_path, False) if include_path else None
        include_defaults = local is None or not set(tasks) <= set(local.all_tasks)
    tm = task_manager(include_path, include_defaults)
    before = lm.gate_counts.as_dict()
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                  num_fewshot=num_fewshot, log_samples=True, verbosity="WARNING")
    tasks_out: dict[str, Any] = {}
    for task, samples in (res.get("samples") or {}).items():
        values = [float(s[metric]) for s in samples if metric in s]
        if not values:
            have = sorted(k for k in samples[0] if isinstance(samples[0][k], (int, float))) if samples else []
            raise SieveError(f"lm-eval task {task!r} has no per-document metric {metric!r}; it has {have}")
        agg = {k.split(",")[0]: v for k, v in res["results"].get(task, {}).items()
               if isinstance(v, (int, float)) and not k.startswith("alias")}
        tasks_out[task] = {"values": values, "metrics": agg}
    after = lm.gate_counts.as_dict()
    return {"tasks": tasks_out, "gate": {k: after[k] - before[k] for k in after}}


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line with the ``sieve`` model registered (this module is imported)."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
