"""Token healing in generation: the prompt's last token backed up, the first generated token constrained.

The headline case is the issue's: on the embedded world, a function start that ends in ``"\\n"`` after
its docstring gave an empty completion almost every time, because the tokenizer merges a newline with
the next line's indentation and a bare ``"\\n"`` token reads as end of file.
"""

from __future__ import annotations

import pytest
import torch

from sieve.generation import generate
from sieve.healing import Heal, TokenHealer, heal_rows, strip_healed, token_table
from sieve.models import underlying
from tests.conftest import PROMPTS

# Function starts written for this test (no `re`, no import), each ending in "\n" after the docstring.
DOCSTRING_PROMPTS = [
    'def find_emails(text):\n    """Return all email addresses found in text."""\n',
    'def is_valid_date(s):\n    """Check whether s looks like YYYY-MM-DD."""\n',
    'def split_words(line):\n    """Split a line into words, dropping punctuation."""\n',
    'def parse_header(line):\n    """Parse a "Key: value" header line into a tuple."""\n',
    'def count_vowels(word):\n    """Count the vowels in a word."""\n',
    'def mean(values):\n    """The arithmetic mean of a list of numbers."""\n',
    'def extract_numbers(text):\n    """Return every integer written in text."""\n',
    'def normalise_spaces(s):\n    """Collapse runs of whitespace into one space."""\n',
]


@pytest.fixture(scope="module")
def world():
    from sieve.world import load_world

    return load_world()


def test_token_table_bytes_are_the_decoded_text(world):
    tok = world.model.tokenizer
    table = token_table(tok)
    checked = 0
    for i in range(len(tok)):
        data = table.bytes_of[i]
        if i in tok.all_special_ids:
            assert data is None
            continue
        text = tok.decode([i])
        if "\ufffd" not in text:  # whole characters: the bytes are exactly the text
            assert data == text.encode("utf-8"), i
            checked += 1
    assert checked > 0.9 * len(tok)
    assert all(table.bytes_of[i].startswith(b"\n ") for i in table.extending(b"\n "))
    assert len(table.extending(b"\n ")) >= 2


def test_rows_are_healed_only_where_a_merge_is_possible(world):
    tok = world.model.tokenizer
    rows = [tok(t)["input_ids"] for t in ("x = 1\n", "x = 1\n    ", "<|endoftext|>")]
    kept, heals = heal_rows(tok, rows)
    assert heals[0] == Heal("\n", b"\n", heals[0].allowed, (rows[0][-1],)) and kept[0] == rows[0][:-1]
    assert all(token_table(tok).bytes_of[i].startswith(b"\n") for i in heals[0].allowed)
    assert heals[2] is None and kept[2] == rows[2]  # BOS only: nothing to back up
    # A token no other vocabulary entry extends stays as it is.
    table = token_table(tok)
    lone = next(i for i, b in enumerate(table.bytes_of) if b and table.extending(b) == [i] and b.isascii())
    kept, heals = heal_rows(tok, [[tok.bos_token_id, lone]])
    assert heals == [None] and kept == [[tok.bos_token_id, lone]]


def test_healer_masks_only_healed_rows_at_the_first_step():
    h = TokenHealer([Heal("a", b"a", (1, 3)), None], prompt_len=2)
    scores = torch.arange(10.0).reshape(2, 5)
    first = h(torch.zeros(2, 2, dtype=torch.long), scores.clone())
    assert first[0].tolist() == [float("-inf"), 1.0, float("-inf"), 3.0, float("-inf")]
    assert first[1].tolist() == scores[1].tolist()
    assert torch.equal(h(torch.zeros(2, 3, dtype=torch.long), scores.clone()), scores)  # later steps


def test_issue_failure_docstring_newline_gives_empty_completions_unless_healed(world):
    """The issue's failure, reproduced then fixed: sampled completions of prompts ending in "\\n"."""
    n = len(DOCSTRING_PROMPTS) * 4
    rows = DOCSTRING_PROMPTS * 4
    kw = dict(layer_index=world.layer, max_new_tokens=24, temperature=0.8, seeds=list(range(n)), progress=False)
    raw = generate(world.model, rows, None, token_healing=False, **kw)
    healed = generate(world.model, rows, None, **kw)
    raw_empty = sum(not o.text.strip() for o in raw)
    healed_empty = sum(not o.text.strip() for o in healed)
    assert raw_empty >= 0.9 * n  # the failure is real on this tokenizer
    assert healed_empty <= 0.1 * n
    tok = world.model.tokenizer
    for o in healed:
        assert o.healed == "\n"
        first = tok.decode(o.token_ids[:1])
        assert first.startswith("\n")
        assert tok.decode(o.token_ids) == "\n" + o.text  # text continues the prompt as written


