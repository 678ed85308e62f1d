"""A KV cache that grows in place: :func:`growing_cache`.

HF's :class:`~transformers.DynamicCache` concatenates each decode step's keys and values onto the whole
cache, copying all of it at every step: with the embedded world on a CPU at batch 64 (one thread, 56
new tokens after 172-token prompts), ``aten::cat`` was 28% of plain ``generate``'s profiled time
(``bench/profile_chunk.py --plain-profile``). Its
full-attention layers here write into buffers with room kept ahead and hand out views of the filled
part: the same keys and values, the same attention, no copy. Imported only where generation runs
(importing transformers is slow).

Cascade attention (:class:`CascadeLayer`, :func:`cascade_attention`): where rows share a prompt prefix
(the samples of one prompt), the prefix's keys and values are kept once and, at every decode step, read
once for all its rows; each row's own positions are attended apart and the two parts merged by their
log-sum-exp. The same attention summed in another order (float noise); on the default run's first
chunk on a CPU, attention went from 36% to 23% of the profiled time (``bench/profile_chunk.py --cascade``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sieve.errors import SieveError
from sieve.models import underlying

__all__ = ["CascadeLayer", "GrowingLayer", "cascade_attention", "cascade_cache", "cascades", "growing_cache"]


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
        n = self._filled()
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

    def _filled(self) -> int:
        """The positions this layer's own buffers hold (:class:`CascadeLayer` adds a shared prefix)."""
        return DynamicLayer.get_seq_length(self)

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
        buf, n = self._buf, self._filled()
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


# --- cascade attention: a shared prompt prefix read once per group of rows --------------------------------

CASCADE = "sieve_cascade"
_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("sieve_cascade_cache", default=None)


