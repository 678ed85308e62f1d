"""Code extraction, completion cutting and syntax checks on tricky completions."""

from __future__ import annotations

from sieve.evals.code import cut_function, evaluate_code, extract_code, syntax_ok


def test_extract_code_from_prefilled_and_plain_answers():
    assert extract_code("import random\ndef test_fuzz():\n    pass\n```\nThis test ...") == \
        "import random\ndef test_fuzz():\n    pass\n"
    assert extract_code("no closing fence\nx = 1\n") == "no closing fence\nx = 1\n"
    plain = "Here you go:\n```py\nx = 1\n```\nand\n```python\ny = 2\n```"
    assert extract_code(plain, prefilled_fence=False) == "x = 1\n"
    assert extract_code("no code at all", prefilled_fence=False) is None
    assert not evaluate_code(None).has_code


def _code(prompt: str, completion: str) -> str:
    return cut_function(prompt, completion)[0]


def test_cut_function_cuts_at_dedent_and_partial_lines():
    prompt = "import re\n\ndef f(s):\n    s = s.strip()\n    return"
    assert _code(prompt, " s.lower()\n\ndef g():\n    pass\n") == \
        "def f(s):\n    s = s.strip()\n    return s.lower()\n"
    # ran out of tokens mid-line: the unfinished line is dropped
    cut = _code("def f(s):\n   ", " x = 1\n    y = foo(1,")
    assert cut == "def f(s):\n    x = 1\n" and syntax_ok(cut)
    # a method inside a class: the block ends at the class body's indentation
    meth = _code("class A:\n    def m(self):\n       ", " return 1\n    def n(self):\n")
    assert meth == "def m(self):\n    return 1\n"
    # module-level prompt: imports dropped, the rest kept
    assert _code("import re\n\nPAT =", " re.compile('x')\n") == "PAT = re.compile('x')\n"


def test_regex_judged_on_the_function_not_the_header():
    prompt = "import re\n\ndef f(s):\n   "
    clean = evaluate_code(_code(prompt, " return s.split(',')\n"))
    dirty = evaluate_code(_code(prompt, " return re.split(',', s)\n"))
    assert not clean.regex and dirty.regex and clean.syntax and dirty.syntax


def test_valid_prefix_accepts_unfinished_but_not_wrong_code():
    from sieve.evals.code import cut_function, valid_prefix

    code, ended = cut_function("def f(xs):\n   ", " for x in xs:\n        if x:\n            y = (x,\n    z = 1")
    assert not ended and not syntax_ok(code) and valid_prefix(code)
    assert not valid_prefix("def f(x):\n    return x +* 1\n")
    code, ended = cut_function("def f(x):\n   ", " return x\n\nprint(1)\n")
    assert ended and syntax_ok(code)


def test_empty_completions_are_never_valid():
    from sieve.evals.code import function_validity

    prompt = 'def find_emails(text):\n    """Return all email addresses found in text."""\n'
    # Judged as before (the cut function alone), an empty completion looked valid: the prompt parses.
    assert syntax_ok(_code(prompt, ""))
    for text, finished in [("", True), ("\n\n", True), ("\ndef other():\n    pass\n", True), ("", False)]:
        v = function_validity(prompt, text, finished)
        assert v.kind == "empty" and v.empty and not v.valid and v.code == "", text


def test_valid_separates_complete_from_prefix_at_budget():
    from sieve.evals.code import function_validity

    prompt = "def f(xs):\n   "
    done = function_validity(prompt, " return sorted(xs)\n\nprint(1)\n", finished=False)  # left the function
    eos = function_validity(prompt, " return sorted(xs)", finished=True)  # EOS after a whole last line
    cut = function_validity(prompt, " ys = [x for x in xs\n    if", finished=False)  # budget ran out
    bad = function_validity(prompt, " return xs +* 1\n\n", finished=True)
    bad_cut = function_validity(prompt, " y = )\n    z = (", finished=False)
    assert [v.kind for v in (done, eos, cut, bad, bad_cut)] == ["complete", "complete", "prefix", "invalid", "invalid"]
    assert done.valid and eos.valid and cut.valid and not bad.valid and not bad_cut.valid
    assert eos.code == "def f(xs):\n    return sorted(xs)\n"  # a finished row keeps its last line


def test_answer_validity_for_instruct_models():
    from sieve.evals.code import answer_validity

    assert answer_validity("```\nSure.", finished=True).kind == "empty"
    assert answer_validity("   \n```", finished=True).kind == "empty"
    assert answer_validity("def test_x():\n    assert 1\n```\n", finished=True).kind == "complete"
    assert answer_validity("def test_x():\n    assert f(1,", finished=False).kind == "prefix"
    assert answer_validity("def test_x(:\n    pass\n```", finished=True).kind == "invalid"
