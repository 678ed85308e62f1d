"""The README's quickstart runs as written, and what its text says about gated rows holds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_closed_gates_change_nothing(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_quickstart() + '''
texts = model.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:])
c = steer.counts()
for row in (3, 4, 5):  # the steered twins of rows 0, 1 and 2
    opened = c["prompt_fired"][row] + c["gen_fired"][row] > 0
    print("ROW", row, "fired" if opened else "closed", "same" if texts[row] == texts[row - 3] else "changed")
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^ROW (\d) (fired|closed) (same|changed)$", out.stdout, re.M)
    assert len(rows) == 3
    for _, gate, result in rows:
        if gate == "closed":
            assert result == "same"  # a gate that never opened left the row token-identical
    assert ("4", "fired", "changed") in rows  # the README says the intent head opens its gate and changes


def _section(title: str, lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.index("\n## ", start + 3)
    return re.findall(rf"```{lang}\n(.*?)```", text[start:end], re.S)


def test_composing_examples_run_as_written(tmp_path):
    """Every Python block of "Composing interventions", in order, as one script; then what they claim."""
    blocks = _section("Composing interventions", "python")
    assert len(blocks) == 5
    script = tmp_path / "composing.py"
    script.write_text("\n".join(blocks) + '''
assert [o.counts["prompt_edited"] + o.counts["gen_edited"] for o in outs][5] == 0  # the unsteered row
assert outs[0].counts["prompt_fired"] + outs[0].counts["gen_fired"] > 0  # the feature is active on the re prompt
assert len(composed) == 2 and all(o.token_ids for o in composed)
c = s.counts()
assert len(c["gen_edited"]) == 2 and c["prompt_fired"][0] > 0
print("COMPOSING OK")
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "COMPOSING OK" in out.stdout, out.stderr[-3000:]


def test_composing_recipe_tables_validate():
    import tomllib

    from sieve.methods import build
    from sieve.recipe import recipe_from_dict
    from tests.test_recipe import _world_parts

    (block,) = _section("Composing interventions", "toml")
    data = {"name": "readme", "sae": {"layer": 2, "feature": 978}, **tomllib.loads(block)}
    r = recipe_from_dict(data)
    _, parts = _world_parts()
    parts.add_direction("caa", parts.directions["sae"])  # any direction of the right width
    parts.add_detector("caa", parts.detectors["sae"][0], 0.0)
    ivs = {name: build(r.method(name), parts, -2.0) for name in r.methods}
    assert ivs["caa_two_layers"].layers == (2, 3) and ivs["caa_two_layers"].reads_at == 2
    assert ivs["code_latch_clamp"].edit.op == "set"


def test_the_token_healing_example_runs_after_the_quickstart(tmp_path):
    """The README's healing block continues the quickstart (its model and iv): each healed row's first
    new token starts with the text it backed up."""
    text = (ROOT / "README.md").read_text()
    heal = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "TokenHealer(heals" in b)
    script = tmp_path / "heal.py"
    script.write_text(_quickstart() + heal + '''
new = [model.tokenizer.decode(ids[i, enc["input_ids"].shape[1]:][:1]) for i in range(2)]
print("OK", all(n.startswith(h.text) for n, h in zip(new, heals) if h is not None), [h is not None for h in heals])
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK True [True, True]" in out.stdout, out.stdout[-2000:]
