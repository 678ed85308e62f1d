"""Load a causal LM as an nnsight model with uniform layer access, and format chat prompts.

``load_model`` takes a hub id or a local directory and returns an ``nnsight.TransformersModel`` whose
decoder layers are ``model.layers[i]`` on every supported architecture. The attention implementation
is chosen for the device: flash-attention 2 when it imports and the model is on CUDA, otherwise the
architecture's own default (never forcing sdpa, which Gemma2 refuses).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import Any

import torch

from sieve.errors import NotAvailableOffline, SieveError

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "load_model",
    "own_weights",
    "check_device",
    "layer",
    "hidden_size",
    "num_layers",
    "chat_prompt",
    "encode_prompts",
    "choose_attention",
    "underlying",
    "clip_to_tokens",
    "max_context",
    "pad_left",
    "tokenize_prompts",
    "decoder_layers",
    "pad_id",
]

# model_type -> where the decoder layers live. nnsight's ``rename`` maps each to ``layers``.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "gpt2": "transformer.h",
    "llama": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
}
_RENAME = {"transformer.h": "layers", "model.layers": "layers"}
# accelerate's device maps that spread one model over several GPUs.
SPLIT_DEVICE_MAPS: tuple[str, ...] = ("balanced", "balanced_low_0", "sequential")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def _hub_hint(kind: str, ident: str) -> str:
    return (
        f"{kind} {ident!r} is not on this machine and the hub cannot be reached "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Download it where there is "
        f"network with `hf download {ident} --local-dir DIR`, then pass DIR instead of the hub id "
        "(or copy the hub cache to this machine)."
    )


def _resolve_config(source: str | Path, revision: str | None):
    from transformers import AutoConfig

    path = Path(source)
    if not path.exists() and (str(source).startswith(("/", ".", "~")) or str(source).count("/") > 1):
        raise SieveError(f"model folder {path} not found (a hub id looks like 'org/name')")
    if path.exists():
        if not (path / "config.json").exists():
            raise SieveError(f"model directory {path} has no config.json; expected a save_pretrained dir")
        return AutoConfig.from_pretrained(path)
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(source), "config.json", revision=revision)
        if not isinstance(cached, str):
            raise NotAvailableOffline(_hub_hint("model", str(source)))
    try:
        return AutoConfig.from_pretrained(str(source), revision=revision)
    except OSError as e:
        raise NotAvailableOffline(_hub_hint("model", str(source)) + f" ({e.__class__.__name__})") from e


def choose_attention(model_type: str, device: str, dtype: torch.dtype | None = None) -> str | None:
    """The attention implementation to ask for: flash-attention 2 on CUDA when installed and the model
    runs in float16 or bfloat16 (its kernels take no other dtype), else None. Gemma-2 soft-caps its
    attention logits, which flash-attention supports from 2.6 on: an older one is not asked for.

    None leaves transformers' default (sdpa for GPT-2/Llama/Qwen2, eager for Gemma2).

    Example:
        >>> choose_attention("gemma2", "cpu") is None
        True
        >>> choose_attention("llama", "cuda", torch.float32) is None  # on any machine: flash-attention is 16-bit only
        True
    """
    if not (device.startswith("cuda") and torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
        return None
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return None
    if model_type == "gemma2" and _version_below("flash_attn", (2, 6)):
        return None
    return "flash_attention_2"


def _version_below(dist: str, least: tuple[int, ...]) -> bool:
    """Whether the installed distribution's version is below ``least`` (unknown versions are not)."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    for name in (dist, dist.replace("_", "-")):
        try:
            got = tuple(int(x) for x in re.findall(r"\d+", version(name))[: len(least)])
        except PackageNotFoundError:
            continue
        return got < least
    return False


def check_device(device: str) -> None:
    """Refuse (:class:`~sieve.errors.SieveError`) a device name torch does not know, or one this machine
    does not have (``cuda`` on a build or machine without CUDA), before anything loads.

    Example:
        >>> check_device("cpu"); check_device("auto")
        >>> check_device("cdua")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        sieve.errors.SieveError: device 'cdua' is not one sieve knows: use auto, cpu, cuda, cuda:N, mps, ...
    """
    import re

    if device in ("auto", "cpu") or device in SPLIT_DEVICE_MAPS:  # a split map without GPUs loads on the CPU
        return
    if not re.fullmatch(r"cuda(:\d+)?|mps", device):
        raise SieveError(f"device {device!r} is not one sieve knows: use auto, cpu, cuda, cuda:N, mps, "
                         f"{', '.join(SPLIT_DEVICE_MAPS[:-1])} or {SPLIT_DEVICE_MAPS[-1]}")
    if device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SieveError("device 'mps': this torch sees no Apple GPU (use cpu or auto)")
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        why = "a CPU-only build" if torch.version.cuda is None else "none visible"
        raise SieveError(f"device {device!r}: this torch sees no CUDA GPU ({why}); use cpu or auto")
    if device.startswith("cuda:") and int(device[5:]) >= n:
        raise SieveError(f"device {device!r}: this machine has {n} CUDA GPU(s) (cuda:0..cuda:{n - 1})")


