"""Shards as jobs through submitit: the local executor on this machine (CPU), then the automatic merge."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import polars as pl
import pytest

pytest.importorskip("submitit", reason="the [launch] extra is not installed")

from recipes import regex
from sieve.errors import SieveError
from sieve.interventions import Edit, Intervention
from sieve.launch import LaunchSpec, ShardJob, make_executor, shard_argv
from sieve.recipe import load_recipe
from sieve.results import ResultStore
from tests.test_regex_recipe import _overrides, detector_cache  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
METHODS = '["unsteered","conditional_per_input","constant_steering_vector"]'


def test_shard_job_requeues_itself_with_the_same_shard():
    """On preemption or a time limit submitit calls ``checkpoint``: the same shard is submitted again,
    into the same folder, where its stored rows are skipped."""
    job = ShardJob("recipes.regex")
    argv = shard_argv(["r.toml"], Path("/o"), 2, 4)
    again = job.checkpoint(argv)
    assert again.function is job and again.args == (argv,)
    assert pickle.loads(pickle.dumps(job)).module == "recipes.regex"


def test_launch_flags_are_checked_before_anything_runs(tmp_path, capsys):
    recipe = str(ROOT / "recipes/regex.toml")
    assert regex.main([recipe, "--launch", "--shard", "0/2", "--out", str(tmp_path / "a")]) == 2
    assert "leave out --shard" in capsys.readouterr().err
    assert regex.main([recipe, "--launch", "--shards", "0", "--out", str(tmp_path / "b")]) == 2
    assert "[launch.shards] must be >= 1" in capsys.readouterr().err
    assert not list((tmp_path / "a").rglob("*.parquet"))


def test_launch_spec_errors_name_the_key(tmp_path):
    with pytest.raises(SieveError, match=r"\[launch.shards\] must be >= 1"):
        LaunchSpec(shards=0).check()
    with pytest.raises(SieveError, match=r"\[launch.executor\] 'pbs' is unknown"):
        LaunchSpec(executor="pbs").check()  # type: ignore[arg-type]
    if shutil.which("sbatch") is None:
        with pytest.raises(SieveError, match="needs SLURM's sbatch"):
            make_executor(LaunchSpec(executor="slurm"), tmp_path)


def _task_pids(marker: str) -> list[int]:
    """Processes running submitit's job entry point for a folder containing ``marker`` (Linux /proc)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(marker.encode() in c for c in cmd):
            pids.append(int(p.name))
    return pids


def _preempt_once(shard_gen: Path, marker: str, done: threading.Event, hits: list[int]) -> None:
    """Once shard 0 has stored its first chunk, send its job the preemption signal (SIGUSR2), as SLURM
    does before preempting a job; submitit then checkpoints it and requeues it."""
    while not done.is_set():
        if list(shard_gen.glob("part-*.parquet")):
            for pid in _task_pids(marker):
                os.kill(pid, signal.SIGUSR2)
                hits.append(pid)
            if hits:
                return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the job's process through /proc")
