"""The oracle itself, against matrices written out by hand."""

import torch
from reference import block_circulant_reference, cdvft_delta_reference


def test_single_block_matches_hand_written_circulant():
    w = torch.tensor([[[1.0, 2.0, 3.0]]])
    # First row is w; each row shifts right by one: C[u, t] = w[(t - u) mod 3].
    expected = torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]], dtype=torch.float64)
    assert torch.equal(block_circulant_reference(w), expected)


def test_blocks_are_placed_by_output_then_input_block():
    w = torch.zeros(2, 3, 2)
    w[1, 2] = torch.tensor([5.0, 7.0])  # block (i=1, j=2): rows 2..3, columns 4..5
    dense = block_circulant_reference(w)
    assert dense.shape == (4, 6)
    assert torch.equal(dense[2:4, 4:6], torch.tensor([[5.0, 7.0], [7.0, 5.0]], dtype=torch.float64))
    assert dense.abs().sum() == 24.0


def test_cdvft_reference_is_the_product_of_its_factors():
    d1, d2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    c = torch.tensor([[[0.5, 4.0]]])
    expected = 2.0 * torch.diag(d2.double()) @ torch.tensor([[0.5, 4.0], [4.0, 0.5]], dtype=torch.float64) \
        @ torch.diag(d1.double())
    assert torch.equal(cdvft_delta_reference([d1, d2], [c], alpha=2.0), expected)