def _reference_greedy(model, prompt: str, n: int) -> list[int]:
    """Healing by hand: drop the last token, argmax over tokens starting with its text, then greedy."""
    hf, tok = underlying(model), model.tokenizer
    ids = tok(prompt)["input_ids"]
    last = tok.decode(ids[-1:])
    allowed = [i for i in range(len(tok)) if i not in tok.all_special_ids and tok.decode([i]).startswith(last)]
    x = torch.tensor([ids[:-1]])
    with torch.inference_mode():
        logits = hf(x).logits[0, -1]
        first = allowed[int(logits[allowed].argmax())]
        x = torch.cat([x, torch.tensor([[first]])], dim=1)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
    row = [first] + out[0, x.shape[1]:].tolist()
    eos = tok.eos_token_id
    return row[: row.index(eos)] if eos in row else row


def test_greedy_healing_matches_a_hand_reference_in_a_mixed_batch(world):
    """Healed and unhealed rows of one left-padded batch, each equal to the hand-written reference."""
    prompts = DOCSTRING_PROMPTS[:3] + ["def add(a, b):\n    ret", "<|endoftext|>"]
    outs = generate(world.model, prompts, None, layer_index=world.layer, max_new_tokens=10, progress=False)
    assert [bool(o.healed) for o in outs] == [True, True, True, True, False]
    for p, o in zip(prompts[:4], outs):
        assert o.token_ids == _reference_greedy(world.model, p, 10)[: len(o.token_ids)]
        assert len(o.token_ids) == 11 or o.finished  # the healed row keeps its 10 tokens after the prompt
    alone = generate(world.model, prompts[4:], None, layer_index=world.layer, max_new_tokens=10, progress=False)
    assert outs[4].token_ids == alone[0].token_ids
    assert len(outs[4].token_ids) <= 10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sampled_healing_does_not_depend_on_the_batch(tiny_models, arch):
    """Per-row seeded sampling with mixed healing: each row equals itself generated alone."""
    model = tiny_models[arch]
    _, heals = heal_rows(model.tokenizer, [model.tokenizer(p)["input_ids"] for p in PROMPTS])
    assert any(h is not None for h in heals)
    kw = dict(layer_index=1, max_new_tokens=8, temperature=1.0, progress=False)
    together = generate(model, PROMPTS, None, seeds=[11, 12, 13, 14], **kw)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], None, seeds=[11 + i], **kw)[0]
        assert alone.token_ids == together[i].token_ids and alone.healed == together[i].healed
        if together[i].healed:
            assert model.tokenizer.decode(together[i].token_ids[:1]).startswith(together[i].healed)


def test_healing_off_feeds_the_prompt_as_is(world):
    p = DOCSTRING_PROMPTS[0]
    off = generate(world.model, [p], None, layer_index=world.layer, max_new_tokens=6, progress=False,
                   token_healing=False)[0]
    hf, tok = underlying(world.model), world.model.tokenizer
    x = torch.tensor([tok(p)["input_ids"]])
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
    ref = out[0, x.shape[1]:].tolist()
    ref = ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref
    assert off.token_ids == ref and off.healed == ""


def test_strip_healed_cuts_exact_bytes(world):
    tok = world.model.tokenizer
    ids = tok("\n    return x", add_special_tokens=False)["input_ids"]
    assert strip_healed(tok, ids, Heal("\n", b"\n", ())) == "    return x"
    assert strip_healed(tok, ids, None) == "\n    return x"


