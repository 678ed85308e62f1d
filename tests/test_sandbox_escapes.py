"""Escape attempts against the sandbox, each checked by its EFFECT outside (a file unchanged or absent,
a marker never printed by a second process, a listener that received nothing, a process still alive,
the time and memory sieve spent), not by the error it raised.

Every attempt runs twice: through the OS layers alone (bubblewrap, the harness's per-test worker,
seccomp and resource limits, with the syntax screen and the audit hook switched OFF), and through the
public :func:`run_sandboxed` with every layer on. Both must hold.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sieve.evals.sandbox import SandboxResult, _interpreter, _run, bwrap_available, run_sandboxed

ROOT = Path(__file__).resolve().parents[1]
MARK = "SIEVE" + "-ESCAPED"  # what a second process or a leaked read would print; never in the code as one word
TIMEOUT = 3.0

pytestmark = pytest.mark.skipif(not bwrap_available() and os.environ.get("SIEVE_SANDBOX_TESTS") != "require",
                                reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")


@dataclass
class World:
    """What the attacks aim at, made fresh for each attempt."""

    tmp: Path
    target: Path
    new: Path
    sentinel: subprocess.Popen
    tcp: socket.socket
    udp: socket.socket
    abstract: socket.socket
    abstract_name: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)

    def fmt(self, code: str) -> str:
        return textwrap.dedent(code).format(
            target=str(self.target), new=str(self.new), tmp=str(self.tmp), sentinel=self.sentinel.pid,
            tcp_port=self.tcp.getsockname()[1], udp_port=self.udp.getsockname()[1], abstract=self.abstract_name,
            root=str(ROOT), tag=self.tag, stdlib=_interpreter(None).stdlib, prefix=sys.prefix,
            home=str(Path.home()),
        )


@pytest.fixture()
def world(tmp_path: Path):
    target = tmp_path / "outside.txt"
    target.write_text("keep me")
    os.utime(target, (1_000_000, 1_000_000))
    target.chmod(0o644)
    sentinel = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    assert sentinel.stdout.readline() == b"ready\n"  # started and about to sleep, before any attack runs
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    name = "sieve-escape-" + uuid.uuid4().hex
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + name)
    abstract.listen(8)
    abstract.setblocking(False)
    w = World(tmp_path, target, tmp_path / "created-by-sandbox", sentinel, tcp, udp, abstract, name)
    try:
        yield w
    finally:
        sentinel.kill()
        sentinel.wait()
        sentinel.stdout.close()
        for s in (tcp, udp, abstract):
            s.close()


def untouched(w: World) -> None:
    assert w.target.read_text() == "keep me"
    st = w.target.stat()
    assert st.st_mtime == 1_000_000 and (st.st_mode & 0o777) == 0o644 and st.st_nlink == 1
    assert sorted(p.name for p in w.tmp.iterdir()) == ["outside.txt"], "a file appeared outside the sandbox"


def no_mark(r: SandboxResult, w: World) -> None:
    assert MARK not in r.output and MARK not in r.detail


def nothing_received(w: World) -> None:
    for s in (w.tcp, w.abstract):
        with pytest.raises(BlockingIOError):
            s.accept()
    with pytest.raises(BlockingIOError):
        w.udp.recvfrom(100)


def sentinel_alive(w: World) -> None:
    assert w.sentinel.poll() is None
    state = Path(f"/proc/{w.sentinel.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    # stopped (T), traced (t), zombie or dead (Z, X) would be an attack's effect; running, sleeping
    # or a short disk wait (D, which a loaded machine shows while the sentinel is paged in) are not.
    assert state not in ("T", "t", "Z", "X", "x"), f"sentinel is in state {state}"


def no_process_with_tag(w: World) -> None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                assert w.tag.encode() not in (p / "cmdline").read_bytes(), "a process of the sandbox outlived it"
            except OSError:
                pass


def host_shm_clean(w: World) -> None:
    assert not [p for p in Path("/dev/shm").iterdir() if w.tag in p.name]


PRINT_MARK = "print('SIEVE' + '-ESCAPED', flush=True)"

# name -> (class, code, extra effect checks). Codes are str.format templates (see World.fmt); every
# attempt is also checked by `untouched` (the target file and the folder around it) and `no_mark`.
ATTEMPTS: dict[str, tuple[str, str, tuple[Callable[[World], None], ...]]] = {
    # --- the audit hook switched off from inside, then the forbidden operation
    "hook_via_main_module": ("audit hook", """
        import sys, os
        def test_a():
            m = sys.modules['__main__']
            for k in list(vars(m)):
                if 'audit' in k or 'BLOCK' in k or 'inside' in k:
                    setattr(m, k, lambda *a, **k: True)
            os.system('echo SIEVE-ESC""APED > {new}')
            open({target!r}, 'w').write('owned')
        """, ()),
    "hook_realpath_replaced": ("audit hook", """
        import os.path
        def test_a():
            os.path.realpath = lambda p: '/sandbox/x'
            open({target!r}, 'w').write('owned')
        """, ()),
    "hook_bypass_ctypes_system": ("audit hook", """
        import ctypes
        def test_a():
            ctypes.CDLL(None).system(b"echo " + b"SIEVE-ESC" + b"APED; touch {new}")
        """, ()),
    "hook_bypass_ctypes_open": ("audit hook", """
        import ctypes
        def test_a():
            libc = ctypes.CDLL(None)
            fd = libc.open({target!r}.encode(), 0o1 | 0o1000)
            libc.write(fd, b"owned", 5)
        """, ()),
    # --- writes outside the work dir, by every path
    "write_open": ("write", "def test_a():\n    open({target!r}, 'w').write('owned')\n", ()),
    "write_os_open_trunc": ("write", """
        import os
        def test_a():
            fd = os.open({target!r}, os.O_WRONLY | os.O_TRUNC)
            os.write(fd, b'owned')
        """, ()),
    "write_os_open_creat": ("write", """
        import os
        def test_a():
            os.close(os.open({new!r}, os.O_WRONLY | os.O_CREAT, 0o644))
        """, ()),
    "rename": ("write", "import os\ndef test_a():\n    os.rename({target!r}, {new!r})\n", ()),
    "replace": ("write", "import os\ndef test_a():\n    os.replace({target!r}, {new!r})\n", ()),
    "shutil_move": ("write", "import shutil\ndef test_a():\n    shutil.move({target!r}, {new!r})\n", ()),
    "hard_link": ("write", "import os\ndef test_a():\n    os.link({target!r}, {new!r})\n", ()),
    "symlink_outside": ("write", "import os\ndef test_a():\n    os.symlink('/etc/passwd', {new!r})\n", ()),
    "symlink_then_write": ("write", """
        import os
        def test_a():
            os.symlink({target!r}, 'link')
            open('link', 'w').write('owned')
        """, ()),
    "utime": ("write", "import os\ndef test_a():\n    os.utime({target!r}, (0, 0))\n", ()),
    "chmod": ("write", "import os\ndef test_a():\n    os.chmod({target!r}, 0o777)\n", ()),
    "truncate": ("write", "import os\ndef test_a():\n    os.truncate({target!r}, 0)\n", ()),
    "remove": ("write", "import os\ndef test_a():\n    os.remove({target!r})\n", ()),
    "mkfifo": ("write", "import os\ndef test_a():\n    os.mkfifo({new!r})\n", ()),
    "mkdir": ("write", "import os\ndef test_a():\n    os.mkdir({new!r})\n", ()),
    "mkstemp_dir": ("write", "import tempfile\ndef test_a():\n    tempfile.mkstemp(dir={tmp!r})\n", ()),
    "dev_shm_file": ("write", "def test_a():\n    open('/dev/shm/{tag}', 'w').write('x')\n", (host_shm_clean,)),
    "shared_memory": ("write", """
        from multiprocessing import shared_memory
        def test_a():
            shared_memory.SharedMemory(name='{tag}', create=True, size=4096)
        """, (host_shm_clean,)),
    "write_project_tree": ("write", """
        def test_a():
            open({root!r} + '/sieve/__init__.py', 'a').write('owned = True')
        """, ()),
    "write_stdlib": ("write", "def test_a():\n    open({stdlib!r} + '/sieve_{tag}.py', 'w').write('x')\n", ()),
    "write_via_proc_root": ("write", "def test_a():\n    open('/proc/1/root' + {target!r}, 'w').write('owned')\n", ()),
    # --- process creation, each of which would print the marker from a second process
    "os_system": ("process", "import os\ndef test_a():\n    os.system('echo SIEVE-ESC''APED')\n", ()),
    "subprocess_python": ("process", """
        import subprocess, sys
        def test_a():
            subprocess.run([sys.executable, '-c', "print('SIEVE' + '-ESCAPED')"])
        """, ()),
    "posixsubprocess_fork_exec": ("process", """
        import _posixsubprocess, os, sys
        def test_a():
            r, w = os.pipe()
            _posixsubprocess.fork_exec([sys.executable, '-c', "print('SIEVE' + '-ESCAPED')"],
                [os.fsencode(sys.executable)], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w,
                True, False, -1, None, None, None, -1, None, False)
            import time; time.sleep(0.5)
        """, ()),
    "os_fork": ("process", """
        import os
        def test_a():
            if os.fork() == 0:
                {print_mark}
                os._exit(0)
            os.wait()
        """, ()),
    "os_forkpty": ("process", """
        import os
        def test_a():
            pid, fd = os.forkpty()
            if pid == 0:
                {print_mark}
                os._exit(0)
            print(os.read(fd, 100).decode())
        """, ()),
    "posix_spawn": ("process", """
        import os, sys
        def test_a():
            pid = os.posix_spawn(sys.executable, [sys.executable, '-c', "print('SIEVE' + '-ESCAPED')"], {{}})
            os.waitpid(pid, 0)
        """, ()),
    "execv": ("process", """
        import os, sys
        def test_a():
            os.execv(sys.executable, [sys.executable, '-c', "print('SIEVE' + '-ESCAPED')"])
        """, ()),
    "multiprocessing_spawn": ("process", """
        import multiprocessing
        def test_a():
            p = multiprocessing.get_context('spawn').Process(target=print, args=('SIEVE' + '-ESCAPED',))
            p.start()
            p.join()
        """, ()),
    "multiprocessing_fork": ("process", """
        import multiprocessing
        def test_a():
            p = multiprocessing.get_context('fork').Process(target=print, args=('SIEVE' + '-ESCAPED',))
            p.start()
            p.join()
        """, ()),
    "pickle_reduce_fork": ("process", """
        import os, pickle
        class P:
            def __reduce__(self):
                return (os.fork, ())
        def test_a():
            if pickle.loads(pickle.dumps(P())) == 0:
                {print_mark}
                os._exit(0)
        """, ()),
    "ctypes_raw_fork": ("process", """
        import ctypes, os
        def test_a():
            if ctypes.CDLL(None).fork() == 0:
                {print_mark}
                os._exit(0)
        """, ()),
    "fork_bomb_as_root": ("process", """
        import os
        def test_a():
            assert os.getuid() != 0 or True
            for _ in range(200):
                if os.fork() == 0:
                    {print_mark}
        """, ()),
    # --- outliving the timeout
    "setsid_grandchild": ("timeout", """
        import os, sys
        def test_a():
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{tag}'])
                os._exit(0)
        """, (no_process_with_tag,)),
    "grandchild_holds_stdout": ("timeout", """
        import os, sys
        def test_a():
            if os.fork() == 0:
                os.setsid()
                os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', '{tag}'])
        """, (no_process_with_tag,)),
    "sleep_forever": ("timeout", "import time\ndef test_a():\n    time.sleep(10**6)\n", ()),
    "busy_loop": ("timeout", "def test_a():\n    while True:\n        pass\n", ()),
    "thread_keeps_running": ("timeout", """
        import threading, time
        def test_a():
            threading.Thread(target=lambda: time.sleep(10**6)).start()
        """, ()),
    # --- reading what is not the sandbox's; a leak would print the marker
    "read_etc_passwd": ("read", """
        def test_a():
            if 'root:' in open('/etc/passwd').read():
                {print_mark}
        """, ()),
    "read_project_file": ("read", """
        def test_a():
            if 'sieve' in open({root!r} + '/pyproject.toml').read():
                {print_mark}
        """, ()),
    "list_home": ("read", """
        import os
        def test_a():
            if set(os.listdir({home!r})) - {{'.pyenv'}}:
                {print_mark}
        """, ()),
    "read_parent_cmdline": ("read", """
        import os
        def test_a():
            for pid in os.listdir('/proc'):
                if pid.isdigit() and b'pytest' in open('/proc/' + pid + '/cmdline', 'rb').read():
                    {print_mark}
        """, ()),
    "read_environment_secret": ("read", """
        import os
        def test_a():
            if 'hunter2' in str(os.environ) or b'hunter2' in open('/proc/self/environ', 'rb').read():
                {print_mark}
        """, ()),
    "import_venv_packages": ("read", """
        def test_a():
            import polars
            {print_mark}
        """, ()),
    "read_other_process_memory": ("read", """
        def test_a():
            with open('/proc/{sentinel}/mem', 'rb') as f:
                f.read(1)
            {print_mark}
        """, ()),
    # --- the parent's memory and time
    "huge_stdout": ("memory", """
        import sys
        def test_a():
            for _ in range(1024):
                sys.stdout.write('x' * (1 << 20))
        """, ()),
    "huge_stderr_one_line": ("memory", "import sys\ndef test_a():\n    sys.stderr.write('x' * (1 << 30))\n", ()),
    "fill_tmpfs": ("memory", """
        def test_a():
            for i in range(64):
                open('f%d' % i, 'wb').write(b'0' * (7 << 20))
            {print_mark}
        """, ()),
    # --- faked results
    "harness_report_then_exit": ("fake", """
        import sys, os
        m = sys.modules['__main__']
        getattr(m, '_report', lambda *a: None)('ok')
        os._exit(0)
        def test_a():
            assert False
        """, ()),
    "forge_result_on_every_fd": ("fake", """
        import os
        def test_a():
            line = b'{{"test": "test_a", "outcome": "pass"}}\\n{{"done": true}}\\n'
            for fd in range(4, 1024):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
            assert False, 'this test fails'
        """, ()),
    "forge_own_report_then_exit": ("fake", """
        import os
        def test_a():
            try:
                os.write(3, b'P')
                os._exit(0)
            finally:
                assert False, 'this test fails'
        """, ()),
    "forge_via_posix_module": ("fake", """
        import posix
        def test_a():
            try:
                posix.write(3, b'P')
                posix._exit(0)
            finally:
                assert False, 'this test fails'
        """, ()),
    "forge_via_fileio_on_report_fd": ("fake", """
        import io
        def test_a():
            io.FileIO(3, 'w', closefd=False).write(b'P')
            raise SystemExit(0)
        """, ()),
    "forge_via_fresh_posix_copy": ("fake", """
        import importlib.util
        def test_a():
            try:
                fresh = importlib.util.module_from_spec(importlib.util.find_spec('posix'))
                fresh.write(3, b'P')
                fresh._exit(0)
            finally:
                assert False, 'this test fails'
        """, ()),
    "exit_zero_at_import": ("fake", "import sys\nsys.exit(0)\ndef test_a():\n    assert False\n", ()),
    "raise_system_exit_in_test": ("fake", "def test_a():\n    raise SystemExit(0)\n", ()),
    "keyboard_interrupt": ("fake", "def test_a():\n    raise KeyboardInterrupt\n", ()),
    # --- network
    "tcp_to_host_listener": ("network", """
        import socket
        def test_a():
            s = socket.create_connection(('127.0.0.1', {tcp_port}), timeout=1)
            s.sendall(b'x')
        """, (nothing_received,)),
    "udp_to_host_listener": ("network", """
        import socket
        def test_a():
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp_port}))
        """, (nothing_received,)),
    "abstract_unix_socket": ("network", """
        import socket
        def test_a():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect('\\0{abstract}')
            s.sendall(b'x')
        """, (nothing_received,)),
    # --- other processes
    "kill_sentinel": ("process", "import os\ndef test_a():\n    os.kill({sentinel}, 9)\n", (sentinel_alive,)),
    "kill_everything": ("process", "import os\ndef test_a():\n    os.kill(-1, 19)\n", (sentinel_alive,)),
    "ptrace_attach": ("process", """
        import ctypes
        def test_a():
            assert ctypes.CDLL(None).ptrace(16, {sentinel}, 0, 0) == 0
        """, (sentinel_alive,)),
}


def _code(w: World, template: str) -> str:
    return w.fmt(template.replace("{print_mark}", PRINT_MARK))


def test_there_are_at_least_forty_distinct_attempts():
    assert len(ATTEMPTS) >= 40
    assert len({c for c, _, _ in ATTEMPTS.values()}) >= 8
    assert len({textwrap.dedent(code) for _, code, _ in ATTEMPTS.values()}) == len(ATTEMPTS)


@pytest.mark.parametrize("layers", ["os-only", "all"])
@pytest.mark.parametrize("name", sorted(ATTEMPTS))
def test_escape_has_no_effect(name, layers, world, monkeypatch):
    monkeypatch.setenv("SIEVE_TEST_SECRET", "hunter2")
    kind, template, checks = ATTEMPTS[name]
    code = _code(world, template)
    t0 = time.monotonic()
    if layers == "os-only":
        r = _run(code, "", None, TIMEOUT, 256, 8, None, "bwrap", screen_code=False, audit_hook=False)
    else:
        r = run_sandboxed(code, timeout_s=TIMEOUT, memory_mb=256)
    elapsed = time.monotonic() - t0
    untouched(world)
    no_mark(r, world)
    for check in checks:
        check(world)
    assert elapsed < TIMEOUT + 6, f"{name}: sieve waited {elapsed:.1f}s"
    if kind in ("fake", "memory") or name.startswith(("read_", "import_")):
        assert not r.ok, f"{name}: {r}"
    if name in ("sleep_forever", "busy_loop"):
        assert r.status in ("timeout", "killed"), r


def test_pid_namespace_ends_what_a_test_leaves_behind_even_without_seccomp(world):
    """With the seccomp filter off a test can fork; its setsid grandchildren, holding stdout, still die
    with the sandbox and sieve does not wait for them."""
    code = _code(world, ATTEMPTS["grandchild_holds_stdout"][1])
    t0 = time.monotonic()
    r = _run(code, "", None, TIMEOUT, 256, 8, None, "bwrap", screen_code=False, audit_hook=False, seccomp=False)
    assert time.monotonic() - t0 < TIMEOUT + 6
    time.sleep(0.2)
    no_process_with_tag(world)
    code = _code(world, ATTEMPTS["setsid_grandchild"][1]).replace("def test_a():", "def test_a():\n    import time")
    code += "\n    time.sleep(60)\n"
    r = _run(code, "", None, TIMEOUT, 256, 8, None, "bwrap", screen_code=False, audit_hook=False, seccomp=False)
    assert r.status == "timeout"
    time.sleep(0.2)
    no_process_with_tag(world)


def test_huge_output_does_not_grow_sieve(tmp_path):
    """1 GiB on stdout from the sandbox: the parent's peak memory grows by far less than that."""
    script = textwrap.dedent("""
        import resource, sys
        from sieve.evals.sandbox import _run
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        code = "import sys\\ndef test_a():\\n    for _ in range(1024):\\n        sys.stdout.write('x' * (1 << 20))\\n"
        r = _run(code, "", None, 20.0, 256, 8, None, "bwrap", screen_code=False, audit_hook=False)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(r.status, (after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    status, grown_mb = out.stdout.split()
    assert status == "killed" and int(grown_mb) < 64, out


def test_a_forged_pass_from_a_test_process_never_counts_for_another_test():
    """The result channel belongs to the harness: a passing test that writes forged lines on every
    descriptor does not turn the failing test after it into a pass."""
    code = textwrap.dedent("""
        import os
        def test_a():
            for fd in range(4, 1024):  # everything but its own report pipe (fd 3)
                try:
                    os.write(fd, b'{"test": "test_b", "outcome": "pass"}\\n{"done": true}\\n')
                except OSError:
                    pass
        def test_b():
            assert False
    """)
    r = _run(code, "", None, TIMEOUT, 256, 8, None, "bwrap", screen_code=False, audit_hook=False)
    assert not r.ok and r.status == "error" and r.detail.startswith("test_b")


def test_sandbox_kills_survivors_so_no_signal_reaches_the_host(world):
    """Signals from inside reach nothing outside: the pid namespace has only the sandbox's processes."""
    r = _run("import os\ndef test_a():\n    for pid in range(2, 5000):\n        try:\n            os.kill(pid, 19)\n"
             "        except OSError:\n            pass\n", "", None, TIMEOUT, 256, 8, None, "bwrap",
             screen_code=False, audit_hook=False)
    assert not r.ok or r.status == "ok"  # it may stop its own harness (a timeout), nothing else
    sentinel_alive(world)


# Attempts that are safe to let succeed here (they touch only the test's own folder, print a marker or
# read): run without bubblewrap and without the seccomp filter, each must have its effect. This shows
# the checks above can fail, i.e. that the attempts are real.
CONTROL = ["write_open", "write_os_open_trunc", "write_os_open_creat", "rename", "replace", "shutil_move",
           "hard_link", "symlink_outside", "utime", "chmod", "truncate", "remove", "mkfifo", "mkdir",
           "mkstemp_dir", "subprocess_python", "posixsubprocess_fork_exec", "os_fork", "posix_spawn", "execv",
           "pickle_reduce_fork", "read_etc_passwd", "read_project_file", "hook_bypass_ctypes_open"]


def _effect_seen(r: SandboxResult, w: World, checks) -> bool:
    for check in (untouched, no_mark, *checks):
        try:
            check(r, w) if check is no_mark else check(w)
        except (AssertionError, OSError):  # a changed file, or one that is gone
            return True
    return False


@pytest.mark.parametrize("name", CONTROL)
def test_control_without_the_os_layers_the_attempt_has_its_effect(name, world):
    _, template, checks = ATTEMPTS[name]
    code = _code(world, template)
    r = _run(code, "", None, TIMEOUT, 256, 8, None, "process", screen_code=False, audit_hook=False, seccomp=False)
    assert _effect_seen(r, world, checks), f"{name} had no effect even without the OS layers: {r}"
