"""Writing a run's files so that nothing planted in the folder redirects them.

A run folder may come from someone else (``--report-only`` or ``--merge`` of a shared run, a recipe's
``output.dir``): a symbolic link shipped as ``summary.csv`` or as a fixed temporary name
(``.report.html.tmp``) would make an ordinary ``open(path, "w")`` write through it, anywhere the
user can write. :func:`write_atomic` writes a fresh temporary file beside the target (created with
``O_EXCL`` under a random name, so no planted link is followed) and renames it over the target (a
rename replaces a link; it never writes through it). A reader never sees a half-written file either.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["write_atomic", "local_mac"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], object]) -> Path:
    """Write ``path`` with ``data`` (text as UTF-8, bytes, or a function that writes the file at the
    path it is given: ``df.write_parquet``, ``chart.save``) through a new temporary file in the same
    folder, renamed over ``path``; the file gets the usual permissions (0666 less the umask).

    Example:
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / "summary.csv").symlink_to(d / "elsewhere.txt")
        >>> write_atomic(d / "summary.csv", "a,b\\n").read_text(), (d / "elsewhere.txt").exists()
        ('a,b\\n', False)
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _secret() -> bytes | None:
    """This user's key for :func:`local_mac` (``SIEVE_SECRET_FILE``, default ``~/.cache/sieve/secret``,
    made once with 32 random bytes, readable by the user only), or None where it cannot be kept."""
    path = Path(os.environ.get("SIEVE_SECRET_FILE") or Path.home() / ".cache" / "sieve" / "secret")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        return path.read_bytes()
    except FileExistsError:
        return path.read_bytes()
    except OSError:
        return None


def local_mac(*parts: bytes) -> str | None:
    """An HMAC of ``parts`` under this user's secret key: what sieve writes into a cache it made, so
    that a cache file shipped in a shared output folder (whose key, derived from the recipe, anyone
    can compute) is not taken for one. None where no key can be kept (then nothing is reused).

    Example:
        >>> local_mac(b"caa", b"vector") == local_mac(b"caa", b"vector") != local_mac(b"caa", b"other")
        True
    """
    secret = _secret()
    if not secret:
        return None
    h = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()
