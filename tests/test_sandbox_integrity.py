"""Honest results: a generated test cannot make a false assertion about the code under test pass.

Each attempt asserts something FALSE about the function under test and tries to make it pass anyway by
changing what that function sees (a shadowed builtin, a patched module reached through an alias or the
module table, a patched class, mutated data or defaults) or by forging its own report (a fresh copy of
``posix`` with the real ``write``/``_exit``, the worker's frames, a swapped report pipe). The effect
checked is the outcome: never ``ok``. Attempts run through :func:`evaluate_code` exactly as
``recipes.regex`` calls it, and the runtime layers are also checked with the syntax screen off.
"""

from __future__ import annotations

import ast
import contextlib
import os
import textwrap
from pathlib import Path

import pytest

from sieve.evals.code import evaluate_code
from sieve.evals.sandbox import _run, bwrap_available, run_sandboxed

pytestmark = pytest.mark.skipif(not bwrap_available() and os.environ.get("SIEVE_SANDBOX_TESTS") != "require",
                                reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")

SETUP = textwrap.dedent('''
    import re

    TABLE = {"a": 1}

    class Checker:
        def ok(self, digits):
            return len(digits) >= 7

    def normalize_phone(number, *, keep_plus=True):
        """Keep the digits of a phone number. Raises ValueError if fewer than 7 digits."""
        digits = re.sub(r"\\D", "", number)
        if not Checker().ok(digits) or TABLE.get("a") != 1:
            raise ValueError("too few digits")
        return ("+" if keep_plus and number.strip().startswith("+") else "") + digits
''')
FALSE = "    assert normalize_phone('12') == '12'\n"  # raises ValueError on the real function

ATTEMPTS = {
    "shadow_builtin_at_top": "def len(x):\n    return 10\ndef test_fuzz():\n" + FALSE,
    "patch_module_through_alias_at_top": "import re\nm = re\nm.sub = lambda p, r, s: '1234567'\ndef test_fuzz():\n"
                                         "    assert normalize_phone('12') == '1234567'\n",
    "patch_module_through_alias_in_test": "import re\ndef test_fuzz():\n    m = re\n    m.sub = lambda p, r, s: '1234567'\n"
                                          "    assert normalize_phone('12') == '1234567'\n",
    "patch_module_from_module_table": "import sys\ndef test_fuzz():\n    getattr(sys, 'modules')['re'].sub = "
                                      "lambda p, r, s: '1234567'\n    assert normalize_phone('12') == '1234567'\n",
    "module_table_through_a_module": "import typing\ndef test_fuzz():\n    typing.sys.modules['re'].sub = "
                                     "lambda p, r, s: '1234567'\n    assert normalize_phone('12') == '1234567'\n",
    "patch_builtins_module": "import sys\ndef test_fuzz():\n    b = getattr(sys, 'modules')['builtins']\n"
                             "    b.len = lambda x: 10\n" + FALSE,
    "patch_class_through_alias": "def test_fuzz():\n    c = Checker\n    c.ok = lambda self, d: True\n" + FALSE,
    "mutate_module_data": "def test_fuzz():\n    TABLE.update(a=2)\n    try:\n        normalize_phone('1234567')\n"
                          "    except ValueError:\n        return\n    assert False, 'it should raise'\n",
    "change_defaults_through_alias": "def test_fuzz():\n    f = normalize_phone\n    f.__kwdefaults__ = {'keep_plus': False}\n"
                                     "    assert normalize_phone('+1234567') == '1234567'\n",
    "fresh_posix_copy_forges_report": textwrap.dedent("""
        import sys
        def test_fuzz():
            mods = getattr(sys, 'modules')
            real = mods.pop('posix')
            bs = mods['_frozen_importlib']
            fresh = bs.module_from_spec(bs.BuiltinImporter.find_spec('posix'))
            mods['posix'] = real
            fresh.write(3, b'P')
            r, w = fresh.pipe()
            fresh.dup2(w, 3)  # the worker's own report then goes nowhere
        """) + FALSE,
    "builtins_getattr_computes_exit": textwrap.dedent("""
        import sys
        def test_fuzz():
            mods = getattr(sys, 'modules')
            real = mods.pop('posix')
            bs = mods['_frozen_importlib']
            fresh = bs.module_from_spec(bs.BuiltinImporter.find_spec('posix'))
            mods['posix'] = real
            fresh.write(3, b'P')
            mods['builtins'].getattr(fresh, '_' + 'exit')(0)
        """) + FALSE,
    "frames_through_an_imported_name": textwrap.dedent("""
        from traceback import walk_stack
        from typing import sys as s
        def test_fuzz():
            for f, _ in walk_stack(None):
                loc = s.modules['builtins'].getattr(f, 'f_' + 'locals')
                if 'exit_' in loc:
                    loc['write'](3, b'P')
                    loc['exit_'](0)
        """) + FALSE,
    "worker_frames_through_builtins_getattr": textwrap.dedent("""
        import sys
        def test_fuzz():
            ga = getattr(sys, 'modules')['builtins'].getattr
            f = ga(ga(sys, 'modules')['sys'], '_get' + 'frame')(1)
            loc = ga(f, 'f_' + 'locals')
            loc['write'](3, b'P')
            loc['exit_'](0)
        """) + FALSE,
    # an import named like a refused builtin, bound only in a function never called, left the builtin free
    "builtin_freed_by_an_import_in_an_uncalled_function": textwrap.dedent("""
        import sys
        def _never_called():
            from string import Template as vars
        def test_fuzz():
            fr = vars(sys)['_get' + 'frame'](0)
            FT = vars(type(fr))
            while fr is not None and 'code _worker' not in repr(fr):
                fr = FT['f_b' + 'ack'].__get__(fr)
            loc = FT['f_lo' + 'cals'].__get__(fr)
            loc['write'](3, b'P')
            loc['exit_'](0)
        """) + FALSE,
    # functools.update_wrapper told to copy a computed name: a getattr and setattr with computed names
    "update_wrapper_copies_a_computed_name": textwrap.dedent("""
        import functools
        import sys
        def ga(obj, name):
            box = []
            W = type('W', (), {name: property(None, lambda s, v: box.append(v))})
            functools.update_wrapper(W(), obj, assigned=(name,), updated=())
            return box[0]
        def test_fuzz():
            fr = ga(sys, '_get' + 'frame')(0)
            while fr is not None and 'code _worker' not in repr(fr):
                fr = ga(fr, 'f_b' + 'ack')
            loc = ga(fr, 'f_lo' + 'cals')
            loc['write'](3, b'P')
            loc['exit_'](0)
        """) + FALSE,
    "generator_test_never_runs_its_body": "def test_fuzz():\n" + FALSE + "    yield\n",
    "async_generator_test_never_runs_its_body": "async def test_fuzz():\n" + FALSE + "    yield\n",
    "decorator_swallows_the_failure": textwrap.dedent("""
        import functools
        def checked(fn):
            @functools.wraps(fn)
            def run():
                try:
                    fn()
                except (AssertionError, ValueError):
                    pass
            return run
        @checked
        def test_fuzz():
        """) + FALSE,
    "test_name_rebound_after_its_def": "def test_fuzz():\n" + FALSE + "test_fuzz = print\n",
    "private_module_state_poisoned": "import re\ndef test_fuzz():\n    re.sub('x', '', '')\n"
                                     "    re._cache[(str, r'\\D', 0)] = re.compile('x')\n"
                                     "    assert normalize_phone('1-2-3-4-5-6-7') == '1-2-3-4-5-6-7'\n",
    "nested_statement_deeper_than_the_screen_follows": "import re\ndef test_fuzz():\n    re.x[" + "-" * 900 + "1].y = 1\n",
}


def test_the_false_assertion_fails_honestly():
    e = evaluate_code("def test_fuzz():\n" + FALSE, setup=SETUP, execute=True)
    assert (e.executed, e.exec_status) == (False, "error")
    assert evaluate_code("def test_fuzz():\n    assert normalize_phone('+1 234 567') == '+1234567'\n", setup=SETUP,
                         execute=True).exec_status == "ok"


@pytest.mark.parametrize("name", sorted(ATTEMPTS))
def test_a_false_assertion_never_passes(name):
    # exactly as recipes/regex.py calls it
    e = evaluate_code(ATTEMPTS[name], setup=SETUP, execute=True, timeout_s=3.0, memory_mb=512, sandbox="bwrap")
    assert e.executed is False and e.exec_status in ("tampered", "error"), (name, e)


RUNTIME = ["shadow_builtin_at_top", "patch_module_through_alias_at_top", "patch_module_through_alias_in_test",
           "patch_module_from_module_table", "module_table_through_a_module", "patch_class_through_alias",
           "mutate_module_data", "change_defaults_through_alias", "fresh_posix_copy_forges_report",
           "builtins_getattr_computes_exit"]


@pytest.mark.parametrize("name", RUNTIME)
def test_runtime_layers_hold_with_the_screen_off(name):
    """The worker's own checks (separate globals, the snapshot of what the code under test reaches, no
    second posix, the report pipe's identity) hold without the syntax screen."""
    r = _run(ATTEMPTS[name], SETUP, None, 3.0, 512, 8, None, "bwrap", screen_code=False, audit_hook=True)
    assert not r.ok and r.status in ("tampered", "error", "no-result"), (name, r)


def test_runtime_check_names_what_changed():
    r = _run(ATTEMPTS["patch_module_through_alias_in_test"], SETUP, None, 3.0, 512, 8, None, "bwrap",
             screen_code=False, audit_hook=True)
    assert r.status == "tampered" and "module re: sub" in r.detail, r


@pytest.mark.parametrize("code", [
    "import random, string, warnings\ndef test_fuzz():\n    random.seed(0)\n    with warnings.catch_warnings():\n"
    "        warnings.simplefilter('ignore')\n        warnings.warn('x')\n    for _ in range(100):\n"
    "        s = ''.join(random.choice(string.digits + '+- ') for _ in range(12))\n        try:\n"
    "            assert normalize_phone(s).lstrip('+').isdigit()\n        except ValueError:\n            pass\n",
    "import io, contextlib\ndef test_fuzz():\n    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n"
    "        print(normalize_phone('+1 234 567'))\n    assert buf.getvalue() == '+1234567\\n'\n",
    "import dataclasses, enum, functools, tempfile, json, decimal, fractions, datetime, statistics, collections\n"
    "import typing, textwrap, difflib, logging\n@dataclasses.dataclass\nclass P:\n    x: int\nclass C(enum.Enum):\n    A = 1\n"
    "@functools.lru_cache\ndef h(n):\n    return n\nlogging.basicConfig(level=logging.INFO)\n"
    "def test_fuzz():\n    assert C(1) is C.A and h(2) == 2 and P(1).x == 1\n    t: typing.List[int] = [1]\n"
    "    with tempfile.TemporaryDirectory(dir='.'):\n        pass\n    json.dumps({'a': str(decimal.Decimal(1))})\n"
    "    fractions.Fraction(1, 3)\n    datetime.datetime.now().isoformat()\n    statistics.mean([1, 2])\n"
    "    collections.Counter('aab')\n    textwrap.dedent('  x')\n    difflib.SequenceMatcher(None, 'a', 'b').ratio()\n"
    "    logging.getLogger('t').info('x')\n    assert normalize_phone('1234567') == '1234567'\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\ndef test_fuzz():\n    s = Stack()\n"
    "    s.items.append(normalize_phone('7654321'))\n    assert s.items == ['7654321']\n",
])
def test_honest_tests_that_touch_the_standard_library_still_pass(code):
    r = run_sandboxed(code, setup=SETUP, timeout_s=10)
    assert r.ok, r


OS_PROBE = textwrap.dedent('''
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    def test_a():
        got = {}
        for name, nr, args in [("clone3", 435, (0, 0)), ("vfork", 58, ()), ("fork", 57, ()), ("io_uring_setup", 425, (8, 0)),
                               ("execveat", 322, (-100, 0, 0, 0, 0)), ("clone_newuser", 56, (0x10000000 | 17, 0, 0, 0, 0)),
                               ("unshare_newuser", 272, (0x10000000,)), ("socket_inet", 41, (2, 1, 0)),
                               ("socket_netlink", 41, (16, 3, 0)), ("chroot", 161, (b"/sandbox",)), ("setuid0", 105, (0,)),
                               ("mknod_char_device", 133, (b"/sandbox/n", 0o20666, 0x103)),
                               ("memfd_create", 319, (b"m", 0)), ("shmget", 29, (0, 1 << 20, 0o1600)),
                               ("msgget", 68, (0, 0o1600)), ("setxattr", 188, (b"/sandbox", b"user.k", b"v" * 64, 64, 0)),
                               ("fsetxattr", 190, (0, b"user.k", b"v", 1, 0)), ("inotify_init1", 294, (0,)),
                               ("inotify_init", 253, ()), ("mq_open", 240, (b"q", 0o100, 0o600, 0)),
                               ("vmsplice", 278, (0, 0, 0, 0))]:
            v = libc.syscall(nr, *args)
            if v == 0 and nr in (57, 58):
                libc.syscall(60, 0)  # a child (never expected) leaves at once
            got[name] = -1 if v < 0 else v, ctypes.get_errno() if v < 0 else 0
        print("GOT", got, flush=True)
''')


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 system call numbers")
def test_process_namespace_and_device_calls_fail_under_the_os_layers_alone():
    """Raw system calls through ctypes, with the screen and the audit hook off: only seccomp, the user
    namespace and the missing capabilities stand in the way, and each call fails."""
    r = _run(OS_PROBE, "", None, 5.0, 256, 8, None, "bwrap", screen_code=False, audit_hook=False)
    assert r.ok, r
    got = ast.literal_eval(r.output.split("GOT ", 1)[1].splitlines()[0])
    assert got["clone3"] == (-1, 38)  # ENOSYS: the C library falls back to clone, which is checked
    for name in ("vfork", "fork", "io_uring_setup", "execveat", "clone_newuser", "unshare_newuser", "chroot",
                 "mknod_char_device", "memfd_create", "shmget", "msgget", "setxattr", "fsetxattr", "inotify_init1",
                 "inotify_init", "mq_open", "vmsplice"):
        # memfd, System V shared memory, message queues, extended attributes and pages pinned in pipes hold
        # memory outside the address-space limit (a tmpfs's size counts file data only); file watches and
        # POSIX message queues are budgets shared with every process of the user
        assert got[name] == (-1, 1), (name, got[name])  # EPERM
    assert got["socket_inet"] == (-1, 13) and got["socket_netlink"] == (-1, 13)  # EACCES
    assert got["setuid0"][0] == -1


SIGNAL_QUEUE = textwrap.dedent("""
    import signal
    def test_queue():
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
        queued = 0
        try:
            for _ in range(5000):
                signal.raise_signal(signal.SIGRTMIN)
                queued += 1
        except OSError:
            pass
        print("QUEUED", queued, flush=True)
        assert queued <= 64
""")


@pytest.mark.parametrize("mode", ["bwrap", "process"])
def test_queued_signals_do_not_spend_the_host_users_budget(mode):
    """Queued real-time signals count against RLIMIT_SIGPENDING of the real user, passed up through
    the user namespace to the user sieve runs as: a test that queued about 96,000 left every process of
    that user unable to queue a signal (sigqueue, pthread_kill with a real-time signal) until it ended.
    The harness sets the limit to 64."""
    r = run_sandboxed(SIGNAL_QUEUE, timeout_s=10.0, mode=mode)
    assert r.ok and r.status == "ok", r


SETUP_FORGERIES = {
    "update_wrapper_walks_to_the_worker": textwrap.dedent("""
        import functools
        import sys
        def f(x):
            return x
        def _ga(obj, name):
            box = []
            W = type('W', (), {name: property(None, lambda s, v: box.append(v))})
            functools.update_wrapper(W(), obj, assigned=(name,), updated=())
            return box[0]
        _fr = _ga(sys, '_get' + 'frame')(0)
        while _fr is not None and 'code _worker' not in repr(_fr):
            _fr = _ga(_fr, 'f_b' + 'ack')
        if _fr is not None:
            _loc = _ga(_fr, 'f_lo' + 'cals')
            _loc['write'](3, b'P')
            _loc['exit_'](0)
        """),
    "inspect_stack": "import inspect\nfor fi in inspect.stack():\n    loc = fi.frame.f_locals\n    if 'exit_' in loc:\n"
                     "        loc['write'](3, b'P')\n        loc['exit_'](0)\ndef f(x):\n    return x\n",
    "traceback_walk_stack": "import traceback\nfor fr, _ in traceback.walk_stack(None):\n    loc = fr.f_locals\n"
                            "    if 'exit_' in loc:\n        loc['write'](3, b'P')\n        loc['exit_'](0)\n"
                            "def f(x):\n    return x\n",
}


@pytest.mark.parametrize("name", sorted(SETUP_FORGERIES))
def test_a_prompt_files_code_under_test_cannot_pass_every_test(name):
    """A shared prompts file's code under test that walks up to the worker's frame to write the report
    itself: the generated test's false assertion still does not pass."""
    e = evaluate_code("def test_a():\n    assert f(1) == 2\n", setup=SETUP_FORGERIES[name], execute=True, timeout_s=3.0)
    assert e.executed is False and e.exec_status in ("tampered", "error"), (name, e)


CLASSIFY = textwrap.dedent('''
    import re

    class Rules:
        table = {"digits": r"\\d+"}

    _rules = Rules()
    _rules.extra = [r"^x$"]

    def classify(s):
        if re.fullmatch(Rules.table["digits"], s):
            return "number"
        if any(re.fullmatch(p, s) for p in _rules.extra):
            return "x"
        return "other"
''')
DATA_THROUGH_LOCAL_NAMES = {
    "class_data": "def test_a():\n    t = Rules.table\n    t['digits'] = r'[a-z]+'\n    assert classify('hello') == 'number'\n",
    "object_attribute": "def test_a():\n    r = _rules\n    r.extra = [r'.*']\n    assert classify('hello') == 'x'\n",
    "object_data": "def test_a():\n    e = _rules.extra\n    e.append(r'.*')\n    assert classify('hello') == 'x'\n",
}


@pytest.mark.parametrize("name", sorted(DATA_THROUGH_LOCAL_NAMES))
@pytest.mark.parametrize("screen_code", [True, False])
def test_the_code_under_tests_class_and_object_data_changed_through_local_names(name, screen_code):
    """A false assertion made true by changing the data of a class or an object of the code under test
    through a local name (no alias the screen can see): the snapshot compares their contents."""
    r = _run(DATA_THROUGH_LOCAL_NAMES[name], CLASSIFY, None, 3.0, 512, 8, None, "bwrap", screen_code=screen_code,
             audit_hook=True)
    assert r.status == "tampered" and ("__sieve_setup__.Rules.table" in r.detail or "_rules" in r.detail), r
    assert run_sandboxed("def test_a():\n    assert classify('12') == 'number' and classify('x') == 'x'\n",
                         setup=CLASSIFY, timeout_s=5).ok


def test_the_attempts_that_the_screen_alone_stops_work_without_it():
    """Control: with the screen off, these attempts do pass their false assertion (the screen is what
    stops them), so the checks above can fail."""
    for name in ("builtin_freed_by_an_import_in_an_uncalled_function", "update_wrapper_copies_a_computed_name"):
        r = _run(ATTEMPTS[name], SETUP, None, 3.0, 512, 8, None, "bwrap", screen_code=False, audit_hook=True)
        assert r.ok, (name, r)


def test_a_prompt_files_code_under_test_nested_too_deeply_is_refused_not_a_crash():
    setup = "import re\nre.x[" + "-" * 900 + "1].y = 1\ndef f(x):\n    return x\n"
    e = evaluate_code("def test_a():\n    assert f(1) == 1\n", setup=setup, execute=True, timeout_s=3.0)
    assert e.exec_status == "tampered"


def _extract_emails() -> str:
    import tomllib

    spec = tomllib.loads((Path(__file__).parents[1] / "recipes/prompts/regex_task.toml").read_text())
    return next(f["code"] for f in spec["function"] if f["name"] == "extract_emails")


DATA = Path(__file__).parent / "data"
MISCOUNTED = sorted((DATA / "sandbox_miscounted").glob("*.txt"))
HONEST = sorted((DATA / "sandbox_honest").glob("*.txt"))


@pytest.mark.parametrize("path", MISCOUNTED, ids=[p.stem for p in MISCOUNTED])
def test_honest_looking_tests_of_a_false_property_are_not_counted_ok(path):
    """Written as a careless model might (no lying construct), each states a FALSE property of the real
    extract_emails: a test class beside a test function, unittest.main() from a test, a test defined
    under if/else, `return ok` instead of assert, an assert on a tuple. pytest fails or warns on each;
    they were counted ok."""
    e = evaluate_code(path.read_text(), setup=_extract_emails(), execute=True, timeout_s=5.0)
    assert e.exec_status == "error" and not e.executed, (path.stem, e)


@pytest.mark.parametrize("path", HONEST, ids=[p.stem for p in HONEST])
def test_common_honest_tests_are_not_refused(path):
    """Patterns a model writes in honest tests (the `__main__` guard, a docstring naming a dunder, stdout
    captured and restored, stdin or argv set, os.environ set, operator.itemgetter, a signal.alarm
    timeout, a unittest class the module runs itself): they were refused as tampered."""
    e = evaluate_code(path.read_text(), setup=_extract_emails(), execute=True, timeout_s=5.0)
    assert e.exec_status == "ok" and e.executed, (path.stem, e)


def test_a_module_whose_every_test_sits_under_a_false_if_has_no_test():
    e = evaluate_code("HAVE = False\nif HAVE:\n    def test_a():\n        assert True\n", setup=_extract_emails(),
                      execute=True, timeout_s=5.0)
    assert e.exec_status == "error" and not e.executed


def test_many_files_in_the_work_folder_stop_the_test():
    """A tmpfs bounds its bytes, not its inodes: a test making empty folders held over a GiB of host
    kernel memory in ten seconds. The harness now stops a test once the folder holds 10,000 more."""
    code = textwrap.dedent("""
        import os
        def test_many():
            for i in range(200_000):
                os.mkdir("d%d" % i)
        """)
    r = _run(code, "", None, 30.0, 256, 8, None, "bwrap")
    assert r.status == "killed" and "more than 10000 files and folders in the sandbox folder" in r.detail, r
    assert r.seconds < 25  # stopped at the limit, not at the time limit
    # the report pipe closed first: the harness read its end and stopped counting (706,000 folders, +1.7 GiB)
    closing = code.replace("def test_many():\n", "import select\ndef test_many():\n    select.epoll.fromfd(1 + 2).close()\n")
    assert "fromfd" in closing
    r = _run(closing, "", None, 30.0, 256, 8, None, "bwrap")
    assert r.status == "killed" and "more than 10000 files" in r.detail and r.seconds < 25, r


def test_code_the_test_wrote_is_not_imported():
    """A test wrote a module into its folder and imported it: a compiled one (a .so) or bytecode (a .pyc)
    runs past the screen and the compile check. The audit hook refuses both (a .py is refused as code
    compiled at run time)."""
    import importlib.util
    import marshal

    pyc = importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(compile("VALUE = 1\n", "helper.py", "exec"))
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("helper.pyc", pyc)
    for name, data in (("helper.pyc", pyc), ("helper.cpython-311-x86_64-linux-gnu.so", b"\x7fELF" + b"\0" * 60),
                       ("h.zip", buf.getvalue())):
        code = textwrap.dedent(f"""
            import sys
            def test_writes_and_imports():
                with open({name!r}, "wb") as f:
                    f.write({data!r})
                sys.path.insert(0, {name!r} if {name!r}.endswith(".zip") else ".")
                import helper
                assert helper.VALUE == 1
            """)
        r = _run(code, "", None, 10.0, 256, 8, None, "bwrap")
        assert r.status == "error" and "importing code the test wrote is not allowed" in r.detail, (name, r)


def test_code_objects_are_not_made_at_run_time():
    """A coroutine's code (``cr_code``), rebuilt with ``code.replace(co_names=...)`` into a function,
    was a getattr with a computed name, walked frames to the worker and forged a pass. The screen
    refuses those names, and the audit hook refuses making code or functions from parts."""
    forged = textwrap.dedent("""
        async def co():
            return x.y
        def test_a():
            c = co()
            code = c.cr_code
            c.close()
            assert code is not None
        """)
    assert run_sandboxed(forged, timeout_s=10).status == "tampered"
    for body in ("(lambda: 1).__code__.replace(co_names=('x',))", "type(lambda: 1)((lambda: 1).__code__, {})",
                 "__import__('marshal').loads(__import__('marshal').dumps(1))"):
        r = _run(f"def test_a():\n    {body}\n", "", None, 10.0, 256, 8, None, "bwrap", screen_code=False)
        assert r.status == "error" and any(w in r.detail for w in (
            "code.__new__ is not allowed", "function.__new__ is not allowed", "code from bytes is not allowed")), (body, r)
    # named like the import system's own function, it is still not the import system
    r = _run("import marshal\ndef _compile_bytecode(b):\n    return marshal.loads(b)\n"
             "def test_a():\n    _compile_bytecode(marshal.dumps(1))\n", "", None, 10.0, 256, 8, None, "bwrap",
             screen_code=False)
    assert r.status == "error" and "code from bytes is not allowed" in r.detail, r


def test_string_formatter_fields_and_signal_frames_do_not_reach_the_worker():
    """A string.Formatter subclass resolves fields by names built at run time (``"{0.tb_" + "frame..."``)
    and hands back the objects: from a traceback it reached the worker's frame and forged a pass; a
    signal handler is handed the interrupted frame. The screen refuses string.Formatter and its hooks;
    handlers get no frame."""
    for code in ("import string\nclass F(string.Formatter):\n    pass\ndef test_a():\n    assert True\n",
                 "from string import Formatter as G\ndef test_a():\n    assert G\n",
                 "class F:\n    def convert_field(self, v, c):\n        return v\ndef test_a():\n    assert F\n"):
        assert run_sandboxed(code, timeout_s=10).status == "tampered", code
    frames = textwrap.dedent("""
        import signal
        seen = []
        def test_a():
            signal.signal(signal.SIGUSR1, lambda s, frame: seen.append(frame))
            signal.raise_signal(signal.SIGUSR1)
            assert seen == [None]
        """)
    assert run_sandboxed(frames, timeout_s=10).ok
    r = _run(frames.replace("import signal", "import _signal as signal"), "", None, 10.0, 256, 8, None, "bwrap",
             screen_code=False)
    assert r.ok, r  # the C module's own signal() is wrapped too


def test_the_audit_hook_runs_no_method_of_a_test_object():
    """A str subclass passed to os.remove ran its own startswith inside the audit hook (os.path.realpath
    called it), and from there the test emptied the hook's tables. Arguments are now exact copies, and
    the tables cannot be changed."""
    code = textwrap.dedent("""
        import os
        called = []
        class S(str):
            def startswith(self, *a):
                called.append(1)
                return str.startswith(self, *a)
            def __fspath__(self):
                called.append(2)
                return str(self)
        def test_a():
            open("f", "w").close()
            os.remove(S("f"))
            assert called == []
        """)
    r = _run(code, "", None, 10.0, 256, 8, None, "bwrap", screen_code=False)
    assert r.ok, r


def test_record_locks_are_refused():
    """POSIX record locks are kernel memory per lock (about 60 MiB for 336,000, outside memory_mb):
    seccomp refuses taking them; fcntl's other commands still work (with the screen and hook off)."""
    code = textwrap.dedent("""
        import fcntl, os
        def test_a():
            fd = os.open("f", os.O_RDWR | os.O_CREAT)
            assert fcntl.fcntl(fd, fcntl.F_GETFD) >= 0
            r, w = os.pipe()
            try:
                fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: pinned pipe pages outside memory_mb
            except PermissionError:
                pass
            else:
                raise AssertionError("the pipe grew")
            for how in (fcntl.LOCK_EX, fcntl.LOCK_SH):
                try:
                    fcntl.lockf(fd, how | fcntl.LOCK_NB, 1, 0)
                except PermissionError:
                    pass
                else:
                    raise AssertionError("a record lock was taken")
        """)
    r = _run(code, "", None, 10.0, 256, 8, None, "bwrap", screen_code=False, audit_hook=False)
    assert r.ok, r


def _cgroups_here() -> dict[str, str]:
    """Which of an evaluation's cgroups sieve can make here ("pids", "memory" -> the cgroup it made,
    removed again)."""
    from sieve.evals import sandbox

    made = sandbox._eval_cgroups(1 << 30)
    kinds = {}
    for d in made:
        if os.path.exists(os.path.join(d, "pids.max")):
            kinds["pids"] = d
        if any(os.path.exists(os.path.join(d, f)) for f in ("memory.max", "memory.limit_in_bytes")):
            kinds["memory"] = d
        sandbox._remove_cgroup(d)
    return kinds


def test_threads_of_an_evaluation_are_bounded():
    """Each thread in the sandbox takes a pid of the host's table: one honest-looking test started 21,813
    threads (67% of pid_max) under memory_mb = 4096. Where sieve can make a pids cgroup, an evaluation
    holds at most 256 processes and threads, and the cgroup goes with it."""

    probe = _cgroups_here().get("pids")
    if probe is None:
        pytest.skip("no writable pids cgroup here: threads are bounded by the memory limit only")
    parent = os.path.dirname(probe)
    code = textwrap.dedent("""
        import threading
        def test_many():
            stop, started = threading.Event(), []
            try:
                for _ in range(2000):
                    t = threading.Thread(target=stop.wait)
                    t.start()
                    started.append(t)
            finally:
                print("STARTED", len(started), flush=True)
                stop.set()
        """)
    r = run_sandboxed(code, timeout_s=30, memory_mb=4096)
    started = int(r.output.split("STARTED ", 1)[1].split()[0])
    assert r.status == "error" and started < 256, (started, r)
    assert not [d for d in os.listdir(parent) if d.startswith(f"sieve-sandbox-{os.getpid()}-")]  # removed


PAGE_TABLES = textwrap.dedent("""
    import ctypes
    def test_pt():
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        n = 0
        for i in range(70000):
            addr = (1 << 40) + i * (1 << 30)  # a page in each GiB: page tables of its own
            p = libc.mmap(addr, 4096, 1, 0x2 | 0x20 | 0x100000, -1, 0)  # PROT_READ, private anonymous, no replace
            if p is None or p != addr:
                break
            ctypes.c_char.from_address(p).value
            n += 1
        print("MAPPED", n, flush=True)
""")


def test_kernel_memory_of_an_evaluation_is_bounded():
    """Page tables are kernel memory outside the address-space limit: a test mapping a page in each GiB
    held 514 MiB of them under memory_mb = 300 (screen and hook off: it needs ctypes). Where sieve can
    make a memory cgroup, an evaluation's memory, kernel memory included, is bounded by memory_mb, the
    work folder and 64 MiB for the interpreter: the test is killed."""
    if "memory" not in _cgroups_here():
        pytest.skip("no writable memory cgroup here: kernel memory is bounded by the address-space limit only")
    r = _run(PAGE_TABLES, "", None, 20.0, 300, 8, None, "bwrap", screen_code=False, audit_hook=False)
    assert r.status == "killed" and "MAPPED" not in r.output, r


def test_a_sandbox_that_cannot_join_its_cgroups_does_not_run(monkeypatch, tmp_path):
    """The wrapper fails closed: where writing its pid into an evaluation's cgroup fails, the sandbox is
    not started (it would run without the task and memory bounds)."""
    from sieve.evals import sandbox

    monkeypatch.setattr(sandbox, "_eval_cgroups", lambda memory_bytes: [str(tmp_path / "gone")])
    r = _run("def test_a():\n    assert True\n", "", None, 10.0, 256, 8, None, "bwrap")
    assert not r.ok and r.status == "no-result" and "could not join" in r.detail, r
    sandbox._probe.cache_clear()  # and the check before a run says so, not "allow user namespaces"
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match="could not be put into the cgroup sieve made"):
            sandbox.check_sandbox("bwrap")
    finally:
        sandbox._probe.cache_clear()


