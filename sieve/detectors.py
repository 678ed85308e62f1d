"""Build the detectors a setting's methods use: the SAE feature, CAA vectors and linear probes, from
activations read in nnsight traces.

- :func:`last_token_activations` / :func:`token_activations`: a layer's residual stream, batched,
  read with ``model.trace`` (no hooks), padding and BOS dropped; :func:`token_labels`: per-token
  labels from character spans, aligned with :func:`token_activations` (the one place that alignment
  is made).
- :func:`feature_detector`: an SAE feature's exact pre-activation as a detector, with its threshold.
- :func:`caa_vector` / :func:`caa_detector`: mean(positive) − mean(negative) of the last prompt token's
  activation over contrastive prompt pairs, as the study built it (not normalised; normalised when used
  as a direction), as a detector whose threshold is set directly or calibrated to fire as often as a
  reference detector (:func:`calibrate_threshold`).
- :func:`train_probe` / :func:`probe_detector`: logistic regression on token activations, trained with
  torch, seeded; :func:`probe_training_data`: its texts and labels (regex-use spans, or tokens
  generated from contrastive prompts labelled by polarity).

CAA vectors and probes are cached as safetensors under a key hashed from every input (:func:`cached`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.errors import SieveError, first_line
from sieve.files import local_mac, write_atomic
from sieve.interventions import Detector, eligible_mask
from sieve.models import _last_logits_only, encode_prompts, layer, tokenize_prompts

log = logging.getLogger(__name__)

__all__ = [
    "last_token_activations",
    "token_activations",
    "token_labels",
    "feature_detector",
    "caa_vector",
    "caa_detector",
    "Probe",
    "train_probe",
    "probe_training_data",
    "probe_detector",
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
    with model.trace(enc, **_last_logits_only(model)) as tracer:  # the layer's outputs only
        out = target.output
        h = (out[0] if isinstance(out, tuple) else out).save()
        tracer.stop()  # the layers after it, and the LM head, are never run
    return h.detach().float().cpu(), enc


def last_token_activations(
    model, texts: list[str], layer_index: int, *, batch_size: int = 16, progress: bool = True,
    desc: str = "activations",
) -> Tensor:
    """``[N, D]``: the layer's output at each text's last token (prompts are left-padded).

    Example:
        >>> acts = last_token_activations(model, ["def f(", "x ="], 1)  # doctest: +SKIP
        >>> acts.shape  # doctest: +SKIP
        torch.Size([2, 192])
    """
    rows = []
    for sl in tqdm(list(_batches(len(texts), batch_size)), desc=desc, disable=not progress):
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
    desc: str = "activations",
) -> list[Tensor]:
    """Per text, ``[T_i, D]``: the layer's output at each of its real tokens (padding and BOS dropped).

    Token i of the result is token i of ``tokenizer(text)`` without the BOS the tokenizer adds.
    """
    out: list[Tensor] = []
    bos = model.tokenizer.bos_token_id
    for sl in tqdm(list(_batches(len(texts), batch_size)), desc=desc, disable=not progress):
        h, enc = _layer_outputs(model, texts[sl], layer_index)
        keep = eligible_mask(enc["input_ids"], enc["attention_mask"], bos)
        for i in range(h.shape[0]):
            out.append(h[i][keep[i]])
    return out


def token_labels(tokenizer, text: str, spans: Sequence[tuple[int, int]], length: int | None = None) -> Tensor:
    """``[T]`` bool, one per token of ``text`` as :func:`token_activations` returns them (BOS dropped):
    True where the token overlaps a character span ``[start, end)``. ``length`` cuts the labels to the
    activations actually read (a text clipped to the context).

    The same positions index :func:`~sieve.evals.ability.steered_logprobs`' ``[T - 1]`` values (the
    probability of each token after the first).

    Example:
        >>> from sieve.world import load_world
        >>> tok = load_world().model.tokenizer
        >>> lab = token_labels(tok, "import re\\nx = 1", [(0, 9)])
        >>> lab.shape[0] == len(tokenize_prompts(tok, ["import re\\nx = 1"])[0]) - 1, bool(lab[0]), bool(lab[-1])
        (True, True, False)
    """
    ids = tokenize_prompts(tokenizer, [text])[0]
    bos = tokenizer.bos_token
    enc = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise SieveError("token_labels: the tokenizer's offsets do not follow its own tokenization of the text")
    lab = torch.zeros(len(ids), dtype=torch.bool)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a < e and s < b for s, e in spans):
            lab[t] = True
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        lab = lab[1:]
    return lab if length is None else lab[:length]


def feature_detector(feature: Any, threshold: float | None = None) -> tuple[Detector, float]:
    """An SAE feature as a detector (its exact pre-activation, ``h·w + b``) and its threshold: the one
    given, else the SAE's own (JumpReLU), else 0.

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> det, thr = feature_detector(w.feature)
        >>> det.kind, thr == (w.feature.threshold or 0.0)
        ('sae', True)
    """
    w, b = feature.linear()
    thr = threshold if threshold is not None else (feature.threshold or 0.0)
    return Detector(w, b, kind="sae", name=f"feature {feature.index}"), float(thr)


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
    pos = last_token_activations(model, positive, layer_index, batch_size=batch_size, progress=progress,
                                 desc="CAA vector: positive prompts")
    neg = last_token_activations(model, negative, layer_index, batch_size=batch_size, progress=progress,
                                 desc="CAA vector: negative prompts")
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


def caa_detector(
    model,
    positive: list[str],
    negative: list[str],
    layer_index: int,
    *,
    threshold: float | str = "calibrate",
    calibration: list[str] | None = None,
    reference: tuple[Detector, float] | None = None,
    bias: float = 0.0,
    cache: Path | None = None,
    key: Any = None,
    progress: bool = True,
) -> tuple[Detector, float]:
    """The CAA projection ``h·v`` as a detector, and its threshold.

    ``threshold``: a number, or ``"calibrate"``: fire on as many of the ``calibration`` texts' tokens as
    the ``reference`` detector (with its threshold) does, then add ``bias``. The vector is cached in
    ``cache`` (a safetensors file) under ``key`` and the prompts, when given.

    Example:
        >>> det, thr = caa_detector(model, pos, neg, 2, calibration=texts, reference=(sae_det, 3.2))  # doctest: +SKIP
    """
    if not positive or not negative:
        raise SieveError("caa_detector needs at least one positive and one negative contrastive prompt")

    def compute() -> dict[str, Tensor]:
        return {"v": caa_vector(model, positive, negative, layer_index, progress=progress)}

    v = (cached(cache, fingerprint(key, positive, negative), compute) if cache is not None else compute())["v"]
    det = Detector(v, 0.0, kind="caa", name="CAA projection")
    if not isinstance(threshold, str):
        return det, float(threshold)
    if threshold != "calibrate" or not calibration or reference is None:
        raise SieveError("caa_detector: threshold 'calibrate' needs calibration texts and a reference detector")
    acts = torch.cat(token_activations(model, calibration, layer_index, progress=progress,
                                       desc="CAA threshold: calibration texts"))
    ref_det, ref_thr = reference
    return det, calibrate_threshold(det.score(acts), ref_det.score(acts) > ref_thr) + bias


def probe_training_data(
    model,
    *,
    spans_texts: list[str] | None = None,
    contrastive: tuple[list[str], list[str]] | None = None,
    samples: int = 8,
    max_new_tokens: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> tuple[list[str], list[Tensor]]:
    """Texts and per-token labels (:func:`token_labels`' alignment) to train a probe on.

    ``spans_texts``: code, tokens labelled by regex use. Otherwise ``contrastive`` (positive, negative)
    prompts: ``samples`` completions of each (temperature 1, seeded), every generated token labelled by
    its prompt's polarity, as the study did.
    """
    from sieve.evals.regex_use import find_regex_use

    tok = model.tokenizer
    if spans_texts is not None:
        return spans_texts, [token_labels(tok, t, find_regex_use(t).spans) for t in spans_texts]
    if contrastive is None:
        raise SieveError("probe_training_data needs spans_texts or contrastive prompts")
    from sieve.generation import generate

    texts, labels = [], []
    bar = tqdm(total=samples * sum(len(p) for p in contrastive), desc="probe data: sampled generations",
               unit="row", smoothing=0, disable=not progress)
    for polarity, prompts in zip((True, False), contrastive):
        rows = [p for p in prompts for _ in range(samples)]
        outs = generate(model, rows, None, max_new_tokens=max_new_tokens, temperature=1.0,
                        seeds=[seed * 100_003 + i for i in range(len(rows))], progress=False, on_batch=bar.update)
        for o in outs:
            n = len(token_labels(tok, o.text, []))
            texts.append(o.text)
            labels.append(torch.full((n,), polarity, dtype=torch.bool))
    bar.close()
    return texts, labels


def probe_detector(
    model,
    texts: list[str],
    labels: list[Tensor],
    layer_index: int,
    *,
    l2: float = 1e-3,
    seed: int = 0,
    cache: Path | None = None,
    key: Any = None,
    progress: bool = True,
) -> Probe:
    """A probe trained on ``texts``' token activations against ``labels`` (split by text), cached in
    ``cache`` under ``key`` and the texts; its :meth:`Probe.detector` fires where it says positive.

    Example:
        >>> texts, labels = probe_training_data(model, spans_texts=code)  # doctest: +SKIP
        >>> probe_detector(model, texts, labels, 2).test_accuracy > 0.8  # doctest: +SKIP
        True
    """

    def fit() -> dict[str, Tensor]:
        acts = token_activations(model, texts, layer_index, progress=progress, desc="probe: training activations")
        x = torch.cat(acts)
        y = torch.cat([lab[: a.shape[0]] for lab, a in zip(labels, acts)]).long()
        groups = torch.cat([torch.full((a.shape[0],), i) for i, a in enumerate(acts)])
        p = train_probe(x, y, groups=groups, l2=l2, seed=seed)
        return {"w": p.w, "b": torch.tensor([p.b]), "acc": torch.tensor([p.train_accuracy, p.test_accuracy])}

    t = cached(cache, fingerprint(key, texts, l2, seed), fit) if cache is not None else fit()
    return Probe(t["w"], float(t["b"][0]), float(t["acc"][0]), float(t["acc"][1]))


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able inputs (prompts, model id, layer, settings)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(path: Path, key: str, compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Load ``path`` if it holds tensors for ``key`` that this user's sieve wrote (an HMAC under the
    user's key, :func:`sieve.files.local_mac`: a cache shipped in a shared output folder is computed
    again, not trusted); otherwise compute, save (safetensors) and return.

    Example:
        >>> t = cached(tmp / "caa.safetensors", fingerprint(prompts, 3), lambda: {"v": v})  # doctest: +SKIP
    """
    if path.is_file():  # not a FIFO or a folder shipped under its name
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            log.info("%s is not a readable cache (%s): computed again", path, first_line(e))
            meta = {}
        if meta.get("key") == key:
            t = load_file(str(path))
            mac = local_mac(key.encode(), _tensor_bytes(t))
            if mac is not None and hmac.compare_digest(meta.get("mac", ""), mac):
                return t
            log.info("%s was not written by this user's sieve (or by an older version): computed again", path)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": key}
    mac = local_mac(key.encode(), _tensor_bytes(out))
    if mac is not None:
        meta["mac"] = mac
    write_atomic(path, lambda p: save_file({k: v.contiguous() for k, v in out.items()}, str(p), metadata=meta))
    return out


def _tensor_bytes(t: dict[str, Tensor]) -> bytes:
    """The names, dtypes, shapes and raw bytes of a dict of tensors, in name order."""
    h = hashlib.sha256()
    for name in sorted(t):
        v = t[name].detach().cpu().contiguous()
        h.update(f"{name}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()
