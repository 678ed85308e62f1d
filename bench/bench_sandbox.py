"""What the OS-level sandbox costs per evaluation. One command, ratios from one run.

    python bench/bench_sandbox.py [--repeats 30]

Times one evaluation (one generated test module against its function under test, wall clock as sieve
sees it) three ways, interleaved (old, bwrap, process, old, bwrap, ...), and reports medians and the
ratio of medians with the range of the per-round ratios:

- ``old``: the sandbox before the bubblewrap work (an interpreter with an audit hook, under ``unshare
  -rn``), loaded from this repository's history (commit ``OLD_COMMIT``);
- ``bwrap``: the default mode (bubblewrap, one forked worker per test behind seccomp);
- ``process``: the weaker mode (same harness, no namespaces);
- ``bwrap, no cgroup``: the default mode without the ``pids`` and memory cgroups an evaluation runs in
  where sieve can make them (to show what those bounds cost; the same as ``bwrap`` where none can be
  made).

Two workloads: the study's typical answer (one ``test_fuzz`` with 200 random cases) and a module with
three test functions (one worker process each).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sieve.evals import sandbox  # noqa: E402

OLD_COMMIT = "8a3b397"  # main just before the bubblewrap sandbox landed

SETUP = '''
import re

def extract_numbers(text):
    """Every run of digits in text, in order."""
    return [int(m) for m in re.findall(r"[0-9]+", text)]
'''
ONE_TEST = '''
import random
import string

def test_fuzz():
    random.seed(0)
    for _ in range(200):
        nums = [random.randint(0, 999) for _ in range(random.randint(0, 5))]
        text = " ".join(random.choice(string.ascii_letters) + str(n) for n in nums)
        assert extract_numbers(text) == nums, text
'''
THREE_TESTS = ONE_TEST + '''
def test_empty():
    assert extract_numbers("") == []

def test_words():
    assert extract_numbers("no digits here") == []
'''


def _old_module():
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:sieve/evals/sandbox.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_sandbox.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    old = _old_module()
    warnings.simplefilter("ignore", sandbox.SandboxWarning)
    ways = {
        "old": lambda code: old.run_sandboxed(code, setup=SETUP, timeout_s=10),
        "bwrap": lambda code: sandbox.run_sandboxed(code, setup=SETUP, timeout_s=10),
        "process": lambda code: sandbox.run_sandboxed(code, setup=SETUP, timeout_s=10, mode="process"),
        "bwrap, no cgroup": _without_cgroup(lambda code: sandbox.run_sandboxed(code, setup=SETUP, timeout_s=10)),
    }
    print(f"# cgroups here: {', '.join(_cgroups()) or 'none'}")
    print(f"# {platform.machine()}, {platform.python_version()}, {args.repeats} interleaved rounds")
    for label, code in (("1 test function", ONE_TEST), ("3 test functions", THREE_TESTS)):
        for way in ways.values():  # warm-up (interpreter query, probe, page cache)
            r = way(code)
            assert r.ok, r
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                t0 = time.perf_counter()
                r = way(code)
                times[name].append(time.perf_counter() - t0)
                assert r.ok, (name, r)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in ("bwrap", "process"):
            pair = sorted(b / a for a, b in zip(times["old"], times[name]))
            lo, hi = pair[len(pair) // 10], pair[-1 - len(pair) // 10]
            print(f"{label}: old {med['old'] * 1000:.0f} ms, {name} {med[name] * 1000:.0f} ms, "
                  f"ratio {med[name] / med['old']:.2f}x (10-90%: {lo:.2f}-{hi:.2f})")
        pair = sorted(b / a for a, b in zip(times["bwrap, no cgroup"], times["bwrap"]))
        lo, hi = pair[len(pair) // 10], pair[-1 - len(pair) // 10]
        print(f"{label}: bwrap without the cgroups {med['bwrap, no cgroup'] * 1000:.0f} ms, with them "
              f"{med['bwrap'] * 1000:.0f} ms, ratio {med['bwrap'] / med['bwrap, no cgroup']:.2f}x (10-90%: {lo:.2f}-{hi:.2f})")


def _cgroups() -> list[str]:
    """Which of an evaluation's cgroups sieve makes here."""
    made = sandbox._eval_cgroups(1 << 30)
    kinds = [k for d in made for k, f in (("pids", "pids.max"), ("memory", "memory.max"),
                                          ("memory", "memory.limit_in_bytes")) if os.path.exists(os.path.join(d, f))]
    for d in made:
        sandbox._remove_cgroup(d)
    return kinds


def _without_cgroup(run):
    """``run`` with sieve's cgroups switched off for its call."""
    def call(code):
        real = sandbox._eval_cgroups
        sandbox._eval_cgroups = lambda memory_bytes: []
        try:
            return run(code)
        finally:
            sandbox._eval_cgroups = real
    return call


if __name__ == "__main__":
    main()
