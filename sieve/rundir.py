"""A run's output folder: where a recipe may put it, which recipe it belongs to, who is writing it.

- :func:`output_dir`: ``--out`` from the command line goes anywhere. Otherwise the recipe's
  ``output.dir``, relative to the working directory (never inside an installed package), must resolve
  inside the working directory or the recipe file's folder: a shared recipe cannot write elsewhere.
- :func:`claim`: a folder holds the results of one recipe (one :func:`~sieve.recipe.recipe_hash`). The
  first run saves the resolved recipe (file + overrides) as ``recipe.toml`` and ``recipe.json``; a later
  run with another recipe is refused, naming the keys that differ, instead of mixing its rows with the
  old ones.
- :func:`lock`: one writer per folder and name (e.g. per shard); a second one is refused with who holds
  the lock (pid, host, start time, command). The lock is the OS's (``flock``): it goes with the process,
  so a killed run leaves no stale lock.

Example:
    >>> import tempfile
    >>> from sieve.recipe import load_recipe
    >>> r = load_recipe("recipes/regex.toml")
    >>> out = Path(tempfile.mkdtemp())
    >>> claim(out, r).name
    'recipe.toml'
    >>> (out / "rows.parquet").write_bytes(b"PAR1")  # the folder now holds results of r
    4
    >>> claim(out, r).name  # the same recipe may come back
    'recipe.toml'
    >>> claim(out, load_recipe("recipes/regex.toml", ["sweep.samples=2"]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    sieve.errors.SieveError: ... differs in sweep.samples (16 -> 2)...
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import sys
import tempfile  # noqa: F401 - the doctests use it
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sieve.errors import RecipeError, SieveError, first_line
from sieve.files import read_json, read_regular, write_atomic
from sieve.recipe import Recipe, recipe_dict, recipe_hash

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["output_dir", "check", "claim", "lock", "refuse_links"]


# What a folder may hold before it is a run folder (no recipe.json yet): the detector cache that
# sieve.setting.load_setting keeps there, and lock files.
BEFORE_A_RUN = frozenset({"cache"})


def _not_run_files(path: Path) -> list[str]:
    """The entries of ``path`` that may not be overwritten, where it is not a run folder yet (no
    recipe.json): anything but a detector cache and lock files (a folder of your own summary.csv,
    report.html... from elsewhere is not a run's)."""
    if not path.is_dir() or (path / "recipe.json").is_file():
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in BEFORE_A_RUN and not p.name.startswith(".lock-"))