def test_local_executor_runs_shards_requeues_a_preempted_one_and_merges(tmp_path, detector_cache):  # noqa: F811
    out = tmp_path / "run"
    n = 2
    for i in range(n):  # the detectors each shard would fit again: the session's, as the other tests do
        shutil.copytree(detector_cache, out / "shards" / f"{i}of{n}" / "cache")
    ov = _overrides(out, **{"sweep.methods": METHODS, "prompts.regex_limit": "4", "prompts.neutral_limit": "2",
                            "sweep.batch_size": "1"})  # chunks of 4 rows: shard 0 stores 3 parts
    recipe = str(ROOT / "recipes/regex.toml")
    done, hits = threading.Event(), []
    watcher = threading.Thread(target=_preempt_once, args=(out / "shards" / f"0of{n}" / "gen", str(out), done, hits))
    watcher.start()
    try:
        # One shard at a time: the preempted one is the only job running when the signal comes.
        code = regex.main([recipe, *ov, "--launch", "--executor", "local", "--shards", str(n), "--parallelism", "1",
                           "--gpus-per-task", "0", "--time-min", "20", "--no-progress"])
    finally:
        done.set()
        watcher.join()
    assert code == 0 and hits, "shard 0 was never preempted"
    logs = [p.read_text() for p in sorted((out / "launch").rglob("*_log.err"))]
    assert len(logs) == n
    (log0,) = [t for t in logs if "Requeued job" in t]
    assert "this job is preempted" in log0
    starts = [int(m) for m in re.findall(r"generation: \d+ rows in this shard, (\d+) done", log0)]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] > 0  # the requeued shard resumed, not restarted
    # Each shard ran in its own process into its own folder; the merge put every planned row in `out`
    # once, the preempted shard's included.
    per_shard = [ResultStore(out / "shards" / f"{i}of{n}" / "gen").table().height for i in range(n)]
    gen = ResultStore(out / "gen").table()
    assert all(h > 0 for h in per_shard) and sum(per_shard) == gen.height
    assert gen.height == 3 * (4 + 2) and gen["key"].n_unique() == gen.height
    assert ResultStore(out / "ability").table().height == 3
    summary = pl.read_parquet(out / "summary.parquet")
    assert sorted(summary["method"].to_list()) == sorted(load_recipe(recipe, ov).sweep.methods)
    assert (out / "pareto.png").exists()


