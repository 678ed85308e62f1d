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
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_atomic", "local_mac", "key_problem", "secret_path", "sign", "signed", "mac_path", "move_aside",
           "write_signed", "folder_digest", "machine_path", "read_regular", "read_json"]


def read_regular(path: str | Path, limit: int = 16 << 20) -> bytes:
    """A regular file's bytes, at most ``limit`` of them. A shared folder can ship a FIFO, socket or
    device under a file's name (``recipe.toml``, an SAE's ``cfg.json``), whose read would block or never
    end, or a link to a file that reads on past any size (``/proc/self/pagemap``, which says it is a
    regular file of size 0): those raise :class:`ValueError` (links are followed, as a hub cache's are).
    Messages do not repeat the path: the caller names the file.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.json").write_text("{}")
        >>> read_regular(d / "a.json")
        b'{}'
        >>> os.mkfifo(d / "b.json")
        >>> read_regular(d / "b.json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: not a regular file
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):  # whole MiB (pagemap reads only in multiples of 8 bytes)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise ValueError(f"larger than {limit:,} bytes: not read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json(path: str | Path, limit: int = 16 << 20) -> Any:
    """The JSON in a regular file (:func:`read_regular`). Every way a shared file can fail to be JSON
    sieve reads (missing or unreadable, a FIFO, too large, not UTF-8, not JSON, nested too deep, an
    integer past Python's digit limit) raises :class:`ValueError` with the reason, so a caller catches
    one exception.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "deep.json").write_text("[" * 100_000)
        >>> read_json(d / "deep.json")
        Traceback (most recent call last):
        ValueError: nested too deep to read
    """
    try:
        return json.loads(read_regular(path, limit))
    except OSError as e:
        raise ValueError(e.strerror or str(e)) from None
    except RecursionError:
        raise ValueError("nested too deep to read") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes | Callable[[Path], object],
                 before_rename: Callable[[Path], object] | None = None) -> Path:
    """Write ``path`` with ``data`` (text as UTF-8, bytes, or a function that writes the file at the
    path it is given: ``df.write_parquet``, ``chart.save``) through a new temporary file in the same
    folder, renamed over ``path``; the file gets the usual permissions (0666 less the umask).
    ``before_rename(tmp)`` runs on the finished temporary file just before (:func:`write_signed`).

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
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def secret_path() -> Path:
    """Where this user's key lives: ``SIEVE_SECRET_FILE``, default ``~/.cache/sieve/secret``.

    Example:
        >>> secret_path().name  # doctest: +SKIP
        'secret'
    """
    return Path(os.environ.get("SIEVE_SECRET_FILE") or Path.home() / ".cache" / "sieve" / "secret").expanduser()


def _load_secret() -> tuple[bytes | None, str]:
    """This user's key (made once with 32 random bytes, readable by the user only), or None and why not."""
    path = secret_path()
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = None
    except OSError as e:
        return None, f"{path} cannot be read ({e.strerror or e})"
    if key is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
            key = path.read_bytes()
        except FileExistsError:
            try:
                key = path.read_bytes()
            except OSError as e:
                return None, f"{path} cannot be read ({e.strerror or e})"
        except OSError as e:
            return None, f"{path} cannot be made ({e.strerror or e})"
    if len(key) < 16:
        return None, f"{path} holds {len(key)} bytes, too few for a key (sieve writes 32)"
    return key, ""


def _secret() -> bytes | None:
    return _load_secret()[0]


def key_problem() -> str:
    """Why this user has no key for :func:`local_mac` (empty when there is one): e.g. its path is a
    folder, or cannot be written. Where there is none, nothing sieve signed can be told from a copy.

    Example:
        >>> key_problem()  # doctest: +SKIP
        ''
    """
    return _load_secret()[1]


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


def _file_mac(path: Path, kind: bytes, context: str, data: Path | None = None) -> str | None:
    return local_mac(kind, context.encode(), path.name.encode("utf-8", "surrogateescape"),
                     hashlib.sha256((data or path).read_bytes()).digest())


def _write_mac(path: Path, kind: bytes, context: str, data: Path | None = None) -> None:
    """Write ``path``'s HMAC file (of ``data``'s bytes where given: a temporary file about to become
    ``path``); nothing where there is no key."""
    mac = _file_mac(path, kind, context, data)
    if mac is not None:
        write_atomic(mac_path(path), mac)


def write_signed(path: str | Path, data: str | bytes | Callable[[Path], object], kind: bytes = b"file",
                 context: str = "") -> Path:
    """:func:`write_atomic` and :func:`sign` in the order that leaves no moment where the file stands
    without its HMAC: the HMAC of the finished temporary file is written first, then the file is
    renamed into place (a run of another shard checking the folder meanwhile never takes it for a
    file someone else put there).

    Example:
        >>> d = Path(tempfile.mkdtemp())
        >>> signed(write_signed(d / "run.json", "{}", context="abc"), context="abc")
        True
    """
    path = Path(path)
    return write_atomic(path, data, before_rename=lambda tmp: _write_mac(path, kind, context, data=tmp))


def mac_path(path: str | Path) -> Path:
    """The HMAC file beside ``path``: ``.<name>.mac``."""
    path = Path(path)
    return path.with_name(f".{path.name}.mac")


def sign(path: str | Path, kind: bytes = b"file", context: str = "") -> Path:
    """Write the HMAC of ``path``'s name and bytes under this user's key beside it (``.<name>.mac``), so
    that a later run tells the file from one shipped or edited by someone else (:func:`signed`).
    ``context`` binds it to what the file belongs to (a run's recipe hash): the user's own file of
    another study, copied into this one's folder, does not pass as this one's. Nothing is written where
    there is no key. Returns ``path``.

    Example:
        >>> d = Path(tempfile.mkdtemp()); f = write_atomic(d / "run.json", "{}")
        >>> signed(sign(f)), signed(write_atomic(d / "other.json", "{}"))
        (True, False)
    """
    path = Path(path)
    _write_mac(path, kind, context)
    return path


