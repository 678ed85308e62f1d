"""Regex-use detection on tricky code: aliases, from-imports, strings, comments, broken code."""

from __future__ import annotations

import pytest

from sieve.evals.regex_use import find_regex_use

USES = [
    ("import re\n", "import"),
    ("import re as rx\nrx.compile('a')\n", "call"),
    ("import os, re\n", "import"),
    ("from re import sub\nsub('a', 'b', s)\n", "call"),
    ("from re import compile as c\nP = c(r'\\d+')\n", "call"),
    ("x = re.match(r'a+', s)\n", "call"),
    ("flags = re.IGNORECASE | re.M\n", "attribute"),
    ("def f(s):\n    return re.findall('x', s)\n", "call"),
    ("m = __import__('re').search('a', s)\n", "call"),
    ("import importlib\nr = importlib.import_module('re')\n", "call"),
    ("pat = re.compile('[a-z]+')\nok = pat.fullmatch(s)\n", "call"),
    ("y = [re.escape(w) for w in words]\n", "call"),
    ("class P:\n    PAT = re.compile('x')\n", "call"),
    # the third-party regex module, a drop-in for re: a model steered off re that takes it up still
    # uses regular expressions
    ("import regex\nregex.sub('a', 'b', s)\n", "call"),
    ("import regex as re\nre.sub('a', 'b', s)\n", "call"),
    ("from regex import findall\nfindall('a', s)\n", "call"),
    ("import importlib\nr = importlib.import_module(name='re')\n", "call"),
]

NOT_USES = [
    "s = 're.match(x)'\n",
    "# use re.sub here\nx = 1\n",
    "'''docstring: import re'''\n",
    "more.match(x)\n",
    "regex = 1\nregex.search\n",
    "def f(re):\n    return re.x\n",           # a parameter named re, not the module
    "x = 'from re import sub'\n",
    "s.replace('a', 'b').strip()\n",
    "re = Recorder()\nre.match(1)\n",           # the name rebound, never imported
    "",
]


@pytest.mark.parametrize("code,kind", USES)
def test_uses(code, kind):
    r = find_regex_use(code)
    assert r.used and r.parsed == "ast"
    assert kind in r.kinds


@pytest.mark.parametrize("code", NOT_USES)
def test_not_uses(code):
    assert not find_regex_use(code).used


def test_call_span_covers_pattern_argument():
    code = "x = 1\nm = re.search(r'(\\d+)-(\\d+)', s)\n"
    r = find_regex_use(code)
    (start, end), = [s for s, k in zip(r.spans, r.kinds) if k == "call"]
    assert code[start:end] == "re.search(r'(\\d+)-(\\d+)', s)"


def test_unparsable_falls_back_and_flags():
    code = "import re\ndef f(s):\n    return re.sub('a', 'b', s\n"   # cut mid-call
    r = find_regex_use(code)
    assert r.used and r.parsed == "partial"
    text_only = find_regex_use("def f(:\n    re.match('a', s)")
    assert text_only.used and text_only.parsed == "text"
    # the text rule still ignores comments and strings when it can tokenize
    assert not find_regex_use("def f(:\n    x = 're.match' # re.sub\n").used


def test_an_import_of_regex_does_not_make_a_parameter_named_re_the_module():
    code = "import regex\ndef f(re):\n    return re.x\n"
    r = find_regex_use(code)
    assert r.used and [code[a:b] for a, b in r.spans] == ["import regex"]


def test_text_rule_reads_import_lists():
    """Past the parsable prefix, an import of re inside a list of imports, aliased, is a use."""
    r = find_regex_use("def f(:\n    pass\nimport os, re as rx\nrx.sub('a', 'b', s)\n")
    assert r.used and r.parsed in ("partial", "text") and "import" in r.kinds
    assert find_regex_use("def f(:\nimport regex\n").used
    assert not find_regex_use("def f(:\nimport os, rest\nimport re_tools\n").used


def test_many_uses_on_one_non_ascii_line():
    """Each span of a long non-ASCII line maps to the right characters (a table per line, built once)."""
    code = "import re\nx = 'é'; " + "; ".join(f"re.I{'ü' * (i % 3)}" for i in range(300)) + "\n"
    r = find_regex_use(code)
    got = [code[a:b] for (a, b), k in zip(r.spans, r.kinds) if k == "attribute"]
    assert got == [f"re.I{'ü' * (i % 3)}" for i in range(300)]


def test_non_ascii_offsets():
    code = "s = 'héllo'; m = re.match('h', s)\n"
    r = find_regex_use(code)
    (start, end), = [s for s, k in zip(r.spans, r.kinds) if k == "call"]
    assert code[start:end] == "re.match('h', s)"
