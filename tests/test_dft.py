"""transform="dft" (circtune.adapters._dft) against the float64 reference, and the spectrum-keeping rule of both
transform routes: values, every gradient, low precision, and what the backward recomputes."""

import pytest
import torch
from reference import assert_close, block_circulant_reference
from torch.utils._python_dispatch import TorchDispatchMode

from circtune.adapters import _dft, block_circulant_product
from circtune.adapters._dft import dft_bases, dft_kernel_grad, inverse, mix, spectrum

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

# (q_out, q_in, p): non-square both ways, p not a power of two (12, 24, 48), odd p, p = 1 and 2, many blocks.
SHAPES = [(2, 3, 12), (3, 2, 24), (1, 4, 48), (4, 1, 48), (2, 2, 7), (3, 3, 1), (2, 5, 2), (6, 5, 3), (8, 8, 8)]


def _reference(x, w, g, scale):
    """y, dx, dw of ``scale · C(w) x`` through the dense matrix built by index arithmetic (torch.roll)."""
    w_ref = w.detach().double().clone().requires_grad_()
    x_ref = x.detach().double().clone().requires_grad_()
    y = scale * x_ref @ block_circulant_reference(w_ref).T
    y.backward(g.double())
    return y, x_ref.grad, w_ref.grad


@pytest.mark.parametrize("p", [1, 2, 3, 12, 24, 48, 64])
def test_spectrum_is_the_normalised_rfft_and_inverse_undoes_it(p):
    v = torch.randn(5, 3 * p, dtype=torch.float64)
    spec = spectrum(v, p)  # [2, F, N, q]
    expected = torch.fft.rfft(v.view(5, 3, p), dim=-1) / p  # [N, q, F]
    assert_close(spec[0].permute(1, 2, 0), expected.real, atol=1e-13, rtol=1e-12, what="real plane")
    assert_close(spec[1].permute(1, 2, 0), expected.imag, atol=1e-13, rtol=1e-12, what="imaginary plane")
    assert_close(inverse(spec, p), v, atol=1e-12, rtol=1e-12, what="round trip")
    assert spec.is_contiguous()  # frequency-major straight out of the GEMM


def test_bases_are_cached_per_p_dtype_and_device():
    assert dft_bases(24, torch.float32, "cpu")[0] is dft_bases(24, torch.float32, "cpu")[0]
    assert dft_bases(24, torch.float64, "cpu")[0] is not dft_bases(24, torch.float32, "cpu")[0]
    assert dft_bases(24, torch.bfloat16)[1].dtype == torch.bfloat16


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("keep", [True, False])
def test_product_and_gradients_match_reference(shape, tokens, keep, monkeypatch):
    monkeypatch.setattr(_dft, "KEEP_SPECTRUM_FACTOR", 2.0 if keep else 0.0)
    q_out, q_in, p = shape
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(tokens, q_in * p, dtype=torch.float64, requires_grad=True)
    g = torch.randn(tokens, q_out * p, dtype=torch.float64)
    y = block_circulant_product(x, w, scale=0.37, transform="dft")
    y.backward(g)
    y_ref, dx_ref, dw_ref = _reference(x, w, g, 0.37)
    assert_close(y, y_ref, atol=1e-12, rtol=1e-10, what="forward")
    assert_close(x.grad, dx_ref, atol=1e-12, rtol=1e-10, what="input gradient")
    assert_close(w.grad, dw_ref, atol=1e-12, rtol=1e-10, what="kernel gradient")


def test_three_dimensional_input_keeps_its_shape():
    w = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 36, dtype=torch.float64, requires_grad=True)
    y = block_circulant_product(x, w, transform="dft")
    assert y.shape == (2, 5, 24)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, dx_ref, dw_ref = _reference(x.reshape(10, 36), w, g.reshape(10, 24), 1.0)
    assert_close(y.reshape(10, 24), y_ref, atol=1e-12, rtol=1e-10, what="forward")
    assert_close(x.grad.reshape(10, 36), dx_ref, atol=1e-12, rtol=1e-10, what="input gradient")
    assert_close(w.grad, dw_ref, atol=1e-12, rtol=1e-10, what="kernel gradient")


@pytest.mark.parametrize("shape", [(2, 3, 12), (3, 2, 24), (1, 2, 48), (2, 2, 5)])
def test_gradcheck(shape):
    q_out, q_in, p = shape
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, q_in * p, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: block_circulant_product(x, w, scale=0.5, transform="dft"), (x, w))


