"""Rows that have ended leave their batch (sieve.generation._DropEnded): no completion changes. Token
for token, with counts and positions, for every registered method (gated, always, lexical), a composed
row, greedy and sampled, healing on and off, stop strings and EOS, forked rows and the recorded
trajectories they are decided on, HF's cache and the growing one, and the tiny Llama and Gemma-2
(grouped keys, sliding-window layers)."""

from __future__ import annotations

import pytest
import torch

import sieve.generation as g
from sieve.errors import SieveError
from sieve.generation import RowTracker, generate
from sieve.interventions import Detector, Edit, Intervention, Steerer
from sieve.methods import EXTRA_METHODS, LEXICAL_METHODS, METHODS, STUDY_METHODS, build
from tests.test_fork import _composed, _parts, _prompts, _value
from tests.test_prefill import _differ, _rows, lockstep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world():
    from sieve.world import load_world

    return load_world()


@pytest.fixture
def drops(monkeypatch):
    """Every _DropEnded made: after a generation, how often rows left and the row-steps computed."""
    made: list = []
    real = g._DropEnded.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(g._DropEnded, "__init__", spy)
    return made


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_leaving_the_batch_change_no_completion(world, temperature, drops):
    parts = _parts(world)
    methods = list(dict.fromkeys(m.name for m in (*STUDY_METHODS, *EXTRA_METHODS, *METHODS.values(), *LEXICAL_METHODS)))
    ivs = [None] + [build(METHODS[n], parts, _value(METHODS[n])) for n in methods] + [_composed(world, parts)]
    prompts = _prompts("intent_regex", 3) + _prompts("neutral", 2) + ["def parse_header(line):\n    "]
    texts, rows, seeds = _rows(world, prompts, ivs, 2)
    kw = dict(max_new_tokens=24, temperature=temperature, seeds=seeds, stop=["return"], progress=False, batch_size=48)
    kept = generate(world.model, texts, rows, drop_ended=False, **kw)
    assert drops == []
    for cache in ("grow", "hf"):
        dropped = generate(world.model, texts, rows, kv_cache=cache, **kw)
        assert _differ(kept, dropped) == [], cache
    # rows did leave, and the batches computed fewer row-steps than rows x steps
    assert sum(d.left for d in drops) >= 4
    ends = [len(o.token_ids) for o in kept]
    assert min(ends) < 24 and any(o.finished for o in kept)


@pytest.fixture
def reused(monkeypatch):
    """Per batch whose rows read their prefix from their trajectories: its rows."""
    seen: list[int] = []
    real = g._reused_prefix

    def spy(model, enc, rows, *a, **k):
        out = real(model, enc, rows, *a, **k)
        if out is not None:
            seen.append(len(rows))
        return out

    monkeypatch.setattr(g, "_reused_prefix", spy)
    return seen


def test_forked_rows_and_their_trajectories_with_rows_leaving(world, drops, reused):
    """Forked rows read their prefix's keys, values and layer outputs from the trajectory (no prefill
    of it): the same completions, counts and positions as generating every row in full."""
    from sieve.fork import generate_forked

    parts = _parts(world)
    ivs = [None, build("conditional_per_input", parts, -8.0), build("conditional_per_token", parts, -8.0),
           build("sae_code_clamping", parts, -3.0), build("constant_steering_vector", parts, -8.0)]
    texts, rows, seeds = _rows(world, _prompts("intent_regex", 3), ivs, 4)
    kw = dict(max_new_tokens=20, temperature=1.0, seeds=seeds, progress=False, stop=["\n\n"])
    full = generate(world.model, texts, rows, drop_ended=False, **kw)
    kept, s1 = generate_forked(world.model, texts, rows, drop_ended=False, **kw)
    dropped, s2 = generate_forked(world.model, texts, rows, **kw)
    assert _differ(kept, dropped) == [] and s1 == s2 and s2.forked and s2.reused
    assert _differ(full, dropped) == []
    assert sum(d.left for d in drops) >= 1
    assert sum(reused) == s1.forked + s2.forked  # every forked row read its prefix from its trajectory
    reused.clear()
    again, s3 = generate_forked(world.model, texts, rows, share_prefill=False, **kw)  # the engine off: re-read
    assert reused == [] and _differ(full, again) == []


