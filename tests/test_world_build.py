"""The world build is seeded and resumable: the same config gives the same weights, and a run cut off
and resumed from its checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sieve.world.corpus import SourceFile, chunk_file, stdlib_files
from sieve.world.train_lm import LMConfig, encode_chunks, train_lm, train_tokenizer


def _chunks():
    files = [f for f in stdlib_files() if f.rel in {"json/decoder.py", "json/encoder.py", "fnmatch.py", "glob.py",
                                                     "textwrap.py", "shlex.py", "string.py"}]
    files.append(SourceFile("held/out.py", "import re\n\ndef f(s):\n    return re.sub('a', 'b', s)\n", True))
    return [c for f in files for c in chunk_file(f)]


def _cfg(tokens: int) -> LMConfig:
    return LMConfig(vocab_size=320, n_layer=1, n_embd=32, n_head=2, n_ctx=64, batch_size=4, tokens=tokens,
                    warmup_steps=2, regex_phase_steps=2, checkpoint_every=3, threads=1)


def _train(out: Path, tokens: int):
    chunks = _chunks()
    tok = train_tokenizer([c.text for c in chunks if not c.held_out], 320, out / "tok")
    ids = encode_chunks(tok, chunks)
    return train_lm(_cfg(tokens), tok, chunks, ids, out), tok


def test_same_seed_same_weights(tmp_path):
    a, _ = _train(tmp_path / "a", 4 * 64 * 6)
    b, _ = _train(tmp_path / "b", 4 * 64 * 6)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, monkeypatch):
    import sieve.world.train_lm as tl

    straight, _ = _train(tmp_path / "straight", 4 * 64 * 6)
    # The same run killed right after its step-3 checkpoint, then started again.
    real_save = tl._save_ckpt

    def save_then_die(path, model, opt, step, cfg, losses):
        real_save(path, model, opt, step, cfg, losses)
        if step == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tl, "_save_ckpt", save_then_die)
    cut = tmp_path / "cut"
    try:
        _train(cut, 4 * 64 * 6)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    assert not (cut / "model").exists()
    monkeypatch.setattr(tl, "_save_ckpt", real_save)
    resumed, _ = _train(cut, 4 * 64 * 6)
    w1, w2 = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


def test_chunks_carry_their_imports():
    src = SourceFile("m.py", "import os\nimport re\n\nX = 1\n\nclass A:\n    def m(self):\n        return re.I\n", False)
    chunks = list(chunk_file(src))
    assert [c.name for c in chunks] == ["<module>", "A"]
    assert all(c.header == "import os\nimport re" for c in chunks)
    assert chunks[1].uses_regex and not chunks[0].uses_regex


def test_intent_phase_resumes_and_shows_bare_functions(tmp_path, monkeypatch):
    import sieve.world.train_intent as ti

    chunks = _chunks()
    tok = train_tokenizer([c.text for c in chunks if not c.held_out], 320, tmp_path / "tok")
    start = train_lm(_cfg(4 * 64 * 2), tok, chunks, encode_chunks(tok, chunks), tmp_path / "lm")
    cfg = ti.IntentConfig(steps=4, batch_size=2, n_ctx=64, warmup_steps=1, checkpoint_every=2, threads=1)
    # Half of the chunks (a seeded choice) come without their import lines.
    stream = tok.decode(ti._stream(tok, [c for c in chunks if not c.held_out], cfg, 0).flatten().tolist())
    assert stream.count("<|endoftext|>def ") + stream.count("<|endoftext|>class ") > 0
    assert stream.count("<|endoftext|>import ") + stream.count("<|endoftext|>from ") > 0
    straight = ti.train_intent(cfg, start, chunks, tmp_path / "straight")
    cut = ti.train_intent(cfg, start, chunks, tmp_path / "cut", stop_after=2)
    assert not cut.exists()
    resumed = ti.train_intent(cfg, start, chunks, tmp_path / "cut")
    w1, w2 = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    assert not all(torch.equal(w1[k], w0) for k, w0 in load_file(str(start / "model.safetensors")).items())