@pytest.mark.parametrize("shape", [(3, 2, 24), (2, 16, 12)])
def test_kernel_gradient_function_from_activations_or_spectra(shape):
    """The pure function another backend calls: from x and g, and from their spectra, equal to the reference."""
    q_out, q_in, p = shape
    x = torch.randn(2, 7, q_in * p, dtype=torch.float64)
    g = torch.randn(2, 7, q_out * p, dtype=torch.float64)
    w = torch.randn(shape, dtype=torch.float64)
    _, _, dw_ref = _reference(x.reshape(14, -1), w, g.reshape(14, -1), 0.25)
    from_activations = dft_kernel_grad(x, g, p, 0.25, out_dtype=torch.float64)
    from_spectra = dft_kernel_grad(None, None, p, 0.25, x_spec=spectrum(x, p), g_spec=spectrum(g, p),
                                   out_dtype=torch.float64)
    assert_close(from_activations, dw_ref, atol=1e-12, rtol=1e-10, what="from x and g")
    assert_close(from_spectra, dw_ref, atol=1e-12, rtol=1e-10, what="from spectra")


def test_gauss_and_stacked_mixing_agree():
    spec = torch.randn(2, 7, 11, 5, dtype=torch.float64)
    mr, mi = torch.randn(7, 5, 3, dtype=torch.float64), torch.randn(7, 5, 3, dtype=torch.float64)
    expected = torch.einsum("fnj,fji->fni", torch.complex(spec[0], spec[1]), torch.complex(mr, mi))
    for form in ("stacked", "gauss"):
        out = mix(spec, mr, mi, form)
        assert_close(out[0], expected.real, atol=1e-12, rtol=1e-12, what=f"{form} real")
        assert_close(out[1], expected.imag, atol=1e-12, rtol=1e-12, what=f"{form} imag")


# Each GEMM rounds its result to the dtype: errors scale with the largest value of each tensor, so the tolerances
# are relative to the reference's largest magnitude.
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 1.5e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("shape", [(3, 2, 48), (2, 4, 24)])
def test_low_precision_against_float64(dtype, tol, shape):
    q_out, q_in, p = shape
    w = torch.randn(shape, requires_grad=True)
    x = torch.randn(6, q_in * p).to(dtype).requires_grad_()
    g = torch.randn(6, q_out * p).to(dtype)
    scale = 1 / (q_in * p)
    y = block_circulant_product(x, w, scale=scale, transform="dft")
    y.backward(g)
    assert y.dtype == x.grad.dtype == dtype and w.grad.dtype == torch.float32
    for what, got, ref in zip(("forward", "input gradient", "kernel gradient"), (y, x.grad, w.grad),
                              _reference(x, w, g, scale)):
        bound = tol * float(ref.detach().abs().max())
        assert_close(got, ref, atol=bound, rtol=0, what=f"{dtype} {what}")


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transform, op, kept, recomputed", [
    # rfft/fft backward: transforms of g and w; of x too only when its spectrum was not kept.
    ("rfft", "_fft_r2c", 2, 3), ("fft", "_fft_r2c", 2, 3),
    # dft backward: GEMMs for g's spectrum, w's spectrum, the two inverses; x's spectrum one more.
    ("dft", "mm", 4, 5)])
def test_backward_transforms_x_only_when_its_spectrum_was_not_kept(transform, op, kept, recomputed, monkeypatch):
    w = torch.randn(8, 8, 12, requires_grad=True)  # 64 block pairs: the torch.fft routes' bmm path
    x = torch.randn(5, 96, requires_grad=True)
    for factor, expected in ((2.0, kept), (0.0, recomputed)):
        monkeypatch.setattr(_dft, "KEEP_SPECTRUM_FACTOR", factor)
        y = block_circulant_product(x, w, transform=transform)
        with _OpCounter() as counter:
            y.backward(torch.ones_like(y))
        assert counter.counts.get(op, 0) == expected, (factor, counter.counts)


def test_bf16_activations_keep_no_float32_spectrum_in_the_fft_routes():
    """The rule: a complex64 spectrum of bf16 activations costs ≈ 2x (rfft) their bytes, more than the factor."""
    w = torch.randn(8, 8, 12, requires_grad=True)
    x = torch.randn(5, 96).to(torch.bfloat16).requires_grad_()
    y = block_circulant_product(x, w, transform="rfft")
    saved = y.grad_fn.saved_tensors[0]
    assert saved.dtype == torch.bfloat16 and saved.shape == x.shape
    y_dft = block_circulant_product(x, w, transform="dft")
    assert y_dft.grad_fn.saved_tensors[0].dtype == torch.bfloat16  # the dft spectrum has x's dtype: kept
    assert y_dft.grad_fn.saved_tensors[0].dim() == 4