def output_dir(recipe: Recipe, out: str | Path | None = None, *, trusted: bool = False,
               claiming: bool = True) -> Path:
    """The run's output folder: ``out`` when given (the command line's ``--out``), else the recipe's
    ``output.dir`` relative to the working directory. Unless ``trusted`` (the value came from the
    command line), it must lie inside the working directory or the recipe file's folder, not in the
    folder of sieve's key (:func:`sieve.files.secret_path`) nor in any hidden folder, and, when the run
    will write there (``claiming``), be new, a run folder already (a ``recipe.json``), or hold only a
    detector cache (:data:`BEFORE_A_RUN`): a run writes ``recipe.toml``, ``report.html``… and would
    overwrite such files elsewhere.

    Example:
        >>> from sieve.recipe import load_recipe
        >>> output_dir(load_recipe("recipes/regex.toml")) == Path.cwd() / "runs/regex-world"
        True
        >>> output_dir(load_recipe("recipes/regex.toml", ['output.dir="/etc/x"']))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        sieve.errors.RecipeError: ...[output.dir] '/etc/x' resolves to /etc/x, outside ...
    """
    if out is not None:
        return Path(out).expanduser().resolve()
    raw = recipe.output.dir
    cwd = Path.cwd().resolve()
    path = (cwd / Path(raw).expanduser()).resolve()
    if trusted:
        return path
    roots = [cwd] + ([recipe.path.parent.resolve()] if recipe.path is not None else [])
    if not any(path == root or path.is_relative_to(root) for root in roots):
        raise RecipeError(recipe.path or "<recipe>", "output.dir",
                          f"{raw!r} resolves to {path}, outside the working directory ({cwd}) and the recipe's "
                          "folder: a recipe file may only write there. Pass --out DIR to write elsewhere.")
    # hidden components below the root the folder lies in (the recipe's own folder may itself be hidden)
    hidden = min(([part for part in path.relative_to(r).parts if part.startswith(".")] for r in roots
                  if path.is_relative_to(r)), key=len)
    if hidden:  # ~/.bashrc.d, ~/.config/...: folders whose files other programs read or run
        raise RecipeError(recipe.path or "<recipe>", "output.dir",
                          f"{raw!r} resolves to {path}, inside a hidden folder ({hidden[0]}): other programs read "
                          "such folders (a shell sources every file in ~/.bashrc.d), so a recipe file may not write "
                          "there. Pass --out DIR to write there yourself.")
    from sieve.files import secret_path

    keys = secret_path().parent.resolve()
    if path.is_relative_to(keys):
        raise RecipeError(recipe.path or "<recipe>", "output.dir",
                          f"{raw!r} resolves to {path}, beside sieve's key ({secret_path()}): a recipe file may not "
                          "write there. Pass --out DIR to write elsewhere.")
    link = _first_link(path)
    if link is not None:  # a shared folder that ships ``out/gen -> ~/somewhere`` would write there
        raise RecipeError(recipe.path or "<recipe>", "output.dir",
                          f"{raw!r} holds a symbolic link, {link} -> {os.readlink(link)}: a run from a recipe file "
                          "does not write through links. Remove it, or pass --out DIR to choose the folder yourself.")
    other = _not_run_files(path) if claiming else []
    if other:
        raise RecipeError(recipe.path or "<recipe>", "output.dir",
                          f"{raw!r} resolves to {path}, a folder that holds files a run did not make "
                          f"({', '.join(other[:3])}{', …' if len(other) > 3 else ''}) and no recipe.json: a recipe "
                          "file may only write into a new folder or a run folder, so that it overwrites nothing else "
                          "there. Pass --out DIR to choose the folder.")
    return path


def refuse_links(folder: str | Path, what: str) -> None:
    """Refuse a run folder to read (``--report-only``, ``--merge``) that holds a symbolic link: a shared
    folder whose ``gen/part-*.parquet`` or ``prompts.parquet`` links elsewhere would copy another run's
    texts, or any parquet file, into this run's outputs.

    Example:
        >>> refuse_links(tempfile.mkdtemp(), "--merge")  # a folder without links passes
    """
    link = _first_link(Path(folder))
    if link is not None:
        raise SieveError(f"{what} {folder}: holds a symbolic link, {link} -> {os.readlink(link)}; a run folder is read "
                         "without following links (it would bring files from elsewhere into the outputs). Remove "
                         "the link, or copy the folder without it.")


