"""Batch sizes when none is given (memory-aware on CUDA), and prefix passes that skip the LM head."""

from __future__ import annotations

import functools
import types

import pytest
import torch
from transformers import GPT2Config, LlamaConfig

from sieve import generation
from sieve.generation import default_batch_size, generate, rows_that_fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _llama8b() -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256)


def test_rows_that_fit_counts_kv_prefill_and_logits():
    c = _llama8b()
    kv = 32 * 2 * 8 * 128 * 600 * 2  # layers x (k, v) x kv heads x head dim x positions x bf16
    prefill = 600 * (4 * 4096 + 2 * 14336) * 2 + 32 * 600 * 600 * 4
    per_row = kv + prefill + 2 * 128256 * 4
    budget = 200 * per_row + per_row // 2
    assert rows_that_fit(c, 600, 2, budget) == 200
    # More positions, fewer rows; float32 halves them again (about: the scores are float32 either way).
    assert rows_that_fit(c, 1200, 2, budget) < 100
    assert rows_that_fit(c, 600, 4, budget) < 120
    # Clamped to [lo, hi]: at least one row (a row too long for memory fails as it would alone).
    assert rows_that_fit(c, 600, 2, 1) == 1
    assert rows_that_fit(c, 600, 2, 1, lo=16) == 16
    assert rows_that_fit(c, 600, 2, 10**15) == 1024


def test_rows_that_fit_reads_gpt2_names_and_gives_up_without_a_shape():
    g = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)  # n_inner None: 4 x n_embd
    per_row = 12 * 2 * 12 * 64 * 100 * 4 + 100 * (4 * 768 + 2 * 3072) * 4 + 12 * 100 * 100 * 4 + 2 * 50257 * 4
    assert rows_that_fit(g, 100, 4, 50 * per_row) == 50
    assert rows_that_fit(types.SimpleNamespace(), 100, 2, 10**12) is None


class _FakeCuda:
    """A model as default_batch_size sees it: a config, a dtype and a parameter on CUDA (no GPU needed)."""

    def __init__(self, config, device: str = "cuda", device_map: dict | None = None):
        self.config = config
        self.dtype = torch.bfloat16
        self._p = types.SimpleNamespace(device=torch.device(device), element_size=lambda: 2)
        if device_map is not None:
            self.hf_device_map = device_map

    def parameters(self):
        return iter([self._p])


@pytest.fixture
def gpus(monkeypatch):
    """Two fake GPUs: free bytes per device index, and what torch's allocator holds unused on each."""
    state = {"free": {0: 40 * 2**30, 1: 40 * 2**30}, "reserved": {0: 0, 1: 0}, "allocated": {0: 0, 1: 0}}
    index = lambda d: torch.device(d).index or 0  # noqa: E731
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (state["free"][index(d)], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["reserved"][index(d)])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["allocated"][index(d)])
    return state


def test_default_batch_size_on_cuda_fits_half_the_free_memory(gpus):
    m = _FakeCuda(_llama8b())
    assert rows_that_fit(m.config, 600, 2, 20 * 2**30) == 119
    assert default_batch_size(m, positions=600) == 112  # 119 rows fit: multiples of 16
    # Memory torch's allocator holds but does not use counts as free.
    gpus["reserved"][0], gpus["allocated"][0] = 12 * 2**30, 2 * 2**30
    assert default_batch_size(m, positions=600) == rows_that_fit(m.config, 600, 2, 25 * 2**30) // 16 * 16 == 144
    gpus["reserved"][0] = gpus["allocated"][0] = 0
    # A model over two GPUs: the fuller one decides; layers on the CPU, disk or elsewhere do not count.
    gpus["free"][1] = 10 * 2**30
    split = _FakeCuda(_llama8b(), device_map={"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1,
                                              "model.layers.2": "disk", "model.norm": "meta", "lm_head": "cpu"})
    assert default_batch_size(split, positions=600) == rows_that_fit(split.config, 600, 2, 5 * 2**30) // 16 * 16 == 16
    # Too long to fit even 16: fewer rows, never more than fit (a single row too long fails as it would alone).
    gpus["free"][0] = 2**30
    assert default_batch_size(m, positions=600) == rows_that_fit(m.config, 600, 2, 2**29) == 2
    assert default_batch_size(m) == 128  # no length known: the fixed default
    assert default_batch_size("cuda") == 128
    # A config without a shape, or with several text configs: the fixed default.
    assert default_batch_size(_FakeCuda(types.SimpleNamespace()), positions=600) == 128

    class Several:
        def get_text_config(self):
            raise ValueError("several text configs")

    assert default_batch_size(_FakeCuda(Several()), positions=600) == 128
    # On a CPU: 32 whatever the memory.
    assert default_batch_size(_FakeCuda(_llama8b(), "cpu"), positions=600) == 32


