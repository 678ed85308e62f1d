"""An intervention says *where* and *what*: detector × gate × edit, bound to the layer(s) it acts on.

- **Detector**: a score per token. :class:`Detector` is linear, ``a = h·w + b`` (an SAE feature's true
  pre-activation, a CAA projection, a probe's logit); :class:`SAECode` is the SAE's code itself (the
  post-activation, after JumpReLU / ReLU / TopK) of one feature or a set of features, combined as a
  weighted ``sum``, ``any`` (max) or ``all`` (min).
- **Gate**: where to edit. ``always``: every real token; ``token``: tokens whose score passes the
  threshold; ``input``: every real token of a row from the first real token (BOS and padding
  excluded) that passes it on, latched for the rest of the generation. Gates are expressions:
  :class:`Fires` leaves combined with ``&``, ``|``, ``~`` and ``.latch()``. The latch is causal: in the
  prefill, prompt tokens before the first firing are not edited.
- **Edit**: :class:`Edit` ``add`` ``s·u``, or ``clamp`` the detector to value ``c``: ``h += (c − a)/(w·u) · u``
  (the detector reads exactly ``c`` afterwards); or :class:`LatentEdit`, an edit in SAE space: encode,
  set / scale / add / ablate latents, decode, and add back the reconstruction error, so
  ``h' = h + dec(f') − dec(f)`` and every untouched token is exactly unchanged.
- **Where**: ``layers`` (one or several) that the edit acts on; ``read_layer`` where the gate's
  detectors are read (by default the first edit layer; never after it).

A batch row may carry several interventions. Every row's interventions are packed into tensors, and
:class:`Steerer` applies them inside any nnsight trace with one vectorised edit per layer per forward
(no torch hook): detectors read at a layer see that layer's output as the model produced it; the edits
at a layer are computed from that same output and summed::

    steer = Steerer([iv] * len(prompts), enc, tokenizer)
    with model.generate(enc, max_new_tokens=N) as tracer:
        for step in tracer.iter[:N]:
            steer.forward(model)          # every layer the interventions touch, in order
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from sieve.errors import ShapeMismatch, SieveError

__all__ = [
    "Detector", "SAECode", "Gate", "Always", "Fires", "And", "Or", "Not", "Latch", "Edit", "LatentEdit",
    "Intervention", "GATES", "EDITS", "LATENT_OPS", "Row", "as_rows", "eligible_mask", "Steerer", "sae_rule",
    "resolve_prompt_gates", "UnmaskedPrompt",
]

GateKind = Literal["always", "token", "input"]
EditKind = Literal["add", "clamp"]
LatentOp = Literal["set", "scale", "add", "ablate"]
GATES: tuple[str, ...] = ("always", "token", "input")
EDITS: tuple[str, ...] = ("add", "clamp")
LATENT_OPS: tuple[str, ...] = ("set", "scale", "add", "ablate")
REDUCES: tuple[str, ...] = ("sum", "any", "all")
SAE_ARCHITECTURES: tuple[str, ...] = ("standard", "jumprelu", "topk")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise SieveError(f"{what} must be a number, got {value!r}")
    return float(value)


def _vector(v: Any, what: str) -> Tensor:
    if not isinstance(v, Tensor):
        raise SieveError(f"{what} must be a 1-D torch tensor [D], got {type(v).__name__}")
    if v.dim() != 1:
        raise SieveError(f"{what} must be 1-D [D], got shape {tuple(v.shape)}")
    return v.detach().float()


# --------------------------------------------------------------------------------------------- detectors


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
        object.__setattr__(self, "w", _vector(self.w, f"detector {self.name or self.kind!r}: w"))
        object.__setattr__(self, "b", _number(self.b, f"detector {self.name or self.kind!r}: b"))

    @property
    def width(self) -> int:
        return int(self.w.shape[0])

    def score(self, h: Tensor) -> Tensor:
        """``[..., D] -> [...]`` in float32."""
        return h.float() @ self.w.to(h.device) + self.b

    def __repr__(self) -> str:
        return f"Detector({self.kind}{' ' + repr(self.name) if self.name else ''}, d={self.width}, b={self.b:.3g})"


@dataclass(frozen=True)
class SAERule:
    """How an SAE encodes and decodes, read from a sae-lens SAE (JumpReLU, ReLU/standard, TopK)."""

    architecture: str
    d_in: int
    d_sae: int
    apply_b_dec_to_input: bool
    rescale_by_decoder_norm: bool
    k: int


def sae_rule(sae: Any) -> SAERule:
    """The encoding rule of a sae-lens SAE, with a clear error for what sieve cannot edit exactly.

    Example:
        >>> from sieve.world import load_world
        >>> sae_rule(load_world().sae).architecture
        'topk'
    """
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not hasattr(sae, "W_enc") or not hasattr(sae, "W_dec"):
        raise SieveError(f"expected a sae-lens SAE (with cfg, W_enc, W_dec), got {type(sae).__name__}")
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else str(cfg.architecture)
    if arch not in SAE_ARCHITECTURES:
        raise SieveError(f"SAE architecture {arch!r} is not supported for SAE-space edits and codes; "
                         f"supported: {list(SAE_ARCHITECTURES)}")
    norm = getattr(cfg, "normalize_activations", "none")
    if norm not in ("none", None):
        raise SieveError(f"the SAE normalises its input ({norm!r}): its decoder is not linear in the code, so "
                         "h + dec(f') − dec(f) is not an exact edit; use an SAE with normalize_activations='none'")
    return SAERule(arch, int(cfg.d_in), int(cfg.d_sae), bool(getattr(cfg, "apply_b_dec_to_input", False)),
                   bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)) and arch == "topk",
                   int(getattr(cfg, "k", 0) or 0))


def _features(sae: Any, features: Any, what: str) -> tuple[int, ...]:
    feats = (features,) if isinstance(features, int) else tuple(features)
    if not feats:
        raise SieveError(f"{what}: give at least one feature")
    n = int(sae.cfg.d_sae)
    for f in feats:
        if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < n:
            raise SieveError(f"{what}: feature {f!r} is out of range: this SAE has {n} features (0..{n - 1})")
    if len(set(feats)) != len(feats):
        raise SieveError(f"{what}: feature indices repeat: {list(feats)}")
    return feats


@dataclass(frozen=True, eq=False)
class SAECode:
    """A detector on the SAE's code: the post-activation of ``features`` (after JumpReLU / ReLU / TopK).

    ``reduce``: ``sum`` (weighted by ``weights``, default 1), ``any`` (the largest activation, so
    ``Fires(code, t)`` fires where any feature's activation passes t) or ``all`` (the smallest).
    ``encode="full"`` encodes with the whole encoder even where a sparse one would do (JumpReLU and
    ReLU SAEs need only the features' own encoder columns; TopK always needs the full encode).

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> code = SAECode(w.sae, [w.feature.index])
        >>> code  # doctest: +ELLIPSIS
        SAECode(topk 2048 latents, features [...], sum)
    """

    sae: Any
    features: Sequence[int]
    reduce: Literal["sum", "any", "all"] = "sum"
    weights: Sequence[float] | None = None
    encode: Literal["auto", "full"] = "auto"
    name: str = ""

    def __post_init__(self) -> None:
        rule = sae_rule(self.sae)
        object.__setattr__(self, "features", _features(self.sae, self.features, "SAECode"))
        if self.reduce not in REDUCES:
            raise SieveError(f"SAECode: reduce {self.reduce!r} is unknown; allowed: {list(REDUCES)}")
        if self.weights is not None:
            if self.reduce != "sum":
                raise SieveError("SAECode: weights apply to reduce='sum' only")
            ws = tuple(_number(x, "SAECode weight") for x in self.weights)
            if len(ws) != len(self.features):
                raise SieveError(f"SAECode: {len(ws)} weights for {len(self.features)} features")
            object.__setattr__(self, "weights", ws)
        if self.encode not in ("auto", "full"):
            raise SieveError(f"SAECode: encode {self.encode!r} is unknown; allowed: ['auto', 'full']")
        object.__setattr__(self, "_rule", rule)

    @property
    def width(self) -> int:
        return self._rule.d_in  # type: ignore[attr-defined]

    def score(self, h: Tensor) -> Tensor:
        """``[..., D] -> [...]``: the reduced code of the features (equal to ``sae.encode(h)``'s columns)."""
        f = _encode(_sae_tensors(self.sae, self.features, self.encode == "full", h.device), h)
        return _reduce(f, self.reduce, self.weights)

    def __repr__(self) -> str:
        feats = list(self.features)
        shown = feats if len(feats) <= 6 else [*feats[:6], "..."]
        return (f"SAECode({self._rule.architecture} {self._rule.d_sae} latents, features {shown}, "  # type: ignore[attr-defined]
                f"{self.reduce})")


def _reduce(f: Tensor, reduce: str, weights: Sequence[float] | None) -> Tensor:
    if reduce == "any":
        return f.max(dim=-1).values
    if reduce == "all":
        return f.min(dim=-1).values
    w = torch.tensor(weights if weights is not None else [1.0] * f.shape[-1], device=f.device)
    return f @ w


AnyDetector = Detector | SAECode


# ------------------------------------------------------------------------------------------------- gates


class Gate:
    """A gate expression: :class:`Always`, :class:`Fires` leaves, ``&``, ``|``, ``~`` and ``.latch()``.

    Example:
        >>> a = Fires(Detector(torch.tensor([1.0, 0.0])), 0.5)
        >>> b = Fires(Detector(torch.tensor([0.0, 1.0])), 0.5)
        >>> (a.latch() & ~b)
        (latch(fires(Detector(custom, d=2, b=0) > 0.5)) & ~fires(Detector(custom, d=2, b=0) > 0.5))
    """

    def __and__(self, other: Gate) -> Gate:
        return And((self, _gate(other)))

    def __or__(self, other: Gate) -> Gate:
        return Or((self, _gate(other)))

    def __invert__(self) -> Gate:
        return Not(self)

    def latch(self) -> Gate:
        """On from the first token where this gate is on, for the rest of the row's generation."""
        return Latch(self)

    def leaves(self) -> list[Fires]:
        return []


def _gate(g: Any) -> Gate:
    if not isinstance(g, Gate):
        raise SieveError(f"expected a gate (Always, Fires, &, |, ~, .latch()), got {type(g).__name__}")
    return g


@dataclass(frozen=True, eq=False, repr=False)
class Always(Gate):
    """Every real token (padding and BOS excluded)."""

    def __repr__(self) -> str:
        return "always"


@dataclass(frozen=True, eq=False, repr=False)
class Fires(Gate):
    """Tokens where ``detector``'s score is above ``threshold``."""

    detector: AnyDetector
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.detector, (Detector, SAECode)):
            raise SieveError(f"Fires: expected a Detector or SAECode, got {type(self.detector).__name__}")
        object.__setattr__(self, "threshold", _number(self.threshold, "Fires: threshold"))

    def leaves(self) -> list[Fires]:
        return [self]

    def __repr__(self) -> str:
        return f"fires({self.detector!r} > {self.threshold:g})"


@dataclass(frozen=True, eq=False, repr=False)
class _Combined(Gate):
    """Two or more gates joined by one operator (``And``, ``Or``)."""

    parts: tuple[Gate, ...]
    _symbol = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(_gate(p) for p in self.parts))
        if len(self.parts) < 2:
            raise SieveError(f"{type(self).__name__} needs at least two gates")

    def leaves(self) -> list[Fires]:
        return [leaf for p in self.parts for leaf in p.leaves()]

    def __repr__(self) -> str:
        return "(" + f" {self._symbol} ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, eq=False, repr=False)
class And(_Combined):
    _symbol = "&"


@dataclass(frozen=True, eq=False, repr=False)
class Or(_Combined):
    _symbol = "|"


@dataclass(frozen=True, eq=False, repr=False)
class Not(Gate):
    part: Gate

    def __post_init__(self) -> None:
        _gate(self.part)

    def leaves(self) -> list[Fires]:
        return self.part.leaves()

    def __repr__(self) -> str:
        return f"~{self.part!r}"


@dataclass(frozen=True, eq=False, repr=False)
class Latch(Gate):
    part: Gate

    def __post_init__(self) -> None:
        _gate(self.part)

    def leaves(self) -> list[Fires]:
        return self.part.leaves()

    def __repr__(self) -> str:
        return f"latch({self.part!r})"


# ------------------------------------------------------------------------------------------------- edits


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
        d = _vector(self.direction, "edit direction")
        n = float(d.norm())
        if not n > 0 or n != n:
            raise SieveError("edit direction has zero (or NaN) norm")
        object.__setattr__(self, "direction", d / n)
        object.__setattr__(self, "value", _number(self.value, "edit value"))

    @property
    def width(self) -> int:
        return int(self.direction.shape[0])

    def __repr__(self) -> str:
        return f"Edit({self.kind} {self.value:g}, d={self.width})"


@dataclass(frozen=True, eq=False)
class LatentEdit:
    """An edit in SAE space: ``f = enc(h)``; latents ``features`` set to / scaled by / added ``values``,
    or ablated (zeroed); ``h' = h + dec(f') − dec(f)`` (the reconstruction error is kept).

    ``values``: one per feature, or one for all (``ablate`` takes none). ``encode="full"`` forces the
    whole encoder (TopK SAEs always need it; JumpReLU and ReLU need only the edited features' columns).

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> LatentEdit(w.sae, [w.feature.index], "set", 0.0)  # doctest: +ELLIPSIS
        LatentEdit(set [...] to [0.0], topk 2048 latents)
    """

    sae: Any
    features: Sequence[int]
    op: LatentOp
    values: Sequence[float] | float = ()
    encode: Literal["auto", "full"] = "auto"

    def __post_init__(self) -> None:
        rule = sae_rule(self.sae)
        feats = _features(self.sae, self.features, f"LatentEdit {self.op}")
        object.__setattr__(self, "features", feats)
        if self.op not in LATENT_OPS:
            raise SieveError(f"LatentEdit: op {self.op!r} is unknown; allowed: {list(LATENT_OPS)}")
        vals = self.values
        if self.op == "ablate":
            if vals not in ((), None, 0, 0.0):
                raise SieveError("LatentEdit: ablate takes no values (it sets the latents to 0)")
            vals = (0.0,) * len(feats)
        elif isinstance(vals, (int, float)) and not isinstance(vals, bool):
            vals = (float(vals),) * len(feats)
        else:
            vals = tuple(_number(v, f"LatentEdit {self.op} value") for v in vals)  # type: ignore[union-attr]
            if len(vals) != len(feats):
                raise SieveError(f"LatentEdit {self.op}: {len(vals)} values for {len(feats)} features")
        object.__setattr__(self, "values", tuple(float(v) for v in vals))
        if self.encode not in ("auto", "full"):
            raise SieveError(f"LatentEdit: encode {self.encode!r} is unknown; allowed: ['auto', 'full']")
        object.__setattr__(self, "_rule", rule)

    @property
    def width(self) -> int:
        return self._rule.d_in  # type: ignore[attr-defined]

    def affine(self) -> tuple[list[float], list[float]]:
        """Per feature ``(α, β)`` with ``f' = α·f + β``."""
        n = len(self.features)
        if self.op == "set":
            return [0.0] * n, list(self.values)
        if self.op == "scale":
            return list(self.values), [0.0] * n
        if self.op == "add":
            return [1.0] * n, list(self.values)
        return [0.0] * n, [0.0] * n

    def __repr__(self) -> str:
        feats = list(self.features)
        shown = feats if len(feats) <= 6 else [*feats[:6], "..."]
        word = {"set": " to", "scale": " by", "add": " +", "ablate": ""}[self.op]
        vals = "" if self.op == "ablate" else f"{word} {list(self.values)[:6]}"
        return f"LatentEdit({self.op} {shown}{vals}, {self._rule.architecture} {self._rule.d_sae} latents)"  # type: ignore[attr-defined]


AnyEdit = Edit | LatentEdit


# ---------------------------------------------------------------------------------------- interventions


def _layers(value: Any, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    vals = (value,) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if not vals:
        raise SieveError(f"{what}: give at least one layer")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SieveError(f"{what}: layers must be non-negative integers, got {list(vals)!r}")
    return tuple(sorted(set(vals)))


@dataclass(frozen=True, eq=False)
class Intervention:
    """One intervention: a gate, an edit, where it edits (``layers``) and where its gate reads
    (``read_layer``, default the first edit layer).

    ``gate`` is ``"always"``, ``"token"`` (``detector`` passes ``threshold``), ``"input"`` (the same,
    latched) or a :class:`Gate` expression. ``detector`` is also what a ``clamp`` edit clamps.
    ``layers=None`` leaves the layer to be bound later (``iv.at(L)``, ``build(..., layer=L)``, or
    ``generate(..., layer_index=L)``).

    Example:
        >>> u = torch.tensor([0.0, 1.0])
        >>> iv = Intervention("token", Edit("add", u, -4.0), Detector(torch.tensor([1.0, 0.0])), threshold=2.0)
        >>> iv.at(3)
        Intervention(token, Edit(add -4, d=2), layers [3])
        >>> iv.at([3, 4, 5], read_layer=3).condition
        fires(Detector(custom, d=2, b=0) > 2)
    """

    gate: GateKind | Gate
    edit: AnyEdit
    detector: AnyDetector | None = None
    threshold: float = 0.0
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    layers: Sequence[int] | int | None = None
    read_layer: int | None = None

    def __post_init__(self) -> None:
        label = f"intervention {self.name!r}" if self.name else "intervention"
        if not isinstance(self.edit, (Edit, LatentEdit)):
            raise SieveError(f"{label}: edit must be an Edit or LatentEdit, got {type(self.edit).__name__}")
        if self.detector is not None and not isinstance(self.detector, (Detector, SAECode)):
            raise SieveError(f"{label}: detector must be a Detector or SAECode, got {type(self.detector).__name__}")
        object.__setattr__(self, "threshold", _number(self.threshold, f"{label}: threshold"))
        if isinstance(self.gate, str):
            if self.gate not in GATES:
                raise SieveError(f"{label}: gate {self.gate!r} is unknown; allowed: {list(GATES)} or a Gate")
            if self.gate != "always" and self.detector is None:
                raise SieveError(f"{label}: gate {self.gate!r} needs a detector")
        else:
            _gate(self.gate)
        own_reader = isinstance(self.gate, str) and self.gate != "always"  # 'token'/'input': reads detector, threshold
        if not own_reader and self.threshold != 0.0:
            raise SieveError(f"{label}: threshold {self.threshold:g} is not used: it is the 'token' and 'input' "
                             "gates' own; a Gate expression carries its thresholds (Fires(detector, t))")
        if isinstance(self.gate, Gate):
            cond: Gate = self.gate
        elif self.gate == "always":
            cond = Always()
        else:
            leaf = Fires(self.detector, self.threshold)  # type: ignore[arg-type]
            cond = leaf if self.gate == "token" else leaf.latch()
        object.__setattr__(self, "_condition", cond)
        if isinstance(self.edit, Edit) and self.edit.kind == "clamp":
            if not isinstance(self.detector, Detector):
                raise SieveError(f"{label}: a clamp edit needs a linear Detector (it clamps the detector's "
                                 "score); to clamp SAE latents use LatentEdit(sae, features, 'set', value)")
            wu = float(self.detector.w @ self.edit.direction)
            if abs(wu) < 1e-6 * float(self.detector.w.norm()):
                raise SieveError(f"{label}: clamp direction is orthogonal to the detector (w·u ≈ 0): moving "
                                 "along it cannot change the score")
        widths = {("edit", self.edit.width)}
        for leaf in self.condition.leaves():
            widths.add(("gate detector", leaf.detector.width))
        if self.detector is not None:
            widths.add(("detector", self.detector.width))
        if len({w for _, w in widths}) > 1:
            raise ShapeMismatch(f"{label}: widths differ: " + ", ".join(f"{k} {w}" for k, w in sorted(widths)))
        clamps = isinstance(self.edit, Edit) and self.edit.kind == "clamp"
        if not own_reader and self.detector is not None and not clamps:
            raise SieveError(f"{label}: detector is not used: a gate {self.gate!r} reads no detector of its own, and "
                             "only a clamp edit clamps one; put it in the gate (Fires(detector, t)) or leave it out")
        layers = _layers(self.layers, label)
        object.__setattr__(self, "layers", layers)
        if self.read_layer is not None:
            rl = _layers(self.read_layer, f"{label}: read_layer")
            if rl is None or len(rl) != 1:
                raise SieveError(f"{label}: read_layer is one layer, got {self.read_layer!r}")
            object.__setattr__(self, "read_layer", rl[0])
            if layers is not None and rl[0] > layers[0]:
                raise SieveError(f"{label}: read_layer {rl[0]} is after the first edit layer {layers[0]}; a gate "
                                 "must be read at or before every layer it edits (one forward runs layers in order)")

    @property
    def width(self) -> int:
        return self.edit.width

    @property
    def condition(self) -> Gate:
        """The gate as an expression."""
        return self._condition  # type: ignore[attr-defined]

    @property
    def bound(self) -> bool:
        return self.layers is not None

    @property
    def reads_at(self) -> int:
        """The layer the gate's detectors are read at."""
        if self.layers is None:
            raise SieveError(f"{self!r} has no layer yet: bind one with .at(L)")
        return self.read_layer if self.read_layer is not None else self.layers[0]  # type: ignore[index]

    def at(self, layers: Sequence[int] | int, read_layer: int | None = None) -> Intervention:
        """A copy that edits at ``layers`` (one or several) and reads its gate at ``read_layer``."""
        return dataclasses.replace(self, layers=layers, read_layer=read_layer if read_layer is not None
                                   else self.read_layer)

    def __repr__(self) -> str:
        gate = self.gate if isinstance(self.gate, str) else repr(self.gate)
        where = "unbound" if self.layers is None else f"layers {list(self.layers)}"  # type: ignore[arg-type]
        if self.read_layer is not None:
            where += f", reads {self.read_layer}"
        name = f"{self.name!r}, " if self.name else ""
        return f"Intervention({name}{gate}, {self.edit!r}, {where})"


Row = tuple[Intervention, ...]


def as_rows(interventions: Any, n: int, layer: int | None = None, *, width: int | None = None) -> list[Row]:
    """Normalise interventions for ``n`` rows: one for all, or one per row; each an Intervention, a list of
    them (composed), or None. Unbound interventions are bound to ``layer``; ``width`` checks every one.

    Example:
        >>> iv = Intervention("always", Edit("add", torch.ones(2), 1.0))
        >>> [len(r) for r in as_rows([None, iv, [iv, iv]], 3, layer=0)]
        [0, 1, 2]
    """
    if interventions is None or isinstance(interventions, Intervention):
        per_row: list[Any] = [interventions] * n
    elif isinstance(interventions, (list, tuple)):
        per_row = list(interventions)
    else:
        raise SieveError(f"interventions must be an Intervention, a list (one per row) or None, got "
                         f"{type(interventions).__name__}")
    if len(per_row) != n:
        raise SieveError(f"{len(per_row)} interventions for {n} prompts: give one per row (None: unsteered)")
    out: list[Row] = []
    for i, r in enumerate(per_row):
        items = () if r is None else (r,) if isinstance(r, Intervention) else tuple(r)
        row = []
        for iv in items:
            if not isinstance(iv, Intervention):
                raise SieveError(f"row {i}: expected an Intervention, got {type(iv).__name__}")
            if iv.layers is None:
                if layer is None:
                    raise SieveError(f"row {i}: {iv!r} has no layer; bind one (iv.at(L), build(..., layer=L)) "
                                     "or pass layer_index=")
                iv = iv.at(layer)
            if width is not None and iv.width != width:
                raise ShapeMismatch(f"row {i}: {iv!r} has width {iv.width}, but the model's hidden size is {width}")
            row.append(iv)
        out.append(tuple(row))
    return out


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


def resolve_prompt_gates(rows: list[Row], texts: Sequence[str]) -> tuple[list[Row], list[bool | None]]:
    """Decide prompt gates (:mod:`sieve.prompt_gates`) row by row on the prompt's text: an intervention
    whose gate opens is kept (without the gate, so it is not decided again), one whose gate stays closed
    is dropped. Also returns, per row, whether a prompt gate of it opened (None: it has none).

    Example:
        >>> from sieve.prompt_gates import LEXICAL_REGEX
        >>> iv = Intervention("always", Edit("add", torch.ones(2), -1.0), meta={"prompt_gate": LEXICAL_REGEX})
        >>> rows, opened = resolve_prompt_gates([(iv,), (iv,), ()], ["def match_all(s):", "def mean(xs):", "x"])
        >>> [len(r) for r in rows], opened
        ([1, 0, 0], [True, False, None])
    """
    from sieve.prompt_gates import open_prompt_gates, prompt_gate_of

    if not any(prompt_gate_of(iv) is not None for row in rows for iv in row):
        return rows, [None] * len(rows)
    out: list[Row] = []
    opened: list[bool | None] = []
    memo: dict[int, Any] = {}  # rows sharing an intervention keep sharing one once its gate opened
    for row, text in zip(rows, texts):
        kept, flags = open_prompt_gates(list(row), [text] * len(row), memo)
        out.append(tuple(iv for iv in kept if iv is not None))
        decided = [f for f in flags if f is not None]
        opened.append(any(decided) if decided else None)
    return out, opened


def _prompt_texts(encoding: dict[str, Tensor], tokenizer: Any) -> list[str]:
    ids, mask = encoding["input_ids"].cpu(), encoding.get("attention_mask")
    mask = mask.cpu().bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    return [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(ids, mask)]


# ---------------------------------------------------------------------------------------- the SAE math


@dataclass
class _SAETensors:
    """The slices of one SAE that a layer's work needs: ``U`` features (or the whole encoder)."""

    rule: SAERule
    full: bool
    U: Tensor  # [U] feature indices
    W_enc: Tensor  # [D, U] or [D, S] when full
    b_enc: Tensor
    threshold: Tensor | None
    W_dec: Tensor  # [U, D] effective rows (rescaled when the SAE rescales by decoder norm)
    b_dec: Tensor  # [D]
    dec_norm: Tensor | None  # [U] or [S] (TopK rescaling of the pre-activation)

    def to(self, device: torch.device) -> _SAETensors:
        return dataclasses.replace(self, **{k: (v.to(device) if isinstance(v, Tensor) else v)
                                            for k, v in self.__dict__.items() if k not in ("rule", "full")})


def _sae_tensors(sae: Any, features: Sequence[int], full: bool, device: torch.device | str = "cpu") -> _SAETensors:
    rule = sae_rule(sae)
    full = full or rule.architecture == "topk"
    U = torch.tensor(list(features), dtype=torch.long)
    W_enc = sae.W_enc.detach().float()
    b_enc = sae.b_enc.detach().float()
    thr = getattr(sae, "threshold", None)
    thr = thr.detach().float() if rule.architecture == "jumprelu" and thr is not None else None
    W_dec_all = sae.W_dec.detach().float()
    norms = W_dec_all.norm(dim=-1) if rule.rescale_by_decoder_norm else None
    W_dec = W_dec_all[U] if norms is None else W_dec_all[U] / norms[U, None]
    if not full:
        W_enc, b_enc = W_enc[:, U], b_enc[U]
        thr = thr[U] if thr is not None else None
    return _SAETensors(rule, full, U, W_enc.contiguous(), b_enc, thr, W_dec.contiguous(),
                       sae.b_dec.detach().float(), norms).to(torch.device(device))


def _encode(t: _SAETensors, h: Tensor) -> Tensor:
    """``[..., D] -> [..., U]``: the SAE code of the features ``t.U``, by the SAE's own rule."""
    x = h.float()
    if t.rule.apply_b_dec_to_input:
        x = x - t.b_dec
    pre = x @ t.W_enc + t.b_enc
    if t.dec_norm is not None:
        pre = pre * (t.dec_norm if t.full else t.dec_norm[t.U])
    arch = t.rule.architecture
    if arch == "topk":
        vals, idx = torch.topk(pre, k=t.rule.k, dim=-1, sorted=False)
        act = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    elif arch == "jumprelu":
        act = pre.relu() * (pre > t.threshold)
    else:
        act = pre.relu()
    return act[..., t.U] if t.full else act


# -------------------------------------------------------------------------------------------- packing


_OP = {"pad": 0, "always": 1, "fires": 2, "and": 3, "or": 4, "not": 5, "latch": 6}


def _compile(g: Gate, leaf_index: dict[int, int], nodes: list[tuple[int, int, int, int]]) -> int:
    """Append ``g``'s nodes (op, a, b, leaf) in evaluation order; return its node index."""
    if isinstance(g, Always):
        nodes.append((_OP["always"], 0, 0, 0))
    elif isinstance(g, Fires):
        nodes.append((_OP["fires"], 0, 0, leaf_index[id(g)]))
    elif isinstance(g, (And, Or)):
        acc = _compile(g.parts[0], leaf_index, nodes)
        for p in g.parts[1:]:
            nxt = _compile(p, leaf_index, nodes)
            nodes.append((_OP["and" if isinstance(g, And) else "or"], acc, nxt, 0))
            acc = len(nodes) - 1
        return acc
    elif isinstance(g, (Not, Latch)):
        a = _compile(g.part, leaf_index, nodes)
        nodes.append((_OP["not" if isinstance(g, Not) else "latch"], a, 0, 0))
    else:  # pragma: no cover - _gate() checked the type
        raise SieveError(f"unknown gate {g!r}")
    return len(nodes) - 1


@dataclass
class _Group:
    """One SAE at one layer: the union of features that rows read (codes) or edit there."""

    sae: Any
    features: list[int] = field(default_factory=list)
    full: bool = False
    tensors: _SAETensors | None = None

    def slot(self, f: int) -> int:
        if f not in self.features:
            self.features.append(f)
        return self.features.index(f)


class UnmaskedPrompt(UserWarning):
    """A :class:`Steerer` without the batch's encoding read a prompt of several rows: padding and BOS
    were treated as tokens."""


class Steerer:
    """Applies each batch row's interventions at every forward of a trace, keeping the latches.

    ``rows``: one per batch row, each an :class:`Intervention`, a list of them, or None (or one
    Intervention for all rows). ``layer``: binds interventions that carry no layer. The first forward
    is the prefill (``[B, T_prompt, D]``): padding and BOS are masked using the prompt ``encoding``
    (and the ``tokenizer``'s BOS id); later forwards are decode steps whose new tokens are all real.
    Without an encoding every position is a token (one row, or tensors of your own): :meth:`forward`
    on several rows is then refused, and a prompt of several rows warns (:class:`UnmaskedPrompt`).
    Counts of detector firings and edits (prompt and generated, per row) are kept.

    Inside a trace, call :meth:`forward` once per forward (it visits every layer the interventions
    touch, in order), or ``steer(model.layers[L].output, layer=L)`` yourself for each of
    :attr:`layers` in order.

    Example:
        >>> steer = Steerer([iv] * 2, enc, tokenizer)  # doctest: +SKIP
        >>> with model.generate(enc, max_new_tokens=8) as tracer:  # doctest: +SKIP
        ...     for step in tracer.iter[:8]:
        ...         steer.forward(model)
    """

    def __init__(
        self,
        rows: Any,
        encoding: dict[str, Tensor] | None = None,
        tokenizer: Any = None,
        *,
        layer: int | None = None,
        batch_size: int | None = None,
        split_prompt: bool = False,
    ) -> None:
        if rows is None or isinstance(rows, Intervention):
            n = batch_size or (encoding["input_ids"].shape[0] if encoding is not None else 1)
            rows = [rows] * n
        self.rows = as_rows(rows, len(rows), layer)
        if encoding is not None and "input_ids" in encoding and encoding["input_ids"].shape[0] != len(self.rows):
            raise ShapeMismatch(f"Steerer: {len(self.rows)} rows of interventions for an encoding of "
                                f"{encoding['input_ids'].shape[0]} prompts: give one per prompt (or one for all)")
        if encoding is not None and tokenizer is not None and any("prompt_gate" in iv.meta for r in self.rows for iv in r):
            # Prompt gates left undecided (steered_logprobs, MMLU, lm-eval) read the decoded prompt.
            self.rows = resolve_prompt_gates(self.rows, _prompt_texts(encoding, tokenizer))[0]
        self.encoding = encoding
        # The prompt may come in more than one forward (a prefix, then the rest over its KV cache): every
        # forward is a prompt forward until the encoding's width is read (:meth:`take`).
        self.split_prompt = bool(split_prompt)
        # Set by a caller replaying one record with several Steerers: SAE codes of the recorded tensors,
        # encoded once for all of them (:meth:`replay`).
        self.replay_codes: dict | None = None
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        self._pack()
        self.reset()

    # -------------------------------------------------------------------------------------- packing
    def _pack(self) -> None:
        B = len(self.rows)
        widths = {iv.width for row in self.rows for iv in row}
        if len(widths) > 1:
            raise ShapeMismatch(f"Steerer: interventions have different widths {sorted(widths)}")
        self.width = widths.pop() if widths else None
        D = self.width or 0
        J = max([len(r) for r in self.rows] + [1])
        layers: set[int] = set()
        groups: dict[tuple[int, int], _Group] = {}

        def group(sae: Any, L: int) -> _Group:
            return groups.setdefault((id(sae), L), _Group(sae))

        # Gate leaves: every Fires of every intervention of a row gets a slot k (row-local).
        leaves_per_row = [[leaf for iv in row for leaf in iv.condition.leaves()] for row in self.rows]
        K = max([len(x) for x in leaves_per_row] + [1])
        lw = torch.zeros(B, K, D)
        lb = torch.zeros(B, K)
        thr = torch.zeros(B, K)
        leaf_layer = torch.full((B, K), -1, dtype=torch.long)
        code_leaves: list[tuple[int, int, int, Any]] = []  # (b, k, layer, SAECode)
        # Gate programs: one per (row, intervention).
        progs: list[list[list[tuple[int, int, int, int]]]] = []
        gate_layer = torch.full((B, J), -1, dtype=torch.long)
        for b, row in enumerate(self.rows):
            index: dict[int, int] = {}
            k = 0
            row_progs = []
            for j, iv in enumerate(row):
                R = iv.reads_at
                gate_layer[b, j] = R
                layers.add(R)
                layers.update(iv.layers)  # type: ignore[arg-type]
                for leaf in iv.condition.leaves():
                    index[id(leaf)] = k
                    thr[b, k] = leaf.threshold
                    leaf_layer[b, k] = R
                    if isinstance(leaf.detector, Detector):
                        lw[b, k] = leaf.detector.w
                        lb[b, k] = leaf.detector.b
                    else:
                        code_leaves.append((b, k, R, leaf.detector))
                    k += 1
                nodes: list[tuple[int, int, int, int]] = []
                _compile(iv.condition, index, nodes)
                row_progs.append(nodes)
            progs.append(row_progs)
        N = max([len(p) for rp in progs for p in rp] + [1])
        op = torch.zeros(B, J, N, dtype=torch.long)
        arg = torch.zeros(B, J, N, 2, dtype=torch.long)
        leaf_of = torch.zeros(B, J, N, dtype=torch.long)
        root = torch.zeros(B, J, dtype=torch.long)
        for b, rp in enumerate(progs):
            for j, nodes in enumerate(rp):
                for n, (o, a, a2, lf) in enumerate(nodes):
                    op[b, j, n], arg[b, j, n, 0], arg[b, j, n, 1], leaf_of[b, j, n] = o, a, a2, lf
                root[b, j] = len(nodes) - 1
        # SAE-code leaves: per (SAE, layer) group, weights [B, K, U] over the group's features.
        code_sets: dict[tuple[int, int], list[tuple[int, int, Any]]] = {}
        for b, k, R, det in code_leaves:
            g = group(det.sae, R)
            g.full |= det.encode == "full"
            for f in det.features:
                g.slot(f)
            code_sets.setdefault((id(det.sae), R), []).append((b, k, det))
        # Edits per layer: direction edits [B, M, D] and latent edits per SAE group [B, M, U].
        self.layers = sorted(layers)
        edits: dict[int, dict[str, Any]] = {}
        for L in self.layers:
            dir_slots: list[list[tuple[int, Intervention]]] = [[] for _ in range(B)]
            lat_slots: dict[int, list[list[tuple[int, Intervention]]]] = {}
            for b, row in enumerate(self.rows):
                for j, iv in enumerate(row):
                    if L not in iv.layers:  # type: ignore[operator]
                        continue
                    if isinstance(iv.edit, Edit):
                        dir_slots[b].append((j, iv))
                    else:
                        g = group(iv.edit.sae, L)
                        g.full |= iv.edit.encode == "full"
                        for f in iv.edit.features:
                            g.slot(f)
                        lat_slots.setdefault(id(iv.edit.sae), [[] for _ in range(B)])[b].append((j, iv))
            edits[L] = {"dir": self._pack_dir(dir_slots, D), "lat": {},
                        "clamps": any(isinstance(iv.edit, Edit) and iv.edit.kind == "clamp"
                                      for slots in dir_slots for _, iv in slots)}
            for sid, slots in lat_slots.items():
                edits[L]["lat"][sid] = self._pack_lat(slots, groups[(sid, L)])
        for g in groups.values():
            g.tensors = _sae_tensors(g.sae, g.features, g.full)
        codes: dict[tuple[int, int], dict[str, Tensor]] = {}
        for key, items in code_sets.items():
            g = groups[key]
            U = len(g.features)
            wts = torch.zeros(B, K, U)
            member = torch.zeros(B, K, U, dtype=torch.bool)
            red = torch.zeros(B, K, dtype=torch.long)
            at = torch.zeros(B, K, dtype=torch.bool)
            for b, k, det in items:
                ws = det.weights or [1.0] * len(det.features)
                for f, wv in zip(det.features, ws):
                    wts[b, k, g.slot(f)] = wv
                    member[b, k, g.slot(f)] = True
                red[b, k] = REDUCES.index(det.reduce)
                at[b, k] = True
            codes[key] = {"w": wts, "member": member, "reduce": red, "at": at}
        self._groups = groups
        self._read_layers = {iv.reads_at for row in self.rows for iv in row}
        self._t: dict[str, Any] = {
            "lw": lw, "lb": lb, "thr": thr, "leaf_layer": leaf_layer, "op": op, "arg": arg, "leaf_of": leaf_of,
            "root": root, "gate_layer": gate_layer, "edits": edits, "codes": codes,
        }
        self._K, self._J, self._N = K, J, N

    @staticmethod
    def _pack_dir(slots: list[list[tuple[int, Intervention]]], D: int) -> dict[str, Tensor] | None:
        M = max(len(s) for s in slots)
        if M == 0:
            return None
        B = len(slots)
        t = {"u": torch.zeros(B, M, D), "value": torch.zeros(B, M), "clamp": torch.zeros(B, M, dtype=torch.bool),
             "cw": torch.zeros(B, M, D), "cb": torch.zeros(B, M), "wu": torch.ones(B, M),
             "unit": torch.zeros(B, M, dtype=torch.long), "active": torch.zeros(B, M, dtype=torch.bool)}
        for b, items in enumerate(slots):
            for m, (j, iv) in enumerate(items):
                e = iv.edit
                t["u"][b, m] = e.direction  # type: ignore[union-attr]
                t["value"][b, m] = e.value  # type: ignore[union-attr]
                t["unit"][b, m] = j
                t["active"][b, m] = True
                if e.kind == "clamp":  # type: ignore[union-attr]
                    det = iv.detector
                    t["clamp"][b, m] = True
                    t["cw"][b, m] = det.w  # type: ignore[union-attr]
                    t["cb"][b, m] = det.b  # type: ignore[union-attr]
                    t["wu"][b, m] = det.w @ e.direction  # type: ignore[union-attr]
        return t

    @staticmethod
    def _pack_lat(slots: list[list[tuple[int, Intervention]]], g: _Group) -> dict[str, Tensor]:
        B, M, U = len(slots), max(len(s) for s in slots), len(g.features)
        alpha = torch.ones(B, M, U)
        beta = torch.zeros(B, M, U)
        unit = torch.zeros(B, M, dtype=torch.long)
        active = torch.zeros(B, M, dtype=torch.bool)
        for b, items in enumerate(slots):
            for m, (j, iv) in enumerate(items):
                e = iv.edit
                a, be = e.affine()  # type: ignore[union-attr]
                for f, x, y in zip(e.features, a, be):  # type: ignore[union-attr]
                    alpha[b, m, g.slot(f)] = x
                    beta[b, m, g.slot(f)] = y
                unit[b, m], active[b, m] = j, True
        return {"alpha": alpha, "beta": beta, "unit": unit, "active": active}

    # ---------------------------------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the latches and counts: ready for a new generation."""
        B = len(self.rows)
        self.calls = 0
        self._pos = 0  # prompt positions read so far (the encoding's width once the prompt is read)
        self._in_prompt = False  # whether the forward under way reads prompt positions
        self._latch = torch.zeros(B, self._J, self._N, dtype=torch.bool)
        self.stats = {k: torch.zeros(B, dtype=torch.long)
                      for k in ("prompt_fired", "gen_fired", "prompt_edited", "gen_edited")}
        self._device: torch.device | None = None
        self._layer_pos = 0
        # Where, not only how often: the prefill's firing mask and one [2, B] (fired, edited) per decode
        # step, kept on the device and read once by positions().
        self._prompt_fired: Tensor | None = None
        self._prompt_edited: Tensor | None = None
        self._gen_marks: list[Tensor] = []
        self._warned = False
        # The rows still in the forwards (indices into :attr:`rows`) once some have left (:meth:`keep_rows`);
        # None: all of them.
        self._present: Tensor | None = None

    def _to(self, device: torch.device) -> None:
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        self._t = move(self._t)
        for g in self._groups.values():
            g.tensors = g.tensors.to(device)  # type: ignore[union-attr]
        self._latch = self._latch.to(device)
        self.stats = {k: v.to(device) for k, v in self.stats.items()}
        if self._present is not None:
            self._present = self._present.to(device)
        self._device = device

    def _prompt_forward(self, B: int, T: int) -> bool:
        """Whether a forward of ``T`` positions reads the prompt: the first does; with ``split_prompt``,
        every forward does until the encoding's width has been read."""
        if self.calls == 0:
            return True
        return self.split_prompt and self.encoding is not None and self._pos < self.encoding["input_ids"].shape[1]

    def _prompt_eligible(self, B: int, T: int, device: torch.device) -> Tensor:
        if self.encoding is None:
            if B > 1 and T > 1 and not self._warned:
                self._warned = True
                warnings.warn(f"Steerer without the batch's encoding: every position of this {B} x {T} prompt counts "
                              "as a token, padding and BOS included (they can open gates and be edited); give "
                              "Steerer(rows, enc, model.tokenizer) the enc the trace runs on", UnmaskedPrompt,
                              stacklevel=3)
            return torch.ones(B, T, dtype=torch.bool, device=device)
        ids = self.encoding["input_ids"]
        W = ids.shape[1]
        fits = ids.shape[0] == B and (self._pos + T <= W if self.split_prompt else T == W)
        if not fits:
            raise SieveError(
                f"Steerer: the prompt encoding is {tuple(ids.shape)} but the first forward is {(B, T)}"
                + (f" after {self._pos} prompt positions" if self._pos else "")
                + "; pass the same encoding to the trace and to the Steerer"
            )
        mask = eligible_mask(ids, self.encoding.get("attention_mask"), self.bos_token_id)
        return mask[:, self._pos : self._pos + T].to(device)

    def take(self, index: Sequence[int], encoding: dict[str, Tensor]) -> Steerer:
        """A Steerer for the rows ``index`` of this one (repeats allowed), carrying their state: the
        latches, counts and prompt marks so far, and how much of the prompt was read. ``encoding`` is the
        new rows' full prompt encoding, of which this Steerer read the first positions (it was made with
        ``split_prompt=True`` and the same width). A prompt prefix shared by many rows (the samples of a
        prompt in a sweep) is read once, then each row goes on from its own copy (:mod:`sieve.generation`).

        Example:
            >>> iv = Intervention("input", Edit("add", torch.tensor([1.0, 0.0]), -1.0),
            ...                   Detector(torch.tensor([1.0, 0.0])), threshold=0.5)
            >>> enc = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
            >>> one = Steerer([iv], enc, layer=0, split_prompt=True)
            >>> _ = one(torch.tensor([[[2.0, 0.0], [0.0, 0.0]]]))      # prompt positions 0, 1: fires at 0, edits 0, 1
            >>> enc3 = {k: v.expand(3, -1) for k, v in enc.items()}
            >>> three = one.take([0, 0, 0], enc3)
            >>> _ = three(torch.zeros(3, 1, 2))                         # prompt position 2: latched, edits
            >>> three.counts()["prompt_edited"], three.positions()["prompt_fired"]
            ([3, 3, 3], [[0], [0], [0]])
        """
        if self._gen_marks or self._layer_pos or self._present is not None:
            raise SieveError("Steerer.take: only between prompt forwards")
        idx = torch.as_tensor(list(index), dtype=torch.long)

        def rows_of(x: Any) -> Any:  # every packed per-row tensor has the rows first
            if isinstance(x, Tensor):
                return x[idx.to(x.device)]
            if isinstance(x, dict):
                return {k: rows_of(v) for k, v in x.items()}
            return x

        # The packed rows are indexed, not packed again: the SAE tensors (groups) are shared as they are,
        # on their device (no copy of an SAE per batch).
        new = copy.copy(self)
        new.rows = [self.rows[i] for i in index]
        new.encoding = encoding
        new.split_prompt = True
        new.replay_codes = None
        new._t = rows_of(self._t)
        new._latch = rows_of(self._latch).clone()
        new.stats = {k: rows_of(v).clone() for k, v in self.stats.items()}
        new._prompt_fired = rows_of(self._prompt_fired)
        new._prompt_edited = rows_of(self._prompt_edited)
        new._gen_marks = []
        new._codes = {}
        return new

    def keep_rows(self, keep: Tensor) -> None:
        """Between decode forwards: the next forwards hold only the rows ``keep`` (indices into the rows
        they hold now, each once, in the order they will come) — rows that have ended left the batch.
        Their packed tensors and latches are indexed; counts and positions stay per row of :attr:`rows`
        (the rows that left count nothing more, as a row whose tokens are no longer counted).

        Example:
            >>> iv = Intervention("token", Edit("add", torch.tensor([1.0, 0.0]), -1.0),
            ...                   Detector(torch.tensor([1.0, 0.0])), threshold=0.5)
            >>> steer = Steerer([iv] * 3, layer=0)
            >>> _ = steer(torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[2.0, 0.0]]]))  # the prompt
            >>> steer.keep_rows(torch.tensor([0, 2]))
            >>> _ = steer(torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]]]))                 # rows 0 and 2 only
            >>> steer.counts()["gen_fired"], steer.positions()["gen_fired"]
            ([0, 0, 1], [[], [], [0]])
        """
        if self.layers and (self._layer_pos or self._prompt_forward(0, 0)):
            raise SieveError("Steerer.keep_rows: only between decode forwards")
        dev = self._latch.device
        idx = torch.as_tensor(keep, dtype=torch.long).to(dev)
        present = self._present if self._present is not None else torch.arange(len(self.rows), device=dev)
        if idx.numel() and (int(idx.max()) >= present.numel() or int(idx.min()) < 0
                            or idx.unique().numel() != idx.numel()):
            raise SieveError(f"Steerer.keep_rows: {idx.tolist()} are not distinct indices into "
                             f"{present.numel()} rows")

        def rows_of(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x[idx.to(x.device)]
            if isinstance(x, dict):
                return {k: rows_of(v) for k, v in x.items()}
            return x

        self._t = rows_of(self._t)
        self._latch = self._latch[idx]
        self._present = present[idx]

    def _rows_present(self) -> int:
        return len(self.rows) if self._present is None else int(self._present.numel())

    # -------------------------------------------------------------------------------------- the edit
    def forward(self, model: Any, counted: Tensor | Callable[[], Tensor | None] | None = None) -> None:
        """Inside a trace: edit every layer the interventions touch, in order, for this forward.

        ``counted`` may be a function, called once this forward's layer outputs exist: a trace body runs
        ahead of the model, so state the model updates between forwards (a stopping criterion's) must be
        read late."""
        from sieve.models import layer as layer_of

        if self.encoding is None and self.calls == 0 and len(self.rows) > 1:
            raise SieveError(f"Steerer.forward(model) on {len(self.rows)} rows needs the batch's encoding, to keep "
                             "padding and BOS out of gates and edits: Steerer(rows, enc, model.tokenizer), with the "
                             "enc the trace runs on")
        for L in self.layers:
            target = layer_of(model, L)
            target.output = self(target.output, counted, layer=L)

    def __call__(self, output: Any, counted: Tensor | Callable[[], Tensor | None] | None = None, *,
                 layer: int | None = None) -> Any:
        """Edit one layer's output for this forward. Layers must come in the order of :attr:`layers`,
        once each per forward; ``layer`` may be left out when there is only one. ``counted`` (``[B]``
        bool, optional): the rows whose tokens of this forward go into the counts."""
        h = output[0] if isinstance(output, tuple) else output
        if not self.layers:  # every row unsteered
            if self._prompt_forward(h.shape[0], h.shape[1]):
                self._pos += h.shape[1]
            self.calls += 1
            return output
        if layer is None:
            if len(self.layers) != 1:
                raise SieveError(f"Steerer acts on layers {self.layers}: pass layer= (or call .forward(model))")
            layer = self.layers[0]
        expected = self.layers[self._layer_pos]
        if layer != expected:
            raise SieveError(f"Steerer: layer {layer} came when layer {expected} was due; call the layers "
                             f"{self.layers} in order, once each per forward")
        B, T, D = h.shape
        if B != self._rows_present():
            raise SieveError(f"Steerer holds {self._rows_present()} rows but the layer output has {B}")
        if self.width is not None and D != self.width:
            raise ShapeMismatch(f"Steerer: interventions have width {self.width} but layer {layer}'s output has {D}")
        if self._device != h.device:
            # Everything stays on the model's device: no host sync per step.
            self._to(h.device)
        if self._layer_pos == 0:  # a new forward
            self._in_prompt = self._prompt_forward(B, T)
            self._eligible = self._prompt_eligible(B, T, h.device) if self._in_prompt else \
                torch.ones(B, T, dtype=torch.bool, device=h.device)
            self._fired = torch.zeros(B, self._K, T, dtype=torch.bool, device=h.device)
            self._gate = torch.zeros(B, self._J, T, dtype=torch.bool, device=h.device)
            self._edited = torch.zeros(B, T, dtype=torch.bool, device=h.device)
            self._codes: dict[int, Tensor] = {}
        h_new = self._layer(h, layer)
        self._layer_pos += 1
        if self._layer_pos == len(self.layers):
            self._end_forward(counted)
        return (h_new, *output[1:]) if isinstance(output, tuple) else h_new

    def _code(self, L: int, sid: int, h: Tensor) -> Tensor:
        """The group's code ``[B, T, U]``, encoded once per layer per forward (in a :meth:`replay`, once
        per recorded row)."""
        if sid not in self._codes:
            t = self._groups[(sid, L)].tensors
            src = getattr(self, "_replay_src", None)
            if src is None:
                self._codes[sid] = _encode(t, h)  # type: ignore[arg-type]
            else:  # the recorded rows' code, shared by Steerers replaying the same record (replay_codes)
                key = (id(src[0]), sid, t.full, tuple(t.U.tolist()))  # type: ignore[union-attr]
                shared = self.replay_codes if self.replay_codes is not None else {}
                if key not in shared:
                    shared[key] = _encode(t, src[0])  # type: ignore[arg-type]
                self._codes[sid] = shared[key][src[1]]
        return self._codes[sid]

    def replay(self, outputs: dict[int, Tensor], at: Tensor, counted: Tensor | None = None) -> None:
        """One forward over layer outputs recorded elsewhere (an unsteered generation's, say): row ``i``
        reads row ``at[i]`` of ``outputs[L]`` at every layer ``L`` of :attr:`layers`. Rows that read the
        same recorded row share its SAE encodes (and Steerers replaying the same recorded tensors share
        them too when given one dict as :attr:`replay_codes`). Edits are marked, not computed: the replay
        is for :meth:`counts`, :meth:`positions` and :meth:`prefill_marks` (where the rows would fire and
        edit), and it returns nothing.

        Example:
            >>> iv = Intervention("token", Edit("add", torch.tensor([1.0, 0.0]), -1.0),
            ...                   Detector(torch.tensor([1.0, 0.0])), threshold=0.5)
            >>> steer = Steerer([iv, iv, iv], layer=0)
            >>> steer.replay({0: torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])}, torch.tensor([1, 0, 1]))
            >>> steer.counts()["prompt_edited"]
            [1, 0, 1]
        """
        for L in self.layers:
            src = outputs[L]
            idx = at.to(src.device)
            self._replay_src = (src, idx)
            try:
                self(src[idx], counted, layer=L)
            finally:
                self._replay_src = None

    def _layer(self, h: Tensor, L: int) -> Tensor:
        t = self._t
        self._codes = {}
        elig = self._eligible
        # 1. detectors read here -> fired [B, K, T]
        if L in self._read_layers:
            at_L = t["leaf_layer"] == L
            score = torch.einsum("btd,bkd->bkt", h.float(), t["lw"]) + t["lb"][..., None]
            for (sid, R), c in t["codes"].items():
                if R != L:
                    continue
                f = self._code(L, sid, h)  # [B, T, U]
                s_sum = torch.einsum("btu,bku->bkt", f, c["w"])
                big = torch.finfo(f.dtype).max
                fm = f[:, None, :, :]  # [B, 1, T, U]
                mem = c["member"][:, :, None, :]
                s_any = torch.where(mem, fm, -big).amax(-1)
                s_all = torch.where(mem, fm, big).amin(-1)
                red = c["reduce"][..., None]
                s_code = torch.where(red == 0, s_sum, torch.where(red == 1, s_any, s_all))
                score = torch.where(c["at"][..., None], s_code, score)
            fired = (score > t["thr"][..., None]) & at_L[..., None] & elig[:, None, :]
            self._fired |= fired
            self._eval_gates(L)
        # 2. edits here: one delta per layer, summed over the row's interventions
        e = t["edits"].get(L, {"dir": None, "lat": {}, "clamps": False})
        delta = None
        replaying = getattr(self, "_replay_src", None) is not None  # a replay marks where edits act, no more
        if e["dir"] is not None:
            d = e["dir"]
            g = self._gate.gather(1, d["unit"][..., None].expand(-1, -1, h.shape[1])) & d["active"][..., None]
            self._edited |= g.any(1)
            if not replaying:
                if e["clamps"]:  # the clamped detectors' scores, read here
                    a = torch.einsum("btd,bmd->bmt", h.float(), d["cw"]) + d["cb"][..., None]
                    coef = torch.where(d["clamp"][..., None], (d["value"][..., None] - a) / d["wu"][..., None],
                                       d["value"][..., None])
                else:
                    coef = d["value"][..., None].expand(-1, -1, h.shape[1])
                coef = torch.where(g, coef, torch.zeros_like(coef))
                delta = torch.einsum("bmt,bmd->btd", coef, d["u"])
        for sid, lt in e["lat"].items():
            g = self._gate.gather(1, lt["unit"][..., None].expand(-1, -1, h.shape[1])) & lt["active"][..., None]
            self._edited |= g.any(1)
            if replaying:
                continue
            gt = self._groups[(sid, L)].tensors
            f = self._code(L, sid, h)  # [B, T, U]
            # f' − f = (α − 1)·f + β per slot, where the gate is on; slots of a row add up
            df = torch.einsum("btu,bmu->bmtu", f, lt["alpha"] - 1) + lt["beta"][:, :, None, :]
            df = (df * g[..., None]).sum(1)  # [B, T, U]
            dl = df @ gt.W_dec  # type: ignore[union-attr]
            delta = dl if delta is None else delta + dl
        if delta is None:
            return h
        return h + delta.to(h.dtype)

    def _eval_gates(self, L: int) -> None:
        """Evaluate the gate programs of the interventions that read at ``L``."""
        t = self._t
        mine = t["gate_layer"] == L  # [B, J]
        T = self._fired.shape[-1]
        elig = self._eligible[:, None, :]
        regs: list[Tensor] = []
        for n in range(self._N):
            op = t["op"][:, :, n, None]
            if regs:  # operands: earlier nodes of the same program
                stack = torch.stack(regs, 2)  # [B, J, n, T]
                idx = t["arg"][:, :, n].clamp_max(n - 1)[:, :, :, None].expand(-1, -1, -1, T)
                xy = stack.gather(2, idx)
                x, y = xy[:, :, 0], xy[:, :, 1]
            else:
                x = y = torch.zeros_like(self._gate)
            leaf = self._fired.gather(1, t["leaf_of"][:, :, n, None].expand(-1, -1, T))
            latched = self._latch[:, :, n, None] | (x.long().cumsum(-1) > 0)
            val = torch.where(op == 1, True, torch.where(op == 2, leaf, torch.where(op == 3, x & y, torch.where(
                op == 4, x | y, torch.where(op == 5, ~x, torch.where(op == 6, latched, False))))))
            val = val & elig
            self._latch[:, :, n] |= (op[..., 0] == 6) & mine & x.any(-1)
            regs.append(val)
        out = torch.stack(regs, 2).gather(2, t["root"][:, :, None, None].expand(-1, -1, 1, T))[:, :, 0]
        self._gate = torch.where(mine[..., None], out, self._gate)

    def _end_forward(self, counted: Tensor | Callable[[], Tensor | None] | None) -> None:
        where = "prompt" if self._in_prompt else "gen"
        if callable(counted):
            counted = counted()
        n_fired, n_edited = self._fired.any(1).sum(1), self._edited.sum(1)
        if counted is not None:
            counted = counted.to(n_fired.device)
            n_fired, n_edited = n_fired * counted, n_edited * counted
        present = self._present
        if present is not None:  # rows have left: counted in their own places, nothing for the others
            self.stats[f"{where}_fired"].index_add_(0, present, n_fired)
            self.stats[f"{where}_edited"].index_add_(0, present, n_edited)
        else:
            self.stats[f"{where}_fired"] += n_fired
            self.stats[f"{where}_edited"] += n_edited
        if self._in_prompt:
            fired, edited = self._fired.any(1), self._edited.clone()
            if self._prompt_fired is None or self._prompt_edited is None:
                self._prompt_fired, self._prompt_edited = fired, edited
            else:  # the rest of a prompt read in parts
                self._prompt_fired = torch.cat([self._prompt_fired, fired], 1)
                self._prompt_edited = torch.cat([self._prompt_edited, edited], 1)
            self._pos += fired.shape[1]
        else:
            marks = torch.stack([n_fired > 0, n_edited > 0])
            if present is not None:
                full = marks.new_zeros(2, len(self.rows))
                full[:, present] = marks
                marks = full
            self._gen_marks.append(marks)
        self.calls += 1
        self._layer_pos = 0

    def counts(self) -> dict[str, list[int]]:
        """Per-row counts of detector firings and edits, on prompt and generated tokens."""
        return {k: v.cpu().tolist() for k, v in self.stats.items()}

    def positions(self) -> dict[str, list[list[int]]]:
        """Per row, where the detector fired and the edit acted: ``prompt_fired`` (indices into the
        row's prompt tokens, padding removed), ``gen_fired`` and ``gen_edited`` (indices of generated
        tokens: decode step k reads generated token k-1, so the last generated token is never read).

        Example:
            >>> iv = Intervention("token", Edit("add", torch.tensor([1.0, 0.0]), -1.0),
            ...                   Detector(torch.tensor([1.0, 0.0])), threshold=0.5)
            >>> steer = Steerer([iv], layer=0)
            >>> _ = steer(torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]))   # prompt: token 1 fires
            >>> _ = steer(torch.tensor([[[0.0, 0.0]]]))              # generated token 0: no
            >>> _ = steer(torch.tensor([[[3.0, 0.0]]]))              # generated token 1: fires
            >>> steer.positions()
            {'prompt_fired': [[1]], 'gen_fired': [[1]], 'gen_edited': [[1]]}
        """
        B = len(self.rows)
        out: dict[str, list[list[int]]] = {"prompt_fired": [[] for _ in range(B)]}
        if self._prompt_fired is not None:
            pf = self._prompt_fired.cpu()
            am = self.encoding.get("attention_mask") if self.encoding is not None else None
            pads = (am == 0).sum(1).tolist() if am is not None else [0] * B
            out["prompt_fired"] = [[j - pads[i] for j in row.nonzero().flatten().tolist()] for i, row in enumerate(pf)]
        marks = torch.stack(self._gen_marks, dim=-1).cpu() if self._gen_marks else torch.zeros(2, B, 0, dtype=torch.bool)
        for k, name in enumerate(("gen_fired", "gen_edited")):
            out[name] = [row.nonzero().flatten().tolist() for row in marks[k]]
        return out

    def prefill_marks(self) -> tuple[Tensor, Tensor]:
        """Where the first forward (the prefill) fired and edited: ``[B, T]`` bool each, in the padded
        layout of that forward (padding and BOS never marked). A continued row
        (:func:`sieve.fork.generate_forked`) splits its prefill into prompt and generated tokens with it.

        Example:
            >>> iv = Intervention("token", Edit("add", torch.tensor([1.0, 0.0]), -1.0),
            ...                   Detector(torch.tensor([1.0, 0.0])), threshold=0.5)
            >>> steer = Steerer([iv], layer=0)
            >>> _ = steer(torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]))
            >>> [m.tolist() for m in steer.prefill_marks()]
            [[[False, True]], [[False, True]]]
        """
        if self._prompt_fired is None or self._prompt_edited is None:
            raise SieveError("Steerer: no forward has run yet")
        return self._prompt_fired.cpu(), self._prompt_edited.cpu()

    def __repr__(self) -> str:
        n = sum(len(r) for r in self.rows)
        return f"Steerer({len(self.rows)} rows, {n} interventions, layers {self.layers}, {self.calls} forwards)"
