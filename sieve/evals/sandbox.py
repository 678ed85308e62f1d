"""Run untrusted generated code in a contained child process, never in sieve's own.

Layers of containment, each a backstop for the others:

1. a separate interpreter started with ``-I`` (isolated: no ``PYTHON*`` variables, no user site),
   in a fresh temporary directory that is its working directory and ``HOME``, deleted afterwards;
2. a scrubbed environment (``PATH``, ``HOME``, ``LANG`` only): no secrets to read;
3. resource limits set before the code starts: CPU seconds, address space, file size, open files,
   processes (no fork bombs), no core dumps;
4. no network: a new network namespace (``unshare -n``) where the OS allows it, and in any case an
   audit hook that refuses sockets;
5. the audit hook also refuses writes outside the temporary directory, process creation
   (``fork``, ``exec``, ``subprocess``, ``os.system``) and ``ctypes``;
6. a wall-clock timeout that kills the whole process group.

The result is read from a file the harness writes with a per-run nonce; anything else (a crash, a
limit hit, a refused operation, a timeout) is a failure with its reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "run_sandboxed", "network_isolation_available"]

_HARNESS = r'''
import json, os, sys, builtins
_nonce = os.environ.pop("SIEVE_NONCE")
_root = os.path.realpath(os.getcwd())
_result_path = os.path.join(_root, ".result-" + _nonce)
_real_open = builtins.open

def _inside(p):
    try:
        p = os.path.realpath(os.fsdecode(p))
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)

_BLOCK = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.fork",
          "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
          "ctypes.dlopen", "ctypes.dlsym", "os.kill", "os.killpg", "pty.spawn"}

def _audit(event, args):
    if event in _BLOCK:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "open" and args and len(args) > 1:
        path, mode = args[0], args[1]
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if isinstance(mode, int):
            writing = bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if writing and not isinstance(path, int) and not _inside(path):
            raise PermissionError("sandbox: writing outside the sandbox directory")
    if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod",
                 "os.symlink", "os.link", "os.truncate"):
        if args and not isinstance(args[0], int) and not _inside(args[0]):
            raise PermissionError("sandbox: " + event + " outside the sandbox directory")

def _report(status, detail=""):
    with _real_open(_result_path, "w") as f:
        json.dump({"nonce": _nonce, "status": status, "detail": detail[-2000:]}, f)

sys.addaudithook(_audit)
_spec = json.loads(_real_open(os.path.join(_root, "job.json")).read())
ns = {"__name__": "__sieve_sandbox__"}
try:
    exec(compile(_spec["setup"], "<under_test>", "exec"), ns)
    exec(compile(_spec["code"], "<generated>", "exec"), ns)
    names = _spec["call"] or sorted(k for k, v in ns.items() if k.startswith("test") and callable(v))
    if not names:
        raise RuntimeError("no test function found")
    for n in names:
        if n not in ns:
            raise NameError("test function " + repr(n) + " is not defined")
        ns[n]()
except BaseException as e:
    import traceback
    _report("error", type(e).__name__ + ": " + str(e) + "\n" + traceback.format_exc(limit=3))
    os._exit(1)
_report("ok", "ran " + ", ".join(names))
os._exit(0)
'''


@dataclass(frozen=True)
class SandboxResult:
    """``ok`` when the code ran and every test function returned; otherwise ``status`` says why."""

    ok: bool
    status: str  # ok | error | timeout | killed | no-result
    detail: str
    seconds: float


def network_isolation_available() -> bool:
    """Whether ``unshare -n`` works here (a new, empty network namespace)."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


_NET: bool | None = None


def _limits(cpu_s: int, memory_mb: int, file_mb: int, nproc: int):
    def apply() -> None:  # runs in the child between fork and exec
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb * 1024 * 1024,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        except (ValueError, OSError):
            pass

    return apply


def run_sandboxed(
    code: str,
    *,
    setup: str = "",
    call: list[str] | None = None,
    timeout_s: float = 3.0,
    memory_mb: int = 512,
    file_mb: int = 8,
    python: str | None = None,
) -> SandboxResult:
    """Run ``setup`` (the function under test) then ``code`` (the generated tests) in a sandbox and call
    the test functions (``call``, or every callable named ``test*``).

    Example:
        >>> run_sandboxed("def test_one():\\n    assert 1 + 1 == 2\\n").ok
        True
        >>> run_sandboxed("import os\\ndef test_x():\\n    os.system('true')\\n").status
        'error'
    """
    global _NET
    if _NET is None:
        _NET = network_isolation_available()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sieve-sandbox-"))
    try:
        nonce = secrets.token_hex(16)
        (tmp / "harness.py").write_text(_HARNESS)
        (tmp / "job.json").write_text(json.dumps({"setup": setup, "code": code, "call": call or []}))
        exe = python or sys.executable
        cmd = [exe, "-I", "-B", str(tmp / "harness.py")]
        if _NET:
            # -r maps us to root inside a user namespace, which lets -n create the namespace unprivileged.
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "LANG": "C.UTF-8", "SIEVE_NONCE": nonce,
               "TMPDIR": str(tmp)}
        cpu = max(1, int(timeout_s) + 1)
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_limits(cpu, memory_mb, file_mb, nproc=64 if _NET else 512),
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.communicate()
            return SandboxResult(False, "timeout", f"wall-clock limit {timeout_s}s", time.monotonic() - t0)
        result_file = tmp / f".result-{nonce}"
        if result_file.exists():
            try:
                res = json.loads(result_file.read_text())
            except json.JSONDecodeError:
                res = {}
            if res.get("nonce") == nonce and res.get("status") in ("ok", "error"):
                ok = res["status"] == "ok" and proc.returncode == 0
                return SandboxResult(ok, res["status"] if ok or res["status"] == "error" else "error",
                                     res.get("detail", ""), time.monotonic() - t0)
        status = "killed" if proc.returncode and proc.returncode < 0 else "no-result"
        detail = (err or b"").decode(errors="replace")[-2000:]
        return SandboxResult(False, status, f"exit {proc.returncode}: {detail}", time.monotonic() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
