"""The prompt-boundary failure on the embedded world, measured with token healing off and on.

    python bench/healing_check.py [--samples 40] [--max-new-tokens 48]

Eight function starts written for this check (a ``def`` and a docstring, no import, no ``re``), each
ending in a bare newline after the docstring, the way a person would write a completion prompt. For
each: the probability that the first token is EOS without healing, then ``samples`` sampled
completions (temperature 0.8, seeds 0..samples-1) with healing off and on, counting empty
completions (no non-blank character) and syntax-valid complete ones. Prints a JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

PROMPTS = [
    'def find_emails(text):\n    """Return all email addresses found in text."""\n',
    'def is_valid_date(s):\n    """Check whether s looks like YYYY-MM-DD."""\n',
    'def split_words(line):\n    """Split a line into words, dropping punctuation."""\n',
    'def parse_header(line):\n    """Parse a "Key: value" header line into a tuple."""\n',
    'def count_vowels(word):\n    """Count the vowels in a word."""\n',
    'def mean(values):\n    """The arithmetic mean of a list of numbers."""\n',
    'def extract_numbers(text):\n    """Return every integer written in text."""\n',
    'def normalise_spaces(s):\n    """Collapse runs of whitespace into one space."""\n',
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()

    from sieve.evals.code import function_validity
    from sieve.generation import generate
    from sieve.models import encode_prompts, underlying
    from sieve.world import load_world

    w = load_world()
    tok = w.model.tokenizer
    enc = encode_prompts(tok, PROMPTS)
    with torch.inference_mode():
        logits = underlying(w.model)(**enc).logits[:, -1].float()
    p_eos = torch.softmax(logits, -1)[:, tok.eos_token_id].tolist()
    rows = [p for p in PROMPTS for _ in range(args.samples)]
    seeds = [s for _ in PROMPTS for s in range(args.samples)]
    result: dict = {"prompts": len(PROMPTS), "completions": len(rows),
                    "p_eos_first_unhealed": [round(p, 3) for p in p_eos]}
    for heal in (False, True):
        outs = generate(w.model, rows, None, layer_index=w.layer, max_new_tokens=args.max_new_tokens,
                        temperature=0.8, seeds=seeds, token_healing=heal, progress=False)
        kinds = [function_validity(p, o.text, o.finished).kind for p, o in zip(rows, outs)]
        key = "healed" if heal else "unhealed"
        result[key] = {"empty_text": sum(not o.text.strip() for o in outs),
                       **{k: kinds.count(k) for k in ("empty", "complete", "prefix", "invalid")}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
