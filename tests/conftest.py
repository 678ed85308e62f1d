"""Shared fixtures: tiny tokenizer and tiny GPT-2 / Llama / Gemma2 models built from configs (no download)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# the key of sieve's cache HMACs (sieve.files.local_mac): one per test session, not the user's own
if "SIEVE_SECRET_FILE" not in os.environ:
    import tempfile as _tempfile

    os.environ["SIEVE_SECRET_FILE"] = os.path.join(_tempfile.mkdtemp(prefix="sieve-secret-"), "secret")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ("gpt2", "llama", "gemma2")


def _texts() -> list[str]:
    from sieve.world.corpus import stdlib_root

    root = stdlib_root()
    names = ["json/decoder.py", "json/encoder.py", "string.py", "fnmatch.py", "glob.py", "textwrap.py"]
    return [(root / n).read_text() for n in names]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from sieve.world.train_lm import train_tokenizer

    return train_tokenizer(_texts(), 512, tmp_path_factory.mktemp("tok"))


def build_tiny(arch: str, tok, d: int = 64):
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed({"gpt2": 0, "llama": 1, "gemma2": 2}[arch])
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=3, n_head=4, n_positions=256, **common))
    elif arch == "llama":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, **common))
    else:
        m = Gemma2ForCausalLM(Gemma2Config(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=256, sliding_window=32, **common))
    return m.eval()


@pytest.fixture(scope="session")
def tiny_dirs(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        build_tiny(arch, tiny_tokenizer).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs):
    from sieve.models import load_model

    return {arch: load_model(path) for arch, path in tiny_dirs.items()}


PROMPTS = [
    "import re\n\ndef parse(s):\n",
    "def add(a, b):\n    return",
    "class Point:\n    def __init__(self, x",
    "x = [i for i in",
]


_IMPORT_RE: tuple[int, float] | None = None


def import_re_feature() -> tuple[int, float]:
    """``(index, threshold)`` of a latent of the shipped world's SAE that fires on ``import re``: the one
    strongest in the SAE's code at the `` re`` token of an import, among those whose pre-activation
    stays below the threshold (half its value there) on every token of imports without ``re``.

    The world's own feature is chosen for intent (README "The intent study") and rarely fires on the
    short contexts of the pipeline tests; tests that need a gate which opens on some rows and not on
    others take this one (``sae.feature=...`` / ``sae.threshold=...`` in a recipe)."""
    global _IMPORT_RE
    if _IMPORT_RE is None:
        from sieve.detectors import token_activations
        from sieve.saes import feature
        from sieve.world import load_world

        w = load_world()
        h_re = token_activations(w.model, ["import re\n"], w.layer, progress=False)[0][1]
        h_other = torch.cat(token_activations(w.model, ["import os\nimport sys\n", "def add(a, b):\n    return a + b\n"],
                                              w.layer, progress=False))
        for k in w.sae.encode(h_re).argsort(descending=True).tolist()[:16]:
            wv, b = feature(w.sae, k).linear()
            thr = float(h_re @ wv + b) / 2
            if thr > 0 and bool(((h_other @ wv + b) < thr).all()):
                _IMPORT_RE = (k, thr)
                break
        else:
            raise AssertionError("no latent of the world's SAE fires on `import re` alone")
    return _IMPORT_RE


@pytest.fixture
def one_torch_thread():
    """One torch thread while a test runs, as exactness is checked (tests/test_fork.py, test_prefill.py):
    with two, float sums differ more often between a re-read prefix and the decode steps that made it,
    and a sampled near-tie can flip (the noise sieve.generation documents)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