class CascadeLayer(GrowingLayer):
    """A full-attention cache layer whose rows share prompt prefixes: ``prefix_keys``/``prefix_values``
    (``[U, H, P, D]``) hold each distinct prefix once, ``groups`` (``[B]``) names each row's, and the
    layer's own (growing) buffers hold only the positions after it, per row. :func:`cascade_attention`
    reads a prefix once for all its rows (the rows' queries stacked against its keys) and each row's own
    positions apart, and merges the two softmax parts: the attention of the whole row, summed in another
    order. ``keys``/``values`` are the own positions only; :meth:`row_kv` gives a row's whole.

    Example:
        >>> import torch
        >>> layer = CascadeLayer(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8), torch.tensor([0, 0, 0]), extra=4)
        >>> _ = layer.update(torch.ones(3, 2, 1, 8), torch.ones(3, 2, 1, 8))
        >>> layer.get_seq_length(), tuple(layer.keys.shape)
        (6, (3, 2, 1, 8))
    """

    def __init__(self, prefix_keys: Tensor, prefix_values: Tensor, groups: Tensor, extra: int) -> None:
        super().__init__(extra)
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self._blocks: tuple[Tensor, Tensor] | None = None
        self.packed = False  # set by blocks()
        self._use(groups.to(prefix_keys.device))

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self._filled()

    is_croppable = False  # a prefix shared by rows cannot be cut for one of them

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep rows ``indices`` (rows leaving a batch): their groups and their own positions; prefixes
        no row uses any more are let go (the others renumbered, copied once here, not at every step)."""
        self._use(self.groups[indices.to(self.groups.device)])
        if self.keys is not None and self.keys.numel():
            super().batch_select_indices(indices)

    def _use(self, groups: Tensor) -> None:
        """Rows now have prefixes ``groups``: prefixes no row uses are let go and the others renumbered
        0..S-1, so every prefix kept is read (by index, never gathered at a step)."""
        used = torch.unique(groups)
        if used.numel() < self.prefix_keys.shape[0]:
            self.prefix_keys, self.prefix_values = self.prefix_keys[used], self.prefix_values[used]
            groups = torch.searchsorted(used, groups)
        self.groups = groups
        self._blocks = None

    def row_kv(self, row: int, start: int = 0) -> tuple[Tensor, Tensor]:
        """Row ``row``'s keys and values over all its positions from ``start`` (prefix, then its own)."""
        g = int(self.groups[row])
        return (torch.cat([self.prefix_keys[g, :, start:], self.keys[row]], -2),
                torch.cat([self.prefix_values[g, :, start:], self.values[row]], -2))

    def blocks(self) -> tuple[Tensor, Tensor]:
        """(each prefix's rows ``[S, G]`` (padded with a row of the same prefix), and each row's place in
        that ``[S * G]`` layout ``[B]``), kept until rows leave."""
        if self._blocks is None:
            g = self.groups
            order = torch.argsort(g, stable=True)
            counts = torch.unique_consecutive(g[order], return_counts=True)[1]  # every prefix has rows: _use
            G = int(counts.max())
            starts = torch.cumsum(counts, 0) - counts
            within = torch.arange(g.numel(), device=g.device) - torch.repeat_interleave(starts, counts)
            which = torch.repeat_interleave(torch.arange(counts.numel(), device=g.device), counts)
            rows = order[starts].repeat_interleave(G).view(-1, G).clone()  # padding: the prefix's first row
            rows[which, within] = order
            place = torch.empty_like(g)
            place[order] = which * G + within
            self._blocks = (rows, place)
            self.packed = rows.numel() == g.numel() and bool((place == torch.arange(g.numel(), device=g.device)).all())
        return self._blocks

    def crop(self, max_length: int) -> None:  # pragma: no cover - sieve never crops a cascade
        raise NotImplementedError("a cascade cache layer cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:  # pragma: no cover - no beam search in sieve
        raise NotImplementedError("a cascade cache layer cannot repeat its rows")


def cascade_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """HF attention (the ``sieve_cascade`` implementation) for a :class:`CascadeLayer`: ``key``/``value``
    are the rows' own positions; the prefix is read from the active cascade cache
    (:func:`cascade_cache`), once per prefix for all its rows. The mask is :func:`sdpa_mask`'s over the
    whole (prefix + own) length. Any other layer is left to SDPA. Returns ``[B, q, H, D]`` as SDPA's.
    Both parts run on torch's CPU flash kernel where the model is on a CPU and no prefix is all padding,
    otherwise in plain torch in float32; the rows of a prefix are padded to its largest group (rows of
    one prompt that a batch boundary or leaving rows split cost some extra prefix work)."""
    cache = _ACTIVE.get()
    layer_idx = getattr(module, "layer_idx", None)
    layer = cache.layers[layer_idx] if cache is not None and layer_idx is not None else None
    if not isinstance(layer, CascadeLayer):
        if cache is not None and layer_idx is None:
            raise SieveError(f"cascade attention: {type(module).__name__} has no layer_idx")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None or "s_aux" in kwargs:
        raise SieveError("cascade attention does not support soft-capping, position bias or attention sinks")
    B, Hq, q, D = query.shape
    Hkv, T = key.shape[1], key.shape[-2]
    r = Hq // Hkv
    pk, pv = layer.prefix_keys, layer.prefix_values
    P = pk.shape[-2]
    scale = scaling if scaling is not None else D**-0.5
    rows, place = layer.blocks()
    S, G = rows.shape
    # Masks (True: attend): each row's own positions [B, 1, q, T]; each prefix's [S, 1, q, P] (the rows
    # of one prefix have the same ids and padding). None: nothing masked.
    own = pre = None
    if attention_mask is not None:
        own, pre = attention_mask[..., P:], attention_mask[rows[:, 0], :, :, :P]
        own = None if bool(own.all()) else own
        pre = None if bool(pre.all()) else pre
    elif q > 1:
        own = (torch.arange(T, device=key.device)[None] <= torch.arange(T - q, T, device=key.device)[:, None])[None, None]
    qs = query.reshape(B, Hkv, r * q, D)  # a key head's query heads (GQA) and positions, stacked
    packed = layer.packed  # rows already in prefix order, every prefix with G of them: no gathers
    qp = (qs if packed else qs[rows.flatten()]).view(S, G, Hkv, r * q, D).transpose(1, 2).reshape(S, Hkv, G * r * q, D)
    own_m = None if own is None else own[:, :, None].expand(own.shape[0], 1, r, q, T).reshape(-1, 1, r * q, T)
    pre_m = None if pre is None else pre[:, :, None, None].expand(S, 1, G, r, q, P).reshape(S, 1, G * r * q, P)
    fast = _FLASH_CPU is not None and query.device.type == "cpu" and (pre is None or bool(pre.any(-1).all()))
    part = _flash_part if fast else _math_part
    o_s, l_s = part(qs, key, value, own_m, scale)  # [B, Hkv, r*q, D], [B, Hkv, r*q]
    o_p, l_p = part(qp, pk, pv, pre_m, scale)  # [S, Hkv, G*r*q, D], [S, Hkv, G*r*q]
    o_p = o_p.reshape(S, Hkv, G, r * q, D).transpose(1, 2).reshape(S * G, Hkv, r * q, D)
    l_p = l_p.reshape(S, Hkv, G, r * q).transpose(1, 2).reshape(S * G, Hkv, r * q)
    if not packed:
        o_p, l_p = o_p[place], l_p[place]
    w = torch.sigmoid(l_p.float() - l_s.float())[..., None]  # the prefix's share of each row's softmax mass
    out = o_s.float() + (o_p.float() - o_s.float()) * w
    return out.to(query.dtype).view(B, Hq, q, D).transpose(1, 2).contiguous(), None


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_part(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` over ``k``/``v`` and its log-sum-exp, by torch's CPU flash kernel."""
    bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -torch.inf)
    out, lse = _FLASH_CPU(q, k, v, attn_mask=bias, scale=scale)[:2]
    return out, lse


def _math_part(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """:func:`_flash_part` in plain torch, in float32 whatever the inputs' dtype (any device; a row wholly
    masked has no mass: log-sum-exp -inf)."""
    sc = torch.matmul(q.float() * scale, k.float().transpose(-1, -2))
    if mask is not None:
        sc = sc.masked_fill(~mask, -torch.inf)
    m = sc.amax(-1, keepdim=True)
    m = m.masked_fill(m == -torch.inf, 0.0)
    e = torch.exp(sc - m)
    total = e.sum(-1, keepdim=True)
    out = torch.matmul(e, v.float()) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return out, (torch.log(total) + m).squeeze(-1)


AttentionInterface.register(CASCADE, cascade_attention)
AttentionMaskInterface.register(CASCADE, sdpa_mask)


def cascades(model: Any) -> bool:
    """Whether ``model``'s attention can run as :func:`cascade_attention`: its text config uses SDPA
    (whose masks and semantics the cascade keeps) with no attention-logit soft-capping. (Its cache must
    also have full-attention layers sieve builds: :func:`sieve.generation.cascades` asks both.)

    Example:
        >>> from sieve.world import load_world
        >>> cascades(load_world().model)
        True
    """
    hf = underlying(model)
    cfg = hf.config.get_text_config()
    return getattr(cfg, "_attn_implementation", None) == "sdpa" and not getattr(cfg, "attn_logit_softcapping", None)


def to_cascade(cache: DynamicCache, groups: Tensor, extra: int) -> None:
    """Turn a filled cache of distinct prefixes (``U`` rows) into a cascade over ``groups`` (``[B]``, each
    row's prefix): its :class:`GrowingLayer` layers become :class:`CascadeLayer` (the prefixes kept once),
    any other layer gets its rows repeated as HF would."""
    layers = []
    for layer in cache.layers:
        if type(layer) is GrowingLayer and isinstance(layer.keys, Tensor):
            layers.append(CascadeLayer(layer.keys.contiguous(), layer.values.contiguous(), groups, extra))
        else:
            if isinstance(getattr(layer, "keys", None), Tensor):
                layer.batch_select_indices(groups.to(layer.keys.device))
            layers.append(layer)
    cache.layers = layers


@contextlib.contextmanager
def cascade_cache(model: Any, cache: Any) -> Iterator[None]:
    """Inside: ``model``'s attention is :func:`cascade_attention` over ``cache`` (its text config's
    implementation switched, and restored after; the switch is the model's, so two cascade
    generations of one model must not run at once in two threads).

    Example:
        >>> from sieve.world import load_world
        >>> m = load_world().model
        >>> with cascade_cache(m, growing_cache(m, 4)):
        ...     underlying(m).config._attn_implementation
        'sieve_cascade'
    """
    cfg = underlying(model).config.get_text_config()
    old = cfg._attn_implementation_internal
    token = _ACTIVE.set(cache)
    cfg._attn_implementation_internal = CASCADE
    try:
        yield
    finally:
        cfg._attn_implementation_internal = old
        _ACTIVE.reset(token)