def test_a_sweep_keeps_the_cgroups_another_thread_has_made_and_not_yet_joined():
    """One thread's sweep removed the empty cgroups another thread had just made for its evaluation and
    not yet joined (3 of 24 evaluations run from three threads then ran past the 256-task bound): a
    process sweeps only the cgroups its own finished evaluations left."""
    from sieve.evals import sandbox

    made = sandbox._eval_cgroups(1 << 30)
    if not made:
        pytest.skip("no writable cgroup here")
    try:
        for d in made:
            sandbox._sweep_cgroups(os.path.dirname(d))  # what another thread's next evaluation does first
        assert all(os.path.isdir(d) for d in made), made
        sandbox._LEFT.update(made)  # once its evaluation has ended and the cgroup could not be removed
        for d in made:
            sandbox._sweep_cgroups(os.path.dirname(d))
        assert not any(os.path.isdir(d) for d in made) and not sandbox._LEFT & set(made)
    finally:
        for d in made:
            sandbox._remove_cgroup(d)


def test_cgroups_a_dead_sieve_of_the_same_pid_left_do_not_stop_new_ones():
    """A sieve killed mid-evaluation leaves empty cgroups named by its pid; a later sieve given the same
    pid (a container's) could make none of its own (the names existed) and ran without bounds: names of
    this pid it never made are swept, and a name that still exists is skipped."""
    import itertools

    from sieve.evals import sandbox

    made = sandbox._eval_cgroups(1 << 30)
    if not made:
        pytest.skip("no writable cgroup here")
    for d in made:
        sandbox._remove_cgroup(d)
    parents = [os.path.dirname(d) for d in made]
    n = next(sandbox._CGROUPS)
    stale = [os.path.join(p, f"sieve-sandbox-{os.getpid()}-{n + k}") for p in parents for k in range(1, 12)]
    for d in stale:
        os.mkdir(d)
    try:
        again = sandbox._eval_cgroups(1 << 30)
        assert len(again) == len(made), again
        for d in again:
            sandbox._remove_cgroup(d)
        assert not [d for d in stale if os.path.isdir(d)]
        # a stale name that cannot be swept (it holds a cgroup of its own) at the next number: stepped over
        m = next(sandbox._CGROUPS)
        busy = [os.path.join(p, f"sieve-sandbox-{os.getpid()}-{m + 1}") for p in parents]
        stale += [os.path.join(d, "inner") for d in busy] + busy  # removed inner first, in finally
        for d in busy:
            os.mkdir(d)
            os.mkdir(os.path.join(d, "inner"))
        sandbox._CGROUPS = itertools.count(m + 1)
        again = sandbox._eval_cgroups(1 << 30)
        assert len(again) == len(made) and not set(again) & set(busy), again
        for d in again:
            sandbox._remove_cgroup(d)
    finally:
        for d in sorted(stale, key=len, reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)
