"""An intervention is detector × gate × edit, applied to one layer's residual stream ``h [B,T,D]``.

- **Detector**: a linear score per token, ``a = h·w + b`` (an SAE feature's true pre-activation, a CAA
  projection, a probe's logit).
- **Gate**: where to edit. ``always``: every real token; ``token``: tokens whose score passes the
  threshold; ``input``: every real token of a row from the first real token (BOS and padding
  excluded) that passes it on, latched for the rest of the generation. The latch is causal: in the
  prefill, prompt tokens before the first firing are not edited (the study's code edited them all,
  and, under the KV cache, never fired again after the prefill).
- **Edit**: ``add`` ``s·u``, or ``clamp`` the detector to value ``c``: ``h += (c − a)/(w·u) · u``, so the
  detector reads exactly ``c`` afterwards (the study used ``(c − a)·u``, exact only when ``w·u = 1``).

A batch of rows, each with its own intervention (or none), is packed into tensors and edited by one
vectorised function, :func:`apply_edit`. :class:`Steerer` wraps it with the per-row latch state and the
prompt's padding/BOS mask, for use inside any nnsight trace::

    steer = Steerer([iv] * len(prompts), enc, tokenizer)
    with model.generate(enc, max_new_tokens=N) as tracer:
        for step in tracer.iter[:N]:
            model.layers[L].output = steer(model.layers[L].output)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sieve.errors import SieveError

__all__ = [
    "Detector",
    "Edit",
    "Intervention",
    "GATES",
    "EDITS",
    "PackedInterventions",
    "pack",
    "apply_edit",
    "eligible_mask",
    "Steerer",
]

GateKind = Literal["always", "token", "input"]
EditKind = Literal["add", "clamp"]
GATES: tuple[str, ...] = ("always", "token", "input")
EDITS: tuple[str, ...] = ("add", "clamp")
_GATE_CODE = {"none": 0, "always": 1, "token": 2, "input": 3}


@dataclass(frozen=True, eq=False)
class Detector:
    """A linear detector: ``score(h) = h·w + b``; ``kind`` is ``sae``, ``caa``, ``probe`` or free text.

    Example:
        >>> d = Detector(torch.tensor([1.0, 0.0]), b=-1.0)
        >>> d.score(torch.tensor([[[3.0, 5.0]]]))
        tensor([[2.]])
    """

    w: Tensor
    b: float = 0.0
    kind: str = "custom"
    name: str = ""

    def __post_init__(self) -> None:
        if self.w.dim() != 1:
            raise SieveError(f"detector {self.name or self.kind!r}: w must be 1-D [D], got {tuple(self.w.shape)}")

    def score(self, h: Tensor) -> Tensor:
        """``[..., D] -> [...]`` in float32."""
        return h.float() @ self.w.to(h.device, torch.float32) + self.b


@dataclass(frozen=True, eq=False)
class Edit:
    """``add`` ``value·direction``, or ``clamp`` the detector to ``value`` along ``direction``.

    The direction is normalised to unit length on construction.
    """

    kind: EditKind
    direction: Tensor
    value: float

    def __post_init__(self) -> None:
        if self.kind not in EDITS:
            raise SieveError(f"edit kind {self.kind!r} is unknown; allowed: {list(EDITS)}")
        if self.direction.dim() != 1:
            raise SieveError(f"edit direction must be 1-D [D], got {tuple(self.direction.shape)}")
        n = float(self.direction.float().norm())
        if not n > 0:
            raise SieveError("edit direction has zero norm")
        object.__setattr__(self, "direction", self.direction.float() / n)


@dataclass(frozen=True, eq=False)
class Intervention:
    """One row's intervention: a gate, an edit, and (for ``token``/``input`` gates and clamps) a detector.

    Example:
        >>> u = torch.tensor([0.0, 1.0])
        >>> iv = Intervention("token", Edit("add", u, -4.0), Detector(torch.tensor([1.0, 0.0])), threshold=2.0)
        >>> iv.gate, iv.edit.value
        ('token', -4.0)
    """

    gate: GateKind
    edit: Edit
    detector: Detector | None = None
    threshold: float = 0.0
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise SieveError(f"gate {self.gate!r} is unknown; allowed: {list(GATES)}")
        if self.gate != "always" and self.detector is None:
            raise SieveError(f"gate {self.gate!r} needs a detector")
        if self.edit.kind == "clamp":
            if self.detector is None:
                raise SieveError("a clamp edit needs a detector (it clamps the detector's score)")
            wu = float(self.detector.w.float() @ self.edit.direction)
            if abs(wu) < 1e-6 * float(self.detector.w.float().norm()):
                raise SieveError(
                    "clamp direction is orthogonal to the detector (w·u ≈ 0): moving along it cannot "
                    "change the score"
                )
        if self.detector is not None and self.detector.w.shape != self.edit.direction.shape:
            raise SieveError(
                f"detector width {tuple(self.detector.w.shape)} != direction width "
                f"{tuple(self.edit.direction.shape)}"
            )

    @property
    def width(self) -> int:
        return int(self.edit.direction.shape[0])


@dataclass
class PackedInterventions:
    """Per-row tensors of a batch of interventions (row i: gate code, detector, threshold, edit)."""

    gate: Tensor  # [B] long: 0 none, 1 always, 2 token, 3 input
    w: Tensor  # [B, D] float32
    b: Tensor  # [B]
    threshold: Tensor  # [B]
    clamp: Tensor  # [B] bool
    value: Tensor  # [B] scale (add) or target (clamp)
    u: Tensor  # [B, D] unit directions
    wu: Tensor  # [B] w·u (1 where unused)

    def to(self, device: torch.device | str) -> PackedInterventions:
        return PackedInterventions(**{k: v.to(device) for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return int(self.gate.shape[0])


def pack(rows: list[Intervention | None], d: int | None = None) -> PackedInterventions:
    """Pack one intervention per row (None: leave that row alone) into tensors.

    Example:
        >>> p = pack([None, Intervention("always", Edit("add", torch.ones(3), 2.0))])
        >>> p.gate.tolist(), p.value.tolist()
        ([0, 1], [0.0, 2.0])
    """
    widths = {iv.width for iv in rows if iv is not None}
    if d is None:
        if not widths:
            raise SieveError("pack: no intervention to take the width from; pass d=")
        d = widths.pop() if len(widths) == 1 else -1
    if widths - {d} or d < 0:
        raise SieveError(f"interventions have widths {sorted(widths)}; the layer's width is {d}")
    B = len(rows)
    gate = torch.zeros(B, dtype=torch.long)
    w = torch.zeros(B, d)
    b = torch.zeros(B)
    thr = torch.zeros(B)
    clamp = torch.zeros(B, dtype=torch.bool)
    value = torch.zeros(B)
    u = torch.zeros(B, d)
    wu = torch.ones(B)
    for i, iv in enumerate(rows):
        if iv is None:
            continue
        gate[i] = _GATE_CODE[iv.gate]
        if iv.detector is not None:
            w[i] = iv.detector.w.float()
            b[i] = iv.detector.b
        thr[i] = iv.threshold
        clamp[i] = iv.edit.kind == "clamp"
        value[i] = iv.edit.value
        u[i] = iv.edit.direction
        if clamp[i]:
            wu[i] = w[i] @ u[i]
    return PackedInterventions(gate, w, b, thr, clamp, value, u, wu)


def apply_edit(
    h: Tensor, p: PackedInterventions, eligible: Tensor, latched: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The one vectorised edit of every method.

    Args:
        h: ``[B, T, D]`` residual stream (any float dtype).
        p: packed per-row interventions.
        eligible: ``[B, T]`` bool, real tokens (False on padding and BOS).
        latched: ``[B]`` bool, the ``input`` gate's state before this forward.

    Returns:
        ``(h_new, latched_new, fired [B,T], edited [B,T])``; ``fired`` is where the detector passed its
        threshold on eligible tokens, ``edited`` where the edit was applied.

    Example:
        >>> p = pack([Intervention("always", Edit("add", torch.tensor([1.0, 0.0]), 3.0))])
        >>> h = torch.zeros(1, 2, 2)
        >>> apply_edit(h, p, torch.tensor([[False, True]]), torch.tensor([False]))[0]
        tensor([[[0., 0.],
                 [3., 0.]]])
    """
    a = torch.einsum("btd,bd->bt", h.float(), p.w) + p.b[:, None]
    fired = (a > p.threshold[:, None]) & eligible
    # The latch is causal: on from the first firing token on (earlier positions of the same forward
    # are left alone), so a prompt read in one forward or token by token is edited the same way.
    latched_bt = latched[:, None] | (fired.long().cumsum(dim=1) > 0)
    latched = latched | ((p.gate == 3) & fired.any(dim=1))
    g = p.gate[:, None]
    edited = torch.where(
        g == 1, eligible, torch.where(g == 2, fired, (g == 3) & latched_bt & eligible)
    )
    coef = torch.where(p.clamp[:, None], (p.value[:, None] - a) / p.wu[:, None], p.value[:, None])
    coef = torch.where(edited, coef, torch.zeros_like(coef))
    h_new = h + (coef[..., None] * p.u[:, None, :]).to(h.dtype)
    return h_new, latched, fired, edited


