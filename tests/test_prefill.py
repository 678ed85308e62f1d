"""The generation engine's savings change no completion: a prompt's prefill shared by the rows that read
it the same way, and the KV cache that grows in place (sieve.kvcache), against HF's own cache with every
row's prefill its own. Token for token, with counts and positions, for every registered method (gated,
always, lexical), a composed row, greedy and sampled, healing on and off, stop strings and EOS."""

from __future__ import annotations

import pytest
import torch

from sieve.errors import SieveError
from sieve.generation import generate
from sieve.interventions import Detector, Edit, Fires, Intervention, Steerer
from sieve.methods import EXTRA_METHODS, LEXICAL_METHODS, METHODS, STUDY_METHODS, build
from tests.test_fork import FIELDS, _composed, _parts, _prompts, _value

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINES = {"shared+grow": dict(share_prefill=True, kv_cache="grow"),
           "shared+hf": dict(share_prefill=True, kv_cache="hf"),
           "own+grow": dict(share_prefill=False, kv_cache="grow")}
BEFORE = dict(share_prefill=False, kv_cache="hf", drop_ended=False)


@pytest.fixture(scope="module")
def world():
    from sieve.world import load_world

    return load_world()


@pytest.fixture
def shared_batches(monkeypatch):
    """Per generation batch that shared its prefill: (rows, distinct prefills)."""
    import sieve.generation as g

    seen: list[tuple[int, int]] = []
    real = g._shared_prefix

    def spy(model, enc, rows, token_ids, *args):
        out = real(model, enc, rows, token_ids, *args)
        if out is not None:
            seen.append((len(rows), len({g._row_key(i, r) for i, r in zip(token_ids, rows)})))
        return out

    monkeypatch.setattr(g, "_shared_prefix", spy)
    return seen


def _differ(a, b) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if any(getattr(x, f) != getattr(y, f) for f in FIELDS)]


def _rows(world, prompts, ivs, samples):
    rows = [(p, iv, 1000 * i + s) for iv in ivs for i, p in enumerate(prompts) for s in range(samples)]
    return [p for p, _, _ in rows], [iv for _, iv, _ in rows], [s for _, _, s in rows]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_and_growing_cache_change_no_completion(world, temperature, shared_batches):
    parts = _parts(world)
    methods = list(dict.fromkeys(m.name for m in (*STUDY_METHODS, *EXTRA_METHODS, *METHODS.values(), *LEXICAL_METHODS)))
    ivs = [None] + [build(METHODS[n], parts, _value(METHODS[n])) for n in methods] + [_composed(world, parts)]
    prompts = _prompts("intent_regex", 3) + _prompts("neutral", 2) + ["def parse_header(line):\n    "]
    samples = 3 if temperature else 2  # greedy samples of one prompt are the same row: shared all the same
    texts, rows, seeds = _rows(world, prompts, ivs, samples)
    kw = dict(max_new_tokens=20, temperature=temperature, seeds=seeds, stop=["return"], progress=False, batch_size=32)
    before = generate(world.model, texts, rows, **BEFORE, **kw)
    assert shared_batches == []
    for name, engine in ENGINES.items():
        after = generate(world.model, texts, rows, **engine, **kw)
        # The growing cache is exact, and so is every greedy row. A shared prefill computes the prompt's
        # last position over the cache (logits ~1e-6 apart), so a sampled near-tie may flip: at most one
        # row in 50 (none on these rows today; a real fault, such as a lost latch or count, moves many).
        allowed = 0 if name == "own+grow" or not temperature else len(rows) // 50
        assert len(_differ(before, after)) <= allowed, (name, _differ(before, after))
    # the prefill really was shared: batches of 32 rows read far fewer distinct prompts
    assert shared_batches and all(u < b for b, u in shared_batches)
    assert sum(b for b, _ in shared_batches) >= 2 * sum(u for _, u in shared_batches)
    # and every kind of row was there: edited in the prompt, in generation, never; ending at EOS and at "return"
    assert any(o.counts.get("prompt_edited") for o in before) and any(o.counts.get("gen_edited") for o in before)
    assert any(r is not None and not o.counts.get("prompt_edited") and not o.counts.get("gen_edited")
               for r, o in zip(rows, before))
    if temperature:
        assert any(o.finished and o.text.endswith("return") for o in before)
        assert any(o.finished and not o.text.endswith("return") for o in before)