def test_split_device_map_is_accepted(tmp_path):
    """``model.device = "balanced"`` (a model spread over several GPUs) goes to accelerate's device_map.
    Without GPUs it loads on the CPU and steers as ``device = "cpu"`` does; several GPUs are not
    tested here."""
    from sieve.generation import generate
    from sieve.models import load_model
    from sieve.world import load_world, world_model_dir

    w = load_world()
    split = load_model(world_model_dir(), device="balanced")
    iv = Intervention("always", Edit("add", w.feature.direction, -8.0))
    prompts = ["def add(a, b):\n", "import re\n\ndef parse(line):\n    m ="]
    a = generate(split, prompts, iv, layer_index=w.layer, max_new_tokens=8, progress=False)
    b = generate(w.model, prompts, iv, layer_index=w.layer, max_new_tokens=8, progress=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


class _FakeJob:
    def __init__(self, polls: int) -> None:
        self.left, self.job_id = polls, "fake"

    def done(self) -> bool:
        self.left -= 1
        return self.left < 0


class _FakeExecutor:
    """Records what the local scheduler asks for: each submission's GPUs and how many ran at once."""

    def __init__(self) -> None:
        self.params: dict = {}
        self.jobs: list[_FakeJob] = []
        self.started: list[tuple] = []
        self.most_at_once = 0

    def update_parameters(self, **kw) -> None:
        self.params.update(kw)

    def submit(self, fn, argv):
        running = sum(1 for j in self.jobs if j.left >= 0)
        self.most_at_once = max(self.most_at_once, running + 1)
        self.started.append(self.params["visible_gpus"])
        self.jobs.append(_FakeJob(polls=2))
        return self.jobs[-1]


def test_local_scheduler_caps_parallelism_and_gives_each_shard_its_gpus(monkeypatch):
    from sieve.launch import _submit_local, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert visible_gpus() == [2, 3, 5, 7]
    ex = _FakeExecutor()
    spec = LaunchSpec(executor="local", shards=6, gpus_per_task=2)
    jobs = _submit_local(ex, ShardJob("recipes.regex"), [["a"]] * 6, spec, poll_s=0)
    assert len(jobs) == 6 and ex.most_at_once == 2  # two slots of two GPUs
    assert set(ex.started) == {(2, 3), (5, 7)} and ex.started[:2] == [(2, 3), (5, 7)]
    ex = _FakeExecutor()
    _submit_local(ex, ShardJob("recipes.regex"), [["a"]] * 5, LaunchSpec(shards=5, gpus_per_task=1, parallelism=3),
                  poll_s=0)
    assert ex.most_at_once == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    ex = _FakeExecutor()
    _submit_local(ex, ShardJob("recipes.regex"), [["a"]] * 3, LaunchSpec(shards=3), poll_s=0)
    assert ex.most_at_once == 1 and set(ex.started) == {()}  # no GPU: one shard at a time, on the CPU


def _sbatch_script(spec: LaunchSpec, tmp_path: Path, monkeypatch) -> str:
    """The sbatch script submitit would submit for ``spec`` (stand-ins for ``sbatch`` and ``srun`` on the
    PATH; nothing is submitted)."""
    from submitit.slurm.slurm import _make_sbatch_string

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ex = make_executor(spec, tmp_path / "logs")
    return _make_sbatch_string(command="python -m submitit.core._submit x", folder=tmp_path / "logs",
                               **ex._executor.parameters)


INJECTIONS = {
    "newline in a value": {"account": "lab\n'; touch MARK; echo '"},
    # sbatch reads a backslash as an escape inside the quotes: the rest of the value becomes options
    "quote escape in a value": {"comment": "a\\'\" --export=ALL,BASH_ENV=touch_MARK --chdir=/tmp #"},
    "newline in a key": {"x\ntouch MARK\n#": "1"},
    "carriage return": {"qos": "normal\rtouch MARK"},
}


@pytest.mark.parametrize("case", sorted(INJECTIONS))
def test_sbatch_options_cannot_inject_shell_lines(tmp_path, monkeypatch, case):
    marker = tmp_path / "MARK"
    slurm = {k.replace("MARK", str(marker)): v.replace("MARK", str(marker)) for k, v in INJECTIONS[case].items()}
    unchecked = LaunchSpec(executor="slurm", slurm=slurm)
    script = _sbatch_script(unchecked, tmp_path, monkeypatch)
    lines = [ln for ln in script.replace("\r", "\n").splitlines() if "touch" in ln]
    if case == "quote escape in a value":  # unchecked, the #SBATCH line carries the escape sbatch honours
        assert any(ln.startswith("#SBATCH --comment=") and "\\'" in ln and "--export=" in ln for ln in lines)
    else:  # unchecked, a shell line would run: the attack is real
        assert any(not ln.startswith("#SBATCH") for ln in lines)
    with pytest.raises(SieveError, match=r"\[launch.slurm.*(control character|not an sbatch option name|a quote)"):
        unchecked.check()
    with pytest.raises(SieveError, match="control character"):
        LaunchSpec(partition=f"gpu\ntouch {marker}").check()
    with pytest.raises(SieveError, match="a quote, backslash"):
        LaunchSpec(partition="gpu\\'\" --output=/tmp/x --partition=debug #").check()
    # the same from a recipe file, and from the command line
    import tomli_w

    recipe = tmp_path / "r.toml"
    recipe.write_text(Path(ROOT / "recipes/regex.toml").read_text() + "\n" + tomli_w.dumps({"launch": {"slurm": slurm}}))
    with pytest.raises(SieveError, match=r"launch.slurm"):
        load_recipe(recipe)
    assert not marker.exists()


def test_a_recipe_file_sets_only_resource_and_accounting_sbatch_options(tmp_path, monkeypatch):
    text = Path(ROOT / "recipes/regex.toml").read_text()
    recipe = tmp_path / "r.toml"
    for key in ("export", "export_file", "output", "error", "chdir", "get-user-env", "container", "mail-user",
                "wrap", "signal", "ntasks"):
        recipe.write_text(text + f'\n[launch]\nslurm = {{ "{key}" = "x" }}\n')
        with pytest.raises(SieveError, match=rf"\[launch.slurm.{key}\] changes what the job runs"):
            load_recipe(recipe)
        # the command line may say so
        assert load_recipe(ROOT / "recipes/regex.toml", [f"launch.slurm.{key}=x"]).launch.slurm == {key: "x"}
    recipe.write_text(text + '\n[launch]\nslurm = { account = "lab", qos = "normal", gres = "gpu:a100:1", '
                             'time_min = "60" }\n')
    spec = load_recipe(recipe).launch
    script = _sbatch_script(spec, tmp_path, monkeypatch)
    assert "#SBATCH --account=lab" in script and "#SBATCH --time-min=60" in script