def eligible_mask(input_ids: Tensor, attention_mask: Tensor | None, bos_token_id: int | None) -> Tensor:
    """``[B, T]`` bool: real prompt tokens, excluding padding and a leading BOS.

    Example:
        >>> eligible_mask(torch.tensor([[9, 0, 5, 6]]), torch.tensor([[0, 1, 1, 1]]), 0).tolist()
        [[False, False, True, True]]
    """
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bos_token_id is not None:
        # The first real token of each row, when it is BOS.
        first = mask.long().argmax(dim=1)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        is_bos = input_ids[rows, first] == bos_token_id
        mask = mask.clone()
        mask[rows[is_bos], first[is_bos]] = False
    return mask


def _resolve_prompt_gates(rows: list[Intervention | None], encoding: dict[str, Tensor], tokenizer: Any) -> list:
    """Rows whose intervention still carries a prompt gate (:mod:`sieve.prompt_gates`) decide it on
    their decoded prompt; others are returned as they are."""
    from sieve.prompt_gates import open_prompt_gates, prompt_gate_of

    if not any(prompt_gate_of(iv) is not None for iv in rows):
        return rows
    ids, mask = encoding["input_ids"], encoding.get("attention_mask")
    texts = [tokenizer.decode(r[m.bool()] if mask is not None else r, skip_special_tokens=True)
             for r, m in zip(ids.cpu(), mask.cpu() if mask is not None else ids.cpu())]
    return open_prompt_gates(rows, texts)[0]


