"""A KV cache that grows in place: :func:`growing_cache`.

HF's :class:`~transformers.DynamicCache` concatenates each decode step's keys and values onto the whole
cache, copying all of it at every step: with the embedded world on a CPU at batch 64 (one thread, 56
new tokens after 172-token prompts), ``aten::cat`` was 28% of plain ``generate``'s profiled time
(``bench/profile_chunk.py --plain-profile``). Its
full-attention layers here write into buffers with room kept ahead and hand out views of the filled
part: the same keys and values, the same attention, no copy. Imported only where generation runs
(importing transformers is slow).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sieve.models import underlying

__all__ = ["GrowingLayer", "growing_cache"]


class GrowingLayer(DynamicLayer):
    """A :class:`~transformers.cache_utils.DynamicLayer` that keeps its keys and values in buffers with
    ``extra`` positions of room past each reallocation; ``keys`` and ``values`` are views of the filled
    part. Anything that replaces them (a crop, a batch selection, a reorder) makes the next update copy
    into fresh buffers, so every :class:`DynamicLayer` method stays right.

    Example:
        >>> import torch
        >>> layer = GrowingLayer(extra=4)
        >>> k = torch.ones(1, 2, 3, 8)
        >>> layer.update(k, k)[0].shape, layer.update(k[:, :, :1], k[:, :, :1])[0].shape
        (torch.Size([1, 2, 3, 8]), torch.Size([1, 2, 4, 8]))
    """

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = int(extra)
        self._buf: tuple[Tensor, Tensor] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        m = n + key_states.shape[-2]
        buf = self._buf
        # The buffers still hold the cache, for the same rows, with room for these positions?
        ours = (self._views_buffers(n) and buf is not None
                and self.keys.shape[:2] == buf[0].shape[:2] == key_states.shape[:2] and m <= buf[0].shape[-2])
        if not ours:
            kshape = (*key_states.shape[:2], m + self.extra, key_states.shape[-1])
            vshape = (*value_states.shape[:2], m + self.extra, value_states.shape[-1])
            buf = (key_states.new_empty(kshape), value_states.new_empty(vshape))
            if n:
                buf[0][..., :n, :] = self.keys
                buf[1][..., :n, :] = self.values
            self._buf = buf
        assert buf is not None
        buf[0][..., n:m, :] = key_states
        buf[1][..., n:m, :] = value_states
        self.keys, self.values = buf[0][..., :m, :], buf[1][..., :m, :]
        return self.keys, self.values

    def _views_buffers(self, n: int) -> bool:
        """Whether ``keys`` and ``values`` (``n`` positions) are still exactly the views of the buffers
        handed out last (not a copy, a slice or a strided selection of them)."""
        buf = self._buf
        return (buf is not None and self.keys is not None and self.values is not None and n > 0
                and self.keys.data_ptr() == buf[0].data_ptr() and self.keys.stride() == buf[0].stride()
                and self.values.data_ptr() == buf[1].data_ptr() and self.values.stride() == buf[1].stride())

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows ``indices`` (a subset, each once: rows that have ended leaving a batch) in place,
        in the buffers' first rows, room ahead kept: only the rows whose place changes are copied (the
        fewest when the rows that stay fill the holes from the end: :class:`sieve.generation._DropEnded`).
        Anything else (repeats: a shared prefix given to many rows) as :class:`DynamicLayer` does."""
        buf, n = self._buf, self.get_seq_length()
        idx = indices.to(self.keys.device) if self.keys is not None else indices
        if not self._views_buffers(n) or idx.numel() > self.keys.shape[0] or idx.unique().numel() != idx.numel():
            super().batch_select_indices(indices)
            return
        assert buf is not None
        r = idx.numel()
        moved = (idx != torch.arange(r, device=idx.device)).nonzero().flatten()
        if moved.numel():
            src = idx[moved]
            keys, values = buf[0][src, :, :n], buf[1][src, :, :n]  # copies: the writes cannot overlap them
            buf[0][moved, :, :n] = keys
            buf[1][moved, :, :n] = values
        self._buf = buf = (buf[0][:r], buf[1][:r])
        self.keys, self.values = buf[0][..., :n, :], buf[1][..., :n, :]

    def reset(self) -> None:
        self._buf = None
        super().reset()

    def offload(self) -> None:
        self._buf = None  # the views move; keeping the buffers would keep the device memory
        super().offload()


def growing_cache(model: Any, extra: int) -> DynamicCache | None:
    """An empty :class:`~transformers.DynamicCache` for ``model`` whose full-attention layers are
    :class:`GrowingLayer` (room for ``extra`` positions past the first write: the decode steps to come);
    sliding-window layers stay as HF makes them. None for a model whose layers need another kind of
    cache (recurrent or linear-attention states): HF then makes its own. The caller passes it to
    ``generate`` with the generation config's ``cache_implementation`` cleared (HF refuses both).

    Example:
        >>> from sieve.world import load_world
        >>> cache = growing_cache(load_world().model, extra=56)
        >>> type(cache.layers[0]).__name__
        'GrowingLayer'
    """
    hf = underlying(model)
    try:
        cache = DynamicCache(config=hf.config)
    except Exception:  # pragma: no cover - a config the cache cannot read: HF makes its own
        return None
    if not cache.layers or not all(isinstance(layer, DynamicLayer) for layer in cache.layers):
        return None
    cache.layers = [GrowingLayer(extra) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