def _first_link(folder: Path) -> Path | None:
    """The first symbolic link inside ``folder`` (not followed), or None."""
    if not folder.is_dir():
        return None
    for top, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            if os.path.islink(os.path.join(top, name)):
                return Path(top) / name
    return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    a, b = _flat(old), _flat(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith("output."))
    shown = ", ".join(f"{k} ({a.get(k, '-')!r} -> {b.get(k, '-')!r})".replace("'", "") for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _has_results(folder: Path) -> bool:
    """Whether a folder holds results: parquet tables other than ``prompts.parquet``, which a run writes
    before its first row (a run that failed before any row leaves its folder free for a corrected
    recipe); the detector cache is keyed by its inputs."""
    return any(p != folder / "prompts.parquet" for p in folder.rglob("*.parquet"))


def check(folder: str | Path, recipe: Recipe) -> None:
    """Refuse (:class:`~sieve.errors.SieveError`) when ``folder`` holds results of a recipe other than
    ``recipe``, naming the keys that differ; a folder without results passes."""
    folder = Path(folder)
    meta_path, toml_path = folder / "recipe.json", folder / "recipe.toml"
    if not meta_path.exists() or not _has_results(folder):
        return
    try:
        meta = read_json(meta_path)  # not a FIFO, nor a link to what never ends
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise SieveError(f"{meta_path} is not readable JSON ({first_line(e):.120}); it says which recipe made this "
                         "folder: restore it or use another output folder") from None
    h = recipe_hash(recipe)
    if meta.get("hash") == h:
        return
    old = {}
    if toml_path.exists():  # only to name the keys that differ: a file that does not read is left out
        with contextlib.suppress(ValueError, RecursionError, OSError):  # a FIFO, bad TOML or UTF-8, too deep
            old = tomllib.loads(read_regular(toml_path).decode("utf-8"))
    diff = _differences(old, recipe_dict(recipe)) if old else ""
    raise SieveError(
        f"{folder} holds results of another recipe (hash {meta.get('hash')}, from {meta.get('file')} "
        f"with overrides {meta.get('overrides', [])}); this run's recipe (hash {h}) "
        + (f"differs in {diff}" if diff else "is different")
        + ". Its rows would mix with the old ones: write to another folder (--out DIR), or delete "
        f"{folder} to start over."
    )


def claim(folder: str | Path, recipe: Recipe, overrides: list[str] | None = None) -> Path:
    """Make ``folder`` the output of ``recipe`` after :func:`check`: writes ``recipe.toml`` (the
    resolved recipe) and ``recipe.json`` (its hash, file and overrides); returns the path of
    ``recipe.toml``.
    """
    import tomli_w

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check(folder, recipe)
    h = recipe_hash(recipe)
    meta_path, toml_path = folder / "recipe.json", folder / "recipe.toml"
    meta = {"hash": h, "file": str(recipe.path) if recipe.path else None, "overrides": list(overrides or [])}
    header = (f"# The resolved recipe of the run in this folder (recipe hash {h}):\n"
              f"# {meta['file']} with overrides {meta['overrides']}.\n"
              "# Relative paths in it are relative to that file's folder.\n\n")
    for path, text in ((toml_path, header + tomli_w.dumps(recipe_dict(recipe))), (meta_path, json.dumps(meta, indent=1))):
        write_atomic(path, text)
    return toml_path


@contextlib.contextmanager
def lock(folder: str | Path, name: str = "run") -> Iterator[Path]:
    """Hold ``<folder>/.lock-<name>`` for the block; refuse (:class:`~sieve.errors.SieveError`, naming the
    holder) when another process holds it.

    Example:
        >>> import tempfile
        >>> with lock(tempfile.mkdtemp(), "shard-0of1") as p:
        ...     p.name
        '.lock-shard-0of1'
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".lock-{name.replace('/', 'of').replace(' ', '-')}"
    try:  # a link planted as the lock file would have it truncated and written wherever it points
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise SieveError(f"{path} is a symbolic link ({os.readlink(path)}): a run does not write through links; "
                             "remove it, or write to another folder (--out DIR)") from None
        raise SieveError(f"{path}: cannot open the lock file ({e.strerror or e})") from e
    try:
        st = os.fstat(fd)
        if st.st_nlink > 1 or not stat.S_ISREG(st.st_mode):  # a hard link to a file elsewhere would be emptied
            raise SieveError(f"{path} is not a lock file of this folder ({'a hard link' if st.st_nlink > 1 else 'not a file'}"
                             "): a run writes its lock there and would change the file it is linked to; remove it, or "
                             "write to another folder (--out DIR)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except ValueError:
                holder = {}
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')} "
                   f"({holder.get('command', '?')})")
            raise SieveError(f"{folder} is being written by another run ({name}): {who}. Wait for it to finish, "
                             "or write to another folder (--out DIR).") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
