"""CAA vectors and probes recover planted directions; metrics match hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from sieve.detectors import caa_vector, cached, calibrate_threshold, fingerprint, train_probe
from sieve.evals.metrics import auroc, binary_metrics, mean_ci, pr_curve, wilson


def test_probe_recovers_planted_direction():
    g = torch.Generator().manual_seed(0)
    d = 32
    planted = torch.randn(d, generator=g)
    planted /= planted.norm()
    x = torch.randn(3000, d, generator=g) * 2 + 5  # offset mean: the bias must absorb it
    y = ((x - 5) @ planted + 0.1 * torch.randn(3000, generator=g) > 0.5).long()
    groups = torch.arange(3000) // 30
    p = train_probe(x, y, groups=groups, seed=0)
    cos = float(p.w @ planted / p.w.norm())
    assert cos > 0.95 and p.test_accuracy > 0.95
    det = p.detector()
    pred = det.score(x) > 0   # the probe fires where w·h + b > 0 (the study tested w·h > b)
    assert float((pred == y.bool()).float().mean()) > 0.95
    assert train_probe(x, y, groups=groups, seed=0).w.equal(p.w)  # seeded, deterministic


def test_probe_rejects_single_class():
    with pytest.raises(ValueError, match="all labels are the same"):
        train_probe(torch.randn(10, 3), torch.zeros(10))


def test_caa_recovers_planted_direction(tiny_models):
    """Prompts whose last token differs systematically: the CAA vector is the mean difference."""
    model = tiny_models["llama"]
    pos = ["def f(x):\n    return re", "x = re", "y = [re"]
    neg = ["def f(x):\n    return x", "x = 1", "y = [0"]
    v = caa_vector(model, pos, neg, 1, progress=False)
    from sieve.detectors import last_token_activations

    want = last_token_activations(model, pos, 1, progress=False).mean(0) - \
        last_token_activations(model, neg, 1, progress=False).mean(0)
    torch.testing.assert_close(v, want)
    # Planted: activations = noise + 3·u on positives; the mean difference points along u.
    g = torch.Generator().manual_seed(1)
    u = torch.randn(64, generator=g)
    u /= u.norm()
    a = torch.randn(400, 64, generator=g) * 0.3
    diff = (a[:200] + 3 * u).mean(0) - a[200:].mean(0)
    assert float(diff @ u / diff.norm()) > 0.95


def test_calibrated_threshold_fires_as_often_as_reference():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, generator=g)
    ref = torch.rand(1000, generator=g) < 0.07
    t = calibrate_threshold(s, ref)
    assert int((s > t).sum()) == int(ref.sum())


def test_cache_round_trip(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"v": torch.arange(3.0)}

    key = fingerprint(["a", 1])
    a = cached(tmp_path / "c.safetensors", key, compute)
    b = cached(tmp_path / "c.safetensors", key, compute)
    assert a["v"].equal(b["v"]) and len(calls) == 1
    cached(tmp_path / "c.safetensors", fingerprint(["a", 2]), compute)
    assert len(calls) == 2


def test_metrics_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3, 0.2])
    labels = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0])
    # 16 positive-negative pairs; ranked correctly: 4+4+3+1 = 12 -> 0.75
    assert auroc(scores, labels) == pytest.approx(12 / 16)
    m = binary_metrics(scores, labels, 0.65)  # predicts the first three positive
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1, 0])) == 0.5  # ties count half
    curve = pr_curve(scores, labels)
    assert curve["recall"][0] == 1.0 and max(curve["precision"]) == 1.0
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.161, abs=1e-3)
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0])
    # Student's t with 3 degrees of freedom (3.182446, from tables), not z = 1.96
    assert m == 2.5 and hi - m == pytest.approx(3.182446 * math.sqrt(5 / 3) / 2, rel=1e-6) and m - lo == hi - m
    # at n = 8 the z interval was 17% too narrow: t(0.975, 7) = 2.364624
    vals = [float(v) for v in range(8)]
    m, lo, hi = mean_ci(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / 7)
    assert hi - m == pytest.approx(2.364624 * sd / math.sqrt(8), rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_layer_output_passes_stop_after_their_layer(arch, tiny_models):
    """Detectors read one layer's outputs and the model stops there (the later layers and the LM head
    never run): the outputs are those of the whole forward, bit for bit, at every layer."""
    from sieve.detectors import _layer_outputs
    from sieve.models import layer

    model = tiny_models[arch]
    texts = ["def f(x):\n    return x", "import re\n\npattern = re.compile(", "x ="]
    for L in range(3):
        got, enc = _layer_outputs(model, texts, L)
        with torch.inference_mode(), model.trace(enc):  # the whole forward
            out = layer(model, L).output
            want = (out[0] if isinstance(out, tuple) else out).save()
        assert torch.equal(got, want.float())
