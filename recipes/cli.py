"""The one command line of every recipe script.

    python -m recipes.NAME [RECIPE.toml] [key=value ...] [--out DIR] [--no-progress] [--debug]

It owns what every recipe script shares: the recipe argument (default: :data:`DEFAULT_RECIPE`, the
embedded world; a first argument with ``=`` that is not a file is an override), ``key=value``
overrides (values in TOML syntax), logging, the output folder (``--out``, else the recipe's
``output.dir``, which must stay inside the working directory or the recipe's folder; see
:mod:`sieve.rundir`), claiming that folder for the recipe (the resolved recipe is saved there; a folder
holding another recipe's results is refused), and user errors: a :class:`~sieve.errors.SieveError`
prints one line and exits 2, without a traceback unless ``--debug``.

Extension point: a recipe script makes one :class:`RecipeCLI`, adds its own options with
``add_argument`` (argparse's) or ``add_override`` (an option that sets a recipe key, e.g.
``--regex-prompts FILE`` sets ``prompts.regex_file``), and hands :meth:`RecipeCLI.main` its body,
which gets a :class:`Run`::

    CLI = RecipeCLI("recipes.detect", __doc__)
    CLI.add_argument("--level", choices=["token", "text"], default="token")

    def body(run: Run) -> int:
        with run.lock():                  # one writer per output folder
            ...                           # run.recipe, run.out, run.args.level, run.progress
        return 0

    def main(argv: list[str] | None = None) -> int:
        return CLI.main(body, argv)

Example:
    >>> CLI = RecipeCLI("recipes.example", "An example.")
    >>> CLI.main(lambda run: print(run.recipe.sweep.samples, run.out.name) or 0,
    ...          ["sweep.samples=2", "--out", tempfile.mkdtemp(prefix="ex-")])  # doctest: +ELLIPSIS
    2 ex-...
    0
    >>> CLI.main(lambda run: 0, ["sweep.samples=0"])  # one line on stderr, exit status 2
    2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile  # noqa: F401 - the doctests use it
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sieve.errors import SieveError, printable
from sieve.recipe import Recipe, load_recipe
from sieve.rundir import claim, lock, output_dir

__all__ = ["DEFAULT_RECIPE", "RecipeCLI", "Run"]

DEFAULT_RECIPE = Path(__file__).parent / "regex.toml"

log = logging.getLogger("recipes")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one log line each (escaped by the handlers' filter), without the source line; one
    written to a given file goes there as before."""
    if file is not None:
        with contextlib.suppress(OSError):
            file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


def _printable_record(record: logging.LogRecord) -> bool:
    """A logging filter: the record's message with control characters escaped (:func:`printable`)."""
    record.msg, record.args = printable(record.getMessage()), None
    return True


@dataclass
class Run:
    """What a recipe script's body gets: the loaded recipe, its claimed output folder, the parsed
    arguments (the script's own options included), the overrides and whether to show progress bars."""

    recipe: Recipe
    out: Path
    args: argparse.Namespace
    overrides: list[str] = field(default_factory=list)
    progress: bool = True

    @contextmanager
    def lock(self, name: str = "run") -> Iterator[Path]:
        """Hold the output folder's lock ``name`` (e.g. one per shard) for the block."""
        with lock(self.out, name) as path:
            yield path


class RecipeCLI:
    """A recipe script's command line: the shared arguments plus the script's own.

    ``default_overrides`` apply only when no recipe file is given (e.g. the MMLU script points the
    default recipe at its small fixture). ``claims_folder(args)``: whether this invocation writes the
    output folder (the default: always); one that only reads (``--report-only DIR``) does not claim it.
    """

    def __init__(self, prog: str, doc: str | None, *, default_overrides: tuple[str, ...] = (),
                 claims_folder: Callable[[argparse.Namespace], bool] | None = None) -> None:
        self.default_overrides = list(default_overrides)
        self.claims_folder = claims_folder or (lambda args: True)
        self._override_options: list[tuple[str, str, bool]] = []
        self.parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        p = self.parser
        p.add_argument("recipe", nargs="?", default=None,
                       help=f"recipe TOML (default: {DEFAULT_RECIPE.name}, the embedded world)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, values in TOML syntax, e.g. sweep.samples=2")
        p.add_argument("--out", default=None, help="output folder, anywhere (default: the recipe's output.dir)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", help="show the traceback of a user error")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """Add a script-specific option (``argparse.ArgumentParser.add_argument``)."""
        return self.parser.add_argument(*args, **kwargs)

    def add_override(self, flag: str, key: str, *, path: bool = False, **kwargs: Any) -> argparse.Action:
        """Add an option that sets recipe key ``key`` (an override after the others; its value in TOML
        syntax); with ``path``, the value is a file relative to the working directory (in a recipe file
        it would be relative to the recipe's folder), made absolute.

        Example:
            >>> cli = RecipeCLI("recipes.example", None)
            >>> _ = cli.add_override("--samples", "sweep.samples")
            >>> cli.parse(["--samples", "3"])[2]
            ['sweep.samples=3']
        """
        action = self.parser.add_argument(flag, default=None, **kwargs)
        self._override_options.append((action.dest, key, path))
        return action

    def parse(self, argv: list[str] | None = None) -> tuple[argparse.Namespace, Path, list[str]]:
        """The parsed arguments, the recipe file and the overrides to apply."""
        args = self.parser.parse_intermixed_args(argv)  # overrides may follow options: --out X key=value
        overrides = list(args.overrides)
        for dest, key, is_path in self._override_options:
            value = getattr(args, dest)
            if value is not None:
                overrides.append(f"{key}={json.dumps(str(Path(value).resolve())) if is_path else value}")
        if args.recipe is not None and "=" in args.recipe and not Path(args.recipe).exists():
            overrides.insert(0, args.recipe)
            args.recipe = None
        if args.recipe is None:
            return args, DEFAULT_RECIPE, [*self.default_overrides, *overrides]
        return args, Path(args.recipe), overrides

    def main(self, body: Callable[[Run], int | None], argv: list[str] | None = None) -> int:
        """Parse, load and check the recipe, claim the output folder, run ``body``; the exit status."""
        args, path, overrides = self.parse(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        for handler in logging.getLogger().handlers:
            handler.addFilter(_printable_record)  # names from shared folders reach the terminal escaped
        shown, warnings.showwarning = warnings.showwarning, _show_warning  # warnings too: they name recipe files
        try:
            recipe = load_recipe(path, overrides)
            # output.dir set on the command line (an override) is the user's, not the recipe file's.
            trusted = any(o.split("=", 1)[0].strip() in ("output.dir", "output") for o in overrides)
            out = output_dir(recipe, args.out, trusted=trusted, claiming=self.claims_folder(args))
            try:
                if self.claims_folder(args):
                    claim(out, recipe, overrides)
            except OSError as e:
                raise SieveError(f"output folder {out}: cannot write there ({e.strerror or e})") from e
            return int(body(Run(recipe, out, args, overrides, progress=not args.no_progress)) or 0)
        except SieveError as e:
            if args.debug:
                raise
            print(f"error: {printable(e)}", file=sys.stderr)
            return 2
        finally:
            warnings.showwarning = shown