def test_forked_rows_reuse_only_full_attention_caches(tiny_models, world, reused):
    """Sliding-window layers (Gemma-2) keep only the last positions: there the prefix is read again."""
    from sieve.fork import generate_forked
    from sieve.models import hidden_size

    assert g.kv_reusable(world.model) and g.kv_reusable(tiny_models["llama"])
    assert not g.kv_reusable(tiny_models["gemma2"])
    for arch in ("llama", "gemma2"):
        model = tiny_models[arch]
        D = hidden_size(model)
        d = torch.randn(D, generator=torch.Generator().manual_seed(5))
        d = d / d.norm()
        texts = ["import re\n\ndef parse(s):\n", "def add(a, b):\n    return"] * 6
        kw = dict(max_new_tokens=24, temperature=1.0, seeds=[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], progress=False)
        forked = []  # thresholds across the detector's scores on unsteered text: rows fork at some of them
        from sieve.detectors import token_activations

        plain = generate(model, texts, None, **kw)
        acts = torch.cat(token_activations(model, [p + o.text for p, o in zip(texts, plain)], 1, progress=False))
        for t in torch.quantile(acts @ d, torch.tensor([0.9, 0.97, 0.995])).tolist():
            iv = Intervention("token", Edit("add", d, -6.0), Detector(d), threshold=t, layers=1)
            outs, summary = generate_forked(model, texts, [None, iv] * 6, **kw)
            forked.append(summary.forked)
            full = generate(model, texts, [None, iv] * 6, share_prefill=False, drop_ended=False, **kw)
            assert _differ(full, outs) == [], (arch, t)
        assert any(forked), arch
        assert (sum(reused) > 0) == (arch == "llama"), arch
        reused.clear()


def test_without_healing_and_mixed_prompt_lengths(world, drops):
    parts = _parts(world)
    ivs = [None, build("conditional_per_input", parts, -8.0), build("constant_sae", parts, -4.0)]
    prompts = _prompts("intent_regex", 4, 200) + ["x"]
    texts, rows, seeds = _rows(world, prompts, ivs, 3)
    kw = dict(max_new_tokens=16, temperature=0.8, seeds=seeds, progress=False, token_healing=False, batch_size=20,
              stop=["\n"])
    assert _differ(generate(world.model, texts, rows, drop_ended=False, **kw), generate(world.model, texts, rows, **kw)) == []
    assert sum(d.left for d in drops) >= 1


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_other_architectures(tiny_models, arch, drops):
    """Grouped keys (Llama) and sliding-window cache layers (Gemma-2: HF's own, selected by HF)."""
    model = tiny_models[arch]
    from sieve.models import hidden_size

    D = hidden_size(model)
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(D, generator=gen)
    iv = Intervention("token", Edit("add", d / d.norm(), -4.0), Detector(d / d.norm()), threshold=0.0, layers=1)
    texts = ["import re\n\ndef parse(s):\n", "def add(a, b):\n    return", "x = 1\n"] * 4
    kw = dict(max_new_tokens=40, temperature=1.0, seeds=list(range(12)), progress=False, stop=[")", "\n"])
    rows = [None, iv] * 6
    a = generate(model, texts, rows, drop_ended=False, **kw)
    b = generate(model, texts, rows, **kw)
    assert _differ(a, b) == []
    assert sum(x.left for x in drops) >= 1, [len(o.token_ids) for o in a]


