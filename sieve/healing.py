"""Token healing: fix prompts that end where the tokenizer would have merged with what follows.

A completion prompt that ends in ``"\\n"`` after a docstring is tokenized with a bare newline token,
but in training text the newline almost always came merged with the next line's indentation
(``"\\n    "``): after a bare ``"\\n"`` the model reads end of file (on the embedded world, P(EOS first)
was 0.96-0.98 and 320 of 320 completions were empty). A trailing space, a half-written name or an
opening ``"\\n   "`` are the same problem in smaller form.

Healing backs up the prompt's last token and constrains the first generated token to one whose text
*starts with* the removed text (a logits mask over the vocabulary), so the model itself chooses how
the prompt's tail is tokenized: ``"\\n"`` may come back as ``"\\n    "``, ``" ret"`` as ``" return"``.
The removed text is then cut from the completion, which continues the prompt as written.

Two steps, kept apart from the steered forward so any generation loop can use them:

- :func:`heal_rows` (prompt preparation): which rows to back up and what each may start with;
- :class:`TokenHealer` (a logits processor): the mask at the first generated step.

A prompt is healed only where it can change something: its last token is plain text (not a special
token), at least one token stays, and some other vocabulary entry extends the last token's text.
Token texts are exact bytes (byte-level BPE, or SentencePiece pieces with byte fallback), so a token
that is half of a UTF-8 character is compared correctly.

Example:
    >>> from sieve.world import load_world
    >>> tok = load_world().model.tokenizer
    >>> rows = [tok('def f(s):\\n    x = 1\\n')["input_ids"]]
    >>> kept, heals = heal_rows(tok, rows)
    >>> heals[0].text, len(kept[0]) == len(rows[0]) - 1
    ('\\n', True)
"""

from __future__ import annotations

import bisect
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["Heal", "TokenTable", "token_table", "heal_rows", "TokenHealer", "strip_healed"]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_kinds(tok) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return set()
    try:
        dec = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:  # a backend that cannot serialise itself: fall back to decoding
        return set()
    kinds = {dec.get("type", "")}
    for sub in dec.get("decoders", []) or []:
        kinds.add(sub.get("type", ""))
    return kinds


class TokenTable:
    """Every vocabulary entry's exact text as bytes (None for special/added tokens), sorted for prefix
    look-ups.

    Example:
        >>> from sieve.world import load_world
        >>> t = token_table(load_world().model.tokenizer)
        >>> all(t.bytes_of[i].startswith(b"\\n  ") for i in t.extending(b"\\n  "))
        True
    """

    def __init__(self, tok) -> None:
        n = len(tok)
        special = set(int(i) for i in getattr(tok, "all_special_ids", []) or [])
        special |= set(int(i) for i in (getattr(tok, "added_tokens_decoder", None) or {}))
        kinds = _decoder_kinds(tok)
        pieces = tok.convert_ids_to_tokens(list(range(n)))
        out: list[bytes | None] = []
        if "ByteLevel" in kinds:
            dec = _byte_decoder()
            for i, p in enumerate(pieces):
                out.append(None if i in special or p is None or any(c not in dec for c in p)
                           else bytes(dec[c] for c in p))
        elif "Metaspace" in kinds or "Replace" in kinds or "ByteFallback" in kinds:
            for i, p in enumerate(pieces):
                if i in special or p is None:
                    out.append(None)
                elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
                    out.append(bytes([int(p[3:5], 16)]))
                else:
                    out.append(p.replace("\u2581", " ").encode("utf-8"))
        else:  # unknown decoder: each token decoded alone; partial characters cannot be told apart
            for i in range(n):
                s = None if i in special else tok.decode([i])
                out.append(None if s is None or "\ufffd" in s else s.encode("utf-8"))
        self.bytes_of = out
        pairs = sorted((b, i) for i, b in enumerate(out) if b)
        self._keys = [b for b, _ in pairs]
        self._ids = [i for _, i in pairs]

    def extending(self, prefix: bytes) -> list[int]:
        """Ids of every (non-special) token whose bytes start with ``prefix`` (itself included)."""
        lo = bisect.bisect_left(self._keys, prefix)
        hi = lo
        while hi < len(self._keys) and self._keys[hi].startswith(prefix):
            hi += 1
        return self._ids[lo:hi]


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tok) -> TokenTable:
    """The :class:`TokenTable` of ``tok``, built once per tokenizer (it reads the whole vocabulary)."""
    if tok not in _TABLES:
        _TABLES[tok] = TokenTable(tok)
    return _TABLES[tok]


