"""C3ALinear and CDVFTLinear against the float64 reference: every backend × transform, shapes, dtypes, init."""

import pytest
import torch
from reference import assert_close, layer_delta_reference
from torch import nn

from circtune import C3ALinear, CDVFTLinear, c3a_num_params, cdvft_num_params

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

PATHS = [("torch", "rfft"), ("torch", "fft"), ("torch", "dft"), ("dense", "rfft")]
# (d_in, d_out, p): the shapes, with block sizes that are not powers of two among them.
SHAPES = [(64, 64, 16), (64, 64, 64), (768, 768, 48), (768, 768, 768), (768, 3072, 96), (3072, 768, 192),
          (3072, 768, 768), (1024, 4096, 64), (1024, 4096, 1024)]
SMALL_SHAPES = [(64, 64, 16), (96, 48, 48), (48, 96, 24), (60, 60, 12)]


def _make(method, d_in, d_out, p, backend, transform, factors=2):
    base = nn.Linear(d_in, d_out)
    if method == "c3a":
        return C3ALinear(base, p, transform=transform, backend=backend, init="gaussian")
    layer = CDVFTLinear(base, p, factors, alpha=0.7, transform=transform, backend=backend)
    with torch.no_grad():  # the last diagonal starts at zero; make every factor count
        for d in layer.diagonals:
            d.normal_()
    return layer


def _check_against_reference(layer, x, atol, rtol, scale_atol=False):
    """Forward, input gradient and every adapter parameter's gradient against the reference.

    ``scale_atol``: atol is relative to each tensor's largest reference value (low-precision runs, where sums
    over tokens cancel and an elementwise relative bound would judge rounding noise)."""
    g = torch.randn(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g.to(y.dtype))

    params = {n: p.detach().double().clone().requires_grad_() for n, p in layer.named_parameters()
              if not n.startswith("base_layer.")}
    x_ref = x.detach().double().clone().requires_grad_()
    base = layer.base_layer
    y_ref = x_ref @ base.weight.double().T + base.bias.double() + x_ref @ layer_delta_reference(layer, params).T
    y_ref.backward(g)

    def close(actual, expected, what):
        bound = atol * float(expected.detach().abs().max()) if scale_atol else atol
        assert_close(actual, expected, atol=bound, rtol=rtol, what=what)

    close(y, y_ref, "forward")
    close(x.grad, x_ref.grad, "input gradient")
    for n, p in layer.named_parameters():
        if n.startswith("base_layer."):
            assert p.grad is None, f"the frozen base parameter {n} got a gradient"
        else:
            close(p.grad, params[n].grad, f"gradient of {n}")