def test_fill_holes_moves_the_fewest_rows():
    run = torch.tensor([True, False, False, True, True, False, True])
    keep = g._fill_holes(run)
    assert sorted(keep.tolist()) == [0, 3, 4, 6] and keep[0] == 0 and keep[3] == 3
    assert g._fill_holes(torch.tensor([False, False])).tolist() == []
    assert g._fill_holes(torch.tensor([True, True, False])).tolist() == [0, 1]


def test_growing_layer_keeps_rows_in_place_like_hf():
    from transformers.cache_utils import DynamicLayer

    from sieve.kvcache import GrowingLayer

    ours, theirs = GrowingLayer(extra=4), DynamicLayer()
    step = lockstep(ours, theirs, 3)

    step(5, 6)
    step(1, 6)
    buf = ours._buf[0]
    for layer in (ours, theirs):
        layer.batch_select_indices(torch.tensor([0, 5, 2, 4]))
    assert ours._buf[0].data_ptr() == buf.data_ptr()  # in place: no new buffer
    step(1, 4)
    step(1, 4)
    for layer in (ours, theirs):  # repeats (a shared prefix): the general path
        layer.batch_select_indices(torch.tensor([1, 1, 3]))
    step(1, 3)
    assert ours.get_seq_length() == theirs.get_seq_length() == 9


def test_steerer_and_tracker_keep_rows():
    d = torch.tensor([1.0, 0.0])
    iv = Intervention("input", Edit("add", d, -1.0), Detector(d), threshold=0.5)
    whole, part = Steerer([iv] * 3, layer=0), Steerer([iv] * 3, layer=0)
    prompt = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]])
    for s in (whole, part):
        s(prompt.clone())
    step = torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]], [[3.0, 0.0]]])
    out_whole = whole(step.clone(), torch.tensor([True, False, True]))  # row 1 has ended: not counted
    part.keep_rows(torch.tensor([2, 0]))
    out_part = part(step[[2, 0]].clone())
    assert torch.equal(out_part, out_whole[[2, 0]])  # row 0's latch carried, row 2's fresh firing edits
    assert part.counts() == whole.counts() and part.positions() == whole.positions()
    with pytest.raises(SieveError, match="distinct"):
        part.keep_rows(torch.tensor([1, 1]))
    with pytest.raises(SieveError, match="decode"):
        Steerer([iv], layer=0).keep_rows(torch.tensor([0]))

    tr = RowTracker(prompt_len=1, eos_token_ids=[0])
    tr(torch.tensor([[5, 0], [5, 7], [5, 8]]), None)
    assert tr.running.tolist() == [False, True, True]
    tr.keep_rows(torch.tensor([2, 1]))
    tr(torch.tensor([[5, 8, 0], [5, 7, 9]]), None)
    assert tr.completions() == [([], True), ([7, 9], False), ([8], True)]
    assert tr.keeps(1).tolist() == [False, True, False] and tr.keeps(1, present=True).tolist() == [False, True]


