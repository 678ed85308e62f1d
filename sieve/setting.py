"""A recipe's setting: the loaded model, SAE and feature, and the :class:`~sieve.methods.Parts` (SAE
feature, CAA vector, probe) that the methods are built from. CAA vectors and probes are cached by a hash
of everything that made them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sieve.detectors import caa_detector, feature_detector, probe_detector, probe_training_data
from sieve.errors import RecipeError, SieveError, first_line
from sieve.files import folder_digest, machine_path, read_json
from sieve.interventions import SAECode
from sieve.methods import Parts
from sieve.prompts import PromptSets, load_prompt_sets
from sieve.recipe import Recipe

__all__ = ["Setting", "load_setting", "preflight", "checked_inputs", "sources_identity", "judge_source",
           "with_unrecorded"]

log = logging.getLogger(__name__)


@dataclass
class Setting:
    """Everything a recipe's methods need, loaded."""

    recipe: Recipe
    model: Any
    sae: Any
    feature: Any
    layer: int
    threshold: float
    parts: Parts
    prompts: PromptSets
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Setting({self.recipe.name!r}, layer {self.layer}, {self.feature!r}, {self.parts!r})"


def _looks_local(r: Recipe, value: str) -> bool:
    """Whether a source names a local folder rather than a hub id (``org/name``) or a release name."""
    first = Path(value).parts[0] if Path(value).parts else ""
    return (value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1
            or (bool(first) and "/" in value and r.resolve(first).is_dir()))


def _source(r: Recipe, value: str, key: str) -> str | Path:
    """A local folder (relative to the recipe's folder) when it exists, else a hub id; a value that can
    only be a path but names no folder is an error (it would otherwise be asked of the hub)."""
    where = r.path or "<recipe>"
    p = r.resolve(value)
    real = p.resolve()
    if machine_path(real):
        raise RecipeError(where, key, f"{value!r} resolves to {real}: not a folder a model or SAE is read from")
    hub_like = "/" in value and not value.startswith(("/", ".", "~")) and value.count("/") == 1
    if p.exists():
        if hub_like:
            # 'org/name' beside the recipe: the run would say it used the hub's 'org/name'
            raise RecipeError(where, key, f"{value!r} is both a hub id and the folder {p}: write './{value}' for the "
                              "folder (the run and its report would otherwise name the hub's)")
        return p
    if _looks_local(r, value):
        raise RecipeError(where, key, f"{value!r}: local folder {p} not found (relative paths are "
                          "relative to the recipe's folder; a hub id looks like 'org/name')")
    if hub_like and Path(value).exists():  # transformers and sae-lens open a local folder before the hub
        raise RecipeError(where, key, f"{value!r}: a folder {Path(value).resolve()} in the working directory would be "
                          f"read instead of the hub's; run from another folder, or give {key}=\"{Path(value).resolve()}\" "
                          "to read that folder")
    return value


def _model_source(r: Recipe) -> str | Path:
    if r.model.source == "world":
        from sieve.world import world_model_dir

        return world_model_dir()
    return _source(r, r.model.source, "model.source")


def _sae_source(r: Recipe) -> str | Path:
    if r.sae.source == "world":
        from sieve.world import world_sae_dir

        return world_sae_dir()
    return _source(r, r.sae.source, "sae.source")


def _gemma_scope_file(r: Recipe, src: str | Path) -> Path | None:
    """The ``params.npz`` a local GemmaScope source names (the file, its folder, or the folder + id)."""
    if not isinstance(src, Path):
        return None
    for p in (src, src / "params.npz", src / (r.sae.id or "-") / "params.npz"):
        if p.name == "params.npz" and p.is_file():
            return p
    return None


