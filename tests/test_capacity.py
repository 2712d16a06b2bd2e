"""Capacity fractions against independent float64 references, and tied to circtune's own adapter layers."""

import math

import pytest
import torch
from reference import assert_close, block_circulant_reference
from torch import nn

from circtune import C3ALinear, CDVFTLinear
from circtune._capacity_fit import apply_block_circulant, block_circulant_projection
from circtune.capacity import Capacity, capacity_from_gradients, captured_fraction, uniform_fraction
from circtune.models import TargetLayer
from circtune.space import Candidate

# Tiny tensors: one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

# (d_out, d_in, p): non-square, block sizes that are not powers of two, one block, p = 1
SHAPES = [(18, 12, 3), (18, 12, 6), (12, 18, 6), (12, 12, 12), (10, 15, 5), (8, 6, 1)]


def _reference_projection(g: torch.Tensor, p: int) -> torch.Tensor:
    """P_p(G) by loops: every entry replaced by the mean of its block's circulant diagonal (t - u) mod p."""
    g = g.double()
    out = torch.zeros_like(g)
    for i in range(g.shape[0] // p):
        for j in range(g.shape[1] // p):
            block = g[i * p:(i + 1) * p, j * p:(j + 1) * p]
            for s in range(p):
                cells = [(u, (u + s) % p) for u in range(p)]
                mean = sum(float(block[u, t]) for u, t in cells) / p
                for u, t in cells:
                    out[i * p + u, j * p + t] = mean
    return out


@pytest.mark.parametrize("d_out,d_in,p", SHAPES)
@pytest.mark.parametrize("method", ["c3a", "peft-c3a"])
def test_c3a_fraction_matches_the_loop_reference(d_out, d_in, p, method):
    g = torch.randn(d_out, d_in, dtype=torch.float64)
    ref = _reference_projection(g, p)
    assert_close(block_circulant_projection(g, p), ref, atol=1e-12, rtol=1e-12, what="projection")
    expected = float(ref.square().sum() / g.square().sum())
    assert captured_fraction(g, Candidate(method, p)) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if p == 1:
        assert captured_fraction(g, Candidate(method, p)) == pytest.approx(1.0)


@pytest.mark.parametrize("d_out,d_in,p", SHAPES)
def test_projection_is_idempotent_and_orthogonal(d_out, d_in, p):
    g = torch.randn(d_out, d_in, dtype=torch.float64)
    pg = block_circulant_projection(g, p)
    assert_close(block_circulant_projection(pg, p), pg, atol=1e-12, rtol=1e-12, what="P(P(G))")
    assert abs(float((pg * (g - pg)).sum())) < 1e-10 * float(g.square().sum())


@pytest.mark.parametrize("d_out,d_in,p", SHAPES)
def test_a_block_circulant_gradient_is_captured_whole(d_out, d_in, p):
    g = block_circulant_reference(torch.randn(d_out // p, d_in // p, p))
    assert captured_fraction(g, Candidate("c3a", p)) == pytest.approx(1.0, abs=1e-12)
    assert captured_fraction(g.float(), Candidate("c3a", p)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("d_out,d_in,p", [(18, 12, 3), (18, 12, 6), (12, 18, 6), (15, 10, 5)])
def test_fraction_is_what_the_c3a_kernel_gradient_sees(d_out, d_in, p):
    """At zero init the C3A layer's kernel gradient sums the weight gradient G along each block's circulant
    diagonals, times the layer's scale 1/d_in; so ||dL/dw||^2 = p * scale^2 * ||P_p(G)||^2 exactly."""
    layer = C3ALinear(nn.Linear(d_in, d_out), p, backend="torch", transform="rfft", init="zeros").double()
    x = torch.randn(7, d_in, dtype=torch.float64)
    upstream = torch.randn(7, d_out, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    g = upstream.T @ x  # the frozen weight's gradient: sum over tokens of g x^T
    kernel_grad = layer.kernel.grad.double()
    scale = layer.circulant_scale
    assert scale == pytest.approx(1.0 / d_in)
    # entrywise: kernel entry (i, j, s) sums diagonal s of block (i, j), by the loop reference
    ref = _reference_projection(g, p)
    for i in range(d_out // p):
        for j in range(d_in // p):
            for s in range(p):
                assert float(kernel_grad[i, j, s]) == pytest.approx(scale * p * float(ref[i * p, j * p + s]),
                                                                    rel=1e-10, abs=1e-12)
    lhs = float(kernel_grad.square().sum())
    assert lhs == pytest.approx(p * scale ** 2 * float(ref.square().sum()), rel=1e-10)
    assert captured_fraction(g, Candidate("c3a", p)) == pytest.approx(lhs / (p * scale ** 2) / float(g.square().sum()),
                                                                      rel=1e-10)


def test_fft_product_matches_the_dense_reference():
    for q_out, q_in, p, n in [(3, 2, 6, 5), (2, 4, 3, 7), (1, 1, 8, 4), (2, 3, 5, 2)]:
        w = torch.randn(q_out, q_in, p, dtype=torch.float64)
        x = torch.randn(q_in * p, n, dtype=torch.float64)
        assert_close(apply_block_circulant(w, x), block_circulant_reference(w) @ x, atol=1e-12, rtol=1e-10,
                     what=f"C(w) @ x at {q_out, q_in, p}")


@pytest.mark.parametrize("d_out,d_in", [(18, 12), (12, 20), (16, 16)])
def test_lora_captures_a_low_rank_gradient_and_grows_with_rank(d_out, d_in):
    r = 3
    g = torch.randn(d_out, r, dtype=torch.float64) @ torch.randn(r, d_in, dtype=torch.float64)
    fractions = [captured_fraction(g, Candidate("lora", None, k)) for k in range(1, 6)]
    assert fractions[r - 1] == pytest.approx(1.0, abs=1e-10) and fractions[-1] == pytest.approx(1.0, abs=1e-10)
    assert fractions[0] < 0.99
    noisy = g + torch.randn(d_out, d_in, dtype=torch.float64)
    full = [captured_fraction(noisy, Candidate("lora", None, k)) for k in range(1, min(d_out, d_in) + 1)]
    assert all(a <= b + 1e-12 for a, b in zip(full, full[1:], strict=False)), full
    assert full[-1] == pytest.approx(1.0)
    s = torch.linalg.svdvals(noisy)
    assert full[1] == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-10)


def _cdvft_delta(d_in, d_out, p, m, seed):
    """ΔW of circtune's own CDVFT layer at random factors. The diagonals are positive (|N(0,1)| + 0.1: magnitudes
    spread over two decades), as a trained CDVFT's are near its init of ones; with diagonals of mixed signs the
    alternating fit can stop in a local optimum (0.75-0.99 of such a ΔW on these shapes)."""
    torch.manual_seed(seed)
    layer = CDVFTLinear(nn.Linear(d_in, d_out), p, m, alpha=0.7)
    with torch.no_grad():
        for d in layer.diagonals:
            d.copy_(torch.randn(d.shape).abs() + 0.1)
        for c in layer.circulants:
            c.normal_()
    return layer.delta_weight().detach().double()


@pytest.mark.parametrize("d_out,d_in,p", [(18, 12, 3), (18, 12, 6), (12, 18, 6), (24, 24, 4)])
def test_cdvft_fits_its_own_update(d_out, d_in, p):
    for seed in (1, 2, 3):
        delta = _cdvft_delta(d_in, d_out, p, 2, seed=seed)
        assert captured_fraction(delta, Candidate("cdvft", p, 2)) >= 0.99
    # more factors never capture less, and the m = 2 set contains C3A's (D = 1): never below C3A's projection
    g = torch.randn(d_out, d_in, dtype=torch.float64)
    fc3a = captured_fraction(g, Candidate("c3a", p))
    f = [captured_fraction(g, Candidate("cdvft", p, m)) for m in (2, 3, 4)]
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in f), f
    assert fc3a - 1e-6 <= f[0] <= f[1] + 1e-9 <= f[2] + 2e-9, (fc3a, f)


def test_cdvft_three_factors_gain_on_their_own_update():
    delta = _cdvft_delta(24, 24, 4, 3, seed=2)
    f2 = captured_fraction(delta, Candidate("cdvft", 4, 2))
    f3 = captured_fraction(delta, Candidate("cdvft", 4, 3))
    assert 0.0 <= f2 < f3 <= 1.0


def test_degenerate_and_bad_gradients():
    assert captured_fraction(torch.zeros(6, 6), Candidate("c3a", 3)) == 0.0
    assert captured_fraction(torch.zeros(6, 6), Candidate("cdvft", 3, 2)) == 0.0
    assert captured_fraction(torch.randn(6, 6), Candidate("none")) == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        captured_fraction(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), Candidate("c3a", 2))
    with pytest.raises(ValueError, match="does not divide"):
        captured_fraction(torch.randn(6, 9), Candidate("c3a", 2))
    with pytest.raises(ValueError, match="no capacity rule"):
        captured_fraction(torch.randn(6, 6), Candidate("vera", 3))


@pytest.mark.parametrize("d_in,d_out", [(12, 18), (64, 64), (1024, 1024), (1024, 4096)])
def test_uniform_fraction_linear_sets_are_exact(d_in, d_out):
    for p in (1, 2, 3 if d_in % 3 == 0 and d_out % 3 == 0 else 4):
        assert uniform_fraction(d_in, d_out, Candidate("c3a", p)) == pytest.approx(1 / p)
        assert uniform_fraction(d_in, d_out, Candidate("peft-c3a", p)) == pytest.approx(1 / p)
    assert uniform_fraction(d_in, d_out, Candidate("none")) == 0.0


@pytest.mark.parametrize("d_in,d_out", [(12, 18), (96, 64), (1024, 1024), (1024, 4096)])
def test_uniform_lora_between_its_bounds_and_monotone(d_in, d_out):
    n, small = d_in * d_out, min(d_in, d_out)
    ranks = [1, 2, 4, 8]
    values = [uniform_fraction(d_in, d_out, Candidate("lora", None, r)) for r in ranks]
    for r, v in zip(ranks, values, strict=True):
        # the top r of min(d) singular values hold at least their average share, and none exceeds the
        # Marchenko-Pastur edge (sqrt(d_in) + sqrt(d_out))^2 by much
        assert r / small * 0.999 <= v <= min(1.0, 1.3 * r * (math.sqrt(d_in) + math.sqrt(d_out)) ** 2 / n), (r, v)
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert uniform_fraction(d_in, d_out, Candidate("lora", None, small)) == 1.0


def test_uniform_cdvft_grows_with_parameters():
    d_in, d_out = 48, 96
    by_p = [uniform_fraction(d_in, d_out, Candidate("cdvft", p, 2)) for p in (16, 8, 4)]
    by_m = [uniform_fraction(d_in, d_out, Candidate("cdvft", 8, m)) for m in (2, 3, 4)]
    assert all(a < b for a, b in zip(by_p, by_p[1:], strict=False)), by_p
    assert all(a < b for a, b in zip(by_m, by_m[1:], strict=False)), by_m
    # at least C3A's share at the same p (its set contains C3A's)
    assert by_p[0] >= 1 / 16
    assert all(0.0 < v <= 1.0 for v in by_p + by_m)


def test_capacity_uniform_and_from_gradients():
    layers = [TargetLayer("a", 12, 18), TargetLayer("b", 12, 18), TargetLayer("c", 18, 12)]
    uniform = capacity_from_gradients(layers, None)
    assert uniform.source == "uniform"
    assert uniform.energy == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 3), "c": pytest.approx(1 / 3)}
    cand = Candidate("c3a", 3, None, "rfft", "torch")
    assert uniform.score(layers[0], cand) == pytest.approx(1 / 3 * 1 / 3)

    grads = {"a": torch.randn(18, 12), "b": 3 * torch.randn(18, 12), "c": torch.zeros(12, 18)}
    cap = capacity_from_gradients(layers, grads)
    assert cap.source == "calibration"
    assert sum(cap.energy.values()) == pytest.approx(1.0)
    na, nb = float(grads["a"].double().square().sum()), float(grads["b"].double().square().sum())
    assert cap.energy["a"] == pytest.approx(na / (na + nb)) and cap.energy["c"] == 0.0
    f = captured_fraction(grads["b"], cand)
    assert cap.fraction(layers[1], cand) == pytest.approx(f)
    # transform and backend do not change the set: the same fraction, from the cache
    assert cap.fraction(layers[1], Candidate("c3a", 3, None, "fft", "dense")) == pytest.approx(f)
    assert cap.score(layers[1], cand) == pytest.approx(cap.energy["b"] * f)
    assert cap.score(layers[2], cand) == 0.0
    assert isinstance(cap, Capacity)


def test_capacity_refuses_missing_or_misshaped_gradients():
    layers = [TargetLayer("a", 12, 18)]
    with pytest.raises(ValueError, match="no calibration gradient"):
        capacity_from_gradients(layers, {})
    with pytest.raises(ValueError, match=r"\[d_out, d_in\] = \[18, 12\]"):
        capacity_from_gradients(layers, {"a": torch.randn(12, 18)})
    everything_zero = capacity_from_gradients(layers, {"a": torch.zeros(18, 12)})
    assert everything_zero.energy == {"a": 1.0}


def test_cdvft_on_a_sub_block_keeps_its_guarantees(monkeypatch):
    """A layer larger than the fit's cap: C3A's exact share plus the gain on a strided sub-block, still in
    [C3A's share, 1], monotone in m, and equal to the whole fit when the cap covers the layer."""
    import circtune.capacity as capacity

    g = torch.randn(48, 16, dtype=torch.float64) @ torch.randn(16, 72, dtype=torch.float64)
    g += 0.2 * torch.randn(48, 72, dtype=torch.float64)
    whole = [captured_fraction(g, Candidate("cdvft", 4, m)) for m in (2, 3)]
    monkeypatch.setattr(capacity, "CDVFT_FIT_ENTRIES", 24 * 24)
    monkeypatch.setattr(capacity, "_ALS_ENTRIES", 36 * 36)
    assert capacity._stride(12, 18, 4, 24 * 24) == 3 and capacity._stride(12, 18, 4, 36 * 36) == 2
    c3a = captured_fraction(g, Candidate("c3a", 4))
    capped = [captured_fraction(g, Candidate("cdvft", 4, m)) for m in (2, 3, 4)]
    assert c3a <= capped[0] <= capped[1] <= capped[2] <= 1.0, (c3a, capped)
    assert capped[0] > c3a + 1e-3
    assert capped[0] != pytest.approx(whole[0], abs=1e-6) and capped[1] != pytest.approx(whole[1], abs=1e-6)
    monkeypatch.setattr(capacity, "CDVFT_FIT_ENTRIES", 48 * 72)
    monkeypatch.setattr(capacity, "_ALS_ENTRIES", 48 * 72)
    assert [captured_fraction(g, Candidate("cdvft", 4, m)) for m in (2, 3)] == pytest.approx(whole, abs=1e-5)


def test_precompute_fills_the_cache():
    layers = [TargetLayer("a", 12, 18), TargetLayer("b", 18, 12)]
    cap = capacity_from_gradients(layers, {"a": torch.randn(18, 12), "b": torch.randn(12, 18)})
    cands = [Candidate("c3a", 3, None, "rfft", "torch"), Candidate("c3a", 3, None, "fft", "torch"),
             Candidate("cdvft", 6, 2, "rfft", "torch"), Candidate("lora", None, 2), Candidate("c3a", 4, None)]
    cap.precompute(layers, cands)
    # one entry per layer and set (transforms share one; p = 4 divides neither layer and is skipped)
    assert len(cap._cache) == 2 * 3
