"""Equality with PEFT's C3A (forward only: PEFT's hand-written backward is wrong for p > 2) and conversion."""

import re

import pytest
import torch
from torch import nn

import circtune

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("d_in, d_out, p", [(64, 64, 16), (96, 192, 48), (192, 96, 96), (60, 60, 5)])
@pytest.mark.parametrize("backend, transform", [("torch", "rfft"), ("torch", "fft"), ("dense", "rfft")])
def test_forward_equals_peft_c3a(d_in, d_out, p, backend, transform):
    from peft.tuners.c3a.layer import C3ALinear as PeftC3ALinear

    base = nn.Linear(d_in, d_out)
    ours = circtune.C3ALinear(base, p, backend=backend, transform=transform, init="gaussian")
    theirs = PeftC3ALinear(nn.Linear(d_in, d_out), "default", peft.C3AConfig(block_size=p), p)
    theirs.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        theirs.c3a_kernel["default"].copy_(ours.kernel)
        x = torch.randn(3, 5, d_in)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"a": nn.Linear(64, 128), "b": nn.Linear(128, 64)})
        self.head = nn.Linear(64, 64)

    def forward(self, x):
        return self.head(self.block["b"](torch.relu(self.block["a"](x))))


CONFIG = {"format": circtune.FORMAT, "base_model": "net",
          "layers": {"block.a": {"method": "c3a", "block_size": 32}, "block.b": {"method": "c3a", "block_size": 16},
                     "head": {"method": "c3a", "block_size": 32}}}


def _net():
    torch.manual_seed(0)
    return _Net()


def test_to_peft_config_has_one_pattern_per_layer():
    pc = circtune.to_peft_config(CONFIG)
    assert pc.block_size == 32 and set(pc.target_modules) == {"block.a", "block.b", "head"}
    assert list(pc.block_size_pattern.values()) == [32, 16]

    def block_size(module_name):  # PEFT 0.21's C3A: the first key k with re.match(rf".*\.{k}$", name), else block_size
        hits = [p for k, p in pc.block_size_pattern.items() if re.match(rf".*\.{k}$", module_name)]
        return hits[0] if hits else pc.block_size

    # Each key matches its layer in the model and under any prefix (a task model around it), nothing else.
    assert [block_size(n) for n in ("block.a", "block.b", "net.block.a", "net.block.b", "m.net.block.b")] == \
        [32, 16, 32, 16, 16]
    assert not any(re.match(rf".*\.{k}$", n) for k in pc.block_size_pattern
                   for n in ("xblock.b", "block.bb", "block.b.c", "block.a.b", "netblock.b"))
    cfg = {**CONFIG, "layers": {**CONFIG["layers"], "head": {"method": "cdvft", "block_size": 32}}}
    with pytest.raises(ValueError, match=r"only express C3A layers; these are not: head \(cdvft\)"):
        circtune.to_peft_config(cfg)


def test_weights_convert_both_ways(tmp_path):
    ours = circtune.apply_adapter(_net(), CONFIG)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(4, 64)
    with torch.no_grad():
        expected = ours(x)
    circtune.export_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(_net(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), expected, atol=1e-5, rtol=1e-4)

    theirs.save_pretrained(tmp_path / "peft-again")
    back = circtune.import_peft(_net(), tmp_path / "peft-again")
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, atol=1e-6, rtol=1e-6)
    assert {n: m.block_size for n, m in back.named_modules() if isinstance(m, circtune.C3ALinear)} == \
        {"block.a": 32, "block.b": 16, "head": 32}