class Steerer:
    """Applies one intervention per batch row at every forward of a trace, keeping the ``input`` latch.

    The first call is the prefill (``[B, T_prompt, D]``): padding and BOS are masked using the prompt
    encoding. Later calls are decode steps (``[B, 1, D]``), whose new tokens are all real. Counts of
    detector firings and edits (prompt and generated, per row) are kept in ``stats``.

    Example:
        >>> steer = Steerer([iv] * 2, enc, tokenizer)  # doctest: +SKIP
        >>> with model.generate(enc, max_new_tokens=8) as tracer:  # doctest: +SKIP
        ...     for step in tracer.iter[:8]:
        ...         model.layers[2].output = steer(model.layers[2].output)
    """

    def __init__(
        self,
        interventions: list[Intervention | None] | Intervention,
        encoding: dict[str, Tensor] | None = None,
        tokenizer: Any = None,
        *,
        batch_size: int | None = None,
    ) -> None:
        if isinstance(interventions, Intervention):
            n = batch_size or (encoding["input_ids"].shape[0] if encoding is not None else 1)
            interventions = [interventions] * n
        self.interventions = list(interventions)
        if encoding is not None and tokenizer is not None:
            self.interventions = _resolve_prompt_gates(self.interventions, encoding, tokenizer)
        # Rows all unsteered: the width is only known at the first forward.
        has_width = any(iv is not None for iv in self.interventions)
        self.packed = pack(self.interventions) if has_width else None
        self.encoding = encoding
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget the latch and counts: ready for a new generation."""
        B = len(self.interventions)
        self.calls = 0
        self.latched = torch.zeros(B, dtype=torch.bool)
        self.stats = {k: torch.zeros(B, dtype=torch.long)
                      for k in ("prompt_fired", "gen_fired", "prompt_edited", "gen_edited")}
        self._device: torch.device | None = None

    def _prompt_eligible(self, B: int, T: int, device: torch.device) -> Tensor:
        if self.encoding is None:
            return torch.ones(B, T, dtype=torch.bool, device=device)
        ids = self.encoding["input_ids"]
        if ids.shape != (B, T):
            raise SieveError(
                f"Steerer: the prompt encoding is {tuple(ids.shape)} but the first forward is {(B, T)}; "
                "pass the same encoding to the trace and to the Steerer"
            )
        return eligible_mask(ids, self.encoding.get("attention_mask"), self.bos_token_id).to(device)

    def __call__(self, output: Any, counted: Tensor | None = None) -> Any:
        """Edit one forward's layer output. ``counted`` (``[B]`` bool, optional): the rows whose tokens
        of this forward go into the counts (a row that has already ended is left out)."""
        h = output[0] if isinstance(output, tuple) else output
        B, T, D = h.shape
        if B != len(self.interventions):
            raise SieveError(f"Steerer holds {len(self.interventions)} rows but the layer output has {B}")
        if self.packed is None:
            self.packed = pack(self.interventions, d=D)
        if self._device != h.device:
            # Everything stays on the model's device: no host sync per step.
            self.packed = self.packed.to(h.device)
            self.latched = self.latched.to(h.device)
            self.stats = {k: v.to(h.device) for k, v in self.stats.items()}
            self._device = h.device
        if self.calls == 0:
            eligible = self._prompt_eligible(B, T, h.device)
        else:
            eligible = torch.ones(B, T, dtype=torch.bool, device=h.device)
        h_new, self.latched, fired, edited = apply_edit(h, self.packed, eligible, self.latched)
        where = "prompt" if self.calls == 0 else "gen"
        n_fired, n_edited = fired.sum(1), edited.sum(1)
        if counted is not None:
            counted = counted.to(h.device)
            n_fired, n_edited = n_fired * counted, n_edited * counted
        self.stats[f"{where}_fired"] += n_fired
        self.stats[f"{where}_edited"] += n_edited
        self.calls += 1
        return (h_new, *output[1:]) if isinstance(output, tuple) else h_new

    def counts(self) -> dict[str, list[int]]:
        """Per-row counts of detector firings and edits, on prompt and generated tokens."""
        return {k: v.cpu().tolist() for k, v in self.stats.items()}