def test_counts_of_an_unhealed_row_do_not_depend_on_healed_rows_beside_it(world):
    """A healed row runs one step more; the unhealed row beside it is counted as if alone."""
    from sieve.interventions import Edit, Intervention

    d = underlying(world.model).config.n_embd
    iv = Intervention("always", Edit("add", torch.ones(d), 0.01))
    prompts = ["<|endoftext|>", DOCSTRING_PROMPTS[0]]
    kw = dict(layer_index=world.layer, max_new_tokens=6, progress=False)
    together = generate(world.model, prompts, iv, **kw)
    alone = generate(world.model, prompts[:1], iv, **kw)[0]
    assert together[0].healed == "" and together[1].healed == "\n"
    assert together[0].token_ids == alone.token_ids and together[0].counts == alone.counts
    for o in together:  # every forward after the prefill that predicts a kept token is counted
        assert o.counts["gen_edited"] == (len(o.token_ids) if o.finished else len(o.token_ids) - 1)


def test_a_model_that_only_says_eos_still_re_spells_the_healed_tail(tiny_dirs):
    """EOS is masked at the healing step: the healed row re-spells its tail, then ends (empty text);
    the unhealed row ends at once. Counts: one decode forward for the healed row, none for the other."""
    from transformers import GPT2LMHeadModel

    from sieve.interventions import Edit, Intervention
    from sieve.models import load_model

    hf = GPT2LMHeadModel.from_pretrained(tiny_dirs["gpt2"]).eval()
    tok = load_model(tiny_dirs["gpt2"]).tokenizer
    with torch.no_grad():
        head = torch.nn.Linear(hf.config.n_embd, hf.config.vocab_size, bias=True)
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 50.0
        hf.lm_head = head
    model = load_model(hf, tokenizer=tok)
    iv = Intervention("always", Edit("add", torch.ones(hf.config.n_embd), 0.5))
    outs = generate(model, [PROMPTS[0], tok.bos_token], iv, layer_index=1, max_new_tokens=8, progress=False)
    healed, plain = outs
    assert healed.healed == "\n" and plain.healed == ""
    assert healed.finished and len(healed.token_ids) == 1 and healed.text == ""
    assert tok.decode(healed.token_ids).startswith("\n")
    assert plain.finished and plain.token_ids == [] and plain.text == ""
    assert healed.counts["gen_edited"] == 1 and plain.counts["gen_edited"] == 0


def test_a_stop_string_in_the_prompts_healed_tail_does_not_end_the_row(world):
    """Healing backs up the prompt's last token; a first token that only re-spells it matched a stop
    string lying in the prompt as written, and the row came back empty and finished."""
    m = world.model
    for prompt, stop in (("import os\nimport sys\n", "\n"), ("x = f(", "("), ("def mean(xs):\n    total =", "=")):
        healed = generate(m, [prompt], None, max_new_tokens=16, stop=[stop], progress=False)[0]
        plain = generate(m, [prompt], None, max_new_tokens=16, stop=[stop], token_healing=False, progress=False)[0]
        assert healed.healed and healed.text, (prompt, healed)  # healed, and not cut at the re-spelled tail
        assert len(healed.token_ids) > 1
        assert plain.text  # the contrast: unhealed rows were never cut there
    # a stop string the first token does complete beyond the prompt still ends the row there
    o = generate(m, ["import os\nimport sys\n"], None, max_new_tokens=16, stop=["import"], progress=False)[0]
    assert o.healed == "\n" and o.text == "import" and o.finished


def test_a_draw_of_exactly_zero_never_takes_a_token_of_zero_probability():
    """Inverse-CDF sampling took token 0 for a uniform draw of exactly 0.0, masked, cut by top-p or
    excluded by healing as it was (token 0 is EOS in the world's vocabulary)."""
    from sieve.generation import RowSampler

    seed = 5528393
    assert float(torch.rand((), generator=torch.Generator().manual_seed(seed))) == 0.0  # the premise
    scores = torch.zeros(1, 6)
    scores[0, :2] = float("-inf")  # tokens 0 and 1 impossible
    out = RowSampler([1.0], seeds=[seed])(torch.zeros(1, 1, dtype=torch.long), scores.clone())
    assert out[0].argmax().item() == 2  # the first token of non-zero probability
    top = RowSampler([1.0], seeds=[seed], top_p=0.5)(torch.zeros(1, 1, dtype=torch.long),
                                                     torch.tensor([[0.0, 0.0, 5.0, 0.0]]))
    assert top[0].argmax().item() == 2  # the whole nucleus
