"""Build the non-SAE detectors: CAA vectors and linear probes, from activations read in nnsight traces.

- :func:`last_token_activations` / :func:`token_activations`: a layer's residual stream, batched,
  read with ``model.trace`` (no hooks), padding dropped.
- :func:`caa_vector`: mean(positive) − mean(negative) of the last prompt token's activation over
  contrastive prompt pairs, as the study built it (not normalised; normalised when used as a direction).
- :func:`train_probe`: logistic regression on token activations, trained with torch, seeded.
- :func:`calibrate_threshold`: a threshold for a detector so it fires about as often as a reference one.

Results are cached as safetensors under a key hashed from every input (:func:`cached`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.errors import SieveError
from sieve.interventions import Detector, eligible_mask
from sieve.models import encode_prompts, layer

__all__ = [
    "last_token_activations",
    "token_activations",
    "caa_vector",
    "Probe",
    "train_probe",
    "calibrate_threshold",
    "cached",
    "fingerprint",
]


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.inference_mode()
def _layer_outputs(model, texts: list[str], layer_index: int) -> tuple[Tensor, dict[str, Tensor]]:
    enc = encode_prompts(model.tokenizer, texts)
    target = layer(model, layer_index)
    with model.trace(enc):
        out = target.output
        h = (out[0] if isinstance(out, tuple) else out).save()
    return h.detach().float().cpu(), enc


def last_token_activations(
    model, texts: list[str], layer_index: int, *, batch_size: int = 16, progress: bool = True
) -> Tensor:
    """``[N, D]``: the layer's output at each text's last token (prompts are left-padded).

    Example:
        >>> acts = last_token_activations(model, ["def f(", "x ="], 1)  # doctest: +SKIP
        >>> acts.shape  # doctest: +SKIP
        torch.Size([2, 192])
    """
    rows = []
    for sl in tqdm(list(_batches(len(texts), batch_size)), desc="activations", disable=not progress):
        h, _ = _layer_outputs(model, texts[sl], layer_index)
        rows.append(h[:, -1])
    return torch.cat(rows)


def token_activations(
    model,
    texts: list[str],
    layer_index: int,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> list[Tensor]:
    """Per text, ``[T_i, D]``: the layer's output at each of its real tokens (padding and BOS dropped).

    Token i of the result is token i of ``tokenizer(text)`` without the BOS the tokenizer adds.
    """
    out: list[Tensor] = []
    bos = model.tokenizer.bos_token_id
    for sl in tqdm(list(_batches(len(texts), batch_size)), desc="activations", disable=not progress):
        h, enc = _layer_outputs(model, texts[sl], layer_index)
        keep = eligible_mask(enc["input_ids"], enc["attention_mask"], bos)
        for i in range(h.shape[0]):
            out.append(h[i][keep[i]])
    return out


def caa_vector(
    model, positive: list[str], negative: list[str], layer_index: int, *, batch_size: int = 16,
    progress: bool = True,
) -> Tensor:
    """The CAA vector ``mean(h_pos[-1]) − mean(h_neg[-1])`` at the layer (unnormalised).

    Example:
        >>> v = caa_vector(model, ["use regex: x"], ["x"], 1)  # doctest: +SKIP
    """
    if not positive or not negative:
        raise SieveError("caa_vector needs at least one positive and one negative prompt")
    pos = last_token_activations(model, positive, layer_index, batch_size=batch_size, progress=progress)
    neg = last_token_activations(model, negative, layer_index, batch_size=batch_size, progress=progress)
    return pos.mean(0) - neg.mean(0)


@dataclass(frozen=True)
class Probe:
    """A logistic-regression probe: ``P(positive | h) = σ(h·w + b)``; accuracies on train and test."""

    w: Tensor
    b: float
    train_accuracy: float
    test_accuracy: float

    def detector(self, name: str = "probe") -> Detector:
        """The probe's logit as a detector; it fires (threshold 0) where the probe says positive."""
        return Detector(self.w, self.b, kind="probe", name=name)

    @property
    def direction(self) -> Tensor:
        return self.w / self.w.norm()


def train_probe(
    x: Tensor,
    y: Tensor,
    *,
    groups: Tensor | None = None,
    test_fraction: float = 0.2,
    l2: float = 1e-3,
    steps: int = 300,
    seed: int = 0,
    balance: bool = True,
) -> Probe:
    """Fit a logistic-regression probe on ``x [N, D]`` with labels ``y [N]`` (0/1), seeded.

    ``groups`` (one id per row, e.g. the sample a token came from) keeps whole groups on one side of
    the train/test split, as the study split by sample. Features are standardised while fitting and the
    weights mapped back, so ``w``/``b`` apply to raw activations. ``balance`` weights classes equally.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 8, generator=g); y = (x[:, 3] > 0).long()
        >>> p = train_probe(x, y)
        >>> int(p.w.abs().argmax()), p.test_accuracy > 0.9
        (3, True)
    """
    if x.dim() != 2 or y.shape[0] != x.shape[0]:
        raise SieveError(f"train_probe: x must be [N, D] and y [N]; got {tuple(x.shape)} and {tuple(y.shape)}")
    y = y.float()
    if y.min() == y.max():
        raise SieveError("train_probe: all labels are the same; a probe needs positives and negatives")
    g = torch.Generator().manual_seed(seed)
    gid = groups if groups is not None else torch.arange(x.shape[0])
    uniq = gid.unique()
    perm = uniq[torch.randperm(len(uniq), generator=g)]
    test_ids = perm[: max(1, int(len(uniq) * test_fraction))]
    is_test = torch.isin(gid, test_ids)
    xtr, ytr = x[~is_test].float(), y[~is_test]
    if ytr.min() == ytr.max():
        is_test = torch.zeros_like(is_test)
        xtr, ytr = x.float(), y
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    z = (xtr - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos_w = (ytr.numel() - ytr.sum()) / ytr.sum().clamp_min(1) if balance else torch.tensor(1.0)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, ytr, pos_weight=pos_w)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w.detach() / sd)
    b_raw = float(b.detach() - (mu * w_raw).sum())

    def acc(mask: Tensor) -> float:
        if not mask.any():
            return float("nan")
        pred = (x[mask].float() @ w_raw + b_raw) > 0
        return float((pred == y[mask].bool()).float().mean())

    return Probe(w_raw, b_raw, acc(~is_test), acc(is_test))


def calibrate_threshold(scores: Tensor, reference_fires: Tensor) -> float:
    """A threshold at which ``scores`` fires on as many tokens as the reference detector did.

    The study calibrated its CAA threshold this way (then subtracted a hand-set bias); sieve takes the
    k-th largest score, k = how often the reference fired, over the same tokens.

    Example:
        >>> calibrate_threshold(torch.tensor([5.0, 1.0, 3.0, 2.0]), torch.tensor([True, False, True, False]))
        2.5
    """
    k = int(reference_fires.sum())
    s = scores.flatten().float().sort(descending=True).values
    if k == 0:
        return float(s[0]) + 1.0
    if k >= s.numel():
        return float(s[-1]) - 1.0
    return float((s[k - 1] + s[k]) / 2)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able inputs (prompts, model id, layer, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: Path, key: str, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Load ``path`` if it holds tensors for ``key``; otherwise compute, save (safetensors) and return.

    Example:
        >>> t = cached(tmp / "caa.safetensors", fingerprint(prompts, 3), lambda: {"v": v})  # doctest: +SKIP
    """
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(path))
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return out