def test_rows_that_ended_leave_before_the_models_positions_run_out(tiny_tokenizer, tmp_path, drops):
    """Learned positions (GPT-2, here 40 of them): with rows leaving, batches are no longer split by
    budget, so a forked row whose budget is spent must leave before its next position passes the
    model's last, while rows with more budget go on."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sieve.fork import generate_forked
    from sieve.models import load_model

    tok = tiny_tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=40, vocab_size=len(tok),
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    texts = ["x = 1\ny = x + 2\nprint(y)\n"] * 8
    n = len(tok(texts[0])["input_ids"])
    new = 40 - n - 1  # the longest a row may run (a healed row one more)
    assert new >= 6, n
    d = torch.randn(32, generator=torch.Generator().manual_seed(1))
    d = d / d.norm()
    from sieve.detectors import token_activations

    plain = generate(model, texts, None, max_new_tokens=new, temperature=1.0, seeds=list(range(8)), progress=False)
    # above every prompt token's score (no edit in the prompt), inside the completions' scores (read alone)
    prompt_max = float((token_activations(model, texts[:1], 1, progress=False)[0] @ d).max())
    acts = torch.cat(token_activations(model, [o.text for o in plain if o.text], 1, progress=False))
    threshold = max(prompt_max + 1e-3, float(torch.quantile(acts @ d, 0.7)))
    iv = Intervention("token", Edit("add", d, -4.0), Detector(d), threshold=threshold, layers=1)
    # many full rows beside few forked ones: a forked row whose budget is spent late is not worth a
    # leave by itself, so only the position limit makes it leave
    always = [Intervention("always", Edit("add", d / (1 + k), -4.0), layers=1) for k in range(3)]
    rows = [None] * 8 + [iv] * 8 + [a for a in always for _ in range(8)]
    kw = dict(max_new_tokens=new, temperature=1.0, seeds=list(range(8)) * 5, progress=False)
    full = generate(model, texts * 5, rows, share_prefill=False, drop_ended=False, **kw)
    outs, summary = generate_forked(model, texts * 5, rows, share_prefill=False, **kw)
    assert summary.forked and _differ(full, outs) == []
    assert sum(d.forced for d in drops) >= 1


def test_a_cache_named_by_the_generation_config_keeps_every_row(tiny_models, drops):
    """A static cache cannot narrow its rows: rows stay in the batch (no crash, the same completions)."""
    model = tiny_models["llama"]
    hf = g.underlying(model)
    texts = ["import re\n\ndef parse(s):\n", "def add(a, b):\n    return", "x = 1\n"] * 2
    kw = dict(max_new_tokens=12, temperature=1.0, seeds=list(range(6)), progress=False, stop=["\n"])
    before = generate(model, texts, None, drop_ended=False, **kw)
    old = hf.generation_config.cache_implementation
    try:
        hf.generation_config.cache_implementation = "static"
        assert not g.drops_ended(model, True) and not g.kv_reusable(model)
        after = generate(model, texts, None, drop_ended=True, **kw)
    finally:
        hf.generation_config.cache_implementation = old
    assert [o.token_ids for o in before] == [o.token_ids for o in after] and drops == []
    assert g.drops_ended(model, None) and g.drops_ended(model, True) and not g.drops_ended(model, False)


def test_trajectory_rows_that_left_early_lend_their_prefix(world, monkeypatch, reused):
    """Keys and values of a trajectory row are copied when it leaves its batch (the batch's cache then
    forgets it): a forked row whose trajectory left early reads the right row's prefix."""
    from sieve.fork import generate_forked

    left: list[int] = []
    real = g._keep_kv

    def spy(record, cache, places, rows, pads):
        if places.numel() < rows.numel():  # a leave (at the end every row held is kept at once)
            left.extend(int(rows[p]) for p in places.tolist())
        return real(record, cache, places, rows, pads)

    monkeypatch.setattr(g, "_keep_kv", spy)
    import sieve.fork as fork

    lent: list[int] = []  # the trajectory rows forked rows read their prefix from
    real_prefix = fork._prefix_of

    def prefix_spy(record, t, *a):
        lent.append(t)
        return real_prefix(record, t, *a)

    monkeypatch.setattr(fork, "_prefix_of", prefix_spy)
    parts = _parts(world)
    ivs = [None, build("conditional_per_token", parts, -8.0), build("sae_code_clamping", parts, -3.0)]
    texts, rows, seeds = _rows(world, _prompts("intent_regex", 4), ivs, 6)
    kw = dict(max_new_tokens=40, temperature=1.0, seeds=seeds, progress=False, stop=["\n\n"])
    full = generate(world.model, texts, rows, share_prefill=False, drop_ended=False, **kw)
    outs, summary = generate_forked(world.model, texts, rows, cascade=False, **kw)  # exact: no cascade noise
    assert left and summary.forked and sum(reused) == summary.forked
    assert set(lent) & set(left)  # one trajectory batch: some forked rows read rows that had left it
    assert _differ(full, outs) == []