def _npz_shape(path: Path, name: str) -> tuple[int, ...] | None:
    """The shape of array ``name`` in an ``.npz`` file, read from its header alone (None where it
    cannot be read: the loader then says why)."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as z, z.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(f))
        return tuple(int(x) for x in shape)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _sae_trained_layer(r: Recipe, cfg: object) -> int | None:
    """The layer an SAE says it was trained on, where it says so before it loads: its ``cfg.json``'s
    (``cfg``, parsed) hook name (sae-lens folders, the world's) or an SAE id naming ``layer_N``
    (GemmaScope)."""
    import re

    from sieve.steering import hook_layer

    if isinstance(cfg, dict):
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        trained = hook_layer((meta.get("hook_layer"), cfg.get("hook_layer")), (meta.get("hook_name"), cfg.get("hook_name")))
        if trained is not None:
            return trained
    m = re.match(r"layer_(\d+)/", r.sae.id or "")
    return int(m.group(1)) if m else None


def judge_source(r: Recipe) -> str | Path:
    """``eval.judge_model`` as the judge will read it: a folder relative to the recipe's folder, or a
    hub id (refused where a folder of that name beside the recipe or in the working directory would
    stand in for the hub's model, as for ``model.source``).

    Example:
        >>> from sieve.recipe import load_recipe
        >>> judge_source(load_recipe("recipes/regex.toml", ['eval.judge_model="Qwen/Qwen2.5-0.5B-Instruct"']))
        'Qwen/Qwen2.5-0.5B-Instruct'
    """
    return _source(r, r.eval.judge_model, "eval.judge_model")


def _recorded(entry: Any, **keys: Any) -> dict[str, Any] | None:
    """A hub entry of an earlier :func:`sources_identity` record, where it names the same source
    (``keys``: its ``hub``, ``id``, ``revision``), else None."""
    return entry if isinstance(entry, dict) and all(entry.get(k) == v for k, v in keys.items()) else None


def _identity(src: str | Path, revision: str | None = None, known: Any = None) -> dict[str, Any]:
    """:func:`sources_identity`'s record of one model: its files' digests, or its hub commit (taken
    from ``known``, an earlier record of the same hub id, where given)."""
    from sieve.models import _resolve_config

    if isinstance(src, Path):  # its config, tokenizer and weights (not its README, notes or logs)
        return {"files": folder_digest(src, _model_file, extra=_model_files(src))}
    recorded = _recorded(known, hub=src, revision=revision or "main")
    if recorded is not None:
        return recorded
    _resolve_config(src, revision)  # fetched into the hub cache where it is not there
    return {"hub": src, "revision": revision or "main", "commit": _hub_commit(src, "config.json", revision)}


def _sae(r: Recipe):
    from sieve.saes import load_sae

    return load_sae(_sae_source(r), r.sae.id or None, layer=r.sae.layer)


@contextmanager
def _model_folder_errors(where: object, src: object) -> Iterator[None]:
    """A model folder's config, tokenizer or chat template that cannot be read (malformed JSON, a
    template Jinja's sandbox refuses...) is one error naming ``model.source``, not a traceback."""
    from jinja2.exceptions import TemplateError

    try:
        yield
    except SieveError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TemplateError) as e:
        raise RecipeError(where, "model.source", f"{src}: its config, tokenizer or chat template cannot be used "
                          f"({type(e).__name__}: {first_line(e):.200})") from e


def preflight(recipe: Recipe) -> PromptSets:
    """The prompt sets of :func:`checked_inputs`, after its checks.

    Example:
        >>> from sieve.recipe import load_recipe
        >>> len(preflight(load_recipe("recipes/regex.toml")).regex) > 0
        True
    """
    return checked_inputs(recipe)[1]


def checked_inputs(recipe: Recipe) -> tuple[Any, PromptSets]:
    """Check what can be checked before any weights load, and return the prompt sets: the model's and
    SAE's sources and configs (layer index, SAE width against the model's, feature index), the prompt
    files, and that every text fits a model with learned positions (prompts with ``max_new_tokens``).
    Each problem is a :class:`~sieve.errors.RecipeError` naming the recipe key or prompt. Returns the
    model's tokenizer (as read from its folder or the hub) and the prompt sets.

    Example:
        >>> from sieve.recipe import load_recipe
        >>> tok, prompts = checked_inputs(load_recipe("recipes/regex.toml"))
        >>> len(prompts.regex) > 0
        True
        >>> preflight(load_recipe("recipes/regex.toml", ["sae.layer=9"]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        sieve.errors.RecipeError: ...[sae.layer] 9 is out of range: the model has 4 layers (0..3)
    """
    from transformers import AutoTokenizer

    from sieve.models import _dtype, _resolve_config, check_device, tokenize_prompts

    r, where = recipe, recipe.path or "<recipe>"
    try:
        check_device(r.model.device)
        _dtype(r.model.dtype, r.model.device)
    except SieveError as e:
        raise RecipeError(where, "model.device" if "device" in str(e) else "model.dtype", str(e)) from None
    src = _model_source(r)
    with _model_folder_errors(where, src):
        config = _resolve_config(src, r.model.revision or None)
    text_config = getattr(config, "text_config", None) or config
    n_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    if isinstance(n_layers, int) and not 0 <= r.sae.layer < n_layers:
        raise RecipeError(where, "sae.layer", f"{r.sae.layer} is out of range: the model has {n_layers} layers "
                          f"(0..{n_layers - 1})")
    for name, spec in r.methods.items():
        for i, L in enumerate(spec.layers):
            if isinstance(n_layers, int) and not 0 <= L < n_layers:
                raise RecipeError(where, f"methods.{name}.layers[{i}]", f"{L} is out of range: the model has "
                                  f"{n_layers} layers (0..{n_layers - 1})")
    width = getattr(text_config, "hidden_size", None) or getattr(text_config, "n_embd", None)
    sae_src = _sae_source(r)
    cfg_path = Path(sae_src) / "cfg.json" if isinstance(sae_src, Path) else None
    npz = _gemma_scope_file(r, sae_src)
    if npz is not None:  # GemmaScope's layout: the widths from W_enc's header, without reading the arrays
        shape = _npz_shape(npz, "W_enc")
        if shape is not None and isinstance(width, int) and shape[0] != width:
            raise RecipeError(where, "sae.source", f"the SAE ({npz}) reads vectors of width {shape[0]} but the model's "
                              f"hidden size is {width}: this SAE was trained on another model")
        if shape is not None and not 0 <= r.sae.feature < shape[1]:
            raise RecipeError(where, "sae.feature", f"{r.sae.feature} is out of range: the SAE has {shape[1]} features "
                              f"(0..{shape[1] - 1})")
    cfg: Any = {}
    if cfg_path is not None and cfg_path.exists():
        try:
            cfg = read_json(cfg_path)
        except ValueError as e:
            raise RecipeError(where, "sae.source", f"{cfg_path} is not readable JSON ({first_line(e):.160})") from None
        if not isinstance(cfg, dict):
            raise RecipeError(where, "sae.source", f"{cfg_path} is not a JSON object")
        d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
        if isinstance(width, int) and isinstance(d_in, int) and d_in != width:
            raise RecipeError(where, "sae.source", f"the SAE reads vectors of width {d_in} but the model's hidden size "
                              f"is {width}: this SAE was trained on another model")
        if isinstance(d_sae, int) and not 0 <= r.sae.feature < d_sae:
            raise RecipeError(where, "sae.feature", f"{r.sae.feature} is out of range: the SAE has {d_sae} features "
                              f"(0..{d_sae - 1})")
    trained = _sae_trained_layer(r, cfg)
    if trained is not None and trained != r.sae.layer:
        log.warning("%s: [sae.layer] is %d, but the SAE was trained on layer %d (%s): its feature is read from "
                    "activations of another layer than the ones it learned", where, r.sae.layer, trained, sae_src)
    with _model_folder_errors(where, src):
        tok = AutoTokenizer.from_pretrained(str(src), revision=r.model.revision or None)
        prompts = load_prompt_sets(r, tok)
    limit = getattr(text_config, "n_positions", None)
    if isinstance(limit, int):
        gen = [(f"{name} prompt {p.id!r}", p.text) for name in ("regex", "neutral") for p in getattr(prompts, name)]
        other = [(f"contrastive prompt {i}", t) for i, t in enumerate(prompts.contrastive[0] + prompts.contrastive[1])]
        other += [(f"calibration text {i}", t) for i, t in enumerate(prompts.calibration)]
        if r.probe.data == "spans":
            other += [(f"probe text {i}", t) for i, t in enumerate(prompts.probe_texts)]
        if r.eval.general == "loss":
            other += [(f"code text {i}", t) for i, t in enumerate(prompts.code)]
        probe_gen = []
        if r.probe.data == "generations":  # sampled from the contrastive prompts for the probe's training
            pos, neg = prompts.probe_generation_prompts or ([], [])
            probe_gen = [(f"probe generation prompt {i}", t) for i, t in enumerate(pos + neg)]
        for items, extra, key in ((gen, r.sweep.max_new_tokens, "sweep.max_new_tokens"), (other, 0, ""),
                                  (probe_gen, r.probe.max_new_tokens, "probe.max_new_tokens")):
            if not items:
                continue
            for (name, _), ids in zip(items, tokenize_prompts(tok, [t for _, t in items])):
                if len(ids) + extra > limit:
                    need = f"{len(ids)} tokens" + (f" + {key} {extra}" if extra else "")
                    raise RecipeError(r.resolve(r.prompts.source) if r.prompts.source != "world" else where,
                                      name, f"needs {need} = {len(ids) + extra} positions, but the model has "
                                      f"{limit} (learned positions): shorten it (e.g. a shorter function)"
                                      + (f" or lower {key}" if key else ""))
    return tok, prompts


def _sae_files(r: Recipe, src: Path) -> tuple[Path, Callable[[str], bool] | None]:
    """The folder holding the SAE a recipe reads from a local source, and which of its files count:
    the loader's own choice (:func:`sieve.saes.load_sae`), so the record names what is read. The
    study's layout keeps every layer's weights in one folder: only this layer's count."""
    from sieve.saes import _digits

    if src.is_file():
        if src.name in ("cfg.json", "config.json"):
            return _sae_files(r, src.parent)
        return src.parent, lambda name: name == src.name
    if r.sae.id:
        sub = src / r.sae.id
        if (sub / "params.npz").is_file() or (sub / "cfg.json").is_file():
            return sub, None
    if (src / "cfg.json").is_file() or (src / "params.npz").is_file():
        return src, None
    if (src / "config.json").is_file():
        weights = {".safetensors", ".pt", ".pth", ".bin"}
        return src, lambda name: name == "config.json" or (
            Path(name).suffix in weights and str(r.sae.layer) in _digits(Path(name).stem))
    return src, None


_MODEL_SUFFIXES = {".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".jinja", ".tiktoken", ".npz",
                   ".msgpack", ".h5", ".gguf"}


def _model_file(name: str) -> bool:
    """A file of a model folder that transformers may read: config, tokenizer, template or weights."""
    return not name.startswith(".") and Path(name).suffix in _MODEL_SUFFIXES and not name.lower().startswith(
        ("readme", "license"))


def _model_files(src: Path) -> tuple[str, ...]:
    """Beyond a model folder's own files: the shards its ``*.index.json`` files name (they may lie in a
    subfolder)."""
    extra: list[str] = []
    for index in sorted(src.glob("*.index.json")):
        try:
            weight_map = read_json(index, 256 << 20).get("weight_map", {})  # a large MoE's: ~9 MB
        except (ValueError, AttributeError):  # a FIFO, bad JSON, not an object: names no shards
            continue
        if isinstance(weight_map, dict):
            extra += [v for v in weight_map.values() if isinstance(v, str)]
    return tuple(dict.fromkeys(extra))


def _hub_commit(repo: str, filename: str, revision: str | None) -> str | None:
    """The commit of the hub cache's snapshot that holds ``filename`` of ``repo`` (None where the
    cache does not hold it)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo, filename, revision=revision)
    except (ValueError, OSError):
        return None
    return Path(path).parent.name if isinstance(path, str) and "snapshots" in Path(path).parts else None


def _repo_commit(repo: str, repo_type: str = "model") -> str | None:
    """The commit a hub repo's ``main`` resolves to for a loader now: the hub's answer where it can be
    reached, else the hub cache's (what an offline load reads); None where neither knows the repo."""
    from sieve.models import _offline

    if not _offline():
        from huggingface_hub import HfApi

        try:
            return HfApi().repo_info(repo, repo_type=repo_type, timeout=30).sha
        except Exception:  # no network, no such repo, a gated one: the cache may still know
            pass
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type=repo_type) / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit or None


