"""The sandbox's behaviour for honest tests, its screen for dishonest ones, and where bubblewrap is
missing. (Escape attempts: tests/test_sandbox_escapes.py.)"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import pytest

from sieve.evals import sandbox
from sieve.evals.code import evaluate_code
from sieve.evals.sandbox import (
    SandboxUnavailable,
    SandboxWarning,
    _run,
    bwrap_available,
    check_sandbox,
    collect_tests,
    run_sandboxed,
    screen,
)

needs_bwrap = pytest.mark.skipif(not bwrap_available() and os.environ.get("SIEVE_SANDBOX_TESTS") != "require",
                                 reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")

SETUP = textwrap.dedent('''
    import re

    def extract_numbers(text):
        """Every run of digits in text, in order."""
        return [int(m) for m in re.findall(r"[0-9]+", text)]
''')


@needs_bwrap
def test_well_behaved_test_passes_and_sees_function_under_test():
    setup = "def double(x):\n    return 2 * x\n"
    code = "import random\ndef test_fuzz():\n    random.seed(0)\n    for _ in range(100):\n" \
           "        x = random.randint(-9, 9)\n        assert double(x) == x + x\n"
    r = run_sandboxed(code, setup=setup)
    assert r.ok and r.status == "ok" and r.detail == "ran test_fuzz"
    bad = run_sandboxed("def test_f():\n    assert double(1) == 3, 'off by one'\n", setup=setup)
    assert not bad.ok and bad.status == "error" and "off by one" in bad.detail and "line 2" in bad.detail


@needs_bwrap
def test_a_typical_generated_test_with_the_standard_library_passes():
    code = textwrap.dedent('''
        import random
        import re
        import string
        from collections import Counter, namedtuple
        from dataclasses import dataclass

        Case = namedtuple("Case", "text numbers")

        @dataclass
        class Gen:
            seed: int

        def _case(rng):
            nums = [rng.randint(0, 999) for _ in range(rng.randint(0, 5))]
            text = " ".join(rng.choice(string.ascii_letters) + str(n) for n in nums)
            return Case(text, nums)

        def test_fuzz():
            rng = random.Random(Gen(0).seed)
            for _ in range(200):
                case = _case(rng)
                assert extract_numbers(case.text) == case.numbers, case
                assert Counter(extract_numbers(case.text)) == Counter(case.numbers)
                assert re.sub("[0-9]", "", case.text) is not None
    ''')
    r = run_sandboxed(code, setup=SETUP)
    assert r.ok, r


@needs_bwrap
def test_every_test_function_runs_in_order_and_one_failure_fails_the_evaluation():
    code = "def test_b():\n    print('b')\ndef test_a():\n    print('a')\ndef helper():\n    assert False\n"
    r = run_sandboxed(code)
    assert r.ok and r.detail == "ran test_b, test_a" and r.output.index("b") < r.output.index("a")
    r = run_sandboxed(code + "def test_c():\n    assert 1 == 2\n")
    assert not r.ok and r.detail.startswith("test_c")
    assert run_sandboxed(code, call=["helper"]).status == "error"
    assert run_sandboxed(code, call=["missing"]).status == "error"


@needs_bwrap
def test_writes_inside_the_private_work_dir_are_allowed_and_private():
    code = "def test_a():\n    open('scratch.txt', 'w').write('x')\n    assert open('scratch.txt').read() == 'x'\n"
    assert run_sandboxed(code).ok
    # the next evaluation starts in an empty work dir
    assert run_sandboxed("import os\ndef test_a():\n    assert os.listdir('.') == []\n").ok


@needs_bwrap
def test_limits_hold_and_are_reported():
    assert run_sandboxed("def test_a():\n    x = bytearray(1 << 30)\n", memory_mb=128).status == "error"
    r = run_sandboxed("def test_a():\n    open('big', 'wb').write(b'0' * (16 << 20))\n", timeout_s=5)
    assert r.status == "error" and "File too large" in r.detail
    assert run_sandboxed("def test_a():\n    while True:\n        pass\n", timeout_s=1.0).status == "timeout"


@needs_bwrap
def test_each_test_runs_in_a_fresh_process():
    code = "STATE = []\ndef test_a():\n    STATE.append(1)\n    assert STATE == [1]\n" \
           "def test_b():\n    STATE.append(2)\n    assert STATE == [2]\n"
    assert run_sandboxed(code).ok


def test_no_test_function_is_a_failure():
    assert run_sandboxed("x = 1\n").status == "error"


@needs_bwrap
def test_evaluate_code_statuses():
    e = evaluate_code("def test_a():\n    while True: pass\n", execute=False)
    assert e.executed is None and e.syntax and e.exec_status == "not-run"
    e = evaluate_code("def test_a(:\n", execute=True)
    assert e.executed is False and e.exec_status == "syntax"
    e = evaluate_code("def extract_numbers(t):\n    return []\ndef test_a():\n    assert extract_numbers('') == []\n",
                      setup=SETUP, execute=True)
    assert e.executed is False and e.exec_status == "tampered"
    e = evaluate_code("def test_a():\n    assert extract_numbers('a1b22') == [1, 22]\n", setup=SETUP, execute=True)
    assert e.executed is True and e.exec_status == "ok"


# ------------------------------------------------------------------------------------- the screen

HONEST = [
    "import re\ndef test_a():\n    assert re.compile('x').match('x')\n",
    "from re import compile\ndef test_a():\n    assert compile('x')\n",
    "import random, string\ndef test_a():\n    random.seed(0)\n"
    "    s = ''.join(random.choice(string.digits) for _ in range(5))\n"
    "    assert extract_numbers(s) == ([int(s)] if s else [])\n",
    "def test_a():\n    text = 'please exit the system and write to the environ'\n    assert extract_numbers(text) == []\n",
    "import sys\ndef test_a():\n    assert extract_numbers(str(sys.maxsize)) == [sys.maxsize]\n",
    "def test_a():\n    with open('f.txt', 'w') as f:\n        f.write('1')\n    assert getattr(f, 'closed')\n",
    "import math\ndef test_a():\n    fn = extract_numbers\n    assert fn('3') == [math.floor(3.5)]\n",
]

DISHONEST = {
    "redefine the function": "def extract_numbers(t):\n    return [1]\ndef test_a():\n    assert extract_numbers('1') == [1]\n",
    "assign over it": "extract_numbers = lambda t: []\ndef test_a():\n    assert extract_numbers('') == []\n",
    "rebind through global": "def test_a():\n    global extract_numbers\n    extract_numbers = len\n",
    "patch its module": "import re\nre.findall = lambda *a: []\ndef test_a():\n    assert extract_numbers('1') == []\n",
    "import over it": "from os import path as extract_numbers\ndef test_a():\n    pass\n",
    "shadow with a parameter": "def test_a(extract_numbers=lambda t: []):\n    assert extract_numbers('1') == []\n",
    "swap its code": "def test_a():\n    extract_numbers.__code__ = (lambda t: []).__code__\n",
    "os._exit": "import os\ndef test_a():\n    try:\n        assert False\n    finally:\n        os._exit(0)\n",
    "sys.exit at import": "import sys\nsys.exit(0)\ndef test_a():\n    assert False\n",
    "exit builtin": "exit(0)\ndef test_a():\n    pass\n",
    "SystemExit": "raise SystemExit(0)\ndef test_a():\n    pass\n",
    "touch __main__": "import sys\nm = sys.modules['__main__']\ndef test_a():\n    pass\n",
    "__main__ import": "import __main__\ndef test_a():\n    pass\n",
    "computed getattr": "import os\nf = getattr(os, '_ex' + 'it')\ndef test_a():\n    f(0)\n",
    "getattr by string": "import os\ndef test_a():\n    getattr(os, '_exit')(0)\n",
    "raw descriptor write": "import os\ndef test_a():\n    os.write(3, b'pass')\n",
    "from os import write": "from os import write as w\ndef test_a():\n    w(3, b'pass')\n",
    "open a raw descriptor": "def test_a():\n    open(3, 'w').write('pass')\n",
    "eval": "def test_a():\n    eval('1')\n",
    "exec": "def test_a():\n    exec('x = 1')\n",
    "globals": "def test_a():\n    globals()['extract_numbers'] = len\n",
    "frames": "import sys\ndef test_a():\n    sys._getframe().f_back\n",
    "traceback frames": "def test_a():\n    try:\n        1 / 0\n    except Exception as e:\n"
                        "        e.__traceback__.tb_frame\n",
    "ctypes": "import ctypes\ndef test_a():\n    pass\n",
    "gc": "import gc\ndef test_a():\n    gc.get_objects()\n",
    "inspect": "import inspect\ndef test_a():\n    inspect.currentframe()\n",
    "importlib": "import importlib\ndef test_a():\n    importlib.import_module('os')\n",
    "dunder import": "def test_a():\n    __import__('os')\n",
    "builtins": "import builtins\ndef test_a():\n    builtins.print = None\n",
    "subclasses walk": "def test_a():\n    ().__class__.__bases__[0].__subclasses__()\n",
    "subprocess": "import subprocess\ndef test_a():\n    subprocess.run(['id'])\n",
    "os.system": "import os\ndef test_a():\n    os.system('id')\n",
    "pickle": "import pickle\ndef test_a():\n    pickle.loads(b'')\n",
    "mock": "from unittest import mock\ndef test_a():\n    pass\n",
    "setattr": "import re\ndef test_a():\n    setattr(re, 'findall', len)\n",
    "relative import": "from . import x\ndef test_a():\n    pass\n",
    "star import": "from os import *\ndef test_a():\n    pass\n",
    "module carried by a module": "import dataclasses\ndef test_a():\n    dataclasses.inspect.currentframe()\n",
    "patch a class of a module": "import json\njson.JSONEncoder.encode = lambda self, o: 'P'\ndef test_a():\n    pass\n",
    "string formatter lookup": "import os, string\ndef test_a():\n    string.Formatter().get_field('0.x', [os], {})\n",
    "annotations": "def test_a():\n    test_a.__annotations__['x'] = 'y'\n",
}


@pytest.mark.parametrize("code", HONEST)
def test_screen_lets_honest_tests_through(code):
    assert screen(code, SETUP) is None


@pytest.mark.parametrize("why", sorted(DISHONEST))
def test_screen_marks_dishonest_tests_tampered(why):
    reason = screen(DISHONEST[why], SETUP)
    assert reason and reason.startswith(("line", "does not")), why
    r = run_sandboxed(DISHONEST[why], setup=SETUP)
    assert r.status == "tampered" and not r.ok and r.detail == reason


def test_screen_of_the_code_under_test_only_refuses_what_fakes_results():
    assert screen(SETUP, generated=False) is None
    assert screen("import os, subprocess\ndef f():\n    return os.getcwd()\n", generated=False) is None
    assert screen("import os\nos._exit(0)\n", generated=False)
    assert run_sandboxed("def test_a():\n    pass\n", setup="import os\nos._exit(0)\n").status == "tampered"


@needs_bwrap
def test_runtime_redefinition_past_the_screen_is_still_tampered():
    """With the screen off, the harness still sees the function under test replaced."""
    code = "def test_a():\n    d = dict(a=1)\n    g = [v for v in [__builtins__]][0]\n" \
           "    import sys\n    sys.modules['__sieve_test__'] = 1\n"
    assert screen(code, SETUP)
    sneaky = "def test_a():\n    ns = test_a.__globals__\n    ns['extract_numbers'] = lambda t: [1]\n" \
             "    assert extract_numbers('x') == [1]\n"
    r = _run(sneaky, SETUP, None, 3.0, 256, 8, None, "bwrap", screen_code=False, audit_hook=False)
    assert r.status == "tampered" and "extract_numbers" in r.detail


def test_collected_tests_are_top_level_test_functions():
    assert collect_tests("def test_a():\n    def test_inner():\n        pass\nclass TestX:\n    pass\n"
                      "async def test_b():\n    pass\n") == ["test_a", "test_b"]


@needs_bwrap
def test_async_tests_do_not_pass_unawaited():
    r = run_sandboxed("async def test_a():\n    assert False\n")
    assert not r.ok and "async" in r.detail


# ----------------------------------------------------------------------------- where bwrap is missing

def test_missing_bwrap_refuses_with_how_to_install(monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap") as e:
        run_sandboxed("def test_a():\n    pass\n")
    assert "eval.sandbox" in str(e.value)
    with pytest.raises(SandboxUnavailable):
        evaluate_code("def test_a():\n    pass\n", execute=True)
    with pytest.raises(SandboxUnavailable, match="unknown sandbox mode"):
        check_sandbox("none")  # type: ignore[arg-type]


def test_process_mode_runs_and_warns_every_time(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "bwrap_available", lambda: False)
    for _ in range(2):
        with pytest.warns(SandboxWarning, match="WITHOUT OS-level isolation"):
            r = run_sandboxed("def test_a():\n    assert 1 + 1 == 2\n", mode="process")
        assert r.ok
    with pytest.warns(SandboxWarning):
        assert run_sandboxed("def test_a():\n    assert 1 == 2\n", mode="process").status == "error"
    # still no process creation in the weaker mode (seccomp), and the screen still applies
    marker = tmp_path / "m"
    r = _run(f"import os\ndef test_a():\n    if os.fork() == 0:\n        open({str(marker)!r}, 'w')\n",
             "", None, 3.0, 256, 8, None, "process", screen_code=False, audit_hook=False)
    assert not marker.exists() and r.status == "error"


def test_a_killed_sieve_leaves_nothing_running_in_process_mode(tmp_path, monkeypatch):
    """With eval.sandbox = "process", killing sieve mid-evaluation left the harness and the test running
    (re-parented to init, with no wall clock) and its work folder behind. Both now die with their parent,
    and the folder goes at the next process-mode evaluation."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    child = subprocess.Popen([sys.executable, "-c", (
        "import warnings; warnings.simplefilter('ignore')\n"
        "from sieve.evals.sandbox import _run\n"
        "_run('import time\\ndef test_a():\\n    time.sleep(60)\\n', '', None, 60.0, 256, 8, None, 'process')\n")],
        env={**os.environ, "TMPDIR": str(tmp_path)}, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(tmp_path.glob("sieve-sandbox-*")):
        time.sleep(0.1)
    (work,) = tmp_path.glob(f"sieve-sandbox-{child.pid}-*")
    time.sleep(1.0)  # the harness and its worker are running

    def children(pids: set[int]) -> set[int]:
        out = set()
        for d in Path("/proc").iterdir():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) in pids:
                out.add(int(d.name))
        return out

    def alive(pid: int) -> bool:  # a zombie (State Z) has ended
        try:
            return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    harness = children({child.pid})
    workers = children(harness)
    assert harness and workers, "the harness and its worker were not running under the child"
    child.send_signal(signal.SIGKILL)
    child.wait()
    time.sleep(2.0)
    assert [pid for pid in harness | workers if alive(pid)] == []  # nothing outlives the killed sieve
    assert work.exists()  # left by the killed process...
    os.utime(work, (time.time() - 120, time.time() - 120))  # folders younger than a minute are left alone
    with pytest.warns(SandboxWarning):
        assert run_sandboxed("def test_a():\n    assert True\n", mode="process").ok
    assert not work.exists()  # ...and swept by the next evaluation