@dataclass(frozen=True)
class Heal:
    """One row's healing: the removed token's ``text`` (and exact ``data`` bytes), the token ids the
    first generated token may take (every vocabulary entry starting with that text), and those of
    them whose text is exactly it (``exact``: a first token that adds nothing to the prompt)."""

    text: str
    data: bytes
    allowed: tuple[int, ...]
    exact: tuple[int, ...] = ()


def heal_rows(tok, rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[Heal | None]]:
    """Back up the last token of each row that ends where the tokenizer could merge.

    Returns the rows to feed the model and, per row, its :class:`Heal` (None: left as it was).

    Example:
        >>> from sieve.world import load_world
        >>> tok = load_world().model.tokenizer
        >>> _, heals = heal_rows(tok, [tok("x = 1\\n")["input_ids"], tok("<|endoftext|>")["input_ids"]])
        >>> heals[0].text, heals[1]
        ('\\n', None)
    """
    table = token_table(tok)
    kept: list[list[int]] = []
    heals: list[Heal | None] = []
    for row in rows:
        row = list(row)
        heal = None
        last = row[-1] if len(row) >= 2 else None  # at least one token must stay
        data = table.bytes_of[last] if last is not None and last < len(table.bytes_of) else None
        if data:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:  # half a character: the cut would land inside it
                text = None
            allowed = table.extending(data) if text is not None else []
            if text is not None and any(i != last for i in allowed):
                heal = Heal(text, data, tuple(allowed), tuple(i for i in allowed if table.bytes_of[i] == data))
                row = row[:-1]
        kept.append(row)
        heals.append(heal)
    return kept, heals


class TokenHealer:
    """A logits processor: at the first generated step, each healed row may only take a token that
    starts with its removed text (every other logit is set to -inf); other rows and later steps are
    left alone. Put it before any sampler, so greedy and sampled rows both see the mask.

    Example:
        >>> h = TokenHealer([Heal("a", b"a", (1, 2)), None], prompt_len=3)
        >>> h(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4)).tolist()
        [[-inf, 0.0, 0.0, -inf], [0.0, 0.0, 0.0, 0.0]]
    """

    def __init__(self, heals: Sequence[Heal | None], prompt_len: int) -> None:
        self.heals = list(heals)
        self.prompt_len = int(prompt_len)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[1] != self.prompt_len:
            return scores
        V = scores.shape[-1]
        block = torch.zeros(scores.shape, dtype=torch.bool)
        for i, h in enumerate(self.heals):
            if h is None:
                continue
            block[i] = True
            ids = torch.tensor([a for a in h.allowed if a < V], dtype=torch.long)
            block[i, ids] = False
        return scores.masked_fill(block.to(scores.device), float("-inf"))

    def keep_rows(self, keep) -> None:
        """Go on with rows ``keep`` only (indices into the rows now held): rows that ended left the batch."""
        keep = keep.tolist() if hasattr(keep, "tolist") else [int(i) for i in keep]
        self.heals = [self.heals[i] for i in keep]


def strip_healed(tok, token_ids: Sequence[int], heal: Heal | None) -> str:
    """The completion's text after the prompt as written: the generated tokens decoded, less the text
    that re-spelled the healed prompt tail.

    Example:
        >>> from sieve.world import load_world
        >>> tok = load_world().model.tokenizer
        >>> strip_healed(tok, tok("\\n    return x", add_special_tokens=False)["input_ids"],
        ...              Heal("\\n", b"\\n", ()))
        '    return x'
    """
    text = tok.decode(list(token_ids), skip_special_tokens=True)
    if heal is None:
        return text
    if text.startswith(heal.text):
        return text[len(heal.text):]
    # A decoder that reshapes the first token (e.g. strips a leading space): cut the exact bytes.
    table = token_table(tok)
    data = b"".join(table.bytes_of[i] or b"" for i in token_ids if i < len(table.bytes_of))
    return data[len(heal.data):].decode("utf-8", errors="replace") if data.startswith(heal.data) else text
