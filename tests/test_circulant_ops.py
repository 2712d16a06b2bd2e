"""The shared math (circtune.adapters._circulant) against the float64 reference, values and gradients."""

import pytest
import torch
from reference import assert_close, block_circulant_reference

from circtune.adapters import TRANSFORMS, block_circulant_matrix, block_circulant_product, compute_dtype
from circtune.adapters._circulant import (
    DENSE_SPECTRAL_MIN_P,
    block_circulant_product_dense,
    dense_block_circulant_linear,
    dense_kernel_grad_route,
    folded_weight,
    gemm_kernel_grad,
    spectral_kernel_grad,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# (q_out, q_in, p): square, non-square both ways, one block, non-power-of-two and odd p, many small blocks.
KERNEL_SHAPES = [(2, 3, 5), (3, 2, 4), (1, 1, 6), (4, 4, 16), (2, 16, 48), (1, 1, 64), (8, 8, 8), (6, 5, 3)]
TOKENS = [1, 7, 33]


def _product(x, w, scale, transform, route):
    if route == "dense":
        return block_circulant_product_dense(x, w, scale=scale)
    return block_circulant_product(x, w, scale=scale, transform=transform)


ROUTES = [("fft-route", t) for t in TRANSFORMS] + [("dense", "rfft")]


@pytest.mark.parametrize("route, transform", ROUTES)
@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_product_and_gradients_match_reference(route, transform, shape, tokens):
    q_out, q_in, p = shape
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(tokens, q_in * p, dtype=torch.float64, requires_grad=True)
    g = torch.randn(tokens, q_out * p, dtype=torch.float64)
    y = _product(x, w, 0.37, transform, route)
    y.backward(g)

    w_ref = w.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = 0.37 * x_ref @ block_circulant_reference(w_ref).T
    y_ref.backward(g)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-10, what="forward")
    assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-10, what="input gradient")
    assert_close(w.grad, w_ref.grad, atol=1e-11, rtol=1e-10, what="kernel gradient")


@pytest.mark.parametrize("route, transform", ROUTES)
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 6), (3, 2, 4), (2, 2, 7)])
def test_gradcheck(route, transform, shape):
    q_out, q_in, p = shape
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, q_in * p, dtype=torch.float64, requires_grad=True)  # leading dims are kept
    assert torch.autograd.gradcheck(lambda a, b: _product(a, b, 0.5, transform, route), (x, w))


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_dense_matrix_matches_reference_and_its_backward_sums_diagonals(shape):
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    dense = block_circulant_matrix(w)
    assert torch.equal(dense, block_circulant_reference(w.detach()))
    g = torch.randn_like(dense)
    dense.backward(g)
    w_ref = w.detach().clone().requires_grad_()
    block_circulant_reference(w_ref).backward(g)
    assert_close(w.grad, w_ref.grad, atol=1e-12, rtol=1e-12, what="diagonal reduction")


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    "dtype, atol, rtol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 3e-2, 3e-2), (torch.float16, 5e-3, 5e-3)])
def test_low_precision_inputs_return_their_dtype(transform, dtype, atol, rtol):
    w = torch.randn(3, 2, 48)
    x = torch.randn(5, 96).to(dtype)
    y = block_circulant_product(x, w, scale=1 / 96, transform=transform)
    assert y.dtype == dtype
    expected = x.double() @ block_circulant_reference(w).T / 96
    assert_close(y, expected, atol=atol, rtol=rtol, what=f"{dtype} forward")
    x.requires_grad_()
    w.requires_grad_()
    block_circulant_product(x, w, scale=1 / 96, transform=transform).sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == torch.float32


