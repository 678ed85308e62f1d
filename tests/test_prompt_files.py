"""User prompt files for the regex recipe: .jsonl and .py formats, errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipes import regex
from sieve.prompts import PromptFileError, load_prompt_file, load_prompt_sets
from sieve.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_prompts_with_ids_references_and_blank_lines(tmp_path):
    f = _jsonl(tmp_path / "mine.jsonl", [{"prompt": "def parse_date(s):\n", "id": "dates", "reference": "x"},
                                         "", {"prompt": "def mean(xs):\n    "}])
    ps = load_prompt_file(f, "regex")
    assert [(p.id, p.text, p.kind, p.style, p.reference) for p in ps] == [
        ("dates", "def parse_date(s):\n", "regex", "completion", "x"),
        ("mine.jsonl:3", "def mean(xs):\n    ", "regex", "completion", ""),
    ]


@pytest.mark.parametrize("rows, line, words", [
    ([{"prompt": "a"}, {"prompt": "b"}, '{"prompt": "c",'], 3, "not valid JSON"),
    ([{"prompt": "a"}, {"text": "b"}], 2, "'prompt' field"),
    ([{"prompt": "   "}], 1, "non-empty string"),
    ([["def f():"]], 1, "JSON object"),
    ([{"prompt": "a", "id": 3}], 1, "'id' must be"),
    ([{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}], 2, "used twice (first on line 1)"),
])
def test_jsonl_errors_name_the_file_and_line(tmp_path, rows, line, words):
    f = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PromptFileError) as e:
        load_prompt_file(f, "regex")
    assert str(e.value).startswith(f"{f}:{line}: ") and words in str(e.value)
    assert e.value.line == line


def test_py_blocks_are_taken_as_written_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "prompts.py"
    f.write_text(
        f"open({str(marker)!r}, 'w').write('x')  # would run if imported\n"
        "# ---\n"
        "\n"
        "def find_emails(text):\n"
        '    """Return every email address in text."""\n'
        "\n"
        "# --- words\n"
        "def split_words(line):\n"
        "    "
    )
    ps = load_prompt_file(f, "neutral")
    assert [p.id for p in ps] == ["prompts.py:1", "prompts.py:4", "words"]
    assert ps[1].text == 'def find_emails(text):\n    """Return every email address in text."""\n'
    assert ps[2].text == "def split_words(line):\n    "  # a trailing indentation is kept exactly
    assert not marker.exists() and all(p.kind == "neutral" for p in ps)


def test_py_and_file_level_errors(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("def f():\n# --- empty\n\n# ---\ndef g():\n")
    with pytest.raises(PromptFileError, match=r"p\.py:2: block 'empty' is empty"):
        load_prompt_file(f, "regex")
    f.write_text("def f():\n# ---\n   \t\n  \n")
    with pytest.raises(PromptFileError, match=r"p\.py:3: block holds only whitespace"):
        load_prompt_file(f, "regex")
    f.write_text("# ---\n\n# ---\n")
    with pytest.raises(PromptFileError, match="has no prompts"):
        load_prompt_file(f, "regex")
    (tmp_path / "p.txt").write_text("def f():\n")
    with pytest.raises(PromptFileError, match="unknown prompt file type '.txt'"):
        load_prompt_file(tmp_path / "p.txt", "regex")
    with pytest.raises(PromptFileError, match="file not found"):
        load_prompt_file(tmp_path / "nope.jsonl", "regex")
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(PromptFileError, match="not UTF-8"):
        load_prompt_file(tmp_path / "latin.jsonl", "regex")


def test_recipe_keys_replace_only_the_named_set(tmp_path):
    (tmp_path / "rx.py").write_text("def parse_date(s):\n# ---\ndef extract_ints(text):\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text((ROOT / "recipes/regex.toml").read_text() + "\n")
    r = load_recipe(recipe, ['prompts.regex_file="rx.py"'])  # relative to the recipe file
    sets = load_prompt_sets(r, None)
    shipped = load_prompt_sets(load_recipe(ROOT / "recipes/regex.toml"), None)
    assert [p.text for p in sets.regex] == ["def parse_date(s):\n", "def extract_ints(text):\n"]
    assert [p.id for p in sets.neutral] == [p.id for p in shipped.neutral]
    assert sets.calibration == shipped.calibration  # the CAA threshold is not calibrated on your prompts


def test_cli_refuses_a_bad_file_before_loading_anything(tmp_path, capsys, monkeypatch):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": 1}])

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr("sieve.setting.load_setting", no_model)
    code = regex.main(["--regex-prompts", str(bad), f'output.dir="{tmp_path / "out"}"', "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: " in err and "Traceback" not in err


def test_help_documents_the_prompt_files(capsys):
    with pytest.raises(SystemExit):
        regex.main(["--help"])
    out = capsys.readouterr().out
    assert "--regex-prompts" in out and "--neutral-prompts" in out and "# ---" in out and ".jsonl" in out


def test_a_byte_order_mark_and_crlf_lines_are_read_as_text(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "def f(s):\\n"}\r\n{"prompt": "def g(s):\\n"}\r\n')
    assert [p.text for p in load_prompt_file(f, "regex")] == ["def f(s):\n", "def g(s):\n"]
    g = tmp_path / "crlf.py"
    g.write_bytes(b"def f(s):\r\n# --- two\r\ndef g(s):\r\n")
    # Windows line ends are read as newlines (a prompt never ends in "\r")
    assert [(p.id, p.text) for p in load_prompt_file(g, "regex")] == [("crlf.py:1", "def f(s):\n"), ("two", "def g(s):\n")]
