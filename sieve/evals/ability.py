"""Teacher-forced measures under an intervention: next-token log-probabilities (the loss is their mean).

One forward per batch (nnsight ``model.trace``), each row with its own intervention (or none), the
edit applied at the layer exactly as in generation. Used for the embedded world's general-ability
axis (held-out loss on regex-free code) and for the probability of ``re`` at real call sites (label
the positions with :func:`sieve.detectors.token_labels`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sieve.generation import steered_logits

__all__ = ["steered_logprobs", "token_logprobs"]


def steered_logprobs(
    model,
    texts: Sequence[str],
    interventions: Any,
    *,
    layer_index: int | None = None,
    batch_size: int = 16,
    progress: bool = False,
) -> list[Tensor]:
    """Per text, ``[T_i - 1]``: log P(token t+1 | tokens ≤ t) under that row's interventions.

    Token positions are those of ``tokenizer(text)`` (BOS included as position 0). The forward is
    :func:`sieve.generation.steered_logits`, the one generation uses.

    Example:
        >>> from sieve.world import load_world
        >>> w = load_world()
        >>> lp = steered_logprobs(w.model, ["def f(x):\\n    return x\\n"], None)
        >>> lp[0].shape[0] > 3 and bool((lp[0] <= 0).all())
        True
    """
    out: list[Tensor] = []
    for _, enc, logits in steered_logits(model, texts, interventions, layer_index=layer_index,
                                          batch_size=batch_size, progress=progress):
        out += token_logprobs(enc, logits)
    return out


def token_logprobs(enc: dict[str, Tensor], logits: Tensor) -> list[Tensor]:
    """Per row of a left-padded batch, ``[T_i - 1]``: log P(token t+1 | tokens ≤ t) from its logits
    ``[B, T, V]`` (padding dropped).

    Example:
        >>> enc = {"input_ids": torch.tensor([[0, 1, 2]]), "attention_mask": torch.tensor([[0, 1, 1]])}
        >>> token_logprobs(enc, torch.zeros(1, 3, 4))[0]
        tensor([-1.3863])
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    ids = enc["input_ids"]
    tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].cpu()
    mask = enc["attention_mask"].cpu()
    out = []
    for j in range(ids.shape[0]):
        n = int(mask[j].sum())
        out.append(tok_lp[j, -(n - 1):] if n > 1 else tok_lp[j, :0])
    return out