def test_rows_whose_prompt_gate_opened_share_one_intervention():
    """The lexical rows of one cell whose gate opens get one intervention object, so their prefill is
    shared like any cell's (rows are grouped by the objects they carry)."""
    from sieve.interventions import resolve_prompt_gates
    from sieve.prompt_gates import LEXICAL_REGEX

    iv = Intervention("always", Edit("add", torch.ones(2), -1.0), meta={"prompt_gate": LEXICAL_REGEX})
    other = Intervention("always", Edit("add", torch.ones(2), -2.0), meta={"prompt_gate": LEXICAL_REGEX})
    rows, opened = resolve_prompt_gates([(iv,), (iv,), (other,), (iv,)],
                                        ["def match(s):", "def match(s):", "def match(s):", "def mean(xs):"])
    assert opened == [True, True, True, False] and rows[0][0] is rows[1][0] and rows[2][0] is not rows[0][0]
    assert rows[3] == () and "prompt_gate" not in rows[0][0].meta


def test_without_healing_and_with_mixed_prompt_lengths(world, shared_batches):
    parts = _parts(world)
    ivs = [None, build("conditional_per_input", parts, -8.0), build("constant_sae", parts, -4.0), _composed(world, parts)]
    prompts = _prompts("intent_regex", 4, 200) + ["x"]  # a one-token prompt among long ones: padding
    texts, rows, seeds = _rows(world, prompts, ivs, 2)
    kw = dict(max_new_tokens=12, temperature=0.8, seeds=seeds, progress=False, token_healing=False, batch_size=40)
    before = generate(world.model, texts, rows, **BEFORE, **kw)
    after = generate(world.model, texts, rows, **kw)
    assert _differ(before, after) == [] and shared_batches


def test_forked_generation_with_the_engine_equals_the_sweep_as_it_was(world):
    from sieve.fork import generate_forked

    parts = _parts(world)
    ivs = [None, build("conditional_per_input", parts, -8.0), build("conditional_per_token", parts, -8.0),
           build("constant_steering_vector", parts, -8.0)]
    texts, rows, seeds = _rows(world, _prompts("intent_regex", 3), ivs, 4)
    kw = dict(max_new_tokens=16, temperature=1.0, seeds=seeds, progress=False)
    before = generate(world.model, texts, rows, **BEFORE, **kw)
    forked, summary = generate_forked(world.model, texts, rows, **kw)
    assert _differ(before, forked) == [] and summary.reused and summary.full_always


def lockstep(ours, theirs, value_dim: int):
    """``step(n, batch)``: the same ``n`` new random positions for ``batch`` rows into both cache
    layers; both must hand out equal keys and values."""
    g = torch.Generator().manual_seed(0)

    def step(n: int, batch: int) -> None:
        k, v = torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, value_dim, generator=g)
        a, b = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    return step


def test_growing_layer_matches_hf_dynamic_layer_through_selects_and_crops():
    from transformers.cache_utils import DynamicLayer

    from sieve.kvcache import GrowingLayer

    ours, theirs = GrowingLayer(extra=3), DynamicLayer()
    step = lockstep(ours, theirs, 5)

    step(5, 3)
    for _ in range(6):  # past the room kept ahead: reallocated, still equal
        step(1, 3)
    for layer in (ours, theirs):
        layer.batch_select_indices(torch.tensor([2, 2, 0, 1]))
    step(1, 4)
    for layer in (ours, theirs):
        layer.crop(-2)
    step(2, 4)
    assert ours.get_seq_length() == theirs.get_seq_length() == 12
    for layer in (ours, theirs):  # a strided view of the buffer (same first address): must not be written into
        layer.keys, layer.values = layer.keys[::2], layer.values[::2]
    step(1, 2)
    ours.reset()
    assert ours.get_seq_length() == 0 and ours._buf is None
    step_fresh = torch.ones(1, 2, 2, 4)
    assert torch.equal(ours.update(step_fresh, step_fresh)[0], step_fresh)


