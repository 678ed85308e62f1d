"""Run a recipe's shards as jobs: submitit job arrays on SLURM, or its local executor on one machine.

A sweep already splits into shards (``--shard i/n``: every n-th row) and joins them (``--merge``).
:func:`launch` submits one job per shard, each running the recipe script with ``--shard i/n --out
<out>/shards/i``; on SLURM they form one job array, at most ``parallelism`` running at a time; on one
machine (``local``) at most ``parallelism`` run at once, each on its own GPU(s) when there are GPUs.
A job that is preempted or reaches its time limit is requeued (submitit checkpoints it by
resubmitting the same shard, at most ``max_requeue`` times for time limits): the shard resumes from
its stored rows, none lost or duplicated. When every shard has finished, the shards are merged into
the output folder and reported, as ``--merge`` does.

Example:
    >>> spec = LaunchSpec(executor="local", shards=2, gpus_per_task=0)
    >>> shard_argv(["recipes/regex.toml"], Path("runs/x"), 1, 2)[-5:]
    ['--shard', '1/2', '--out', 'runs/x/shards/1of2', '--no-progress']
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sieve.errors import RecipeError, SieveError

__all__ = ["LaunchSpec", "ShardJob", "launch", "shard_argv", "make_executor", "visible_gpus", "EXECUTORS",
           "SBATCH_FROM_FILE", "check_recipe_launch"]

log = logging.getLogger(__name__)

_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_VALUE = re.compile(r"[ !#%&()*+,./0-9:;<=>?@A-Z\[\]^_a-z{|}~-]*")  # printable ASCII without \ ' " ` $

EXECUTORS: tuple[str, ...] = ("auto", "slurm", "local", "debug")

# sbatch options a recipe file may set: what the job asks for (resources, where it may run, when) and
# how it is accounted. The others change what the job runs or sees (``export``, ``chdir``,
# ``container``, ``get-user-env``), where it writes (``output``, ``error``), what it reads, who is told
# about it (``mail-user``) or the job's shape and signals that sieve sets itself: those only from the
# command line (``'launch.slurm={export = "ALL"}'``).
SBATCH_FROM_FILE: frozenset[str] = frozenset((
    "account", "qos", "constraint", "cluster-constraint", "clusters", "reservation", "exclude", "nodelist",
    "gres", "gres-flags", "gpus", "gpus-per-node", "gpus-per-socket", "cpus-per-gpu", "mem-per-gpu",
    "mem-per-cpu", "mem", "mincpus", "time", "time-min", "comment", "job-name", "nice", "priority", "exclusive",
    "oversubscribe", "requeue", "no-requeue", "hint", "distribution", "ntasks-per-core", "threads-per-core",
    "sockets-per-node", "cores-per-socket", "switches", "begin", "deadline", "dependency", "licenses",
    "mcs-label", "wckey", "tmp", "core-spec", "thread-spec", "gpu-bind", "gpu-freq", "cpu-freq", "network",
    "prefer", "spread-job", "use-min-nodes", "acctg-freq", "profile", "delay-boot", "power", "partition",
))


def _sbatch_key(key: str) -> str:
    return key.replace("_", "-")


def check_recipe_launch(data: dict[str, Any], where: object) -> None:
    """A recipe file's own ``[launch]`` table sets only the sbatch options of :data:`SBATCH_FROM_FILE`
    (the command line sets any).

    Example:
        >>> check_recipe_launch({"launch": {"slurm": {"account": "lab", "qos": "normal"}}}, "r.toml")
        >>> check_recipe_launch({"launch": {"slurm": {"export": "ALL,LD_PRELOAD=x.so"}}}, "r.toml")
        Traceback (most recent call last):
        ...
        sieve.errors.RecipeError: r.toml: [launch.slurm.export] changes what the job runs, sees or writes ...
    """
    launch = data.get("launch")
    slurm = launch.get("slurm") if isinstance(launch, dict) else None
    if not isinstance(slurm, dict):
        return
    for key in slurm:
        if _sbatch_key(str(key)) not in SBATCH_FROM_FILE:
            raise RecipeError(where, f"launch.slurm.{key}", "changes what the job runs, sees or writes (or who is "
                              "told about it): a recipe file may set only resource and accounting options "
                              "(account, qos, constraint, gres, time, mem-per-gpu, ...: sieve.launch.SBATCH_FROM_FILE)"
                              "; give it on the command line if "
                              f"you mean it ('launch.slurm.{key}=...')")


@dataclass
class LaunchSpec:
    """How to run a recipe's shards (a recipe's ``[launch]`` table, or command-line flags).

    ``executor``: ``slurm`` (a job array through sbatch), ``local`` (processes on this machine),
    ``debug`` (in this process, one after the other), ``auto`` (slurm where ``sbatch`` exists, else
    local). ``parallelism``: shards running at once (0: all on SLURM; locally one per GPU slot, or one
    on a machine without GPUs). ``gpus_per_task``, ``cpus_per_task``, ``mem_gb`` (0: the cluster's
    default), ``timeout_min`` per attempt, ``max_requeue`` requeues after a time limit (preemptions are
    requeued as well), ``partition`` and ``slurm``: further sbatch options (``account``, ``qos``,
    ``constraint``, ...).
    """

    executor: Literal["auto", "slurm", "local", "debug"] = "auto"
    shards: int = 1
    parallelism: int = 0
    partition: str = ""
    gpus_per_task: int = 1
    cpus_per_task: int = 0
    mem_gb: float = 0.0
    timeout_min: int = 720
    max_requeue: int = 3
    slurm: dict[str, str] = field(default_factory=dict)

    def check(self, where: object = "<launch>") -> LaunchSpec:
        """Raise a :class:`~sieve.errors.RecipeError` naming ``where`` and the bad key."""
        if self.executor not in EXECUTORS:
            raise RecipeError(where, "launch.executor", f"{self.executor!r} is unknown; allowed: {list(EXECUTORS)}")
        for key in ("shards", "timeout_min"):
            if getattr(self, key) < 1:
                raise RecipeError(where, f"launch.{key}", f"must be >= 1, got {getattr(self, key)}")
        for key in ("parallelism", "gpus_per_task", "cpus_per_task", "mem_gb", "max_requeue"):
            if getattr(self, key) < 0:
                raise RecipeError(where, f"launch.{key}", f"must be >= 0, got {getattr(self, key)}")
        # each becomes one "#SBATCH --key=value" line of a shell script: one line, a plain option name
        for key, value in [("partition", self.partition), *((f"slurm.{k}", v) for k, v in self.slurm.items())]:
            name = key.split(".", 1)[-1]
            if key != "partition" and not _OPTION.fullmatch(str(name)):
                raise RecipeError(where, f"launch.slurm[{name!r}]", "is not an sbatch option name (letters, digits, "
                                  "'-', '_')")
            if not isinstance(value, (str, int, float, bool)):
                raise RecipeError(where, f"launch.{key}", f"must be a string or number, got {type(value).__name__}")
            if any(ord(ch) < 32 or ord(ch) == 127 for ch in str(value)):
                raise RecipeError(where, f"launch.{key}", f"{str(value)!r} holds a control character (a newline "
                                  "would end the #SBATCH line and start a shell command)")
            if not _VALUE.fullmatch(str(value)):
                raise RecipeError(where, f"launch.{key}", f"{str(value)!r} holds a quote, backslash, '`', '$' or a "
                                  "character outside ASCII: sbatch reads a backslash as an escape even inside the "
                                  "quotes of an #SBATCH line, so such a value can add options of its own")
        return self


class _Checkpointable:
    """submitit's ``Checkpointable`` protocol, without importing submitit at module import."""

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        # Requeued as it was: the shard's stored rows are skipped, so it goes on where it stopped.
        return DelayedSubmission(self, *args, **kwargs)


