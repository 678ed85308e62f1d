"""The benchmark's claims rest on its two sweep paths doing the same work: check they give the same tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_steering", ROOT / "bench" / "bench_steering.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("sampled", [False, True])
def test_study_way_and_sieve_way_give_the_same_tokens(bench, sampled):
    model, layer = bench.build_model("world", "cpu")
    parts, cells, prompts, rows, ivs = bench.sweep_plan(model, layer, per_cell=3)
    pick = [0, 6, 9, 15]  # constant_sae, conditional_per_token, conditional_steering_vector, probe_sae
    cells = [cells[i] for i in pick]  # 4 cells × 3 prompts, in the plan's order
    rows, ivs = ([x for i in pick for x in xs[3 * i : 3 * i + 3]] for xs in (rows, ivs))
    study = bench.study_way(model, layer, cells, parts, prompts, 6, "cpu", sampled)
    ours = bench.sieve_way(model, layer, rows, ivs, 6, "cpu", sampled)
    work: list = []
    forked = bench.sieve_way(model, layer, rows, ivs, 6, "cpu", sampled, fork=True, summary=work)
    assert len(study) == len(ours) == len(forked) == 12
    assert all(s[: len(o)] == o for s, o in zip(study, ours))
    assert forked == ours and work[0].rows == 12 and work[0].full_always == 3  # the constant cell's rows
    assert sum(len(o) for o in ours) > 0
    # the steering really acts: the cells' scales give different completions of the same prompt
    assert len({tuple(ours[i]) for i in range(0, 12, 3)}) > 1


def test_world_prompts_are_distinct_and_bounded(bench):
    ps = bench.world_prompts(20)
    assert len(set(ps)) == 20
    with pytest.raises(SystemExit, match="at most"):
        bench.world_prompts(10**6)


def test_profile_chunk_measures_the_shared_prefill_noise():
    """The README's float-noise figure comes from profile_chunk.split_logit_gap: reading a prompt's last
    position over a cache of the rest moves its logits by float noise only."""
    spec = importlib.util.spec_from_file_location("profile_chunk", ROOT / "bench" / "profile_chunk.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from sieve.world import load_world

    gap = mod.split_logit_gap(load_world().model, ["def add(a, b):\n", "import os\n\ndef main():\n", "x"])
    assert 0.0 <= gap < 1e-4


def test_gate_rate_calibrates_the_sweeps_detectors_on_held_out_tokens(bench):
    """``--gate-rate P``: each random detector fires on P of the held-out neutral tokens it was set on,
    far fewer rows then edit in the prompt than with the default threshold, and the forked sweep still
    gives the unforked sweep's tokens."""
    model, layer = bench.build_model("world", "cpu")
    default = bench.parts_for(model, layer)
    rare = bench.parts_for(model, layer, gate_rate=0.01)
    assert all(t == 0.5 for _, t in default.detectors.values())
    for name, (det, threshold) in rare.detectors.items():
        assert det.w.tolist() == default.detectors[name][0].w.tolist()  # same directions, other thresholds
        scores = bench._neutral_scores(model, layer, det.w[:, None])[:, 0]
        # at most P (and not far under: prompts sharing an opening give tied scores at the top)
        assert 0.005 <= float((scores > threshold).float().mean()) <= 0.01 + 1 / len(scores)
    parts, cells, prompts, rows, ivs = bench.sweep_plan(model, layer, per_cell=4, gate_rate=0.01)
    ours = bench.sieve_way(model, layer, rows, ivs, 6, "cpu")
    work: list = []
    forked = bench.sieve_way(model, layer, rows, ivs, 6, "cpu", fork=True, summary=work)
    assert forked == ours and work[0].reused > 0
