"""Cascade attention (:mod:`sieve.kvcache`): the rows sharing a prompt read its keys and values once per
decode step. It must be the same attention as SDPA over each row's whole cache (up to float sums), for
every shape sieve meets: several prefixes of uneven sizes, left padding, grouped-query heads, several
query positions, rows that left the batch, a prefix that is all padding; and generation with it must
read the prefix once and give the same logits, steps and tokens."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import sieve.kvcache as kv
from sieve.kvcache import CascadeLayer, cascade_attention


def _case(Hq: int, Hkv: int, q: int, groups: list[int], pads: list[int], P: int = 9, T: int = 6, D: int = 16,
          seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, B = len(pads), len(groups)
    groups_t = torch.tensor(groups)
    pk, pv = torch.randn(U, Hkv, P, D, generator=g), torch.randn(U, Hkv, P, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    layer = CascadeLayer(pk, pv, groups_t, extra=3)
    layer.update(k[:, :, : T - q], v[:, :, : T - q])  # earlier steps
    own_k, own_v = layer.update(k[:, :, T - q :], v[:, :, T - q :])  # this forward's positions
    mask = torch.ones(B, 1, q, P + T, dtype=torch.bool)
    for b, u in enumerate(groups):
        mask[b, :, :, : pads[u]] = False  # left padding of the row's prompt
    mask &= torch.arange(P + T)[None] <= torch.arange(P + T - q, P + T)[:, None]  # causal
    query = torch.randn(B, Hq, q, D, generator=g)
    whole_k, whole_v = torch.cat([pk[groups_t], k], 2), torch.cat([pv[groups_t], v], 2)
    return layer, query, own_k, own_v, mask, whole_k, whole_v


def _attend(layer, query, own_k, own_v, mask):
    module = types.SimpleNamespace(layer_idx=0, is_causal=True)
    token = kv._ACTIVE.set(types.SimpleNamespace(layers=[layer]))
    try:
        return cascade_attention(module, query, own_k, own_v, mask, scaling=0.25)[0]
    finally:
        kv._ACTIVE.reset(token)


def _sdpa(query, k, v, mask):
    module = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=query.shape[1] // k.shape[1])
    return sdpa_attention_forward(module, query, k, v, mask, scaling=0.25)[0]


@pytest.mark.parametrize("path", ["flash", "math"])
@pytest.mark.parametrize("Hq,Hkv,q", [(4, 4, 1), (8, 2, 1), (4, 2, 3)])
def test_cascade_equals_sdpa_over_each_rows_whole_cache(Hq, Hkv, q, path, monkeypatch):
    if path == "math":
        monkeypatch.setattr(kv, "_FLASH_CPU", None)
    # three prefixes: rows interleaved, uneven groups (3, 2, 2), each prefix its own left padding
    groups, pads = [2, 0, 0, 1, 2, 2, 0], [0, 3, 5]
    layer, query, own_k, own_v, mask, whole_k, whole_v = _case(Hq, Hkv, q, groups, pads)
    want = _sdpa(query, whole_k, whole_v, mask)
    got = _attend(layer, query, own_k, own_v, mask)
    assert got.shape == want.shape == (len(groups), q, Hq, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # rows leave (and the rows from the end fill their places): the rest attend as before
    keep = torch.tensor([6, 1, 4, 3])
    layer.batch_select_indices(keep)
    got = _attend(layer, query[keep], layer.keys, layer.values, mask[keep])
    torch.testing.assert_close(got, want[keep], rtol=1e-5, atol=1e-5)
    # every row of a prefix leaves: the prefix is let go, the others renumbered
    then = torch.tensor([0, 2])
    layer.batch_select_indices(then)
    assert layer.prefix_keys.shape[0] == 2 and layer.groups.tolist() == [0, 1]
    got = _attend(layer, query[keep][then], layer.keys, layer.values, mask[keep][then])
    torch.testing.assert_close(got, want[keep][then], rtol=1e-5, atol=1e-5)
    # a row's whole keys and values, from a start position (a forked row reads them from its trajectory)
    k, v = layer.row_kv(1, start=5)
    torch.testing.assert_close(k, whole_k[4, :, 5:])
    torch.testing.assert_close(v, whole_v[4, :, 5:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["flash", "math"])
def test_cascade_in_half_precision_is_as_close_as_sdpa(dtype, path, monkeypatch):
    """In bf16/fp16 the cascade is no further from the float32 attention than SDPA in that dtype is
    (the plain-torch path, a GPU's, computes in float32)."""
    if path == "math":
        monkeypatch.setattr(kv, "_FLASH_CPU", None)
    elif dtype == torch.float16:
        pytest.skip("torch's CPU flash kernel takes float32 and bf16")
    groups, pads = [1, 0, 0, 1, 1], [0, 4]
    layer, query, own_k, own_v, mask, whole_k, whole_v = _case(8, 2, 1, groups, pads, P=40, T=12, D=32)
    exact = _sdpa(query, whole_k, whole_v, mask)
    half = CascadeLayer(layer.prefix_keys.to(dtype), layer.prefix_values.to(dtype), layer.groups, extra=1)
    half.update(own_k.to(dtype), own_v.to(dtype))
    got = _attend(half, query.to(dtype), half.keys, half.values, mask)
    assert got.dtype == dtype
    sdpa_err = (_sdpa(query.to(dtype), whole_k.to(dtype), whole_v.to(dtype), mask).float() - exact).abs().max()
    assert (got.float() - exact).abs().max() <= 1.5 * sdpa_err


def test_cascade_without_a_mask_and_with_packed_rows():
    """No mask (HF skips it where nothing is padded): the prefix is wholly read, the own positions
    causally; rows already in prefix order take no gathers and give the same attention."""
    groups = [0, 0, 0, 1, 1, 1]
    for q in (1, 2):
        layer, query, own_k, own_v, mask, whole_k, whole_v = _case(4, 4, q, groups, [0, 0])
        want = _sdpa(query, whole_k, whole_v, mask)
        got = _attend(layer, query, own_k, own_v, None)
        assert layer.packed and layer.prefix_keys.shape[0] == layer.groups.unique().numel()  # every prefix read
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prefixes_no_row_has_are_let_go():
    """A cascade made with a prefix no row has keeps only the used ones, renumbered, and attends as SDPA."""
    layer, query, own_k, own_v, mask, whole_k, whole_v = _case(4, 2, 1, [2, 2, 0], [0, 1, 3])
    assert layer.prefix_keys.shape[0] == 2 and layer.groups.tolist() == [1, 1, 0]
    torch.testing.assert_close(_attend(layer, query, own_k, own_v, mask), _sdpa(query, whole_k, whole_v, mask),
                               rtol=1e-5, atol=1e-5)


def test_a_prefix_that_is_all_padding_adds_nothing():
    """A one-token prompt beside longer ones: its prefix is all padding; its rows attend to their own
    positions alone (the kernel that cannot take a wholly masked row is not used for it)."""
    P = 9
    layer, query, own_k, own_v, mask, whole_k, whole_v = _case(4, 2, 1, [0, 1, 1], [0, P], P=P)
    want = _sdpa(query, whole_k, whole_v, mask)
    got = _attend(layer, query, own_k, own_v, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_layers_and_other_models_are_left_to_sdpa():
    """A layer that is not a cascade (a sliding-window layer keeps every row's keys) goes to SDPA; an
    attention module without a layer index under an active cascade is refused, not guessed."""
    layer, query, own_k, own_v, mask, whole_k, whole_v = _case(4, 4, 1, [0, 1], [0, 2])
    module = types.SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=1)
    token = kv._ACTIVE.set(types.SimpleNamespace(layers=[object()]))
    try:
        got = cascade_attention(module, query, whole_k, whole_v, mask, scaling=0.25)[0]
        torch.testing.assert_close(got, _sdpa(query, whole_k, whole_v, mask))
        with pytest.raises(Exception, match="layer_idx"):
            cascade_attention(types.SimpleNamespace(), query, whole_k, whole_v, mask)
    finally:
        kv._ACTIVE.reset(token)


def _steps(model, prompts, cascade: bool, monkeypatch, **kw):
    """generate's tokens, and per decode step the logits its rows read; the cascade layers' calls."""
    import sieve.generation as g

    seen: list[torch.Tensor] = []
    calls = {"cascade": 0}
    real_tracker, real_attention = g.RowTracker.__call__, kv.cascade_attention

    def tracker(self, input_ids, scores, **k):
        seen.append(scores.clone())
        return real_tracker(self, input_ids, scores, **k)

    def attention(module, *a, **k):
        if isinstance(kv._ACTIVE.get().layers[module.layer_idx], CascadeLayer):
            calls["cascade"] += 1
        return real_attention(module, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(g.RowTracker, "__call__", tracker)
        kv.AttentionInterface.register(kv.CASCADE, attention)
        try:
            outs = g.generate(model, prompts, progress=False, cascade=cascade, **kw)
        finally:
            kv.AttentionInterface.register(kv.CASCADE, real_attention)
    return outs, seen, calls["cascade"]


@pytest.mark.parametrize("which", ["world", "llama"])
def test_generation_with_the_cascade_reads_each_prompt_once_and_gives_the_same_logits(which, tiny_models,
                                                                                     monkeypatch):
    """Four prompts of different lengths, three samples each (greedy, so the samples agree): with the
    cascade, the prompt's keys are kept once per prompt (not per row), the cascade runs at every layer
    of every decode step, and every step's logits equal those of the plain attention over each row's
    own copy (float sums), so the tokens are the same."""
    from sieve.generation import cascades
    from sieve.models import underlying

    if which == "world":
        from sieve.world import load_world

        model = load_world().model
    else:
        model = tiny_models["llama"]
    assert cascades(model, None)  # on by default on a CPU
    prompts = [p for p in ["import re\n\ndef parse(s):\n", "def add(a, b):\n    return", "x =",
                           "class Point:\n    def __init__(self, x, y):\n        self.x"] for _ in range(3)]
    kw = dict(max_new_tokens=12, temperature=0.0, batch_size=16, token_healing=False)
    kept: list[int] = []
    real_to_cascade = kv.to_cascade

    def to_cascade(cache, groups, extra):
        real_to_cascade(cache, groups, extra)
        kept.append(next(x for x in cache.layers if isinstance(x, CascadeLayer)).prefix_keys.shape[0])

    monkeypatch.setattr(kv, "to_cascade", to_cascade)
    on, on_logits, n_on = _steps(model, prompts, True, monkeypatch, **kw)
    off, off_logits, n_off = _steps(model, prompts, False, monkeypatch, **kw)
    layers = underlying(model).config.num_hidden_layers
    assert kept == [4] and n_off == 0
    assert n_on == layers * max(len(o.token_ids) for o in on) > 0  # every layer, every forward after the prefix
    assert len(on_logits) == len(off_logits) >= 2
    for a, b in zip(on_logits, off_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]


def test_the_cascade_is_off_where_asked_or_where_attention_is_not_sdpa(tiny_models):
    """``cascade=False`` switches it off; a model on eager attention, or with soft-capped logits
    (Gemma-2), never takes it: its masks and semantics are SDPA's."""
    from sieve.generation import cascades
    from sieve.models import underlying

    llama = tiny_models["llama"]
    assert cascades(llama, None) and not cascades(llama, False)
    cfg = underlying(llama).config
    old = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        assert not cascades(llama, True)
    finally:
        cfg._attn_implementation = old
    gemma = tiny_models["gemma2"]
    assert not cascades(gemma, True)  # eager attention (its hub default)
    gcfg = underlying(gemma).config
    old = gcfg._attn_implementation
    gcfg._attn_implementation = "sdpa"
    try:
        assert gcfg.attn_logit_softcapping and not cascades(gemma, True)  # soft-capped logits
    finally:
        gcfg._attn_implementation = old


def test_forked_rows_read_their_prefix_from_a_cascade_trajectory(monkeypatch):
    """With the cascade, a trajectory's keys are a shared prefix plus each row's own: a forked row's kept
    prefix is put together from both (:meth:`CascadeLayer.row_kv`, rows that left the batch early
    included), and the forked sweep gives what it gives without the cascade (a temperature so low it picks
    the top token unless two are within float noise: none here; greedy rows of a prompt would share one
    trajectory, and the cascade needs trajectories that share a prompt)."""
    from sieve.fork import generate_forked
    from sieve.methods import build
    from sieve.world import load_world
    from tests.test_fork import _parts, _prompts
    from tests.test_prefill import _rows

    w = load_world()
    parts = _parts(w)
    ivs = [None, build("conditional_per_token", parts, -8.0), build("sae_code_clamping", parts, -3.0)]
    texts, rows, seeds = _rows(w, _prompts("intent_regex", 4), ivs, 3)
    kw = dict(max_new_tokens=32, temperature=1e-3, seeds=seeds, progress=False, stop=["\n\n"])
    calls = []
    real = CascadeLayer.row_kv

    def row_kv(self, row, start=0):
        calls.append(row)
        return real(self, row, start)

    monkeypatch.setattr(CascadeLayer, "row_kv", row_kv)
    on, s_on = generate_forked(w.model, texts, rows, cascade=True, **kw)
    off, s_off = generate_forked(w.model, texts, rows, cascade=False, **kw)
    assert s_on.forked > 0 and calls
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
