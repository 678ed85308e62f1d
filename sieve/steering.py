"""Notebook ergonomics: steer any ``model.generate()`` or ``model.trace()`` block, and one-line
interventions from an SAE feature.

:func:`steering` is a context manager around your own trace blocks. It works on models sieve loaded
and on a plain ``nnsight.TransformersModel`` (GPT-2, Llama, Gemma, ... as nnsight names them): the
interventions are stored as an nnsight *edit* (``model.edit``), replayed at every forward of every
trace opened inside the block, and removed on exit. No torch hook is registered::

    with steering(model, from_feature(sae, 978, -8.0, layer=2)) as s:
        with model.generate(prompts, max_new_tokens=32) as tracer:
            ids = tracer.result.save()
    s.counts()   # detector firings and edits of the last generation, per row

:func:`from_feature` makes the common interventions from one SAE feature: add or clamp along its
decoder row where its pre-activation passes a threshold, or set / scale / ablate it in the SAE code.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from torch import Tensor

from sieve.errors import SieveError
from sieve.interventions import Detector, Edit, Fires, Intervention, LatentEdit, SAECode, Steerer, as_rows

__all__ = ["steering", "LiveSteering", "from_feature", "sae_layer"]


class LiveSteering:
    """The state of a :func:`steering` block: the interventions applied to every row of every trace,
    and the :class:`~sieve.interventions.Steerer` of the latest one (a new one at each prefill)."""

    def __init__(self, model: Any, interventions: Sequence[Intervention], layer: int | None) -> None:
        from sieve.generation import check_layers
        from sieve.models import hidden_size

        self.model = model
        self.template = as_rows([list(interventions)], 1, layer, width=hidden_size(model))[0]
        check_layers(model, [self.template], "steering")  # a layer the model lacks: refused before any trace
        self.steerer: Steerer | None = None
        self.traces = 0

    def step(self, model: Any, args: tuple, kwargs: dict) -> None:
        """One forward: a new Steerer at a prefill (from the forward's own ids and mask), then the edit."""
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        if ids is None:
            raise SieveError("steering: the forward has no input_ids (inputs_embeds are not supported)")
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length"):
            prefill = int(cache.get_seq_length()) == 0  # nothing cached yet: the first forward of a run
        else:
            prefill = mask is None or mask.shape[1] == ids.shape[1]
        if self.steerer is None or prefill:
            enc = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
            self.steerer = Steerer([self.template] * ids.shape[0], enc, model.tokenizer)
            self.traces += 1
        self.steerer.forward(model)

    def counts(self) -> dict[str, list[int]]:
        """Per-row counts of detector firings and edits in the latest trace."""
        if self.steerer is None:
            raise SieveError("steering: no trace has run inside the block yet")
        return self.steerer.counts()

    def __repr__(self) -> str:
        return f"LiveSteering({len(self.template)} interventions per row, {self.traces} traces)"


@contextmanager
def steering(model: Any, interventions: Intervention | Sequence[Intervention], *,
             layer: int | None = None) -> Iterator[LiveSteering]:
    """Apply ``interventions`` (composed, on every row) to every trace of ``model`` inside the block.

    ``layer`` binds interventions that carry none. Each ``model.generate`` / ``model.trace`` inside is
    steered from its prefill (padding and a leading BOS never trigger a gate) through every decode
    step; the ``input`` latch starts afresh with each.

    Example:
        >>> import torch
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> iv = from_feature(w.sae, w.feature.index, -8.0, gate="always", layer=w.layer)
        >>> with steering(w.model, iv) as s:
        ...     with torch.inference_mode(), w.model.generate(["def f(x):"], max_new_tokens=4,
        ...                                                    do_sample=False) as tracer:
        ...         ids = tracer.result.save()
        >>> s.counts()["gen_edited"]
        [3]
    """
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    live = LiveSteering(model, ivs, layer)
    before = list(getattr(model, "_edits", []))
    with model.edit(inplace=True) as tracer:
        for _ in tracer.iter[:]:
            args, kwargs = model.inputs
            live.step(model, args, kwargs)
    ours = [e for e in getattr(model, "_edits", []) if not any(e is b for b in before)]
    try:
        with warnings.catch_warnings():
            # The stored loop is open-ended (every step of any generation): nnsight warns when a run
            # ends before a next step that never comes. Nothing follows the loop, so it says nothing.
            warnings.filterwarnings("ignore", message=".*was never reached.*")
            yield live
    finally:
        if hasattr(model, "_edits"):
            model._edits = [e for e in model._edits if not any(e is o for o in ours)]
        else:  # pragma: no cover - nnsight without stored edits
            model.clear_edits()


def sae_layer(sae: Any) -> int | None:
    """The decoder layer an SAE was trained on, read from its hook name (``blocks.8.hook_resid_post``,
    ``model.layers.8``), or None when it does not say.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> sae_layer(NS(cfg=NS(metadata=NS(hook_name="blocks.8.hook_resid_post"))))
        8
    """
    meta = getattr(sae.cfg, "metadata", None)
    return hook_layer((getattr(meta, "hook_layer", None), getattr(sae.cfg, "hook_layer", None)),
                      (getattr(meta, "hook_name", None), getattr(sae.cfg, "hook_name", None)))


def hook_layer(layers: Sequence[object], names: Sequence[object]) -> int | None:
    """The layer an SAE's config names: the first of ``layers`` that is a layer index, else the number
    in the first of ``names`` that is set (``blocks.8.hook_resid_post``, ``model.layers.8``); None.

    Example:
        >>> hook_layer((None,), ("", "model.layers.2")), hook_layer((5,), ("blocks.8.hook_resid_post",))
        (2, 5)
    """
    for v in layers:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return v
    m = re.search(r"(?:blocks|layers|h)\.(\d+)", str(next((n for n in names if n), "")))
    return int(m.group(1)) if m else None


def from_feature(
    sae: Any,
    index: int,
    value: float = 0.0,
    *,
    edit: Literal["add", "clamp", "set", "scale", "ablate"] = "add",
    gate: Literal["always", "token", "input"] = "token",
    threshold: float | None = None,
    layer: int | None = None,
) -> Intervention:
    """One intervention from SAE feature ``index``.

    ``edit``: ``add`` ``value·(unit decoder row)`` or ``clamp`` the feature's pre-activation to ``value``
    along it (gated by the pre-activation); or ``set`` / ``scale`` / ``ablate`` the feature in the SAE
    code (encode, edit, decode, error kept; gated by the code). ``threshold``: default the SAE's own
    JumpReLU threshold for the pre-activation, 0 for the code (active). ``layer``: default the layer in
    the SAE's hook name.

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> from_feature(w.sae, 978, -8.0, layer=w.layer)  # doctest: +ELLIPSIS
        Intervention('feature 978 add', fires(Detector(sae 'feature 978', d=192, b=...) > 0), Edit(add -8, d=192), layers [2])
        >>> from_feature(w.sae, 978, -3.0, edit="set", layer=w.layer).edit
        LatentEdit(set [978] to [-3.0], topk 2048 latents)
    """
    from sieve.saes import feature

    f = feature(sae, index)
    if layer is None:
        layer = sae_layer(sae)
        if layer is None:
            raise SieveError(f"from_feature: the SAE's config does not name its layer; pass layer= "
                             f"(hook name {getattr(getattr(sae.cfg, 'metadata', None), 'hook_name', None)!r})")
    if edit in ("add", "clamp"):
        w, b = f.linear()
        det: Detector | SAECode = Detector(w, b, kind="sae", name=f"feature {index}")
        thr = threshold if threshold is not None else (f.threshold or 0.0)
        if edit == "clamp" and threshold is None:
            thr = max(thr, 0.0)
        e: Edit | LatentEdit = Edit(edit, f.direction, value)
    elif edit in ("set", "scale", "ablate"):
        det = SAECode(sae, [index], name=f"feature {index} code")
        thr = threshold if threshold is not None else 0.0
        e = LatentEdit(sae, [index], edit, () if edit == "ablate" else value)
    else:
        raise SieveError(f"from_feature: edit {edit!r} is unknown; allowed: ['add', 'clamp', 'set', 'scale', "
                         "'ablate']")
    if gate not in ("always", "token", "input"):
        raise SieveError(f"from_feature: gate {gate!r} is unknown; allowed: ['always', 'token', 'input']")
    g = gate if gate == "always" else Fires(det, thr) if gate == "token" else Fires(det, thr).latch()
    return Intervention(g if gate != "always" else "always", e, det if edit == "clamp" else None,
                        name=f"feature {index} {edit}", layers=layer)


class _SteeringModule(type(sys.modules[__name__])):  # type: ignore[misc]
    """This module, callable as :func:`steering`: ``sieve.steering(model, iv)`` is the context manager,
    and ``import sieve.steering as st`` is still the module (``st.from_feature``)."""

    def __call__(self, model: Any, interventions: Intervention | Sequence[Intervention], *,
                 layer: int | None = None):
        return steering(model, interventions, layer=layer)


sys.modules[__name__].__class__ = _SteeringModule
