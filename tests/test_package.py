"""The package: it builds as a wheel that installs into a fresh virtual environment and runs there.

The fresh environment gets only the wheel (``--no-deps``, no index); its dependencies (torch, nnsight,
...) are found through one ``.pth`` line pointing at the test interpreter's site-packages, so nothing
is downloaded. That line adds the folder to the path without running its ``.pth`` files, so a
development (editable) install of sieve there stays invisible: what runs is the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_metadata_names_license_and_entry_points():
    project = PYPROJECT["project"]
    assert project["name"] != "sieve"  # `sieve` on the package index is another project
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    scripts = project["scripts"]
    for name in ("sieve-regex", "sieve-detect", "sieve-mmlu", "sieve-recipes", "sieve-lm-eval"):
        module, _, func = scripts[name].partition(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func)), name
    assert (ROOT / "sieve" / "py.typed").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline from a copy of the tree (the build writes ``build/`` and egg-info
    beside the sources; the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("sieve", "recipes"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(src)], check=True, capture_output=True, text=True)
    (whl,) = dist.glob("*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("sieve/py.typed", "sieve/world/data/world.json", "recipes/regex.toml", "recipes/regex.py",
                   "sieve/evals/lmeval.py", "sieve/templates/report.html"):
        assert needed in names, needed
    for recipe in sorted((ROOT / "recipes").glob("*.toml")):  # every file a shipped recipe reads ships with it
        spec = tomllib.loads(recipe.read_text())
        for table, key in (("prompts", "source"), ("prompts", "regex_file"), ("prompts", "neutral_file"),
                           ("eval", "mmlu_data")):
            value = spec.get(table, {}).get(key)
            if value and value != "world":
                assert f"recipes/{value}" in names, (recipe.name, value)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "runs/", "notebooks/", "build/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and f"Name: {PYPROJECT['project']['name']}" in meta


@pytest.mark.slow
def test_wheel_installs_and_runs_in_a_fresh_environment(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(purelib) / "_sieve_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    work = tmp_path / "work"  # not the checkout: nothing of it may be importable
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run(str(py), "-c", "import sieve, recipes; print(sieve.__file__); print(recipes.__file__)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(Path(purelib)), line
    helped = run(str(py), "-m", "recipes.regex", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage:" in helped.stdout and "--shard" in helped.stdout
    script = env_dir / "bin" / "sieve-regex"
    assert script.exists()
    helped = run(str(script), "--help")
    assert helped.returncode == 0 and "--shard" in helped.stdout, helped.stderr
    listed = run(str(py), "-m", "recipes")
    assert listed.returncode == 0 and "regex.toml" in listed.stdout, listed.stderr
    # The default output folder is relative to the working directory, never inside the installed package.
    where = run(str(py), "-c", "from recipes.cli import DEFAULT_RECIPE; from sieve.recipe import load_recipe; "
                "from sieve.rundir import output_dir; print(output_dir(load_recipe(DEFAULT_RECIPE)))")
    assert where.returncode == 0, where.stderr
    out = Path(where.stdout.strip())
    assert out.is_relative_to(work.resolve()) and not out.is_relative_to(Path(purelib).resolve()), out