class ShardJob(_Checkpointable):
    """One shard of a recipe script as a submitit job: ``module.main(argv)`` in the job's process.

    Example:
        >>> ShardJob("recipes.regex").module
        'recipes.regex'
    """

    def __init__(self, module: str) -> None:
        self.module = module

    def __call__(self, argv: list[str]) -> int:
        code = importlib.import_module(self.module).main(list(argv))
        if code:
            raise SieveError(f"{self.module} {' '.join(argv)} exited with status {code}")
        return 0


def shard_argv(base: list[str], out: Path, i: int, n: int) -> list[str]:
    """The recipe script's arguments for shard ``i`` of ``n`` (its own folder under ``out/shards``)."""
    return [*base, "--shard", f"{i}/{n}", "--out", str(out / "shards" / f"{i}of{n}"), "--no-progress"]


def visible_gpus() -> list[int]:
    """GPU indices this process may hand to shards: those ``CUDA_VISIBLE_DEVICES`` lists (a shard's
    own ``CUDA_VISIBLE_DEVICES`` is set from them), else every CUDA device; empty without CUDA.

    Example:
        >>> os.environ["CUDA_VISIBLE_DEVICES"] = "2,3"; visible_gpus()  # doctest: +SKIP
        [2, 3]
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        try:
            return [int(x) for x in env.split(",") if x.strip()]
        except ValueError:
            raise SieveError(f"CUDA_VISIBLE_DEVICES={env!r}: the local launcher needs GPU indices, not UUIDs") from None
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - torch without a working CUDA runtime
        n = 0
    return list(range(n))


def make_executor(spec: LaunchSpec, folder: Path):
    """A submitit executor for ``spec``, writing its logs and pickles in ``folder``."""
    import submitit

    kind = spec.executor
    if kind == "auto":
        kind = "slurm" if shutil.which("sbatch") else "local"
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    if kind == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=spec.max_requeue)
        ex.update_parameters(timeout_min=spec.timeout_min)
        return ex
    if not shutil.which("sbatch"):
        raise SieveError("executor 'slurm' needs SLURM's sbatch on the PATH; use executor = 'local' on one machine")
    ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=spec.max_requeue)
    params: dict[str, Any] = {"timeout_min": spec.timeout_min, "tasks_per_node": 1, "nodes": 1,
                              "gpus_per_node": spec.gpus_per_task, "name": "sieve"}
    if spec.cpus_per_task:
        params["cpus_per_task"] = spec.cpus_per_task
    if spec.mem_gb:
        params["mem_gb"] = spec.mem_gb
    if spec.partition:
        params["slurm_partition"] = spec.partition
    if spec.parallelism:
        params["slurm_array_parallelism"] = spec.parallelism
    if spec.slurm:
        params["slurm_additional_parameters"] = dict(spec.slurm)
    ex.update_parameters(**params)
    return ex


def _submit_local(executor, job: ShardJob, argvs: list[list[str]], spec: LaunchSpec, poll_s: float) -> list:
    """Submit shards to the local executor, at most ``parallelism`` at once, each on its own GPU slot."""
    gpus = visible_gpus() if spec.gpus_per_task else []
    per = max(1, spec.gpus_per_task)
    slots: list[list[int]] = [gpus[k:k + per] for k in range(0, len(gpus) - per + 1, per)] if gpus else [[]]
    cap = spec.parallelism or (len(slots) if gpus else 1)
    if gpus and cap > len(slots):
        log.warning("parallelism %d > %d GPU slots of %d GPU(s): shards share GPUs", cap, len(slots), per)
    jobs: list = [None] * len(argvs)
    running: dict[int, int] = {}  # shard -> slot
    pending = list(range(len(argvs)))
    while pending or running:
        for i in [i for i in running if jobs[i].done()]:
            del running[i]
        while pending and len(running) < cap:
            i = pending.pop(0)
            used = list(running.values())
            slot = min(range(len(slots)), key=lambda s: used.count(s))
            executor.update_parameters(gpus_per_node=len(slots[slot]), visible_gpus=tuple(slots[slot]))
            jobs[i] = executor.submit(job, argvs[i])
            running[i] = slot
            log.info("shard %d/%d started (job %s%s)", i, len(argvs), jobs[i].job_id,
                     f", GPUs {slots[slot]}" if slots[slot] else "")
        if running:
            time.sleep(poll_s)
    return jobs


def launch(module: str, base_argv: list[str], out: Path, spec: LaunchSpec, *, wait: bool = True,
           poll_s: float = 2.0) -> list:
    """Submit every shard of ``module``'s run (``base_argv``: the recipe and overrides), wait for them
    and merge them into ``out`` (``module.main([*base_argv, "--merge", shard folders..., "--out", out])``).

    Returns the submitit jobs. A failed shard raises a :class:`SieveError` naming it and its log;
    the shards that finished keep their rows (launching again resumes the rest).

    Example:
        >>> launch("recipes.regex", ["recipes/regex.toml"], Path("runs/x"), LaunchSpec(shards=4))  # doctest: +SKIP
    """
    spec.check()
    out = Path(out)
    n = spec.shards
    argvs = [shard_argv(base_argv, out, i, n) for i in range(n)]
    # submitit's pickles (the jobs, their results) in a folder this launch makes anew, under a name no
    # one can guess: a result file shipped in a shared output folder is never loaded as a job's result
    (out / "launch").mkdir(parents=True, exist_ok=True)
    fresh = out / "launch" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(6)}"
    fresh.mkdir(mode=0o700)
    folder = fresh / "%j"
    executor = make_executor(spec, folder)
    job = ShardJob(module)
    name = type(executor).__name__
    if name == "LocalExecutor":
        jobs = _submit_local(executor, job, argvs, spec, poll_s)
    else:
        jobs = executor.map_array(job, argvs)
        log.info("submitted %d shards (%s, job %s)", n, name, jobs[0].job_id if jobs else "-")
    if not wait:
        return jobs
    failed = []
    for i, j in enumerate(jobs):
        try:
            j.result()
        except Exception as e:  # submitit raises its own FailedJobError with the job's log tail
            failed.append(f"shard {i}/{n} (job {j.job_id}, log {j.paths.stderr}): {str(e).strip()[-800:]}")
    if failed:
        raise SieveError(f"{len(failed)} of {n} shards failed; the others keep their rows, and launching again "
                         "resumes the rest:\n" + "\n".join(failed))
    shards = [str(out / "shards" / f"{i}of{n}") for i in range(n)]
    code = importlib.import_module(module).main([*base_argv, "--merge", *shards, "--out", str(out)])
    if code:
        raise SieveError(f"merging the shards into {out} exited with status {code}")
    return jobs