def test_out_of_memory_halves_the_default_batch_and_loses_no_row(monkeypatch, world):
    """A default batch too big for the device: halved until it fits, every row generated once, the
    same completions as batches that fit from the start."""
    real = generation._generate_batch
    sizes = []

    def tight(model, prompts, rows, token_ids, **k):
        sizes.append(len(prompts))
        if len(prompts) > 3:
            raise torch.cuda.OutOfMemoryError("fake: more than 3 rows")
        return real(model, prompts, rows, token_ids, **k)

    prompts = [f"def f{i}(x):\n    return x + {i}" for i in range(7)]
    want = generate(world.model, prompts, None, max_new_tokens=4, progress=False, batch_size=3)
    monkeypatch.setattr(generation, "_generate_batch", tight)
    monkeypatch.setattr(generation, "default_batch_size", lambda model, positions=None: 8)
    got = generate(world.model, prompts, None, max_new_tokens=4, progress=False)
    assert sizes[:2] == [7, 4] and max(sizes[2:]) == 2 and sum(sizes[2:]) == 7  # 8 -> 4 -> 2 rows a batch
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # A batch size the caller chose is the caller's: out of memory is raised, not halved.
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate(world.model, prompts, None, max_new_tokens=4, progress=False, batch_size=5)


def test_generate_asks_for_the_batch_size_with_its_longest_row(monkeypatch, world):
    seen = []
    real = generation.default_batch_size

    def spy(model, positions=None):
        seen.append(positions)
        return real(model, positions)

    monkeypatch.setattr(generation, "default_batch_size", spy)
    prompts = ["def f(x):\n    return", "import os\n\ndef parse_config(path):\n    with open(path) as f:\n"]
    generate(world.model, prompts, None, max_new_tokens=3, progress=False)
    longest = max(len(world.model.tokenizer(p)["input_ids"]) for p in prompts)
    assert seen and seen[0] is not None and longest + 3 <= seen[0] <= longest + 6


def test_prefix_passes_skip_the_lm_head_and_change_nothing(monkeypatch, world):
    """The shared prefill and the prompt-edit scan never read logits: the model is asked for the last
    position's only, and the completions equal those without sharing, bit for bit."""
    from sieve.fork import generate_forked
    from sieve.methods import METHODS, build
    from tests.test_fork import _parts, _prompts, _value

    hf = world.model._module
    calls = []
    real_forward = hf.forward

    @functools.wraps(real_forward)  # the same signature: sieve asks it whether logits_to_keep is taken
    def spy(*args, **kwargs):
        calls.append(kwargs.get("logits_to_keep"))
        return real_forward(*args, **kwargs)

    method = next(m for m in METHODS.values() if m.gate == "token")
    iv = build(method, _parts(world), _value(method))
    prompts = [p for p in _prompts("intent_regex", 2) + _prompts("neutral", 2) for _ in range(3)]
    base = generate(world.model, prompts, iv, max_new_tokens=6, progress=False, share_prefill=False, seeds=0,
                    temperature=1.0)
    monkeypatch.setattr(hf, "forward", spy)
    shared = generate(world.model, prompts, iv, max_new_tokens=6, progress=False, share_prefill=True, seeds=0,
                      temperature=1.0)
    # Every forward asks for the last position's logits alone: HF's own decoding did already; the
    # shared prefix pass now does too (it read [B, W - 1, V] logits before).
    assert calls and None not in calls
    assert [o.token_ids for o in shared] == [o.token_ids for o in base]
    assert [o.counts for o in shared] == [o.counts for o in base]
    calls.clear()
    forked, _ = generate_forked(world.model, prompts, [iv] * len(prompts), max_new_tokens=6, progress=False, seeds=0,
                                temperature=1.0)
    assert calls and None not in calls  # the prompt-edit scan too
    assert [o.token_ids for o in forked] == [o.token_ids for o in base]


@pytest.fixture(scope="module")
def world():
    from sieve.world import load_world

    return load_world()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_last_position_logits_match_the_full_forward(arch, tiny_models):
    """``last_only`` asks the model for the last position's logits alone (Gemma-2's final softcapping
    included): the same numbers as the full forward's last column, for the one steered forward and
    for the forked one (up to the LM head's float sums over a different shape)."""
    from sieve.fork import forked_forward
    from sieve.generation import steered_logits

    model = tiny_models[arch]
    texts = ["def f(x):\n    return x", "import re\n\npattern = re.compile(", "x ="]
    (_, _, last), = steered_logits(model, texts, last_only=True)
    (_, _, full), = steered_logits(model, texts)
    assert last.shape == (3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)
    take_last, _ = forked_forward(model, texts, [None], lambda enc, logits: list(logits), last_only=True)
    take_full, _ = forked_forward(model, texts, [None], lambda enc, logits: list(logits[:, -1]))
    for a, b in zip(take_last[0], take_full[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