def _sae_hub_identity(r: Recipe, src: str) -> dict[str, Any]:
    """A hub SAE's record: the release or repo and id, and the commit of the hub repo its files come from."""
    from sieve.saes import hub_sae_repo

    repo = hub_sae_repo(src)
    return {"hub": src, "id": r.sae.id, "repo": repo, "commit": _repo_commit(repo) if repo else None}


def _weights_identity(r: Recipe, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`sources_identity`'s record of the model and the SAE alone (what keys the detector cache)."""
    known = known or {}
    sae_src = _sae_source(r)
    if isinstance(sae_src, Path):
        folder, keep = _sae_files(r, sae_src)
        sae: dict[str, Any] = {"files": folder_digest(folder, keep)}
    else:
        sae = _recorded(known.get("sae"), hub=sae_src, id=r.sae.id) or _sae_hub_identity(r, sae_src)
    return {"model": _identity(_model_source(r), r.model.revision or None, known.get("model")), "sae": sae}


def sources_identity(recipe: Recipe, *, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the model, SAE, judge model and MMLU data a recipe reads, beyond the names the recipe gives
    them: for a local folder (the embedded world's included) the SHA-256 of each of its files
    (:func:`sieve.files.folder_digest`, read once per file and kept by size, time and inode); for a
    hub model, the commit its config came from; for a sae-lens release or hub SAE, the commit of the
    hub repo holding it, and for ``cais/mmlu`` the dataset's (the hub's ``main`` where it can be
    reached, else the hub cache's); for ``eval.mmlu_data``, the file's SHA-256. Rows made from other
    sources under the same names are not resumed (a model retrained in its folder, a hub id whose
    ``main`` moved).

    ``known``: an earlier record whose hub entries are taken as they are, with no hub lookup (to ask
    again, cheaply, whether local files changed since).

    Example:
        >>> from sieve.recipe import load_recipe
        >>> sorted(sources_identity(load_recipe("recipes/regex.toml"))["model"]["files"])[:2]
        ['config.json', 'generation_config.json']
    """
    r = recipe
    known = known or {}
    out = _weights_identity(r, known)
    if r.eval.judge == "hf" and r.eval.judge_model:
        out["judge"] = _identity(judge_source(r), None, known.get("judge"))
    if r.eval.general == "lmeval" and r.eval.lmeval_include:  # the harness tasks of the recipe's own, and their data
        out["lmeval_include"] = {"files": folder_digest(r.resolve(r.eval.lmeval_include), recursive=True)}
    if r.eval.general == "mmlu" and r.eval.mmlu_data:
        data = r.resolve(r.eval.mmlu_data)
        out["mmlu_data"] = {"files": folder_digest(data) if data.is_dir() else
                            folder_digest(data.parent, lambda name: name == data.name)}
    elif r.eval.general == "mmlu":
        out["mmlu_data"] = _recorded(known.get("mmlu_data"), hub=_MMLU_HUB) or {
            "hub": _MMLU_HUB, "commit": _repo_commit(_MMLU_HUB, "dataset")}
    return out


_MMLU_HUB = "cais/mmlu"  # what sieve.evals.mmlu.load_mmlu reads where eval.mmlu_data is empty


def with_unrecorded(old: Any, new: Any) -> Any:
    """``old`` (a :func:`sources_identity` record) with what sieve did not record before 2026-11-26
    taken from ``new``: a hub SAE's repo and commit, and ``cais/mmlu``'s record. So a folder written
    then compares equal to today's record of the same sources.

    Example:
        >>> with_unrecorded({"sae": {"hub": "r", "id": "i"}}, {"sae": {"hub": "r", "id": "i", "commit": "c"}})
        {'sae': {'hub': 'r', 'id': 'i', 'commit': 'c'}}
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old
    out = dict(old)
    o, n = old.get("sae"), new.get("sae")
    if isinstance(o, dict) and "hub" in o and "commit" not in o and _recorded(n, hub=o["hub"], id=o.get("id")):
        out["sae"] = n
    m = _recorded(new.get("mmlu_data"), hub=_MMLU_HUB)
    if "mmlu_data" not in old and m is not None:
        out["mmlu_data"] = m
    return out


def load_setting(recipe: Recipe, *, progress: bool = True, with_probe: bool = True,
                 cache_dir: str | Path | None = None, checked: bool = False,
                 sources: dict[str, Any] | None = None) -> Setting:
    """Load model, SAE, feature and build every detector and direction the recipe's methods use.

    CAA vectors and probes are cached in ``cache_dir`` (default: ``cache`` in the recipe's output folder).
    The recipe's inputs are checked first (:func:`checked_inputs`) unless ``checked`` says the caller
    just did. ``sources``: the caller's :func:`sources_identity` record, whose hub entries key the
    cache without asking the hub again.

    Example:
        >>> from sieve.recipe import load_recipe
        >>> s = load_setting(load_recipe("recipes/regex.toml"), progress=False)  # doctest: +SKIP
        >>> sorted(s.parts.detectors)  # doctest: +SKIP
        ['caa', 'probe', 'sae']
    """
    from sieve.models import layer as layer_of
    from sieve.models import load_model
    from sieve.saes import check_compatible, feature
    from sieve.steering import sae_layer

    r = recipe
    if cache_dir is None:
        from sieve.rundir import output_dir

        cache_dir = output_dir(r) / "cache"
    cache_dir = Path(cache_dir)
    if not checked:
        checked_inputs(r)  # bad input fails here, before the weights load
    model = load_model(_model_source(r), device=r.model.device, dtype=r.model.dtype,
                       revision=r.model.revision or None)
    layer_of(model, r.sae.layer)  # range check with a clear error
    sae = _sae(r)
    check_compatible(sae, model)
    trained = sae_layer(sae)
    if not isinstance(_sae_source(r), Path) and trained is not None and trained != r.sae.layer:  # a hub SAE
        log.warning("[sae.layer] is %d, but the SAE %s was trained on layer %d: its feature is read from "
                    "activations of another layer than the ones it learned", r.sae.layer, r.sae.source, trained)
    feat = feature(sae, r.sae.feature)
    prompts = load_prompt_sets(r, model.tokenizer)
    parts = Parts(layer=r.sae.layer)
    sae_det, threshold = feature_detector(feat, r.sae.threshold)
    if r.sae.threshold_on == "no_bias":  # the recipe's threshold is on h·w: the same cut on h·w + b
        threshold += sae_det.b
    parts.add_detector("sae", sae_det, threshold)
    parts.add_direction("sae", feat.direction)
    try:  # the SAE's code: SAE-space edits and code detectors (JumpReLU, ReLU, TopK SAEs)
        parts.add_detector("sae_code", SAECode(sae, [r.sae.feature], name=f"feature {r.sae.feature} code"), 0.0)
        parts.add_latents("sae", sae, [r.sae.feature])
    except SieveError as e:
        log.warning("SAE-space methods are not available with this SAE: %s", e)
    ident = _weights_identity(r, sources)  # not the judge's or the data's: they do not make the detectors
    key_base = [ident["model"], ident["sae"], r.sae.id, r.sae.layer]

    # CAA: mean difference at the last prompt token over contrastive pairs; its threshold fires as often
    # as the SAE feature over the calibration prompts' tokens (or is set in the recipe).
    pos, neg = prompts.contrastive
    caa_det, caa_thr = caa_detector(model, pos, neg, r.sae.layer, threshold=r.caa.threshold,
                                    calibration=prompts.calibration, reference=(sae_det, threshold),
                                    bias=r.caa.threshold_bias, cache=cache_dir / "caa.safetensors", key=key_base,
                                    progress=progress)
    parts.add_detector("caa", caa_det, caa_thr)
    parts.add_direction("caa", caa_det.w)
    info: dict[str, Any] = {"caa_threshold": caa_thr, "sae_threshold": threshold}

    if with_probe:
        if r.probe.data == "spans":
            texts, labels = probe_training_data(model, spans_texts=prompts.probe_texts)
        else:
            texts, labels = probe_training_data(model, contrastive=prompts.probe_generation_prompts,
                                                samples=r.probe.samples, max_new_tokens=r.probe.max_new_tokens,
                                                seed=r.probe.seed, progress=progress)
        probe = probe_detector(model, texts, labels, r.sae.layer, l2=r.probe.l2, seed=r.probe.seed,
                               cache=cache_dir / "probe.safetensors",
                               key=[key_base, r.probe.data],
                               progress=progress)
        parts.add_detector("probe", probe.detector(), 0.0)
        parts.add_direction("probe", probe.w)
        info["probe_accuracy"] = {"train": probe.train_accuracy, "test": probe.test_accuracy}
        log.info("probe accuracy train %.3f test %.3f", probe.train_accuracy, probe.test_accuracy)
    return Setting(r, model, sae, feat, r.sae.layer, float(threshold), parts, prompts, info)
