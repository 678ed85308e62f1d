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
for row in (2, 3):  # the steered twins of rows 0 and 1
    opened = c["prompt_fired"][row] + c["gen_fired"][row] > 0
    print("ROW", row, "fired" if opened else "closed", "same" if texts[row] == texts[row - 2] else "changed")
''')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^ROW (\d) (fired|closed) (same|changed)$", out.stdout, re.M)
    assert len(rows) == 2
    for _, gate, result in rows:
        if gate == "closed":
            assert result == "same"  # a gate that never opened left the row token-identical
