"""The sandbox contains each escape attempt and counts it as a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sieve.evals.code import evaluate_code
from sieve.evals.sandbox import run_sandboxed

ESCAPES = {
    "read_secret": "import os\ndef test_a():\n    assert os.environ['SIEVE_TEST_SECRET'] == 'hunter2'\n",
    "write_outside": "def test_a():\n    open({target!r}, 'w').write('x')\n",
    "delete_outside": "import os\ndef test_a():\n    os.remove({target!r})\n",
    "socket": "import socket\ndef test_a():\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "fork_bomb": "import os\ndef test_a():\n    while True:\n        os.fork()\n",
    "subprocess": "import subprocess\ndef test_a():\n    subprocess.run(['id'])\n",
    "os_system": "import os\ndef test_a():\n    os.system('true')\n",
    "memory": "def test_a():\n    blocks = [bytearray(100 * 1024 * 1024) for _ in range(100)]\n",
    "infinite_loop": "def test_a():\n    while True:\n        pass\n",
    "sleep_forever": "import time\ndef test_a():\n    time.sleep(60)\n",
    "big_file": "def test_a():\n    with open('big.bin', 'wb') as f:\n        f.write(b'0' * (64 * 1024 * 1024))\n",
    "ctypes": "import ctypes\ndef test_a():\n    ctypes.CDLL(None)\n",
    "fake_result": "import os\nprint('{{\"status\": \"ok\"}}')\nos._exit(0)\n",
    "exit_zero": "import sys\ndef test_a():\n    sys.exit(0)\n",
}


@pytest.fixture()
def target(tmp_path: Path) -> Path:
    p = tmp_path / "outside.txt"
    p.write_text("keep me")
    return p


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_is_contained(name, target, monkeypatch):
    monkeypatch.setenv("SIEVE_TEST_SECRET", "hunter2")
    code = ESCAPES[name].format(target=str(target))
    r = run_sandboxed(code, timeout_s=2.0, memory_mb=256)
    assert not r.ok, f"{name}: {r}"
    assert target.read_text() == "keep me"
    assert r.seconds < 10


def test_well_behaved_test_passes_and_sees_function_under_test():
    setup = "def double(x):\n    return 2 * x\n"
    code = "import random\ndef test_fuzz():\n    random.seed(0)\n    for _ in range(100):\n" \
           "        x = random.randint(-9, 9)\n        assert double(x) == x + x\n"
    r = run_sandboxed(code, setup=setup)
    assert r.ok and r.status == "ok"
    assert not run_sandboxed("def test_f():\n    assert double(1) == 3\n", setup=setup).ok


def test_writes_inside_its_own_directory_are_allowed_and_removed():
    r = run_sandboxed("def test_a():\n    open('scratch.txt', 'w').write('x')\n    assert open('scratch.txt').read() == 'x'\n")
    assert r.ok
    assert not any(p.name.startswith("sieve-sandbox-") for p in Path(os.environ.get("TMPDIR", "/tmp")).iterdir()
                   if p.is_dir() and (p / "scratch.txt").exists())


def test_no_test_function_is_a_failure():
    assert run_sandboxed("x = 1\n").status == "error"


def test_evaluate_code_switches_execution_off():
    e = evaluate_code("def test_a():\n    while True: pass\n", execute=False)
    assert e.executed is None and e.syntax
    e = evaluate_code("def test_a(:\n", execute=True)
    assert e.executed is False and e.exec_status == "syntax"