def test_compute_dtype_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype(torch.bfloat16, 64, cuda) == torch.float32  # cuFFT has no bf16
    # cuFFT has half for powers of two, but a half transform overflows on loss-scaled gradients (see below).
    assert compute_dtype(torch.float16, 64, cuda) == torch.float32
    assert compute_dtype(torch.float16, 48, cuda) == torch.float32
    assert compute_dtype(torch.float16, 64, cpu) == torch.float32  # the CPU FFT has no half at all
    assert compute_dtype(torch.float64, 48, cpu) == torch.float64
    assert compute_dtype(torch.float32, 48, cpu) == torch.float32


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_fp16_loss_scaled_gradients_stay_finite(device, transform):
    """A loss-scaled fp16 gradient: every value (4096) and every result fit fp16, but the zero-frequency bin of a
    block sums p = 64 of them (262144 > 65504): a transform in fp16 would give inf, and inf·0 = NaN. The kernel
    [1, -1, 0, ...] makes the true input gradient exactly 0 for a constant g, and its own gradient 0 too."""
    p, q = 64, 2
    w = torch.zeros(q, q, p, device=device)
    w[:, :, 0], w[:, :, 1] = 1.0, -1.0
    w.requires_grad_()
    x = torch.full((8, q * p), 4096.0, device=device, dtype=torch.float16, requires_grad=True)
    y = block_circulant_product(x, w, transform=transform)
    y.backward(torch.full_like(y, 4096.0))
    for what, t in (("forward", y), ("input gradient", x.grad), ("kernel gradient", w.grad)):
        assert torch.isfinite(t).all(), what
    assert float(y.abs().max()) == 0 and float(x.grad.abs().max()) == 0


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_circulant_index_is_built_once_per_device(device):
    """The dense route's gather index lives on the layer's device: the second forward and backward move nothing
    between devices (on a GPU that was two blocking host-to-device copies per step). The meta device stands in for
    a GPU (every tensor of the step is on it): an op taking a CPU tensor is such a copy."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from circtune.adapters._circulant import circulant_index

    class FromCPU(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs))):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    def step():
        w = torch.randn(3, 2, 8, device=device, requires_grad=True)
        x = torch.randn(5, 16, device=device, requires_grad=True)
        block_circulant_product_dense(x, w, scale=0.5).backward(torch.randn(5, 24, device=device))

    step()
    with FromCPU() as mode:
        step()
    assert mode.ops == []
    index = circulant_index(8, device)
    assert index.device.type == device and circulant_index(8, torch.device(device)) is index
    assert circulant_index(8, "cpu") is circulant_index(8)
    assert torch.equal(circulant_index(8), (torch.arange(8).view(1, 8) - torch.arange(8).view(8, 1)) % 8)


def test_bad_arguments_are_named():
    w = torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match=r"transform='dct'.*valid transforms: rfft, fft"):
        block_circulant_product(torch.randn(3, 8), w, transform="dct")
    with pytest.raises(ValueError, match=r"does not fit input of shape \(3, 12\)"):
        block_circulant_product(torch.randn(3, 12), w)


# --- the dense backend's folded product and the two kernel-gradient forms --------------------------------------

@pytest.mark.parametrize("shape", KERNEL_SHAPES + [(3, 5, 7), (2, 3, 12), (1, 2, 1)])
def test_both_kernel_gradient_forms_match_reference(shape):
    """spectral (rfft, loop and bmm mixing) and GEMM forms against the gradient of x·(scale·C(w))ᵀ in float64."""
    q_out, q_in, p = shape
    x = torch.randn(9, q_in * p, dtype=torch.float64)
    g = torch.randn(9, q_out * p, dtype=torch.float64)
    w_ref = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    (x @ (0.7 * block_circulant_reference(w_ref)).T).backward(g)
    for form in (spectral_kernel_grad, gemm_kernel_grad):
        dw = form(x, g, p, 0.7, out_dtype=torch.float64)
        assert_close(dw, w_ref.grad, atol=1e-11, rtol=1e-11, what=form.__name__)
    # fp32 inputs: fp32 math, close to the fp64 answer relative to its size.
    dw32 = spectral_kernel_grad(x.float(), g.float(), p, 0.7)
    assert dw32.dtype == torch.float32
    assert_close(dw32, w_ref.grad, atol=2e-5 * float(w_ref.grad.abs().max()), rtol=1e-4, what="fp32 spectral")


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 2, 4), (1, 1, 6), (2, 5, 12), (4, 3, 3), (3, 2, 8), (5, 4, 1)])
def test_dense_folded_product_matches_reference_and_gradchecks(shape):
    """x·(W0 + scale·C(w))ᵀ + b: values and every gradient (x, w, W0, b) in float64, p below and above the
    spectral threshold, non-square both ways, 3-D input."""
    q_out, q_in, p = shape
    kw = {"dtype": torch.float64, "requires_grad": True}
    x, w = torch.randn(2, 3, q_in * p, **kw), torch.randn(shape, **kw)
    weight, bias = torch.randn(q_out * p, q_in * p, **kw), torch.randn(q_out * p, **kw)
    y = dense_block_circulant_linear(x, w, scale=0.3, weight=weight, bias=bias)
    expected = x @ (weight + 0.3 * block_circulant_reference(w)).T + bias
    assert_close(y, expected, atol=1e-12, rtol=1e-12, what="dense forward")
    assert torch.autograd.gradcheck(
        lambda *a: dense_block_circulant_linear(a[0], a[1], scale=0.3, weight=a[2], bias=a[3]), (x, w, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w: dense_block_circulant_linear(x, w, scale=0.3), (x, w))


def test_dense_kernel_gradient_route_rule():
    assert [dense_kernel_grad_route(p) for p in (1, 4, DENSE_SPECTRAL_MIN_P - 1, DENSE_SPECTRAL_MIN_P, 64)] == \
        ["gemm", "gemm", "gemm", "spectral", "spectral"]


def test_folded_weight_strided_and_low_precision():
    """A non-contiguous kernel and a transposed (non-contiguous) weight are read correctly; a bf16 weight gives a
    bf16 sum."""
    w = torch.randn(3, 3, 12)[:, :2]  # [3, 2, 12], non-contiguous
    folded = folded_weight(w, 0.5, None)
    assert folded.is_contiguous() and folded.shape == (36, 24)
    assert torch.equal(folded, 0.5 * block_circulant_matrix(w))
    base = torch.randn(24, 36).T  # [36, 24] as a transposed view
    assert_close(folded_weight(w, 0.5, base), base.double() + 0.5 * block_circulant_reference(w.double()),
                 atol=1e-6, rtol=1e-6, what="strided weight")
    base16 = torch.randn(36, 24, dtype=torch.bfloat16)
    bf16 = folded_weight(w, 0.25, base16)
    assert bf16.dtype == torch.bfloat16
    assert_close(bf16, base16.double() + 0.25 * block_circulant_reference(w.double()), atol=2e-2, rtol=1e-2,
                 what="bf16 weight")