def test_process_mode_holds_writes_relative_to_a_directory_and_deep_folders(tmp_path, monkeypatch):
    """In process mode (no mount namespace), ``os.rename(..., dst_dir_fd=fd)`` and ``os.mkdir(...,
    dir_fd=fd)`` on a descriptor of a folder outside wrote there past the audit hook; a test nesting
    1,500 folders made the clean-up raise RecursionError, and every later run too. Now the first is
    refused (descriptors inside the work folder still work: shutil.rmtree), and the
    second is removed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = textwrap.dedent(f"""
        import os
        def test_a():
            out = os.open({str(outside)!r}, os.O_RDONLY)
            with open("payload.txt", "w") as f:
                f.write("x")
            try:
                os.rename("payload.txt", "MARKER.txt", dst_dir_fd=out)
            except PermissionError:
                pass
            try:
                os.mkdir("DIR", dir_fd=out)
            except PermissionError:
                pass
            try:
                os.open("OPENED.txt", os.O_WRONLY | os.O_CREAT, dir_fd=out)
            except PermissionError:
                pass
        """)
    honest = textwrap.dedent("""
        import os, shutil, tempfile
        def test_a():
            d = tempfile.mkdtemp(dir=".")
            os.makedirs(os.path.join(d, "a", "b"))
            with open(os.path.join(d, "a", "b", "f.txt"), "w") as f:
                f.write("x")
            shutil.rmtree(d)  # descriptors of folders inside the work folder
            assert not os.path.exists(d)
        """)
    deep = "import os\ndef test_a():\n    for _ in range(1500):\n        os.mkdir('a')\n        os.chdir('a')\n"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.warns(SandboxWarning):
        assert run_sandboxed(escape, mode="process", timeout_s=10).ok
        assert run_sandboxed(honest, mode="process", timeout_s=10).ok
        assert run_sandboxed(deep, mode="process", timeout_s=20).ok
    assert sorted(p.name for p in outside.iterdir()) == []  # nothing written outside
    assert list(tmp_path.glob("sieve-sandbox-*")) == []  # the deep folder went too


def test_the_sweep_leaves_folders_in_use_and_new_ones(tmp_path, monkeypatch):
    """A live evaluation's folder seen from another pid namespace looked stale by its pid and was
    removed: a folder is now swept only when no evaluation holds its lock, and not in its first minute."""
    import time

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    held, stale, young = (tmp_path / f"sieve-sandbox-{n}-x" for n in (1, 2, 3))
    for d in (held, stale, young):
        (d / "sub").mkdir(parents=True)
    for d in (held, stale):
        os.utime(d, (time.time() - 120, time.time() - 120))
    lock = sandbox._lock_dir(str(held))
    try:
        sandbox._sweep_stale_work_dirs()
        assert held.exists() and young.exists() and not stale.exists()
    finally:
        os.close(lock)


def test_invalid_limits_are_refused():
    for kw in ({"timeout_s": 0}, {"memory_mb": -5}, {"file_mb": 0}, {"timeout_s": float("inf")},
               {"timeout_s": float("nan")}, {"memory_mb": 1 << 40}):
        with pytest.raises(ValueError, match="must be > 0"):
            run_sandboxed("def test_a():\n    pass\n", **kw)


def test_sandbox_is_a_recipe_key(tmp_path):
    from sieve.errors import RecipeError
    from sieve.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    assert load_recipe(root / "recipes/regex.toml").eval.sandbox == "bwrap"
    assert load_recipe(root / "recipes/regex.toml", ['eval.sandbox="process"']).eval.sandbox == "process"
    with pytest.raises(RecipeError, match=r"\[eval.sandbox\] 'none' is not allowed"):
        load_recipe(root / "recipes/regex.toml", ['eval.sandbox="none"'])


def test_code_nested_too_deep_for_the_parser_is_a_syntax_failure_not_a_crash():
    """Generated code can be deeper than Python's parser allows (RecursionError, MemoryError): sieve's
    own process must not fall over, and it counts as not valid Python."""
    for code in ("x = " + "1+" * 60_000 + "1\ndef test_a():\n    pass\n",
                 "x = " + "-" * 60_000 + "1\ndef test_a():\n    pass\n"):
        e = evaluate_code(code, execute=True)
        assert not e.syntax and e.exec_status == "syntax" and e.executed is False
        r = run_sandboxed(code)
        assert r.status == "error" and r.detail.startswith("does not parse")


def test_code_over_the_size_cap_is_not_read():
    """Every parse and walk in sieve's own process grows with the code: over the cap (about 32k tokens,
    far past any generation budget) an evaluation is refused before the first parse."""
    code = "def test_a():\n    pass\n" + "x = 1\n" * 30_000  # 180 KB
    r = run_sandboxed(code)
    assert r.status == "error" and "not evaluated" in r.detail and not r.ok, r


def test_nested_main_guards_cost_one_walk(monkeypatch):
    """``if __name__ ...:`` blocks nested 90 deep: finding what they guard visits each node a bounded
    number of times (it walked each guard's body once per enclosing guard: 74 s of sieve's CPU for a
    crafted module under the old 1 MiB cap)."""
    import ast

    depth = 90
    code = ("".join("    " * i + "if __name__ == 'x':\n" for i in range(depth)) + "    " * depth + "class TestA:\n"
            + "    " * (depth + 1) + "def test_a(self):\n" + "    " * (depth + 2) + "pass\n"
            + "def test_b():\n    pass\n")
    nodes = sum(1 for _ in ast.walk(ast.parse(code)))
    visited = 0
    walk = ast.walk

    def counting(node):
        nonlocal visited
        for n in walk(node):
            visited += 1
            yield n

    monkeypatch.setattr(ast, "walk", counting)
    assert sandbox.unrun_tests(code) is None  # the test class sits under the guards: not reported
    assert visited <= 3 * nodes, (visited, nodes)
    monkeypatch.setattr(ast, "walk", walk)
    assert sandbox.unrun_tests(code.replace("if __name__ == 'x':", "if True:")) is not None


def test_installed_but_unusable_bwrap_says_what_to_allow(monkeypatch, tmp_path):
    """bwrap present but unable to make its namespaces (here: a stand-in that fails as bwrap does)."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(SandboxUnavailable, match="user namespaces") as e:
            check_sandbox("bwrap")
        assert "No permissions to create new namespace" in str(e.value) and "eval.sandbox" in str(e.value)
    finally:
        sandbox._probe.cache_clear()