def _dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        out = getattr(torch, str(dtype))
    except AttributeError:
        out = None
    if not isinstance(out, torch.dtype):
        raise SieveError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return out


def load_model(
    source: str | Path | Any,
    *,
    device: str = "auto",
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = "auto",
    tokenizer: Any = None,
    revision: str | None = None,
):
    """Load a causal LM as an ``nnsight.TransformersModel`` with ``model.layers[i]`` on any architecture.

    ``source`` is a hub id, a local ``save_pretrained`` directory, or an already-built HF model (then
    pass ``tokenizer``). ``device="auto"`` picks CUDA when available; ``"balanced"``,
    ``"balanced_low_0"`` or ``"sequential"`` spread the layers of a model too large for one GPU over all
    visible GPUs (accelerate's ``device_map``; each layer's edit runs on that layer's GPU).
    ``dtype="auto"`` is bfloat16 on CUDA and float32 on CPU.

    Example:
        >>> from sieve.world import world_model_dir
        >>> model = load_model(world_model_dir())
        >>> len(model.layers) >= 2
        True
    """
    from nnsight import TransformersModel

    check_device(device)
    device_map = device
    if device == "auto" or device in SPLIT_DEVICE_MAPS:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        device_map = device if device_map == "auto" else device_map
    torch_dtype = _dtype(dtype, device)
    if isinstance(source, torch.nn.Module):
        config, built = source.config, source
    else:
        config, built = _resolve_config(source, revision), None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise SieveError(
            f"architecture {model_type!r} of {getattr(config, 'name_or_path', source)!r} is not supported; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    kwargs: dict[str, Any] = {}
    attn = choose_attention(model_type, device, torch_dtype) if attn_implementation == "auto" else attn_implementation
    if built is not None:
        if device_map in SPLIT_DEVICE_MAPS:
            raise SieveError(f"device {device_map!r} needs a model to load (a hub id or folder), not a built one")
        model = TransformersModel(built.to(device), tokenizer=tokenizer, task="text-generation",
                                  rename=_RENAME)
    else:
        if attn is not None:
            kwargs["attn_implementation"] = attn
        if revision:
            kwargs["revision"] = revision
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        model = TransformersModel(
            str(source), task="text-generation", dispatch=True, device_map=device_map, dtype=torch_dtype,
            rename=_RENAME, **kwargs,
        )
        own_weights(underlying(model))
    model.tokenizer.padding_side = "left"
    if model.tokenizer.pad_token is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    return model


def own_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Give ``module``'s CPU parameters and buffers memory of their own, off the files they were read
    from, and return it.

    On a CPU, transformers and safetensors leave weights mapped onto their ``.safetensors`` file: a
    write into that file while the model is loaded (a training job saving into the same folder, a
    copy over it) would change the weights mid-run, under results recorded as made with the file's
    earlier contents (``sources.json``). Tensors on an accelerator are copies already, and are left
    as they are; a weight tied in two places is one parameter, and stays tied.

    Example:
        >>> import torch
        >>> lin = own_weights(torch.nn.Linear(2, 2))
        >>> lin.weight.shape
        torch.Size([2, 2])
    """
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.device.type == "cpu":
                t.data = t.data.clone()
    return module


def underlying(model) -> torch.nn.Module:
    """The plain HF module inside an nnsight model (for code outside a trace)."""
    return getattr(model, "_module", model)


def _last_logits_only(model) -> dict[str, int]:
    """Forward arguments for a pass that reads no logits but the last position's (a prefix filling a
    cache, layer outputs recorded, a next-token answer): the LM head runs for the last position only,
    where the model can be told so (``logits_to_keep``); the layers compute the same."""
    forward = underlying(model).forward
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(forward).parameters else {}


def decoder_layers(model):
    """The decoder layers of an nnsight model: ``model.layers`` on models sieve loaded, found by
    architecture (``transformer.h``, ``model.layers``) on a plain ``nnsight.TransformersModel``.

    Example:
        >>> from sieve.world import world_model_dir
        >>> from nnsight import TransformersModel
        >>> plain = TransformersModel(str(world_model_dir()), task="text-generation", dispatch=True)
        >>> len(decoder_layers(plain))
        4
    """
    for path in ("layers", *sorted(set(SUPPORTED_ARCHITECTURES.values()))):
        node = model
        try:
            for part in path.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        try:
            len(node)
        except TypeError:
            continue
        return node
    raise SieveError(f"cannot find the decoder layers of {type(underlying(model)).__name__}: expected one of "
                     f"model.layers, {', '.join(sorted(set(SUPPORTED_ARCHITECTURES.values())))}")


def num_layers(model) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def hidden_size(model) -> int:
    """The residual stream width d of the model."""
    cfg = underlying(model).config
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def layer(model, index: int):
    """The envoy of decoder layer ``index`` (negative counts from the end), with a clear range error.

    Example:
        >>> layer(model, 99)  # doctest: +SKIP
        SieveError: layer 99 is out of range: this model has 4 decoder layers (0..3)
    """
    layers = decoder_layers(model)
    n = len(layers)
    if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
        raise SieveError(f"layer {index!r} is out of range: this model has {n} decoder layers (0..{n - 1})")
    return layers[index]


def chat_prompt(tokenizer, user: str, *, system: str | None = None, prefill: str = "") -> str:
    """Format one user turn with the model's chat template, the generation prompt and an answer prefill.

    Models whose template has no system role (Gemma) get the system text at the top of the user turn.
    Tokenizers without a chat template (base models, the embedded world) get the plain text.

    Example:
        >>> chat_prompt(tok, "Write tests.", prefill="```python\\n")  # doctest: +SKIP
        '<bos><start_of_turn>user\\nWrite tests.<end_of_turn>\\n<start_of_turn>model\\n```python\\n'
    """
    if not getattr(tokenizer, "chat_template", None):
        head = f"{system}\n\n" if system else ""
        return f"{head}{user}\n{prefill}"
    msgs = [{"role": "user", "content": user}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    except Exception:
        if not system:
            raise
        msgs = [{"role": "user", "content": f"{system}\n\n{user}"}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return text + prefill


def clip_to_tokens(tok, text: str, n_ctx: int) -> str:
    """The longest prefix of ``text`` (whole tokens) that encodes to at most ``n_ctx`` tokens, BOS included.

    Example:
        >>> len(tok(clip_to_tokens(tok, "x = 1\\n" * 500, 256))["input_ids"]) <= 256  # doctest: +SKIP
        True
    """
    ids = tok(text)["input_ids"]
    keep = min(len(ids), n_ctx)
    while True:
        clipped = tok.decode(ids[1:keep])
        if len(tok(clipped)["input_ids"]) <= n_ctx:
            return clipped
        keep -= 4


def max_context(model) -> int | None:
    """The model's context length (positions it was built for), if its config says."""
    cfg = underlying(model).config
    for key in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def tokenize_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as :func:`encode_prompts` feeds them, unpadded: BOS added only where the
    text does not already start with it.

    Example:
        >>> from sieve.world import load_world
        >>> [len(r) for r in tokenize_prompts(load_world().model.tokenizer, ["def f(", "<|endoftext|>def f("])]
        [4, 4]
    """
    if not texts:
        raise SieveError("no prompts given")
    bos = tokenizer.bos_token
    plain = [t for t in texts if not (bos and t.startswith(bos))]
    with_bos = iter(tokenizer(plain, add_special_tokens=True)["input_ids"] if plain else [])
    return [tokenizer(t, add_special_tokens=False)["input_ids"] if bos and t.startswith(bos) else next(with_bos)
            for t in texts]


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (GPT-2 has no pad token), else 0.
    Padding is masked out, so any id does."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(v, int):
            return v
    return 0


def pad_left(rows: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token rows into ``input_ids`` and ``attention_mask``.

    Example:
        >>> pad_left([[5, 6], [7]], 0)["input_ids"].tolist()
        [[5, 6], [0, 7]]
    """
    if not rows:
        raise SieveError("no prompts given")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode_prompts(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize prompts left-padded, adding BOS only where the text does not already start with it.

    Example:
        >>> enc = encode_prompts(tok, ["def f(", "import re"])  # doctest: +SKIP
        >>> enc["input_ids"].shape, enc["attention_mask"].shape  # doctest: +SKIP
    """
    return pad_left(tokenize_prompts(tokenizer, texts), pad_id(tokenizer))
