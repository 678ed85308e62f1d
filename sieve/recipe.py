"""Recipe files: everything a run needs, as TOML data (never code), validated on load.

A recipe names the model, the SAE and feature, the layer, the detector data, the methods and their
scales, the prompt sets, sampling, the sample count, the evaluations and the output directory. Loading
checks every key against the schema below and fails with a :class:`~sieve.errors.RecipeError` naming
the file, the key and what is allowed. Relative paths resolve against the recipe file's folder, so a
folder of recipe + prompt files can be shared as is. ``recipe_hash`` (of the validated content) goes
into every result row.

Example:
    >>> r = load_recipe(Path("recipes/regex.toml"))
    >>> r.sae.layer >= 0 and "input_steering_vector" in r.sweep.methods
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from sieve.errors import RecipeError, first_line
from sieve.launch import LaunchSpec, check_recipe_launch
from sieve.methods import UNSTEERED

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_METHOD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")

__all__ = [
    "Recipe", "ModelSpec", "SAESpec", "CAASpec", "ProbeSpec", "PromptSpec", "SweepSpec", "EvalSpec",
    "OutputSpec", "MethodSpec", "load_recipe", "save_recipe", "recipe_hash", "recipe_dict", "apply_overrides",
    "recipe_from_dict", "read_text", "UNSTEERED",
]


@dataclass
class ModelSpec:
    """``source``: "world" (the embedded model), a hub id, or a local directory."""

    source: str = "world"
    device: str = "auto"
    dtype: str = "auto"
    chat: bool = False
    revision: str = ""


@dataclass
class SAESpec:
    """Where the SAE comes from and which feature of it detects the behaviour.

    ``source``: "world", a sae-lens release (with ``id``), a local dir, or a hub repo in the study's
    format. With ``source = "world"``, ``layer``, ``feature`` and ``threshold`` come from the world's
    ``world.json`` (its one record of them) unless the recipe sets them; any other source must name
    ``layer`` and ``feature``. ``threshold``: None takes the SAE's own (JumpReLU) threshold, else 0.
    ``threshold_on``: what ``threshold`` is compared with: ``"pre_activation"`` (the feature's exact
    pre-activation ``h·w + b``, what the SAE itself thresholds) or ``"no_bias"`` (``h·w`` alone, as the
    study's code scored its features: a threshold taken from the study, e.g. Llama's 5.0, then makes the
    same cut, since sieve gates at ``threshold + b`` on the pre-activation).
    """

    source: str = "world"
    id: str = ""
    layer: int | None = None
    feature: int | None = None
    threshold: float | None = None
    threshold_on: Literal["pre_activation", "no_bias"] = "pre_activation"


@dataclass
class CAASpec:
    """How the CAA vector's threshold is set (its contrastive pairs come from the prompt set).

    ``threshold = "calibrate"`` makes it fire as often as the SAE feature on the calibration prompts
    (then ``threshold_bias`` is added); a number sets it directly.
    """

    threshold: float | str = "calibrate"
    threshold_bias: float = 0.0


@dataclass
class ProbeSpec:
    """Probe training data. ``data = "spans"``: tokens labelled by regex use in code (``code`` set);
    ``data = "generations"``: tokens generated from the contrastive prompts, labelled by polarity."""

    data: Literal["spans", "generations"] = "spans"
    samples: int = 8
    max_new_tokens: int = 64
    l2: float = 1e-3
    seed: int = 0


@dataclass
class PromptSpec:
    """Prompt sets. "world" uses the embedded world's held-out sets; otherwise a prompts TOML file.

    ``regex_file`` / ``neutral_file``: plain completion prompts that replace the regex-prone / neutral
    set (a ``.jsonl`` file with a ``prompt`` field per line, or a ``.py`` file of blocks separated by
    ``# ---`` lines; see :func:`sieve.prompts.load_prompt_file`). Used whole: the limits apply to the
    shipped sets only.

    ``world_set`` (world only): ``intent`` (function heads with no ``re`` token: does the model reach
    for ``re`` because of what the function is for) or ``lexical``, the default (imports kept,
    ``import re`` among them, cut right before the first use).
    """

    source: str = "world"
    world_set: Literal["intent", "lexical"] = "lexical"
    regex_limit: int = 0
    neutral_limit: int = 40
    code_limit: int = 80
    system: str = ""
    regex_file: str = ""
    neutral_file: str = ""


@dataclass
class SweepSpec:
    """Methods × scales × samples. ``scales`` maps a method name or an edit kind (``add``/``clamp``) to
    its values; the method's own entry wins. ``stop``: strings that end a row (kept in its text), e.g.
    the closing code fence when only the code block is evaluated. ``fork``: gated rows reuse or fork
    from their (prompt, sample)'s unsteered trajectory (:mod:`sieve.fork`; the same completions, less
    work); ``false`` generates every row in full. ``share_prefill``: the rows of a batch with the same
    prompt and interventions (the samples of a prompt) read the prompt once; ``kv_cache``: ``grow``
    (keys and values written into room kept ahead, :mod:`sieve.kvcache`) or ``hf`` (HF's own cache,
    copied at every step); ``drop_ended``: rows that have ended leave their batch while the others go
    on (``"auto"``: where the model runs on a CPU); ``cascade``: with the shared prefill, the rows
    sharing a prompt read its keys and values once per decode step (:func:`sieve.kvcache.cascade_attention`;
    ``"auto"``: where the model runs on a CPU). None of the five changes what rows are, only the work
    (the shared prefill and the cascade up to float noise, and a smaller batch on a GPU may flip a bf16
    near-tie, :func:`sieve.generation.generate`; ``false``/``hf``: the engine before them, for
    side-by-side timing)."""

    methods: list[str] = field(default_factory=lambda: [UNSTEERED])
    scales: dict[str, list[float]] = field(default_factory=dict)
    samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 0
    fork: bool = True
    share_prefill: bool = True
    kv_cache: Literal["grow", "hf"] = "grow"
    drop_ended: Literal["auto"] | bool = "auto"
    cascade: Literal["auto"] | bool = "auto"


@dataclass
class MethodSpec:
    """A method declared in the recipe file (``[methods.NAME]``), so a shared recipe carries its own
    compositions: the same fields as :class:`sieve.methods.Method`.

    ``detector``: ``sae`` (the feature's pre-activation), ``sae_code`` (its activation in the SAE's
    code), ``caa``, ``probe`` or "" (none). ``direction``: ``sae`` (decoder row), ``caa`` or ``probe``
    for ``add``/``clamp``; for ``latent_*`` edits, ``sae`` (the recipe's SAE). ``features``: which
    features of the recipe's SAE a latent edit or an ``sae_code`` detector uses (default: ``sae.feature``).
    ``layers``: where the edit acts (default: ``sae.layer``; detectors are read at ``sae.layer``, so
    later layers only, and latent edits only there).
    """

    gate: Literal["always", "token", "input"] = "always"
    edit: Literal["add", "clamp", "latent_set", "latent_scale", "latent_add", "latent_ablate"] = "add"
    direction: Literal["sae", "caa", "probe"] = "sae"
    detector: Literal["", "sae", "sae_code", "caa", "probe"] = ""
    threshold: Literal["detector", "zero", "max0"] = "detector"
    features: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    description: str = ""


@dataclass
class EvalSpec:
    """Evaluations. ``execute``: run generated tests in the sandbox; ``sandbox``: "bwrap" (OS-level
    isolation, the default; refused where bubblewrap is missing) or "process" (the weaker mode, without
    filesystem or network isolation; warns on every run); ``general``: "loss" (held-out next-token
    loss on regex-free code), "mmlu" (sieve's own scorer) or "lmeval" (lm-evaluation-harness tasks
    ``lmeval_tasks``, scored by ``lmeval_metric`` per document; ``lmeval_include``: a folder of task
    YAMLs of your own, relative to the recipe; ``lmeval_fewshot`` -1: each task's own)."""

    execute: bool = True
    sandbox: Literal["bwrap", "process"] = "bwrap"
    timeout_s: float = 3.0
    memory_mb: int = 512
    judge: Literal["off", "hf", "openai"] = "off"
    judge_model: str = ""
    general: Literal["loss", "mmlu", "lmeval", "none"] = "loss"
    mmlu_data: str = ""
    mmlu_subjects: list[str] = field(default_factory=list)
    mmlu_shots: int = 0
    mmlu_limit: int = 0
    lmeval_tasks: list[str] = field(default_factory=list)
    lmeval_include: str = ""
    lmeval_metric: str = "acc"
    lmeval_limit: int = 0
    lmeval_fewshot: int = -1


@dataclass
class OutputSpec:
    """Where results go: ``dir`` is relative to the working directory and must stay inside it or the
    recipe's folder (``--out`` on the command line may point anywhere); see :mod:`sieve.rundir`."""

    dir: str = "runs/regex"
    charts: bool = True


@dataclass
class Recipe:
    """A validated recipe. ``path`` is the file it came from (None when built in code)."""

    name: str
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    sae: SAESpec = field(default_factory=SAESpec)
    caa: CAASpec = field(default_factory=CAASpec)
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    sweep: SweepSpec = field(default_factory=SweepSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    path: Path | None = None

    def resolve(self, value: str) -> Path:
        """An input path from the recipe (model, SAE, prompts, data), relative to the recipe file's folder."""
        p = Path(value).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return (self.path.parent / p).resolve()

    @property
    def forward_batch_size(self) -> int:
        """Rows per teacher-forced forward (held-out loss, MMLU): ``sweep.batch_size``, or 16 when that
        is 0 (automatic, which sizes generation batches)."""
        return self.sweep.batch_size or 16

    def method(self, name: str):
        """The :class:`~sieve.methods.Method` ``name``: declared in this recipe (``[methods.NAME]``), else
        registered in :mod:`sieve.methods`.

        Example:
            >>> load_recipe("recipes/regex.toml").method("conditional_clamping").edit
            'clamp'
        """
        from sieve.methods import METHODS

        if name in self.methods:
            return _method_of(name, self.methods[name], self)
        if name not in METHODS:
            raise RecipeError(self.path or "<recipe>", "sweep.methods",
                              f"unknown method {name!r}; allowed: {[UNSTEERED, *sorted(METHODS), *self.methods]}")
        return METHODS[name]

    def scales_for(self, method: str) -> list[float]:
        """The values swept for ``method`` (its own entry, else its edit kind's: ``add`` for add edits,
        ``clamp`` for clamps and latent sets; a latent ablation sweeps ``[0.0]``)."""
        if method == UNSTEERED:
            return [0.0]
        if method in self.sweep.scales:
            return list(self.sweep.scales[method])
        m = self.method(method)
        if m.edit == "latent_ablate":
            return [0.0]
        kind = m.scale_key
        if kind is not None and kind in self.sweep.scales:
            return list(self.sweep.scales[kind])
        raise RecipeError(self.path or "<recipe>", "sweep.scales",
                          f"no scales for method {method!r}: add '{method}'" + (f" or '{kind}'" if kind else ""))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check(value: Any, tp: Any, where: Path | str, key: str) -> Any:
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise RecipeError(where, key, f"{value!r} is not allowed; allowed: {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, arm, where, key)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(where, key, f"{value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(where, key, f"expected a list, got {type(value).__name__} {value!r}")
        return [_check(v, item, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = get_args(tp)
        if not isinstance(value, dict):
            raise RecipeError(where, key, f"expected a table, got {type(value).__name__}")
        return {str(k): _check(v, vt, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(where, key, f"expected a table, got {type(value).__name__}")
        return _from_dict(tp, value, where, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(where, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(where, key, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(where, key, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(where, key, f"expected a string, got {value!r}")
        return value
    if tp is Path or tp is type(None):
        return value
    raise RecipeError(where, key, f"unsupported schema type {tp}")


def _from_dict(cls: type, data: dict[str, Any], where: Path | str, prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = set(data) - names
    if unknown:
        k = sorted(unknown)[0]
        raise RecipeError(where, f"{prefix}.{k}".lstrip("."), f"unknown key; allowed here: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name == "path":
            continue
        key = f"{prefix}.{f.name}".lstrip(".")
        if f.name in data:
            kwargs[f.name] = _check(data[f.name], hints[f.name], where, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(where, key, "is required")
    return cls(**kwargs)


def _method_of(name: str, spec: MethodSpec, r: Recipe):
    """The Method a ``[methods.NAME]`` table declares, or a RecipeError naming the table and key."""
    from sieve.errors import SieveError
    from sieve.methods import Method

    where = r.path or "<recipe>"
    key = f"methods.{name}"
    needs_detector = spec.gate != "always" or spec.edit == "clamp"
    if needs_detector and not spec.detector:
        raise RecipeError(where, f"{key}.detector", f"gate {spec.gate!r} / edit {spec.edit!r} needs a detector: "
                          "'sae', 'sae_code', 'caa' or 'probe'")
    if spec.edit == "clamp" and spec.detector == "sae_code":
        raise RecipeError(where, f"{key}.edit", "a clamp along a direction needs a linear detector ('sae', 'caa', "
                          "'probe'); to clamp the feature in the SAE code use edit = 'latent_set'")
    latent = spec.edit.startswith("latent_")
    if latent and spec.direction != "sae":
        raise RecipeError(where, f"{key}.direction", f"latent edits act on the recipe's SAE: use 'sae', not "
                          f"{spec.direction!r}")
    if spec.features and not (latent or spec.detector == "sae_code"):
        raise RecipeError(where, f"{key}.features", "features apply to latent_* edits and the sae_code detector")
    for i, f in enumerate(spec.features):
        if f < 0:
            raise RecipeError(where, f"{key}.features[{i}]", f"must be >= 0, got {f}")
    for i, L in enumerate(spec.layers):
        if L < r.sae.layer:
            raise RecipeError(where, f"{key}.layers[{i}]", f"layer {L} is before sae.layer = {r.sae.layer}, where "
                              "the detectors are read; a gate is read at or before the layers it edits")
    if latent and spec.layers and set(spec.layers) != {r.sae.layer}:
        raise RecipeError(where, f"{key}.layers", f"latent edits act at the SAE's layer ({r.sae.layer}) only")
    try:
        return Method(name, spec.gate, spec.edit, spec.direction, spec.detector or None,
                      threshold=spec.threshold, description=spec.description or "declared in the recipe",
                      features=tuple(spec.features), layers=tuple(spec.layers))
    except SieveError as e:
        raise RecipeError(where, key, str(e)) from e


def _resolve_sae(r: Recipe) -> None:
    """Fill ``[sae]`` layer, feature and threshold from ``world.json`` for the world's SAE; require
    layer and feature for any other source."""
    where = r.path or "<recipe>"
    if r.sae.threshold_on == "no_bias" and r.sae.threshold is None:
        raise RecipeError(where, "sae.threshold_on", "'no_bias' needs [sae] threshold (a number on h·w without "
                          "the encoder bias, e.g. the study's); the SAE's own threshold is on the pre-activation")
    if r.sae.source == "world":
        from sieve.world import world_info

        info = world_info()
        if r.sae.layer is None:
            r.sae.layer = int(info["layer"])
        if r.sae.feature is None:
            r.sae.feature = int(info["feature"])
        if r.sae.threshold is None:
            r.sae.threshold = float(info["threshold"])
        return
    for key in ("layer", "feature"):
        if getattr(r.sae, key) is None:
            raise RecipeError(where, f"sae.{key}", f"is required when sae.source is not \"world\" "
                              f"(here {r.sae.source!r})")


def _validate(r: Recipe) -> Recipe:
    from sieve.methods import METHODS

    where = r.path or "<recipe>"
    _resolve_sae(r)
    if not r.sweep.methods:
        raise RecipeError(where, "sweep.methods", 'is empty: list at least one method (e.g. ["unsteered"])')
    for k, values in r.sweep.scales.items():
        if not values:
            users = [m for m in r.sweep.methods if m == k or (m in METHODS and METHODS[m].edit == k)
                     or (m in r.methods and r.methods[m].edit == k)]
            raise RecipeError(where, f"sweep.scales.{k}", "is empty: give at least one value"
                              + (f" (or drop {users} from sweep.methods)" if users else ""))
    for name, spec in r.methods.items():
        if not _METHOD_NAME.fullmatch(name):
            raise RecipeError(where, f"methods[{name!r}]", "a method's name is letters, digits and _ . + - (at most "
                              "64; it names columns, files and chart labels)")
        if name in METHODS or name == UNSTEERED:
            raise RecipeError(where, f"methods.{name}", "a registered method has this name; choose another name")
        _method_of(name, spec, r)
    known = [UNSTEERED, *sorted(METHODS), *r.methods]
    for i, m in enumerate(r.sweep.methods):
        if m not in known:
            raise RecipeError(where, f"sweep.methods[{i}]", f"unknown method {m!r}; allowed: {known}")
    for k in r.sweep.scales:
        if k not in ("add", "clamp") and k not in known:
            raise RecipeError(where, f"sweep.scales.{k}", "must be a method name, 'add' or 'clamp'")
    for m in r.sweep.methods:
        r.scales_for(m)  # every method has scales
    for key, v, lo in (("sweep.samples", r.sweep.samples, 1), ("sweep.max_new_tokens", r.sweep.max_new_tokens, 1),
                       ("sae.layer", r.sae.layer, 0), ("sae.feature", r.sae.feature, 0),
                       ("sweep.batch_size", r.sweep.batch_size, 0), ("probe.samples", r.probe.samples, 1),
                       ("probe.max_new_tokens", r.probe.max_new_tokens, 1)):
        if v < lo:
            raise RecipeError(where, key, f"must be >= {lo}, got {v}")
    if r.sae.id and (Path(r.sae.id).is_absolute() or ".." in Path(r.sae.id).parts or r.sae.id.startswith("~")):
        raise RecipeError(where, "sae.id", f"{r.sae.id!r}: an SAE id names a subfolder or file inside the SAE source "
                          "(e.g. 'layer_8/width_16k/average_l0_71'), not a path of its own")
    if not r.probe.l2 >= 0:
        raise RecipeError(where, "probe.l2", f"must be >= 0 (the probe's L2 penalty), got {r.probe.l2}")
    if r.sweep.temperature < 0:
        raise RecipeError(where, "sweep.temperature", f"must be >= 0, got {r.sweep.temperature}")
    if r.sweep.temperature == 0 and r.sweep.samples > 1:
        raise RecipeError(where, "sweep.samples", f"is {r.sweep.samples} but sweep.temperature = 0 (greedy) makes "
                          "every sample identical: set samples = 1 or a temperature > 0")
    for key, v, hi in (("eval.timeout_s", r.eval.timeout_s, MAX_TIMEOUT_S), ("eval.memory_mb", r.eval.memory_mb,
                                                                             MAX_MEMORY_MB)):
        if not 0 < v <= hi:
            raise RecipeError(where, key, f"must be > 0 and at most {hi}, got {v}")
    for key, v, hi in (("sweep.samples", r.sweep.samples, MAX_SAMPLES),
                       ("sweep.max_new_tokens", r.sweep.max_new_tokens, MAX_NEW_TOKENS),
                       ("probe.samples", r.probe.samples, MAX_SAMPLES),
                       ("probe.max_new_tokens", r.probe.max_new_tokens, MAX_NEW_TOKENS)):
        if v > hi:
            raise RecipeError(where, key, f"must be at most {hi}, got {v}")
    for key, v in (("prompts.regex_limit", r.prompts.regex_limit), ("prompts.neutral_limit", r.prompts.neutral_limit),
                   ("prompts.code_limit", r.prompts.code_limit), ("eval.mmlu_shots", r.eval.mmlu_shots),
                   ("eval.mmlu_limit", r.eval.mmlu_limit)):
        if v < 0:
            raise RecipeError(where, key, f"must be >= 0, got {v}")
    if not 0 < r.sweep.top_p <= 1:
        raise RecipeError(where, "sweep.top_p", f"must be in (0, 1], got {r.sweep.top_p}")
    for i, st in enumerate(r.sweep.stop):
        if not st:
            raise RecipeError(where, f"sweep.stop[{i}]", "must be a non-empty string")
    r.launch.check(where)
    if r.eval.general == "lmeval" and not r.eval.lmeval_tasks:
        raise RecipeError(where, "eval.lmeval_tasks", "general = 'lmeval' needs at least one harness task name")
    if r.eval.lmeval_include and not r.resolve(r.eval.lmeval_include).is_dir():
        raise RecipeError(where, "eval.lmeval_include", f"{r.resolve(r.eval.lmeval_include)} is not a folder")
    if isinstance(r.caa.threshold, str) and r.caa.threshold != "calibrate":
        raise RecipeError(where, "caa.threshold", f"{r.caa.threshold!r}: use a number or 'calibrate'")
    return r


def recipe_from_dict(data: dict[str, Any], path: Path | None = None) -> Recipe:
    """Validate a parsed recipe."""
    where = path or "<recipe>"
    if "kind" in data:
        # Recipe files once named the script that runs them; every recipe script reads any recipe file.
        warnings.warn(f"{where}: [kind] is no longer read (any recipe script runs any recipe file); "
                      "delete the line", UserWarning, stacklevel=2)
        data = {k: v for k, v in data.items() if k != "kind"}
    if "name" not in data:
        raise RecipeError(where, "name", "is required")
    r = _from_dict(Recipe, data, where)
    r.path = path
    return _validate(r)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (``key.sub=value``, values in TOML syntax) and validate a recipe file.

    Example:
        >>> load_recipe("recipes/regex.toml", ["sweep.samples=2"]).sweep.samples
        2
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise RecipeError(path, "-", "file not found" if not path.exists() else "is not a file")
    data = parse_toml(read_text(path), path)
    check_file_settings(data, path, path.parent)  # what only the command line may set
    if overrides:
        data = apply_overrides(data, overrides, path)
    return recipe_from_dict(data, path)


# Bounds on what any recipe may ask (the sandbox's own limits on one evaluation; rows per prompt).
MAX_TIMEOUT_S, MAX_MEMORY_MB, MAX_SAMPLES, MAX_NEW_TOKENS = 86_400, 1 << 20, 100_000, 1_000_000
# What a recipe FILE may ask of the sandbox: the limits contain code its own prompts file brings, so
# larger ones come from the command line only.
FILE_MAX_TIMEOUT_S, FILE_MAX_MEMORY_MB = 60.0, 4096

# A recipe file's inputs whose contents reach its outputs (prompts.parquet, report.html, generated text):
# from a file, they must lie in its folder, so a shared recipe cannot copy ~/.ssh or a project's
# settings into results that are shared back.
_FOLDER_INPUTS = (("prompts", "source"), ("prompts", "regex_file"), ("prompts", "neutral_file"),
                  ("eval", "mmlu_data"), ("eval", "lmeval_include"))


def check_file_settings(data: dict[str, Any], where: object, folder: Path | None = None) -> None:
    """What a recipe file may not set, being shared data; the command line (overrides, flags) may: the
    weaker sandbox (``eval.sandbox = "process"`` runs generated code with no filesystem isolation), the
    API judge (``eval.judge = "openai"`` sends prompts and tests out under the user's key), sandbox
    limits above :data:`FILE_MAX_TIMEOUT_S` and :data:`FILE_MAX_MEMORY_MB` per evaluation,
    sbatch options beyond resources and accounting (:func:`sieve.launch.check_recipe_launch`), and
    prompt, MMLU and harness-task inputs outside the file's ``folder`` (links followed: a link
    shipped in the folder that points out is refused too).

    Example:
        >>> check_file_settings({"eval": {"sandbox": "process"}}, "r.toml")
        Traceback (most recent call last):
        ...
        sieve.errors.RecipeError: r.toml: [eval.sandbox] a recipe file cannot choose 'process': ...
    """
    ev = data.get("eval")
    if isinstance(ev, dict) and ev.get("sandbox") == "process":
        raise RecipeError(where, "eval.sandbox", f"a recipe file cannot choose {ev['sandbox']!r}: generated code runs "
                          "under bubblewrap unless the command line says otherwise (eval.sandbox=process)")
    if isinstance(ev, dict) and ev.get("judge") == "openai":
        raise RecipeError(where, "eval.judge", "a recipe file cannot turn on the API judge: it sends the run's prompts "
                          "and tests to an API under your key; give eval.judge=openai on the command line if you mean it")
    if isinstance(ev, dict):
        for key, hi, top, unit in (("timeout_s", FILE_MAX_TIMEOUT_S, MAX_TIMEOUT_S, "s"),
                                   ("memory_mb", FILE_MAX_MEMORY_MB, MAX_MEMORY_MB, "MB")):
            v = ev.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > hi:
                raise RecipeError(where, f"eval.{key}", f"a recipe file may ask for at most {hi:g} {unit} per evaluation, "
                                  f"got {v:g}: these limits contain the code its own prompts file brings; give "
                                  f"eval.{key}={min(v, top):g} on the command line if you mean it")
    check_recipe_launch(data, where)
    if folder is None:
        return
    root = Path(folder).resolve()
    for table, key in _FOLDER_INPUTS:
        value = data.get(table, {}).get(key) if isinstance(data.get(table), dict) else None
        if not isinstance(value, str) or not value or (table, key, value) == ("prompts", "source", "world"):
            continue
        p = Path(value).expanduser()
        real = (p if p.is_absolute() else root / p).resolve()
        if not real.is_relative_to(root):
            raise RecipeError(where, f"{table}.{key}", f"{value!r} resolves to {real}, outside the recipe's folder "
                              f"({root}): a recipe file reads its prompts and data from its own folder. Give the "
                              f"path on the command line ({table}.{key}=...) if you mean it")


def read_text(path: Path) -> str:
    """A recipe or prompt file's text, with an error naming the file and the byte when it is not UTF-8.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "r.toml"
        >>> _ = p.write_bytes(b'name = "caf\\xe9"')
        >>> read_text(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        sieve.errors.RecipeError: ...r.toml: [-] is not UTF-8 text: byte 0xe9 at offset 11 ...
    """
    from sieve.files import read_regular

    try:
        data = read_regular(path)
    except (OSError, ValueError) as e:
        raise RecipeError(path, "-", f"cannot be read: {first_line(e):.160}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(path, "-", f"is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                          "(save the file as UTF-8)") from None


def parse_toml(text: str, path: Path | str) -> dict[str, Any]:
    """TOML text as a table, with one :class:`RecipeError` naming the file for anything that is not
    (invalid TOML, but also nesting too deep for the parser, or an integer past Python's digit limit).

    Example:
        >>> parse_toml("a = " + "[" * 5000, "r.toml")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        sieve.errors.RecipeError: r.toml: [-] is not valid TOML: nested too deep...
    """
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise RecipeError(path, "-", "is not valid TOML: nested too deep to read") from None
    except ValueError as e:  # tomllib.TOMLDecodeError, and int() past sys.get_int_max_str_digits()
        raise RecipeError(path, "-", f"is not valid TOML: {first_line(e):.160}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str], where: Path | str = "<overrides>") -> dict:
    """Set dotted keys from ``key=value`` strings (value parsed as TOML, else taken as a string)."""
    data = json.loads(json.dumps(data))
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(where, ov, "an override must look like key.sub=value")
        key, raw = ov.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(where, key, f"{p!r} is not a table")
        node[parts[-1]] = value
    return data


def recipe_dict(r: Recipe) -> dict[str, Any]:
    """The recipe as plain TOML-able data (what :func:`save_recipe` writes and :func:`recipe_hash` hashes)."""
    d = dataclasses.asdict(r)
    d.pop("path", None)

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(d)


def save_recipe(r: Recipe, path: str | Path) -> Path:
    """Write a recipe as TOML; ``load_recipe`` of the result gives the same recipe (same hash)."""
    import tomli_w

    from sieve.files import write_atomic

    return write_atomic(Path(path), tomli_w.dumps(recipe_dict(r)))


def recipe_hash(r: Recipe) -> str:
    """A short hash of the validated recipe's content (independent of formatting and comments, and of
    ``[output]`` and ``[launch]``: the same study written to another folder, or run on other machines,
    is the same run; nor of ``sweep.fork``, ``sweep.share_prefill``, ``sweep.kv_cache``,
    ``sweep.drop_ended`` and ``sweep.cascade``, which change how rows are made, not what they are)."""
    d = recipe_dict(r)
    d.pop("output", None)
    d.pop("launch", None)
    if d.get("sae", {}).get("threshold_on") == "pre_activation":  # the default, as before the key existed
        d["sae"].pop("threshold_on")
    for key in ("fork", "share_prefill", "kv_cache", "drop_ended", "cascade"):
        d.get("sweep", {}).pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
