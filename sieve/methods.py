"""The study's twelve methods as data: each is a detector, a gate, an edit and a direction, by name.

A :class:`Method` names its parts; :class:`Parts` holds the concrete detectors (with thresholds) and
directions of one setting (an SAE feature, a CAA vector, a probe). ``build(method, parts, value)`` makes
the :class:`~sieve.interventions.Intervention` for one scale (``add``) or clamp value (``clamp``).

Users add methods without touching sieve::

    register_method(Method("probe_input", gate="input", edit="add", detector="probe", direction="sae"))

Differences from the study's code (by design, see ``upstream_sieve.md``): the SAE detector is the
feature's true pre-activation (encoder bias included, ``b_dec`` subtracted where the SAE does it); the
``input`` gate latches per row across decode steps; the probe fires where ``w·h + b > 0`` (the study
tested ``w·h > b``); clamps move along the direction so the detector reads exactly the clamp value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch  # noqa: F401 - the doctests use it
from torch import Tensor

from sieve.errors import SieveError
from sieve.interventions import EDITS, GATES, LATENT_OPS, Detector, Edit, Intervention, LatentEdit, SAECode
from sieve.prompt_gates import LEXICAL_REGEX, PromptGate

__all__ = [
    "Method", "Parts", "METHODS", "UNSTEERED", "register_method", "get_method", "build", "STUDY_METHODS",
    "EXTRA_METHODS", "LEXICAL_METHODS",
    "FAMILIES", "family",
]

ThresholdRule = Literal["detector", "zero", "max0"]
# Edits along a direction, and edits of SAE latents (encode, edit, decode, add the error back).
LATENT_EDITS: tuple[str, ...] = tuple(f"latent_{op}" for op in LATENT_OPS)
METHOD_EDITS: tuple[str, ...] = (*EDITS, *LATENT_EDITS)

# The name of no method: a sweep's baseline, generated without an intervention (see sieve.sweep).
UNSTEERED = "unsteered"


@dataclass(frozen=True)
class Method:
    """A named composition: ``detector`` and ``direction`` are keys into :class:`Parts`.

    ``edit``: ``add`` / ``clamp`` along the direction ``direction``, or ``latent_set`` / ``latent_scale``
    / ``latent_add`` / ``latent_ablate``: an SAE-space edit of the latents ``direction`` names in
    :attr:`Parts.latents` (``features`` overrides which features of that SAE). ``threshold``:
    ``detector`` uses the detector's own threshold; ``zero`` uses 0; ``max0`` uses ``max(threshold, 0)``
    (clamps only act where the feature is positive, as in the study). ``layers``: where the edit acts
    (default: the parts' layer, where the detectors were read).
    """

    name: str
    gate: str
    edit: str
    direction: str
    detector: str | None = None
    threshold: ThresholdRule = "detector"
    description: str = ""
    prompt_gate: PromptGate | None = None
    features: tuple[int, ...] = ()
    layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise SieveError(f"method {self.name!r}: gate {self.gate!r} unknown; allowed {list(GATES)}")
        if self.edit not in METHOD_EDITS:
            raise SieveError(f"method {self.name!r}: edit {self.edit!r} unknown; allowed {list(METHOD_EDITS)}")
        if self.features and not self.latent and self.detector != "sae_code":
            raise SieveError(f"method {self.name!r}: features apply to latent edits and the sae_code detector")
        object.__setattr__(self, "features", tuple(self.features))
        object.__setattr__(self, "layers", tuple(self.layers))
        if (self.gate != "always" or self.edit == "clamp") and self.detector is None:
            raise SieveError(f"method {self.name!r}: gate {self.gate!r} / edit {self.edit!r} needs a detector")
        if self.threshold not in ("detector", "zero", "max0"):
            raise SieveError(f"method {self.name!r}: threshold rule {self.threshold!r} unknown; "
                             "allowed ['detector', 'zero', 'max0']")

    @property
    def latent(self) -> bool:
        """Whether the edit acts on SAE latents."""
        return self.edit in LATENT_EDITS

    @property
    def scale_key(self) -> str | None:
        """The ``sweep.scales`` entry its values come from when it has none of its own (None: only its
        own; ``latent_ablate`` takes no value and sweeps ``[0.0]``)."""
        return {"add": "add", "latent_add": "add", "clamp": "clamp", "latent_set": "clamp"}.get(self.edit)


@dataclass
class Parts:
    """The detectors (each with its threshold) and unit directions available to methods.

    Example:
        >>> p = Parts()
        >>> p.add_direction("sae", torch.tensor([3.0, 4.0]))
        >>> p.directions["sae"]
        tensor([0.6000, 0.8000])
    """

    detectors: dict[str, tuple[Detector | SAECode, float]] = field(default_factory=dict)
    directions: dict[str, Tensor] = field(default_factory=dict)
    latents: dict[str, tuple[Any, tuple[int, ...]]] = field(default_factory=dict)
    layer: int | None = None  # where the detectors were read: methods built from them act there

    def __repr__(self) -> str:
        return (f"Parts(detectors {sorted(self.detectors)}, directions {sorted(self.directions)}, "
                f"latents {sorted(self.latents)}, layer {self.layer})")

    def add_detector(self, name: str, detector: Detector | SAECode, threshold: float) -> None:
        self.detectors[name] = (detector, float(threshold))

    def add_latents(self, name: str, sae: Any, features: list[int] | tuple[int, ...]) -> None:
        """SAE latents that latent edits act on (and the SAE whose code ``sae_code`` detectors read)."""
        self.latents[name] = (sae, tuple(features))

    def latent(self, name: str) -> tuple[Any, tuple[int, ...]]:
        if name not in self.latents:
            raise SieveError(f"no SAE latents {name!r} in this setting; available: {sorted(self.latents)}")
        return self.latents[name]

    def add_direction(self, name: str, v: Tensor) -> None:
        v = v.detach().float().flatten()
        self.directions[name] = v / v.norm()

    def detector_names(self) -> list[str]:
        """The names of the detectors available, sorted."""
        return sorted(self.detectors)

    def detector(self, name: str) -> tuple[Detector, float]:
        if name not in self.detectors:
            raise SieveError(f"no detector {name!r} in this setting; available: {sorted(self.detectors)}")
        return self.detectors[name]

    def direction(self, name: str) -> Tensor:
        if name not in self.directions:
            raise SieveError(f"no direction {name!r} in this setting; available: {sorted(self.directions)}")
        return self.directions[name]


METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (``replace=True`` to redefine one).

    Example:
        >>> m = register_method(Method("my_input_probe", gate="input", edit="add", direction="sae",
        ...                            detector="probe"), replace=True)
        >>> get_method("my_input_probe").gate
        'input'
    """
    if method.name in METHODS and not replace:
        raise SieveError(f"method {method.name!r} is already registered (pass replace=True)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``, or an error listing the registered ones."""
    if name not in METHODS:
        raise SieveError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name]


def build(method: Method | str, parts: Parts, value: float, *, layer: int | None = None) -> Intervention:
    """The intervention of ``method`` at ``value`` (a scale for add, a target for clamp), bound to
    ``layer`` (default: the parts' own layer; None leaves it unbound).

    Example:
        >>> parts = Parts()
        >>> parts.add_direction("sae", torch.tensor([0.0, 1.0]))
        >>> parts.add_detector("sae", Detector(torch.tensor([0.0, 2.0]), kind="sae"), 1.5)
        >>> iv = build("conditional_per_token", parts, -4.0, layer=2)
        >>> (iv.gate, iv.edit.kind, iv.threshold, iv.layers)
        ('token', 'add', 1.5, (2,))
    """
    m = get_method(method) if isinstance(method, str) else method
    det, thr = (None, 0.0)
    if m.detector is not None:
        det, thr = parts.detector(m.detector)
        if m.features and isinstance(det, SAECode):
            det = SAECode(det.sae, m.features, det.reduce, encode=det.encode, name=det.name)
    if m.threshold == "zero":
        thr = 0.0
    elif m.threshold == "max0":
        thr = max(thr, 0.0)
    edit: Edit | LatentEdit
    if m.latent:
        sae, feats = parts.latent(m.direction)
        edit = LatentEdit(sae, m.features or feats, m.edit.removeprefix("latent_"),  # type: ignore[arg-type]
                          () if m.edit == "latent_ablate" else float(value))
    else:
        edit = Edit(m.edit, parts.direction(m.direction), float(value))  # type: ignore[arg-type]
    where = m.layers or (layer if layer is not None else parts.layer)
    gated = m.gate in ("token", "input")  # an 'always' gate reads no detector; a clamp edit still clamps one
    return Intervention(
        gate=m.gate,  # type: ignore[arg-type]
        edit=edit,
        detector=det if gated or m.edit == "clamp" else None,
        threshold=thr if gated else 0.0,
        name=m.name,
        meta={"method": m.name, "value": float(value),
              **({"prompt_gate": m.prompt_gate} if m.prompt_gate is not None else {})},
        layers=where,
        read_layer=parts.layer if m.layers and parts.layer is not None else None,
    )


STUDY_METHODS: tuple[Method, ...] = (
    Method("constant_sae", "always", "add", "sae", description="add s·(SAE decoder row) everywhere"),
    Method("constant_steering_vector", "always", "add", "caa", description="add s·(CAA vector) everywhere"),
    Method("conditional_per_token", "token", "add", "sae", "sae",
           description="add s·(decoder row) on tokens where the SAE feature fires"),
    Method("conditional_per_input", "input", "add", "sae", "sae",
           description="add s·(decoder row) everywhere once the feature has fired in the row (latched)"),
    Method("conditional_steering_vector", "token", "add", "caa", "caa",
           description="add s·(CAA vector) where the CAA projection passes its calibrated threshold"),
    Method("sae_steering_vector", "token", "add", "caa", "sae",
           description="add s·(CAA vector) where the SAE feature fires"),
    Method("clamping", "token", "clamp", "sae", "sae", threshold="zero",
           description="clamp the feature to s where it is positive"),
    Method("conditional_clamping", "token", "clamp", "sae", "sae", threshold="max0",
           description="clamp the feature to s where it passes its threshold"),
    Method("probe_sae", "token", "add", "sae", "probe",
           description="add s·(decoder row) where the probe says positive"),
    Method("probe_steering_vector", "token", "add", "caa", "probe",
           description="add s·(CAA vector) where the probe says positive"),
    Method("probe_sae_clamping", "token", "clamp", "sae", "probe", threshold="max0",
           description="clamp the probe's logit to s along the decoder row where the probe says positive"),
    Method("probe_steering_vector_clamping", "token", "clamp", "caa", "probe", threshold="max0",
           description="clamp the probe's logit to s along the CAA vector where the probe says positive"),
)
for _m in STUDY_METHODS:
    register_method(_m)

# Beyond the study: compositions its code had no hook function for.
EXTRA_METHODS: tuple[Method, ...] = (
    Method("input_steering_vector", "input", "add", "caa", "sae",
           description="add s·(CAA vector) everywhere once the SAE feature has fired in the row (latched)"),
    Method("input_clamping", "input", "clamp", "sae", "sae", threshold="detector",
           description="clamp the feature to s everywhere once it has fired in the row (latched)"),
)
# SAE-space edits: the feature edited in the SAE's code, the reconstruction error added back, so tokens
# where the feature is not active are exactly unchanged.
SAE_SPACE_METHODS: tuple[Method, ...] = (
    Method("sae_code_clamping", "token", "latent_set", "sae", "sae_code", threshold="zero",
           description="clamp the feature to s in the SAE code where it is active (encode/decode, error kept)"),
    Method("sae_code_ablation", "always", "latent_ablate", "sae",
           description="ablate the feature in the SAE code (set to 0 where active; error kept)"),
)
for _m in (*EXTRA_METHODS, *SAE_SPACE_METHODS):
    register_method(_m)

# The lexical baseline: the same edits, gated by the prompt's words instead of a feature (a row whose
# prompt says "parse", "match", "pattern", "extract", "regex", ... is steered from its first token on;
# see sieve.prompt_gates.REGEX_WORDS). Does the SAE feature add anything a string match does not?
LEXICAL_METHODS: tuple[Method, ...] = (
    Method("lexical_steering_vector", "always", "add", "caa", prompt_gate=LEXICAL_REGEX,
           description="add s·(CAA vector) everywhere in rows whose prompt has a regex-ish word"),
    Method("lexical_sae", "always", "add", "sae", prompt_gate=LEXICAL_REGEX,
           description="add s·(SAE decoder row) everywhere in rows whose prompt has a regex-ish word"),
    Method("lexical_clamping", "always", "clamp", "sae", "sae", prompt_gate=LEXICAL_REGEX,
           description="clamp the feature to s everywhere in rows whose prompt has a regex-ish word"),
)
for _m in LEXICAL_METHODS:
    register_method(_m)


# Families, for tables and charts: a method's family is where its edit is allowed to act, read off its
# detector. One place, so every chart, table and report groups methods the same way.
FAMILIES: tuple[str, ...] = ("baseline", "constant", "SAE-gated", "probe-gated", "CAA-gated", "lexical", "other")
_FAMILY_OF_DETECTOR = {None: "constant", "sae": "SAE-gated", "sae_code": "SAE-gated", "probe": "probe-gated",
                       "caa": "CAA-gated"}


def family(method: str, declared: Mapping[str, Method] | None = None) -> str:
    """The family of a method name: ``baseline`` (unsteered), ``constant`` (no detector), ``SAE-gated``,
    ``probe-gated``, ``CAA-gated`` (by the detector that gates it), or ``other`` (any other detector, or
    a name not registered here, e.g. from another session's results). ``declared``: a recipe's own
    methods (``{name: recipe.method(name)}``), looked up first.

    Example:
        >>> [family(m) for m in ("unsteered", "constant_sae", "conditional_clamping", "probe_sae",
        ...                      "conditional_steering_vector", "no_such_method")]
        ['baseline', 'constant', 'SAE-gated', 'probe-gated', 'CAA-gated', 'other']
    """
    if method == UNSTEERED:
        return "baseline"
    m = (declared or {}).get(method) or METHODS.get(method)
    if m is None:
        return "other"
    if m.prompt_gate is not None:
        return "lexical"
    if m.latent and m.detector is None:
        return "SAE-gated"  # an edit of SAE latents acts only where they are active
    return _FAMILY_OF_DETECTOR.get(m.detector, "other")
