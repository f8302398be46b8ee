"""The fused relative-position attention is the plain formulation, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_, rel_err

from cadsam.sam.image_encoder import Attention


@pytest.mark.parametrize(
    ("table_size", "grid"),
    [((24, 20), (24, 20)), ((7, 7), (7, 7)), ((10, 10), (12, 9))],
    ids=["global-nonsquare", "window", "resampled-table"],
)
def test_fused_equals_plain_forward_and_backward(table_size, grid):
    plain = Attention(dim=64, num_heads=2, input_size=table_size, fused=False).double()
    randomize_(plain, seed=11)
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(3, *grid, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    x_plain, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_fused = plain(x_plain), fused(x_fused)
    assert rel_err(out_fused, out_plain) < 1e-10
    upstream = torch.randn_like(out_plain)
    out_plain.backward(upstream)
    out_fused.backward(upstream)
    assert rel_err(x_fused.grad, x_plain.grad) < 1e-10
    for (name, p_plain), p_fused in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert rel_err(p_fused.grad, p_plain.grad) < 1e-10, name


def test_fused_equals_plain_in_fp32():
    plain = Attention(dim=96, num_heads=3, input_size=(16, 16), fused=False)
    randomize_(plain, seed=13)
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(2, 16, 16, 96, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert rel_err(fused(x), plain(x)) < 1e-5


def test_relative_position_bias_changes_the_output():
    """Guards the test above: with a non-zero table the bias matters, so equality means something."""
    attn = Attention(dim=64, num_heads=2, input_size=(8, 8))
    randomize_(attn, seed=15)
    x = torch.randn(1, 8, 8, 64)
    with torch.no_grad():
        with_bias = attn(x)
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
        assert rel_err(attn(x), with_bias) > 1e-2