def _split_vs_whole(iv, h: torch.Tensor, enc: dict[str, torch.Tensor], cut: int):
    whole = Steerer([iv] * h.shape[0], enc, layer=0)
    out_whole = whole(h.clone())
    prefix = {k: v[:1] for k, v in enc.items()}  # one distinct row, read once
    part = Steerer([iv], prefix, layer=0, split_prompt=True)
    first = part(h[:1, :cut].clone())
    rest_steer = part.take([0] * h.shape[0], enc)
    rest = rest_steer(h[:, cut:].clone())
    out_split = torch.cat([first.expand(h.shape[0], -1, -1), rest], 1)
    return whole, out_whole, rest_steer, out_split


@pytest.mark.parametrize("gate", ["token", "input"])
def test_a_prompt_read_in_two_parts_steers_and_counts_as_in_one(gate):
    """The Steerer's side of a shared prefill: the prefix read once, each row's state copied, the rest
    read per row; edits, latches, counts, positions and prompt marks as if read in one forward."""
    g = torch.Generator().manual_seed(1)
    d = torch.zeros(4)
    d[0] = 1.0
    iv = Intervention(gate, Edit("add", d, -1.0), Detector(d), threshold=0.5)
    h = torch.randn(1, 7, 4, generator=g).expand(3, -1, -1).clone()
    h[:, 2, 0] = 2.0  # fires at prompt position 2 (an input gate latches from there)
    enc = {"input_ids": torch.tensor([[7, 8, 9, 10, 11, 12, 13]] * 3), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    for cut in (1, 3, 6):
        whole, out_whole, split, out_split = _split_vs_whole(iv, h, enc, cut)
        assert torch.equal(out_whole, out_split), cut
        assert whole.counts() == split.counts() and whole.positions() == split.positions()
        assert all(torch.equal(a, b) for a, b in zip(whole.prefill_marks(), split.prefill_marks()))
        step = torch.zeros(3, 1, 4)  # a decode step: the latch carries over (input), a token gate does not fire
        assert torch.equal(whole(step.clone()), split(step.clone()))
        assert whole.counts() == split.counts()


def test_take_carries_any_rows_and_refuses_after_the_prompt():
    d = torch.tensor([1.0, 0.0])
    a = Intervention("token", Edit("add", d, -1.0), Detector(d), threshold=0.5)
    b = Intervention("input", Edit("add", d, -1.0), Detector(d), threshold=0.5)
    composed = [a, Intervention(Fires(Detector(d), 0.5).latch() & ~Fires(Detector(-d), 0.0), Edit("add", d, -2.0))]
    enc = {"input_ids": torch.tensor([[1, 2, 3]] * 3), "attention_mask": torch.ones(3, 3, dtype=torch.long)}
    two = {k: v[:2] for k, v in enc.items()}
    h = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]]).expand(3, -1, -1)
    s = Steerer([a, b, composed], enc, layer=0, split_prompt=True)
    s(h[:, :2].clone())
    part = s.take([1, 1], two)  # only the latched row: a smaller [J, N] layout than the composed row's
    whole = Steerer([b, b], two, layer=0)
    assert torch.equal(part(h[:2, 2:].clone()), whole(h[:2].clone())[:, 2:])
    step = torch.zeros(2, 1, 2)
    out = part(step.clone())
    assert torch.equal(out, whole(step.clone())) and torch.equal(out, step + d * -1.0)  # the latch carried
    assert part.counts() == whole.counts() == {"prompt_fired": [1, 1], "gen_fired": [0, 0],
                                               "prompt_edited": [2, 2], "gen_edited": [1, 1]}
    with pytest.raises(SieveError, match="first forward is"):
        Steerer([a, b], two, layer=0)(torch.zeros(2, 2, 2))  # without split_prompt: the whole prompt at once
    done = Steerer([a, a], two, layer=0, split_prompt=True)
    done(torch.zeros(2, 3, 2))
    done(torch.zeros(2, 1, 2))  # a decode step
    with pytest.raises(SieveError, match="only between prompt forwards"):
        done.take([0, 1], two)


def test_bad_kv_cache_name_is_refused(world):
    with pytest.raises(SieveError, match="kv_cache must be"):
        generate(world.model, ["def f():\n"], max_new_tokens=2, kv_cache="static", progress=False)
