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
    # Clamped to [lo, hi].
    assert rows_that_fit(c, 600, 2, 1) == 16
    assert rows_that_fit(c, 600, 2, 10**15) == 1024


def test_rows_that_fit_reads_gpt2_names_and_gives_up_without_a_shape():
    g = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)  # n_inner None: 4 x n_embd
    per_row = 12 * 2 * 12 * 64 * 100 * 4 + 100 * (4 * 768 + 2 * 3072) * 4 + 12 * 100 * 100 * 4 + 2 * 50257 * 4
    assert rows_that_fit(g, 100, 4, 50 * per_row, lo=1) == 50
    assert rows_that_fit(types.SimpleNamespace(), 100, 2, 10**12) is None


class _FakeCuda:
    """A model as default_batch_size sees it: a config and a parameter on CUDA (no GPU needed)."""

    def __init__(self, config, device: str = "cuda"):
        self.config = config
        self._p = types.SimpleNamespace(device=torch.device(device), element_size=lambda: 2)

    def parameters(self):
        return iter([self._p])


def test_default_batch_size_on_cuda_fits_half_the_free_memory(monkeypatch):
    free = 40 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * 2**30))
    m = _FakeCuda(_llama8b())
    assert default_batch_size(m, positions=600) == rows_that_fit(m.config, 600, 2, free // 2) == 119
    assert default_batch_size(m) == 128  # no length known: the fixed default
    assert default_batch_size("cuda") == 128
    # A config without a shape: the fixed default.
    assert default_batch_size(_FakeCuda(types.SimpleNamespace()), positions=600) == 128
    # On a CPU: 32 whatever the memory.
    assert default_batch_size(_FakeCuda(_llama8b(), "cpu"), positions=600) == 32


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
    assert 1 in calls  # the shared prefix pass
    assert [o.token_ids for o in shared] == [o.token_ids for o in base]
    assert [o.counts for o in shared] == [o.counts for o in base]
    calls.clear()
    forked, _ = generate_forked(world.model, prompts, [iv] * len(prompts), max_new_tokens=6, progress=False, seeds=0,
                                temperature=1.0)
    assert 1 in calls
    assert [o.token_ids for o in forked] == [o.token_ids for o in base]


@pytest.fixture(scope="module")
def world():
    from sieve.world import load_world

    return load_world()


def test_last_position_logits_match_the_full_forward(world):
    """``last_only`` asks the model for the last position's logits alone: the same numbers as the full
    forward's last column (up to the LM head's float sums over a different shape)."""
    from sieve.generation import steered_logits

    texts = ["def f(x):\n    return x", "import re\n\npattern = re.compile(", "x ="]
    (_, _, last), = steered_logits(world.model, texts, last_only=True)
    (_, _, full), = steered_logits(world.model, texts)
    assert last.shape == (3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)
