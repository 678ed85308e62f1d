"""Every notebook runs top to bottom on the embedded world (a failing cell fails the test)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from recipes import regex

    out = tmp_path_factory.mktemp("nbrun")
    ov = ['sweep.methods=["unsteered","constant_sae","conditional_per_token"]', "sweep.samples=1",
          "sweep.max_new_tokens=8", "prompts.regex_limit=6", "prompts.neutral_limit=2", "prompts.code_limit=4",
          f'output.dir="{out}"', "output.charts=false"]
    assert regex.main([str(ROOT / "recipes/regex.toml"), *ov, "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, run_dir, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks with outputs stripped"
    monkeypatch.setenv("SIEVE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "IProgress" not in text and "ipywidgets" not in text  # progress bars need no widgets
    for o in outputs:  # nothing a chart needs comes from the network
        for mime, body in o.get("data", {}).items():
            assert "cdn.jsdelivr" not in str(body) and "https://cdn" not in str(body), mime
    if path.name == "results.ipynb":
        assert any("image/svg+xml" in o.get("data", {}) for o in outputs), "the Pareto chart renders inline as SVG"
    assert os.environ["SIEVE_RUN_DIR"] == str(run_dir)


def test_results_notebook_runs_on_a_run_that_measured_no_general_ability(tmp_path, monkeypatch):
    """``eval.general = "none"`` leaves the ability table empty: the notebook said MMLU and stopped."""
    from recipes import regex

    out = tmp_path / "run"
    ov = ['sweep.methods=["unsteered","constant_sae"]', "sweep.samples=1", "sweep.max_new_tokens=6",
          "prompts.regex_limit=3", "prompts.neutral_limit=1", 'eval.general="none"', f'output.dir="{out}"',
          "output.charts=false"]
    assert regex.main([str(ROOT / "recipes/regex.toml"), *ov, "--no-progress"]) == 0
    path = ROOT / "notebooks" / "results.ipynb"
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("SIEVE_RUN_DIR", str(out))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