def signed(path: str | Path, kind: bytes = b"file", context: str = "") -> bool:
    """Whether ``path`` is a regular file with a valid HMAC beside it under this user's key (written by
    :func:`sign` with the same ``kind`` and ``context``); False for anything else (no key, no HMAC
    file, another context, a link, a folder, a FIFO).

    Example:
        >>> signed(Path(tempfile.mkdtemp()) / "absent.parquet")
        False
    """
    path = Path(path)
    side = mac_path(path)
    try:
        if path.is_symlink() or not path.is_file() or side.is_symlink() or not side.is_file():
            return False
        mac = _file_mac(path, kind, context)
        return mac is not None and hmac.compare_digest(side.read_text(encoding="ascii"), mac)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def move_aside(paths: list[Path], dest: Path, owner: str = "this run") -> Path:
    """Move ``paths`` (with their HMAC files, :func:`mac_path`) into the folder ``dest``, made if
    needed; nothing is deleted (a name already there gets a suffix). Returns ``dest``. Refused
    (:class:`~sieve.errors.SieveError`, naming ``dest`` as a folder of ``owner``) where ``dest`` is a
    link or not a folder: moving into it would put the files wherever a shipped link points.

    Example:
        >>> d = Path(tempfile.mkdtemp()); f = write_atomic(d / "run.json", "{}")
        >>> move_aside([f], d / "foreign").name, (d / "foreign" / "run.json").exists()
        ('foreign', True)
    """
    from sieve.errors import SieveError

    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise SieveError(f"{dest} is not a folder of {owner} (a link or a file): files cannot be set aside "
                         "there; remove it, or write to a fresh folder (--out DIR)")
    dest.mkdir(exist_ok=True)
    for p in paths:
        target, n = dest / p.name, 1
        while target.exists() or target.is_symlink():
            target, n = dest / f"{p.stem}.{n}{p.suffix}", n + 1
        os.replace(p, target)
        side = mac_path(p)
        if side.is_file() or side.is_symlink():
            os.replace(side, mac_path(target))
    return dest


def _digest_cache() -> Path:
    return secret_path().parent / "digests.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def machine_path(path: Path) -> bool:
    """Whether a resolved ``path`` lies in ``/proc``, ``/sys`` or ``/dev`` (but ``/dev/shm``, a RAM disk):
    what is there is the machine's own state, unbounded, or a device, never a model, SAE or data set.

    Example:
        >>> machine_path(Path("/proc/self/mem")), machine_path(Path("/dev/shm/model")), machine_path(Path("/tmp"))
        (True, False, False)
    """
    return (path.is_relative_to("/proc") or path.is_relative_to("/sys")
            or (path.is_relative_to("/dev") and not path.is_relative_to("/dev/shm")))


def folder_digest(folder: str | Path, keep: Callable[[str], bool] | None = None, *,
                  recursive: bool = False, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """A digest of each regular file directly in ``folder`` (every level below it with ``recursive``;
    ``keep`` picks by name; ``extra``: more paths relative to the folder, e.g. the shards a
    ``model.safetensors.index.json`` names), by path: what identifies a local model's or SAE's weights,
    config and tokenizer. Each digest is the file's SHA-256 under this user's key (an HMAC: a record
    shared with others confirms nothing about files they guess; the bare SHA-256 where there is no key).
    A file is read once: its SHA-256 is kept beside sieve's key (``~/.cache/sieve/digests.json``) under
    its resolved path, size, times (modification and change) and inode, and read again only when one of
    them changes (``__pycache__`` and ``.pyc`` files are left out: Python writes them as it imports). A file
    that resolves into the machine's own folders (:func:`machine_path`), or cannot be read, is a
    :class:`~sieve.errors.SieveError` naming it.

    Example:
        >>> d = Path(tempfile.mkdtemp()); _ = (d / "model.safetensors").write_bytes(b"weights")
        >>> a = folder_digest(d); _ = (d / "model.safetensors").write_bytes(b"other")
        >>> list(a), a == folder_digest(d)
        (['model.safetensors'], False)
    """
    import json

    from sieve.errors import SieveError

    folder = Path(folder)
    cache_path = _digest_cache()
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    files = sorted(f for f in (folder.rglob("*") if recursive else folder.iterdir())
                   if "__pycache__" not in f.relative_to(folder).parts and f.suffix != ".pyc")  # Python's own
    files += [folder / e for e in extra if not Path(e).is_absolute() and ".." not in Path(e).parts]
    out, changed = {}, False
    for f in dict.fromkeys(files):
        name = f.relative_to(folder).as_posix()
        if (keep is not None and not keep(f.name)) or not f.is_file():
            continue
        real = f.resolve()
        if machine_path(real):
            raise SieveError(f"{f} resolves to {real}: not a file a model, SAE or data set is read from")
        try:
            st = real.stat()
            stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
            hit = cache.get(str(real))
            if isinstance(hit, dict) and hit.get("stat") == stamp and isinstance(hit.get("sha256"), str):
                sha = hit["sha256"]
            else:
                sha = _file_sha256(real)
                cache[str(real)] = {"stat": stamp, "sha256": sha}
                changed = True
        except OSError as e:
            raise SieveError(f"{f}: cannot be read to identify it ({e.strerror or e})") from None
        out[name] = local_mac(b"source file", bytes.fromhex(sha)) or sha
    if changed:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache_path, json.dumps(cache))
        except OSError:
            pass  # no cache: the files are read again next time
    return out
