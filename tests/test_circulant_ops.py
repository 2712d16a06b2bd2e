"""The shared math (circtune.adapters._circulant) against the float64 reference, values and gradients."""

import pytest
import torch
from reference import assert_close, block_circulant_reference

from circtune.adapters import TRANSFORMS, block_circulant_matrix, block_circulant_product, compute_dtype
from circtune.adapters._circulant import block_circulant_product_dense

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
    assert compute_dtype(torch.float16, 64, cuda) == torch.float16  # cuFFT half: powers of two only
    assert compute_dtype(torch.float16, 48, cuda) == torch.float32
    assert compute_dtype(torch.float16, 64, cpu) == torch.float32  # the CPU FFT has no half at all
    assert compute_dtype(torch.float64, 48, cpu) == torch.float64
    assert compute_dtype(torch.float32, 48, cpu) == torch.float32


def test_bad_arguments_are_named():
    w = torch.randn(2, 2, 4)
    with pytest.raises(ValueError, match=r"transform='dct'.*valid transforms: rfft, fft"):
        block_circulant_product(torch.randn(3, 8), w, transform="dct")
    with pytest.raises(ValueError, match=r"does not fit input of shape \(3, 12\)"):
        block_circulant_product(torch.randn(3, 12), w)