@pytest.mark.parametrize("backend, transform", PATHS)
@pytest.mark.parametrize("d_in, d_out, p", SHAPES)
def test_c3a_float64_matches_reference(backend, transform, d_in, d_out, p):
    layer = _make("c3a", d_in, d_out, p, backend, transform).double()
    _check_against_reference(layer, torch.randn(2, 3, d_in, dtype=torch.float64), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend, transform", PATHS)
@pytest.mark.parametrize("d_in, d_out, p", SHAPES[:6])
def test_cdvft_float64_matches_reference(backend, transform, d_in, d_out, p):
    layer = _make("cdvft", d_in, d_out, p, backend, transform, factors=2).double()
    _check_against_reference(layer, torch.randn(3, d_in, dtype=torch.float64), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("backend, transform", PATHS)
@pytest.mark.parametrize("factors", [3, 4])
@pytest.mark.parametrize("d_in, d_out, p", [(64, 64, 16), (768, 768, 96), (96, 48, 24), (48, 192, 48)])
def test_cdvft_more_factors_match_reference(backend, transform, factors, d_in, d_out, p):
    layer = _make("cdvft", d_in, d_out, p, backend, transform, factors=factors).double()
    _check_against_reference(layer, torch.randn(3, d_in, dtype=torch.float64), atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("backend, transform", PATHS)
@pytest.mark.parametrize("method, factors", [("c3a", 1), ("cdvft", 2),
                                            pytest.param("cdvft", 3, marks=pytest.mark.slow)])  # (minutes in all)
@pytest.mark.parametrize("d_in, d_out, p", SMALL_SHAPES)
def test_layer_gradcheck(backend, transform, method, factors, d_in, d_out, p):
    layer = _make(method, d_in, d_out, p, backend, transform, factors=max(factors, 2)).double()
    names = [n for n, _ in layer.named_parameters() if not n.startswith("base_layer.")]
    params = [dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    x = torch.randn(2, d_in, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("backend, transform", PATHS)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-4), (torch.bfloat16, 2e-2, 2e-2),
                                               (torch.float16, 4e-3, 4e-3)])
@pytest.mark.parametrize("method", ["c3a", "cdvft"])
def test_low_precision(backend, transform, dtype, atol, rtol, method):
    layer = _make(method, 192, 96, 48, backend, transform)
    layer.base_layer.to(dtype)
    with torch.no_grad():  # keep outputs O(1) so tolerances mean the same for both methods
        layer.base_layer.weight.mul_(0.1)
    x = torch.randn(4, 192).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    for p in layer.parameters():
        assert p.dtype == (dtype if p is layer.base_layer.weight or p is layer.base_layer.bias else torch.float32)
    _check_against_reference(layer, x, atol=atol, rtol=rtol, scale_atol=True)


def test_parameter_shapes_and_counts():
    c3a = C3ALinear(nn.Linear(768, 3072), 96)
    assert c3a.kernel.shape == (32, 8, 96) and c3a.kernel.dtype == torch.float32
    assert c3a.num_adapter_params() == c3a_num_params(768, 3072, 96) == 768 * 3072 // 96
    cd = CDVFTLinear(nn.Linear(768, 3072), 96, 4)
    assert [tuple(d.shape) for d in cd.diagonals] == [(768,), (3072,), (3072,), (3072,)]
    assert [tuple(c.shape) for c in cd.circulants] == [(32, 8, 96), (32, 32, 96), (32, 32, 96)]
    expected = 768 + 3 * 3072 + 768 * 3072 // 96 + 2 * 3072 * 3072 // 96
    assert cd.num_adapter_params() == cdvft_num_params(768, 3072, 96, 4) == expected
    # The paper's default on a square layer with p = d: three vectors.
    assert CDVFTLinear(nn.Linear(64, 64), 64).num_adapter_params() == 3 * 64


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_c3a_zero_init_is_identity_and_still_trains(backend):
    layer = C3ALinear(nn.Linear(96, 48), 24, backend=backend)
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer(x).pow(2).sum().backward()
    assert layer.kernel.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_cdvft_init_zero_delta_then_every_parameter_trains(backend):
    layer = CDVFTLinear(nn.Linear(96, 48), 24, 3, backend=backend)
    assert torch.equal(layer.delta_weight(), torch.zeros(48, 96))
    x, target = torch.randn(8, 96), torch.randn(8, 48)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    loss = (layer(x) - target).pow(2).sum()
    loss.backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    assert grads["diagonals.2"].abs().sum() > 0, "the zero factor must get a gradient on the first step"
    opt.step()
    opt.zero_grad()
    (layer(x) - target).pow(2).sum().backward()
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} has no gradient after one step"


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("method", ["c3a", "cdvft"])
def test_merge_and_unmerge(backend, method):
    layer = _make(method, 96, 192, 48, backend, "rfft")
    x = torch.randn(6, 96)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        assert layer.merged
        assert_close(layer(x), expected, atol=1e-5, rtol=1e-5, what="merged forward")
        assert_close(layer.base_layer(x), expected, atol=1e-5, rtol=1e-5, what="merged base alone")
        with pytest.warns(UserWarning, match="already merged"):
            layer.merge()
        layer.unmerge()
        assert_close(layer.base_layer.weight, w0, atol=1e-6, rtol=0, what="weight after unmerge")
        assert_close(layer(x), expected, atol=1e-5, rtol=1e-5, what="unmerged forward")
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_base_is_frozen_and_backend_switches():
    layer = C3ALinear(nn.Linear(32, 32), 8, init="kaiming_uniform")
    assert not layer.base_layer.weight.requires_grad and layer.kernel.requires_grad
    x = torch.randn(3, 32)
    y = layer(x)
    layer.backend = "dense"
    assert_close(layer(x), y, atol=1e-6, rtol=1e-5, what="dense vs torch")
    assert "backend='dense'" in repr(layer)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"block_size=5 does not divide the layer's shape \(d_in=768, d_out=3072\); "
                                         r"valid block sizes: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192"):
        C3ALinear(nn.Linear(768, 3072), 5)
    with pytest.raises(ValueError, match=r"block_size=0 does not divide"):
        CDVFTLinear(nn.Linear(64, 64), 0)
    with pytest.raises(ValueError, match=r"block_size must be an int, got 8.0"):
        C3ALinear(nn.Linear(64, 64), 8.0)
    with pytest.raises(ValueError, match=r"factors=1 is not supported for CDVFT: it needs an int >= 2"):
        CDVFTLinear(nn.Linear(64, 64), 8, 1)
    with pytest.raises(ValueError, match=r"backend='cuda_magic' is not supported; valid backends: torch, dense"):
        C3ALinear(nn.Linear(64, 64), 8, backend="cuda_magic")
    with pytest.raises(ValueError, match=r"transform='dct' is not supported; valid transforms: rfft, fft, dft"):
        CDVFTLinear(nn.Linear(64, 64), 8, transform="dct")
    with pytest.raises(ValueError, match=r"init='ones' is not supported; valid inits: zeros, gaussian"):
        C3ALinear(nn.Linear(64, 64), 8, init="ones")
    with pytest.raises(TypeError, match=r"wraps an nn.Linear, got Conv1d"):
        C3ALinear(nn.Conv1d(4, 4, 1), 2)
    layer = C3ALinear(nn.Linear(64, 64), 8)
    with pytest.raises(ValueError, match=r"valid backends"):
        layer.backend = "nope"


def test_block_size_divisors_are_listed_for_a_prime_gcd():
    with pytest.raises(ValueError, match=r"valid block sizes: 1, 7$"):
        C3ALinear(nn.Linear(7, 14), 2)
